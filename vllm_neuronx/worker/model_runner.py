"""Turns vLLM's SchedulerOutput into backend calls, and tokens back into vLLM's output.

It knows only the backend protocol. It keeps, per running request, its KV line
and its tokens; lines are freed when vLLM reports the request finished or aborted.

Sampling has two paths in one batch. A request that needs only temperature,
top_k and top_p is sampled on the device (or, with on-device sampling off, by
the same rules on the host). A request that needs more is sampled by upstream
vLLM's sampler from the logits the backend returns (``host_sampler``); the
device's token for it is not used.

With LoRA on, each request's adapter is taken from the host pool (``lora.pool``) when it
is admitted and given back when it finishes; a prefill step tells the backend each row's
adapter (``adapter_indices``), which binds it to the row's KV line for the decode steps.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_neuronx import sampling
from vllm_neuronx.backends import NeuronBackend
from vllm_neuronx.log import get_logger
from vllm_neuronx.lora import peft
from vllm_neuronx.lora.pool import AdapterPool
from vllm_neuronx.worker.host_sampler import HostSampler, merge_logprobs
from vllm_neuronx.worker.inputs import SequenceRow, StepInputs, decode_inputs, prefill_inputs
from vllm_neuronx.worker.kv_lines import KVLinePool
from vllm_neuronx.worker.step_times import StepTimes

logger = get_logger(__name__)


class NeuronModelRunner:
    def __init__(self, backend: NeuronBackend, vllm_config) -> None:
        self.backend = backend
        self.capabilities = backend.capabilities
        self.lines = KVLinePool(backend.num_lines)
        self.requests: dict[str, SequenceRow] = {}
        self._pending: StepInputs | None = None
        self.step_times = StepTimes()
        # Plain requests with on-device sampling off are sampled by the device's rules.
        self._host_generator = torch.Generator().manual_seed(backend.seed)
        self.host = HostSampler(
            vllm_config,
            vocab_size=backend.vocab_size,
            max_num_reqs=backend.num_lines,
            max_len=int(backend.neuron_config["seq_len"]),
        )
        if self.host.custom_logitsprocs and not self.capabilities.logits:
            raise ValueError(
                "custom logits processors (--logits-processors, or an installed "
                "vllm.logits_processors plugin) need the logits on the host, but this model "
                f"returns only device-sampled tokens; {self.capabilities.enable_logits}"
            )
        self.lora: AdapterPool | None = None
        lora_config = vllm_config.lora_config
        if lora_config is not None:
            max_cpu_loras = lora_config.max_cpu_loras or lora_config.max_loras
            backend.init_lora(lora_config.max_loras, lora_config.max_lora_rank, max_cpu_loras)
            dims = peft.ModelDims.from_hf(vllm_config.model_config.hf_text_config)
            self.lora = AdapterPool(backend, lora_config, dims)

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
        self.host.forget(req_id)
        if self.lora is not None:
            self.lora.release(req_id)

    def _admit(self, req) -> SequenceRow:
        params = req.sampling_params
        on_host = self.host.needs_host(params)
        if on_host:
            if not self.capabilities.logits:
                raise RuntimeError(
                    f"request {req.req_id} needs sampling on the host "
                    f"({sampling.host_parameters(params)}) but the backend returns no logits; "
                    "request validation should have refused it"
                )
            self.host.admit(req.req_id, req.prompt_token_ids, params)
        adapter = None
        if req.lora_request is not None:
            if self.lora is None:
                raise RuntimeError(
                    f"request {req.req_id} names LoRA adapter {req.lora_request.lora_name!r} "
                    "but LoRA is not enabled; request validation should have refused it"
                )
            adapter = self.lora.acquire(req.req_id, req.lora_request)
        return SequenceRow(
            req.req_id,
            self.lines.allocate(req.req_id),
            list(req.prompt_token_ids),
            sampling.GREEDY_ROW if on_host else self._sampling_row(params),
            adapter,
        )

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
                row = self._admit(req)
                self.requests[req.req_id] = row
                rows.append(row)
            self._pending = prefill_inputs(rows)
            if self.lora is not None:
                self._pending.adapter_ids = self._adapter_ids(rows)
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

    def _adapter_ids(self, rows: list[SequenceRow]) -> torch.Tensor:
        """The backend's adapter index of each prefill row; the adapters of the running
        requests outside this step keep their slots."""
        step = {r.req_id for r in rows}
        live: dict[int, object] = {}
        for row in self.requests.values():
            if row.adapter is not None and row.req_id not in step:
                live[id(row.adapter)] = row.adapter
        return self.backend.adapter_indices([r.adapter for r in rows], list(live.values()))

    def sample_tokens(self, grammar_output=None) -> ModelRunnerOutput:
        """Run the staged step on the backend; one new token per request."""
        step, self._pending = self._pending, None
        if step is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        host_rows = [i for i, req_id in enumerate(step.req_ids) if req_id in self.host]
        wants_prompt = [
            step.is_prefill and self.host.wants_prompt_logprobs(r) for r in step.req_ids
        ]
        extra = {}
        if any(wants_prompt):
            if not self.capabilities.prompt_logits:
                raise RuntimeError(
                    "prompt_logprobs reached a backend without prompt logits; request "
                    "validation should have refused it"
                )
            extra["prompt_logits"] = torch.tensor(wants_prompt)
        if step.adapter_ids is not None:
            extra["adapter_ids"] = step.adapter_ids
        out = self.step_times.timed(
            "prefill" if step.is_prefill else "decode", len(step.req_ids), self.backend.forward,
            step.input_ids, step.position_ids, step.seq_ids, step.sampling_params, **extra
        )
        if host_rows and out.logits is None:
            raise RuntimeError(
                f"{type(self.backend).__name__} returned no logits although its sampling "
                "capabilities say it does"
            )
        sampled = self._device_tokens(out, step, host_rows)
        logprobs = None
        if host_rows:
            host = self.host.sample(
                [step.req_ids[i] for i in host_rows], out.logits[host_rows], grammar_output
            )
            for i, token in zip(host_rows, host.tokens, strict=True):
                sampled[i] = token
            logprobs = merge_logprobs(len(sampled), host_rows, host.logprobs)
        prompt_logprobs = {
            req_id: self.host.prompt_logprobs(req_id, out.prompt_logits[i])
            for i, req_id in enumerate(step.req_ids)
            if wants_prompt[i]
        }
        for req_id, token in zip(step.req_ids, sampled, strict=True):
            self.requests[req_id].token_ids.append(token)
        return ModelRunnerOutput(
            req_ids=step.req_ids,
            req_id_to_index={r: i for i, r in enumerate(step.req_ids)},
            sampled_token_ids=[[t] for t in sampled],
            logprobs=logprobs,
            prompt_logprobs_dict=prompt_logprobs,
        )

    def _device_tokens(self, out, step: StepInputs, host_rows: list[int]) -> list[int]:
        """The device's tokens; with on-device sampling off, the device's rules applied
        on the host to the rows not sampled by the host sampler (their tokens are 0)."""
        if out.tokens is not None:
            return out.tokens.tolist()
        sampled = [0] * len(step.req_ids)
        skip = set(host_rows)
        plain = [i for i in range(len(sampled)) if i not in skip]
        if plain:
            rows = torch.tensor(plain)
            tokens = sampling.sample(
                out.logits[rows],
                step.sampling_params[rows],
                self._topk_limit,
                self._host_generator,
            )
            for i, token in zip(plain, tokens.tolist(), strict=True):
                sampled[i] = token
        return sampled

    @property
    def lines_in_use(self) -> int:
        return self.lines.in_use
