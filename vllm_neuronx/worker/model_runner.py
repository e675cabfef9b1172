"""Turns vLLM's SchedulerOutput into backend calls, and tokens back into vLLM's output.

It knows only the backend protocol. It keeps, per running request, its KV line
and its tokens; lines are freed when vLLM reports the request finished or aborted.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_neuronx import sampling
from vllm_neuronx.backends import NeuronBackend
from vllm_neuronx.log import get_logger
from vllm_neuronx.worker.inputs import SequenceRow, StepInputs, decode_inputs, prefill_inputs
from vllm_neuronx.worker.kv_lines import KVLinePool

logger = get_logger(__name__)


class NeuronModelRunner:
    def __init__(self, backend: NeuronBackend) -> None:
        self.backend = backend
        self.lines = KVLinePool(backend.num_lines)
        self.requests: dict[str, SequenceRow] = {}
        self._pending: StepInputs | None = None
        # Host-side sampling (on-device sampling off) uses the same rules.
        self._host_generator = torch.Generator().manual_seed(backend.seed)

    @property
    def _topk_limit(self) -> int:
        """top_k "off" means all candidates the sampler sees: global_topk, or the vocab."""
        return self.backend.global_topk or self.backend.vocab_size

    def _sampling_row(self, params) -> tuple[int, float, float]:
        return sampling.sampling_row(
            params.temperature, params.top_k, params.top_p, self._topk_limit
        )

    def _forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
        self.lines.release(req_id)

    def execute_model(self, scheduler_output) -> ModelRunnerOutput | None:
        """Admit new requests, free finished ones, and stage this step's inputs."""
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
        new = scheduler_output.scheduled_new_reqs
        cached = scheduler_output.scheduled_cached_reqs
        if cached.resumed_req_ids:
            raise RuntimeError(
                f"requests {sorted(cached.resumed_req_ids)} were preempted; the Neuron "
                "scheduler never preempts, so this is a scheduling bug"
            )
        if new and cached.req_ids:
            raise RuntimeError("prefill and decode were scheduled in one step; NxDI forbids it")
        if new:
            rows = []
            for req in new:
                if req.num_computed_tokens:
                    raise RuntimeError(
                        f"request {req.req_id} arrived with {req.num_computed_tokens} cached "
                        "tokens; prefix caching must be off on Neuron"
                    )
                row = SequenceRow(
                    req.req_id,
                    self.lines.allocate(req.req_id),
                    list(req.prompt_token_ids),
                    self._sampling_row(req.sampling_params),
                )
                self.requests[req.req_id] = row
                rows.append(row)
            self._pending = prefill_inputs(rows)
        elif cached.req_ids:
            rows = []
            for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
                row = self.requests[req_id]
                if computed != len(row.token_ids) - 1:
                    raise RuntimeError(
                        f"request {req_id}: scheduler computed {computed} tokens, runner holds "
                        f"{len(row.token_ids)}"
                    )
                rows.append(row)
            self._pending = decode_inputs(rows)
        else:
            self._pending = None
        return None

    def sample_tokens(self, grammar_output=None) -> ModelRunnerOutput:
        """Run the staged step on the backend; one new token per request."""
        step, self._pending = self._pending, None
        if step is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        out = self.backend.forward(
            step.input_ids, step.position_ids, step.seq_ids, step.sampling_params
        )
        tokens = out.tokens
        if tokens is None:
            tokens = sampling.sample(
                out.logits, step.sampling_params, self._topk_limit, self._host_generator
            )
        sampled = tokens.tolist()
        for req_id, token in zip(step.req_ids, sampled, strict=True):
            self.requests[req_id].token_ids.append(token)
        return ModelRunnerOutput(
            req_ids=step.req_ids,
            req_id_to_index={r: i for i, r in enumerate(step.req_ids)},
            sampled_token_ids=[[t] for t in sampled],
        )

    @property
    def lines_in_use(self) -> int:
        return self.lines.in_use
