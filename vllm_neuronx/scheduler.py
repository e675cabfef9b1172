"""The V1 scheduler for Neuron: prefill-only or decode-only steps, never preemption.

NxDI runs context encoding and token generation as separate graphs, so a step is
either all prefill (new requests into free KV lines) or all decode. A prefill
step runs whenever a KV line is free and a request waits, which is continuous
batching: requests join as lines free up. Each request holds one block of
max_model_len tokens from its prefill on, so a decode never needs a block and the
upstream scheduler never has reason to preempt; if it ever did, that is a bug
we surface instead of silently recomputing.

With the block KV layout (prefix caching: block_kv.py) a request holds vLLM's blocks of
``pa_block_size`` instead, and the steps keep the same rule: a prefill step admits
waiting requests with whatever prefix vLLM's cache already holds for them, a decode step
grows the running ones block by block. When blocks run out, upstream preempts as it does
everywhere (the newest running request gives its blocks back and waits at the front of
the queue, then prefills again, its earlier blocks often still cached). With chunked
prefill, steps are upstream's own: prefill chunks and decodes share them, as NxDI's
chunked prefill contract runs them.

With LoRA, a prefill step takes only the waiting requests ``lora.admission`` admits: at
most ``max_loras`` adapters among the running requests and the new ones together
(upstream counts only the step's own, which our hidden running list would defeat).
"""

from __future__ import annotations

import functools

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_neuronx.lora.admission import adapter_key, admit


class NeuronScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Set when a prefill step admitted nothing, so the next step decodes
        # instead of retrying forever while running requests wait.
        self._prefill_stalled = False
        # One block of max_model_len per request: a decode step never allocates, and
        # nothing is ever preempted. Otherwise the block KV layout's blocks.
        self._one_block_per_request = self.block_size >= self.max_model_len
        self._mixed_steps = self.scheduler_config.enable_chunked_prefill
        # LoRA: each running request's adapter (lora.admission.adapter_key) at admission.
        self._adapter_keys: dict[str, tuple] = {}

    def schedule(self):
        free_lines = self.max_num_running_reqs - len(self.running)
        if self._mixed_steps:
            output = super().schedule()
        elif free_lines > 0 and self.waiting and not self._prefill_stalled:
            output = self._prefill_step(free_lines)
            self._prefill_stalled = output.total_num_scheduled_tokens == 0 and bool(self.running)
        else:
            self._prefill_stalled = False
            output = self._decode_step()
        if output.preempted_req_ids and self._one_block_per_request:
            raise RuntimeError(
                f"the scheduler preempted {sorted(output.preempted_req_ids)}; with one KV "
                "block per sequence this must never happen on Neuron"
            )
        return output

    def _prefill_step(self, free_lines: int):
        """Schedule waiting requests only, at most one per free KV line."""
        order, held, keys = self._hold_adapter_requests() if self.lora_config else ([], [], {})
        running, self.running = self.running, []
        limit, self.max_num_running_reqs = self.max_num_running_reqs, free_lines
        try:
            return super().schedule()
        finally:
            admitted, self.running = self.running, running + self.running
            self.max_num_running_reqs = limit
            if self.lora_config:
                self._remember_adapters(admitted, keys)
            if held:
                self._requeue(order, held)

    def _hold_adapter_requests(self) -> tuple[list, list, dict]:
        """(the waiting queue in order, the requests this step must not schedule:
        lora.admission, their adapters by request id); the held requests are taken out of
        the queue until ``_requeue``."""
        order = list(self.waiting)
        keys = {r.request_id: adapter_key(r.lora_request) for r in order if r.lora_request}
        active = {self._adapter_keys.get(r.request_id) or adapter_key(r.lora_request)
                  for r in self.running if r.lora_request}
        allowed = admit([keys.get(r.request_id) for r in order], active,
                        self.lora_config.max_loras)
        held = [r for r, ok in zip(order, allowed, strict=True) if not ok]
        if held:
            self.waiting.remove_requests(held)
        return order, held, keys

    def _remember_adapters(self, admitted: list, keys: dict) -> None:
        """Each running request's adapter as it was when admitted (a load of the adapter
        that replaced it since is another adapter)."""
        running = {r.request_id for r in self.running}
        self._adapter_keys = {i: k for i, k in self._adapter_keys.items() if i in running}
        for request in admitted:
            if request.request_id in keys:
                self._adapter_keys[request.request_id] = keys[request.request_id]

    def _requeue(self, order: list, held: list) -> None:
        """The waiting queue again in its order before the step: what is still waiting
        (upstream may have moved requests it skipped) and the held requests."""
        still = {id(r) for r in self.waiting} | {id(r) for r in held}
        queue = create_request_queue(self.policy)
        for request in order:
            if id(request) in still:
                queue.add_request(request)
        self.waiting = queue

    def _decode_step(self):
        """Schedule running requests only; new arrivals wait for the next prefill step."""
        waiting, self.waiting = self.waiting, create_request_queue(self.policy)
        manager = self.kv_cache_manager
        if self._one_block_per_request:
            manager.allocate_slots = functools.partial(self._decode_slots, manager.allocate_slots)
        try:
            return super().schedule()
        finally:
            manager.__dict__.pop("allocate_slots", None)
            arrived, self.waiting = self.waiting, waiting
            preempted = [r for r in arrived if r.status == RequestStatus.PREEMPTED]
            for request in reversed(preempted):  # first in line again, as upstream has it
                self.waiting.prepend_request(request)
            for request in arrived:
                if request.status != RequestStatus.PREEMPTED:
                    self.waiting.add_request(request)

    def _decode_slots(self, allocate, request, num_new_tokens, num_lookahead_tokens=0, **kw):
        """The KV manager's allocate_slots, short-cut for a running request whose one
        block already holds the new tokens: the full bookkeeping (about a third of the
        host's time per decode step at batch 32) would find nothing to allocate.

        Speculation's lookahead slots are not vLLM's to find: the KV line holds
        max_model_len + speculation_length positions on the device (speculation.py), and
        upstream already caps the scheduled tokens at max_model_len. Counting them here
        would ask for a second block near the end and preempt."""
        if not kw and request.num_computed_tokens + num_new_tokens <= self.max_model_len:
            return self.kv_cache_manager.empty_kv_cache_blocks
        return allocate(request, num_new_tokens, num_lookahead_tokens=num_lookahead_tokens, **kw)


class NeuronAsyncScheduler(NeuronScheduler, AsyncScheduler):
    """The same rules, with vLLM's asynchronous scheduling: step N+1 is scheduled while
    step N runs on the device, upstream's AsyncScheduler counting step N's token as a
    placeholder until it arrives (the runner waits for it before building N+1's inputs)."""

