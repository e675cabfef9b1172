"""KV lines: NxDI's ``seq_ids``, one per running sequence, from a fixed pool.

Lines come from our own pool, never from vLLM block ids (which include a null
block and can exceed the compiled batch). The lowest free line goes first, so a
full batch is exactly lines 0..B-1, the layout the device graph prefers.
"""

from __future__ import annotations

import heapq


class KVLinePool:
    __slots__ = ("capacity", "_free", "_owner")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity))
        self._owner: dict[str, int] = {}

    def allocate(self, req_id: str) -> int:
        if req_id in self._owner:
            raise RuntimeError(f"request {req_id} already holds KV line {self._owner[req_id]}")
        if not self._free:
            raise RuntimeError(
                f"no free KV line for request {req_id}: all {self.capacity} are in use "
                "(the scheduler admitted more sequences than max_num_seqs)"
            )
        line = heapq.heappop(self._free)
        self._owner[req_id] = line
        return line

    def release(self, req_id: str) -> int | None:
        """Free the request's line; unknown ids (never prefilled) are fine."""
        line = self._owner.pop(req_id, None)
        if line is not None:
            heapq.heappush(self._free, line)
        return line

    def line_of(self, req_id: str) -> int:
        return self._owner[req_id]

    @property
    def in_use(self) -> int:
        return len(self._owner)
