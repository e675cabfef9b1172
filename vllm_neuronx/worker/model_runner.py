"""Turns vLLM's SchedulerOutput into backend calls, and tokens back into vLLM's output.

It knows only the backend protocol. It keeps, per running request, its KV line
and its tokens; lines are freed when vLLM reports the request finished or aborted.

Sampling has two paths in one batch. A request that needs only temperature,
top_k and top_p is sampled on the device (or, with on-device sampling off, by
the same rules on the host). A request that needs more is sampled by upstream
vLLM's sampler from the logits the backend returns (``host_sampler``); the
device's token for it is not used.

With fused speculation (``vllm_neuronx.speculation``) a decode step yields 1 to k tokens
per row. vLLM's scheduler accounts for them as it does for any proposer: after each step
the runner hands it n = k - 1 placeholder drafts per device-sampled row
(``take_draft_token_ids``; their values are never read, the device drafts its own), the
next step schedules 1 + n tokens for the row (fewer near max_model_len), and the runner
returns at most that many, so upstream's rejected-token count, spec-decode metrics and stop
checks (EOS, max_tokens inside an accepted run) are its own. Rows sampled on the host get no
placeholders and keep one token per step (the target's, from the first position's logits).

With the block KV layout (prefix caching: ``block_kv``), each row also carries vLLM's
blocks of its sequence and the prefix its cache already holds; a prefill passes the whole
sequence with the slots of the rest (``inputs.with_blocks``). A request vLLM preempts
gives its KV line back and keeps its tokens and sampling state; it comes back as a
resumed request, a prefill of everything it has, over its cached prefix.

With LoRA on, each request's adapter is taken from the host pool (``lora.pool``) when it
is admitted and given back when it finishes; a prefill step tells the backend each row's
adapter (``adapter_indices``), which binds it to the row's KV line for the decode steps.

With vLLM's asynchronous scheduling (vLLM schedules step N+1 while step N runs) the
backend's calls run on a thread of their own, the device thread, in the order vLLM asks
for them; ``sample_tokens`` queues the step there and returns at once. Step N+1's inputs
are built on vLLM's thread while step N runs; the rows whose last token step N is still
computing get it on the device thread the moment N ends, from N's device tokens (an index
copy), so the device waits for nothing else. N's output (token lists, host sampling,
logprobs) is handled on vLLM's output thread while N+1 runs. One lock keeps the runner's
state (requests, KV lines, host sampler) whole between those threads. Where step N+1
needs more of step N than its device tokens (a row sampled on the host, or on-device
sampling off), the device thread waits until N's output is handled: that step does not
overlap.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from vllm.v1.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    AsyncModelRunnerOutput,
    DraftTokenIds,
    ModelRunnerOutput,
)

from vllm_neuronx import sampling
from vllm_neuronx.backends import ForwardOutput, NeuronBackend
from vllm_neuronx.backends.protocol import Batch
from vllm_neuronx.log import get_logger
from vllm_neuronx.lora import peft
from vllm_neuronx.lora.pool import AdapterPool
from vllm_neuronx.worker.device_thread import DeviceThread, Result
from vllm_neuronx.worker.host_sampler import HostSampler, merge_logprobs
from vllm_neuronx.worker.inputs import (
    SequenceRow,
    StepInputs,
    chunked_inputs,
    decode_inputs,
    prefill_inputs,
    with_blocks,
)
from vllm_neuronx.worker.kv_lines import KVLinePool
from vllm_neuronx.worker.step_times import StepTimes

logger = get_logger(__name__)

# Python's GIL switch interval with asynchronous scheduling (see NeuronModelRunner).
DEVICE_THREAD_SWITCH_S = 50e-6


class NeuronModelRunner:
    def __init__(self, backend: NeuronBackend, vllm_config) -> None:
        self.backend = backend
        self.capabilities = backend.capabilities
        self.lines = KVLinePool(backend.num_lines)
        self.block_layout = backend.block_layout
        self.requests: dict[str, SequenceRow] = {}
        self._pending: StepInputs | None = None
        # Asynchronous scheduling: the device thread, the lock on the runner's state, the
        # last step queued there, and an error of an execute_model (raised by the
        # sample_tokens after it, whose output vLLM waits for).
        self._device = DeviceThread() if vllm_config.scheduler_config.async_scheduling \
            else None
        self._lock = threading.RLock()
        self._queued: _Queued | None = None
        self._follow: _Follow | None = None
        self._staging_error: BaseException | None = None
        self._closing = False
        if self._device is not None:
            # The device thread must go on the moment its device call returns, not when
            # another thread next lets go of the GIL: with Python's default 5 ms switch
            # interval it waited about 1 ms behind vLLM's output handling, every step.
            sys.setswitchinterval(min(sys.getswitchinterval(), DEVICE_THREAD_SWITCH_S))
        self.step_times = StepTimes()
        # Fused speculation: vLLM's n (placeholder drafts per row), and the rows of the last
        # step that get them (take_draft_token_ids).
        self.num_drafts = max(0, backend.speculation_length - 1)
        spec = vllm_config.speculative_config
        if self.num_drafts != (spec.num_speculative_tokens if spec is not None else 0):
            raise RuntimeError(
                f"the compiled model speculates {self.num_drafts} tokens per step but vLLM's "
                f"speculative_config asks for "
                f"{spec.num_speculative_tokens if spec is not None else 0}")
        self._drafted: list[str] = []
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
            self.lora = AdapterPool(_InOrder(backend, self.serialized), lora_config, dims)

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
        row = SequenceRow(
            req.req_id,
            self.lines.allocate(req.req_id),
            list(req.prompt_token_ids),
            sampling.GREEDY_ROW if on_host else self._sampling_row(params),
            adapter,
        )
        if req.num_computed_tokens and self.block_layout is None:
            raise RuntimeError(
                f"request {req.req_id} arrived with {req.num_computed_tokens} cached tokens; "
                "prefix caching is off with contiguous KV lines")
        if self.block_layout is not None:
            row.blocks, row.computed = list(req.block_ids[0]), req.num_computed_tokens
        return row

    def _resume(self, req_id: str, blocks: list[int], computed: int) -> SequenceRow:
        """A request vLLM preempted, back with new blocks: a prefill of all it has."""
        row = self.requests[req_id]
        self.lines.release(req_id)  # given back at the preemption already, as a rule
        row.line = self.lines.allocate(req_id)
        row.blocks, row.computed = list(blocks), computed
        return row

    def _preempted(self, req_ids) -> None:
        """vLLM took these requests' blocks back: their KV lines go too; their tokens and
        sampling state stay for the resume."""
        if req_ids and self.block_layout is None:
            raise RuntimeError(
                f"requests {sorted(req_ids)} were preempted; with one KV line per sequence "
                "the Neuron scheduler never preempts, so this is a scheduling bug")
        for req_id in req_ids or ():
            self.lines.release(req_id)

    def execute_model(self, scheduler_output) -> ModelRunnerOutput | None:
        """Admit new requests, free finished ones, and stage this step's inputs."""
        if self._device is None:
            return self._stage(scheduler_output)
        with self._lock:
            try:
                return self._stage(scheduler_output)
            except Exception as e:  # raised by the sample_tokens after it
                self._pending, self._staging_error = None, e
                return None

    def serialized(self, fn, *args):
        """``fn(*args)`` in order with the steps (on the device thread, where there is
        one): every call on the backend goes through here or ``forward``."""
        if self._device is None or self._device.current:
            return fn(*args)
        return self._device.submit(fn, *args).result()

    def _stage(self, scheduler_output) -> ModelRunnerOutput | None:
        self._follow = None
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
        self._preempted(scheduler_output.preempted_req_ids)
        new = scheduler_output.scheduled_new_reqs
        cached = scheduler_output.scheduled_cached_reqs
        if self.block_layout is not None and self.block_layout.chunked_prefill:
            self._pending = self._chunked_step(scheduler_output) if new or cached.req_ids \
                else None
            return None
        resumed = [i for i, r in enumerate(cached.req_ids) if r in cached.resumed_req_ids]
        if (new or resumed) and len(resumed) != len(cached.req_ids):
            raise RuntimeError("prefill and decode were scheduled in one step; NxDI forbids it")
        if new or resumed:
            rows = []
            for req in new:
                row = self._admit(req)
                self.requests[req.req_id] = row
                rows.append(row)
            for i in resumed:
                rows.append(self._resume(cached.req_ids[i], cached.new_block_ids[i][0],
                                         cached.num_computed_tokens[i]))
            self._pending = prefill_inputs(rows)
            if self.lora is not None:
                self._pending.adapter_ids = self._adapter_ids(rows)
        elif cached.req_ids:
            rows, ahead = [], []
            before = self._queued if self._queued is not None and not self._queued.handled \
                else None
            running = before.index if before is not None else {}
            for i, (req_id, computed) in enumerate(zip(cached.req_ids,
                                                       cached.num_computed_tokens, strict=True)):
                row = self.requests[req_id]
                if computed == len(row.token_ids) and req_id in running:
                    ahead.append(row)  # its last token: the step still running
                elif computed != len(row.token_ids) - 1:
                    raise RuntimeError(
                        f"request {req_id}: scheduler computed {computed} tokens, runner holds "
                        f"{len(row.token_ids)}"
                    )
                if self.block_layout is not None and cached.new_block_ids[i] is not None:
                    row.blocks.extend(cached.new_block_ids[i][0])
                rows.append(row)
            self._pending = decode_inputs(rows, {r.req_id for r in ahead})
            if ahead:
                self._follow = _Follow.of(self._pending, ahead, before, running)
            if self.num_drafts:
                self._pending.keep = self._kept_tokens(self._pending.req_ids, scheduler_output)
        else:
            self._pending = None
        if self._pending is not None and self.block_layout is not None:
            ordered = [self.requests[r] for r in self._pending.req_ids]
            with_blocks(self._pending, ordered, self.block_layout, self.backend.max_length)
        # Nothing to run: the step's output now (asynchronous scheduling samples no such step).
        return EMPTY_MODEL_RUNNER_OUTPUT if self._pending is None else None

    def _chunked_step(self, scheduler_output) -> StepInputs:
        """A step of upstream's own scheduling (chunked prefill): new requests' first
        chunks, running prompts' next chunks and decodes, in one call."""
        scheduled = scheduler_output.num_scheduled_tokens
        cached = scheduler_output.scheduled_cached_reqs
        rows, computed = [], []
        for req in scheduler_output.scheduled_new_reqs:
            row = self.requests[req.req_id] = self._admit(req)
            rows.append(row)
            computed.append(req.num_computed_tokens)
        for i, req_id in enumerate(cached.req_ids):
            blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                row = self._resume(req_id, blocks[0], cached.num_computed_tokens[i])
            else:
                row = self.requests[req_id]
                if blocks is not None:
                    row.blocks.extend(blocks[0])
            rows.append(row)
            computed.append(cached.num_computed_tokens[i])
        counts = [scheduled[r.req_id] for r in rows]
        for row, c, n in zip(rows, computed, counts, strict=True):
            if c + n > len(row.token_ids):
                raise RuntimeError(
                    f"request {row.req_id}: {n} tokens scheduled from position {c}, but the "
                    f"runner holds {len(row.token_ids)}")
        return chunked_inputs(rows, counts, computed, self.block_layout,
                              self.backend.max_length)

    def _kept_tokens(self, req_ids: list[str], scheduler_output) -> list[int]:
        """Fused speculation: the tokens each row may keep, 1 + the drafts vLLM scheduled
        (which it caps near max_model_len; a row sampled on the host got none)."""
        drafts = scheduler_output.scheduled_spec_decode_tokens
        keep = []
        for req_id in req_ids:
            n = len(drafts.get(req_id, ()))
            if scheduler_output.num_scheduled_tokens[req_id] != 1 + n:
                raise RuntimeError(
                    f"request {req_id}: {scheduler_output.num_scheduled_tokens[req_id]} tokens "
                    f"scheduled with {n} drafts; a Neuron decode step takes 1 + the drafts")
            keep.append(1 + n)
        return keep

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """n placeholder drafts for each device-sampled row of the last step: vLLM then
        schedules (and accounts for) the tokens the next fused step may yield."""
        if not self.num_drafts:
            return None
        rows, self._drafted = self._drafted, []
        return DraftTokenIds(rows, [[0] * self.num_drafts for _ in rows])

    def _adapter_ids(self, rows: list[SequenceRow]) -> torch.Tensor:
        """The backend's adapter index of each prefill row; the adapters of the running
        requests outside this step keep their slots."""
        step = {r.req_id for r in rows}
        live: dict[int, object] = {}
        for row in self.requests.values():
            if row.adapter is not None and row.req_id not in step:
                live[id(row.adapter)] = row.adapter
        return self.serialized(self.backend.adapter_indices, [r.adapter for r in rows],
                               list(live.values()))

    def sample_tokens(self, grammar_output=None) -> ModelRunnerOutput | AsyncModelRunnerOutput:
        """Run the staged step on the backend; one new token per request. With
        asynchronous scheduling it is queued on the device thread and this returns at once."""
        error, self._staging_error = self._staging_error, None
        if error is not None:
            raise error
        step, self._pending = self._pending, None
        follow, self._follow = self._follow, None
        if step is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if self._device is None:
            queued = self._queue(step, grammar_output)
            out = self._forward(queued)
            self._timed(queued)
            return self._finish(queued, out)
        with self._lock:
            queued = self._queue(step, _own(grammar_output))
        queued.done = threading.Event()
        queued.follow = follow
        queued.device = self._device.submit(self._device_step, queued, step=True)
        self._queued = queued
        return _StepInFlight(self, queued)

    def _queue(self, step: StepInputs, grammar_output) -> _Queued:
        """The step's call: its host-sampled rows and the backend's extra inputs."""
        # A chunked step's rows still mid-prompt yield nothing (as upstream discards them).
        yields = step.sampled or [True] * len(step.req_ids)
        host_rows = [i for i, req_id in enumerate(step.req_ids)
                     if req_id in self.host and yields[i]]
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
        if step.blocks is not None:
            extra["blocks"] = step.blocks
        # Checked here, while the step before runs; tokens filled in later need no check.
        batch = self.backend.check_call(step.input_ids, step.position_ids, step.seq_ids,
                                        step.sampling_params, **extra)
        return _Queued(step, batch, yields, host_rows, wants_prompt, grammar_output)

    def _forward(self, queued: _Queued):
        start = time.perf_counter()
        queued.out = self.backend.run(queued.batch)
        queued.ran = (start, time.perf_counter())
        return queued.out

    def _timed(self, queued: _Queued) -> None:
        """The step's backend time, into the step times. Asynchronous scheduling records
        it when the output is handled, not on the device thread between two calls."""
        step = queued.step
        phase = "mixed" if step.chunked else "prefill" if step.is_prefill else "decode"
        self.step_times.record(phase, len(step.req_ids), *queued.ran)

    def _device_step(self, queued: _Queued):
        """On the device thread: the tokens of the step before, then this step's call."""
        follow = queued.follow
        if follow is not None and not follow.copied():
            follow.wait(self._device.launching, lambda: self._closing)
        self._device.launching()
        return self._forward(queued)

    def _handle(self, queued: _Queued) -> ModelRunnerOutput:
        """On vLLM's output thread (asynchronous scheduling): the step's output, once
        the device has it."""
        try:
            out = queued.device.result()
            with self._lock:
                queued.handled = True  # with its tokens, as staging sees it under the lock
                self._timed(queued)
                output = self._finish(queued, out)
            queued.ok = True
            return output
        finally:
            queued.handled = True
            # The follow-up and, through it, the step before: let go here, on vLLM's
            # output thread, never on the device thread (device_thread.py says why).
            queued.follow = None
            queued.done.set()

    def _finish(self, queued: _Queued, out) -> ModelRunnerOutput:
        """The step's tokens (device- and host-sampled) and logprobs, into vLLM's output
        and each request's tokens."""
        step = queued.step
        # A request aborted while its step ran is gone: its row's output is discarded.
        host_rows = [i for i in queued.host_rows if step.req_ids[i] in self.host]
        if host_rows and out.logits is None:
            raise RuntimeError(
                f"{type(self.backend).__name__} returned no logits although its sampling "
                "capabilities say it does"
            )
        sampled = self._device_tokens(out, step, host_rows)
        logprobs = None
        if host_rows:
            host = self.host.sample(
                [step.req_ids[i] for i in host_rows], out.logits[host_rows],
                queued.grammar_output
            )
            for i, token in zip(host_rows, host.tokens, strict=True):
                sampled[i] = token
            logprobs = merge_logprobs(len(sampled), host_rows, host.logprobs)
        prompt_logprobs = {
            req_id: self.host.prompt_logprobs(req_id, out.prompt_logits[i])
            for i, req_id in enumerate(step.req_ids)
            if queued.wants_prompt[i] and req_id in self.host
        }
        tokens = self._step_tokens(out, step, sampled, host_rows)
        tokens = [t if y else [] for t, y in zip(tokens, queued.yields, strict=True)]
        for req_id, new in zip(step.req_ids, tokens, strict=True):
            row = self.requests.get(req_id)
            if row is not None:
                row.token_ids.extend(new)
        if self.num_drafts:
            self._drafted = [r for r in step.req_ids if r not in self.host]
        return ModelRunnerOutput(
            req_ids=step.req_ids,
            req_id_to_index={r: i for i, r in enumerate(step.req_ids)},
            sampled_token_ids=tokens,
            logprobs=logprobs,
            prompt_logprobs_dict=prompt_logprobs,
        )

    @staticmethod
    def _step_tokens(out, step: StepInputs, sampled: list[int],
                     host_rows: list[int]) -> list[list[int]]:
        """Each row's new tokens: one, or a fused speculation step's accepted run (up to the
        row's ``keep``; a host-sampled row keeps its one host-sampled token)."""
        if out.spec_tokens is None or step.keep is None:
            return [[t] for t in sampled]
        runs = out.spec_tokens.tolist()
        host = set(host_rows)
        tokens = []
        for i, (run, keep) in enumerate(zip(runs, step.keep, strict=True)):
            if i in host:
                tokens.append([sampled[i]])
                continue
            count = next((j for j, t in enumerate(run) if t < 0), len(run))
            if count < 1 or run[0] != sampled[i]:
                raise RuntimeError(
                    f"fused speculation returned row {i} as {run} with first token "
                    f"{sampled[i]}: a step yields 1 or more tokens, the first in tokens")
            tokens.append(run[:min(count, keep)])
        return tokens

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

    def shutdown(self) -> None:
        if self._device is not None:
            self._closing = True
            self._device.shutdown()


def _own(grammar_output):
    """The step's own copy of its grammar bitmasks. vLLM's structured-output manager fills
    one buffer at every schedule and hands out a view of it; with the worker in the
    scheduler's process, a step whose output is handled after the next step is scheduled
    (asynchronous scheduling) would otherwise mask its rows with the next step's grammars
    (seen: a ``[0-9]{3}`` row sampling the ``no`` a choice grammar allowed)."""
    if grammar_output is None:
        return None
    return replace(grammar_output,
                   structured_output_request_ids=list(
                       grammar_output.structured_output_request_ids),
                   grammar_bitmask=np.array(grammar_output.grammar_bitmask, copy=True))


@dataclass(slots=True, eq=False)
class _Queued:
    """A step handed to the backend, until its output is handled."""

    step: StepInputs
    batch: Batch  # the step's call, checked
    yields: list[bool]
    host_rows: list[int]  # rows sampled on the host, from the logits
    wants_prompt: list[bool]
    grammar_output: object = None
    device: Result | None = None  # the backend's output (asynchronous scheduling)
    out: ForwardOutput | None = None  # the same, as the device thread has it
    ran: tuple[float, float] = (0.0, 0.0)  # the backend call's start and end
    # Its rows whose input token the step before computes (asynchronous scheduling):
    # held here, not by the device thread, and let go once this step is handled.
    follow: _Follow | None = None
    handled: bool = False  # its tokens are in the requests' (under the runner's lock)
    # Set once its output is handled (asynchronous scheduling: a step waiting on it).
    done: threading.Event | None = None
    ok: bool = False

    @property
    def index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.step.req_ids)}


@dataclass(slots=True)
class _Follow:
    """The rows of a step whose input token the step before is still computing."""

    before: _Queued
    input_ids: torch.Tensor  # this step's
    dst: torch.Tensor  # their rows in this step
    src: torch.Tensor  # their rows in the step before
    rows: list[SequenceRow]
    direct: bool  # all sampled on the device in the step before: its tokens are theirs
    # Every row of both steps, in the same order: this step's input_ids (address, bytes),
    # to copy the tokens into as they are; else None.
    same: tuple[int, int] | None

    @classmethod
    def of(cls, step: StepInputs, ahead: list[SequenceRow], before: _Queued,
           index: dict[str, int]) -> _Follow:
        """``index``: the row of each request in ``before``."""
        late = {r.req_id: r for r in ahead}
        dst = [i for i, r in enumerate(step.req_ids) if r in late]
        src = [index[step.req_ids[i]] for i in dst]
        host = set(before.host_rows)
        ids = step.input_ids
        same = (ids.data_ptr(), ids.numel() * ids.element_size()) \
            if dst == src and len(dst) == len(step.req_ids) == len(before.step.req_ids) \
            and ids.is_contiguous() else None
        return cls(before, ids, torch.tensor(dst), torch.tensor(src),
                   [late[step.req_ids[i]] for i in dst], not host.intersection(src), same)

    def copied(self) -> bool:
        """On the device thread, right after the step before ran there: its device tokens
        into this step's input_ids; False where they are known only once its output is
        handled (``wait``)."""
        out = self.before.out  # this thread ran it
        if out is None:
            raise RuntimeError("the step before this one failed")
        tokens = out.tokens
        if not self.direct or tokens is None:
            return False
        if self.same is not None and tokens.dtype is self.input_ids.dtype \
                and tokens.is_contiguous():
            # The same rows in the same order (a steady decode): the bytes, as they are.
            # After a wait for the device, a thread's first work runs about 10x slower than
            # warm on a 2-core VM (a torch op 140 µs, 7.7 warm); a memmove costs least.
            ctypes.memmove(self.same[0], tokens.data_ptr(), self.same[1])
        else:
            self.input_ids.view(-1).index_copy_(0, self.dst, tokens.index_select(0, self.src))
        return True

    def wait(self, release, closing) -> None:
        """Rows sampled on the host (or on-device sampling off): their tokens once the step
        before's output is handled on vLLM's output thread (``release`` gives it there)."""
        release()
        while not self.before.done.wait(0.05):
            if closing():
                raise RuntimeError("the runner shut down while a step waited for the one "
                                   "before it")
        if not self.before.ok:
            raise RuntimeError("the step before this one failed")
        self.input_ids.view(-1).index_copy_(0, self.dst,
                                            torch.tensor([r.token_ids[-1] for r in self.rows]))


class _InOrder:
    """The backend, each call of it in order with the steps (``NeuronModelRunner.serialized``):
    the LoRA pool's adapter loads come from vLLM's thread while a step may be running."""

    def __init__(self, backend: NeuronBackend, serialized) -> None:
        self._backend, self._serialized = backend, serialized

    def __getattr__(self, name: str):
        value = getattr(self._backend, name)
        if not callable(value):
            return value
        return lambda *args: self._serialized(value, *args)


class _StepInFlight(AsyncModelRunnerOutput):
    """A step on the device thread, as vLLM's engine waits for it."""

    def __init__(self, runner: NeuronModelRunner, queued: _Queued) -> None:
        self.runner, self.queued = runner, queued

    def get_output(self) -> ModelRunnerOutput:
        return self.runner._handle(self.queued)
