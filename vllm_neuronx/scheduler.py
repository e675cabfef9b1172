"""The V1 scheduler for Neuron: prefill-only or decode-only steps, never preemption.

NxDI runs context encoding and token generation as separate graphs, so a step is
either all prefill (new requests into free KV lines) or all decode. A prefill
step runs whenever a KV line is free and a request waits, which is continuous
batching: requests join as lines free up. Each request holds one block of
max_model_len tokens from its prefill on, so a decode never needs a block and the
upstream scheduler never has reason to preempt; if it ever did, that is a bug
we surface instead of silently recomputing.
"""

from __future__ import annotations

from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler


class NeuronScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Set when a prefill step admitted nothing, so the next step decodes
        # instead of retrying forever while running requests wait.
        self._prefill_stalled = False

    def schedule(self, throttle_prefills: bool = False):
        free_lines = self.max_num_running_reqs - len(self.running)
        if free_lines > 0 and self.waiting and not self._prefill_stalled:
            output = self._prefill_step(free_lines, throttle_prefills)
            self._prefill_stalled = output.total_num_scheduled_tokens == 0 and bool(self.running)
        else:
            self._prefill_stalled = False
            output = self._decode_step()
        if output.preempted_req_ids:
            raise RuntimeError(
                f"the scheduler preempted {sorted(output.preempted_req_ids)}; with one KV "
                "block per sequence this must never happen on Neuron"
            )
        return output

    def _prefill_step(self, free_lines: int, throttle_prefills: bool):
        """Schedule waiting requests only, at most one per free KV line."""
        running, self.running = self.running, []
        active_limit, self.max_num_active_reqs = self.max_num_active_reqs, free_lines
        try:
            return super().schedule(throttle_prefills)
        finally:
            self.running = running + self.running
            self.max_num_active_reqs = active_limit

    def _decode_step(self):
        """Schedule running requests only; new arrivals wait for the next prefill step."""
        waiting, self.waiting = self.waiting, create_request_queue(self.policy)
        try:
            return super().schedule()
        finally:
            arrived, self.waiting = self.waiting, waiting
            for request in arrived:
                self.waiting.add_request(request)
