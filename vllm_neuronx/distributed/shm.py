"""All-reduce and all-gather through shared memory, for ranks on one machine.

Why: a gloo all-reduce goes through loopback TCP and gloo's threads. Between two CPU ranks
of SmolLM2 on 2 cores it took about 2 ms, 61 times a decode step (two a layer, and the LM
head's gather): two thirds of a 180 ms step. Here each rank writes its part into its own
slot of a shared buffer, publishes the op's sequence number in its own flag, waits for every
rank's flag, and sums the slots in rank order, so every rank gets the same bits.

Two buffers alternate: a rank writes op k's part only after every rank published k - 1,
which each did after reading op k - 2's parts (the same buffer). Ranks publish with plain
stores, read in order on x86's total store order; elsewhere gloo serves (``usable``).
A rank that exits (or turns zombie) is seen at once through /proc; one that hangs past the
timeout fails the others.
"""

from __future__ import annotations

import mmap
import os
import platform
import time

import numpy as np
import torch

# Bytes of one rank's slot in one buffer: a decode step's activations fit (32 tokens of
# hidden 8192 in fp32 is 1 MiB); larger all-reduces go through in pieces, larger gathers
# through gloo.
SLOT_BYTES = 2 << 20
_FLAG_BYTES = 64  # one cache line per rank's flag
_SPINS_BEFORE_YIELD = 200
_LIVENESS_EVERY_S = 0.05


def usable(world: int) -> bool:
    """x86-64 Linux (stores are seen in program order) with room in /dev/shm for the
    buffers (a full tmpfs would kill a rank with SIGBUS at its first write)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        room = os.statvfs("/dev/shm")
    except OSError:
        return False
    return room.f_bavail * room.f_frsize >= 2 * _size(world)


class RankGone(RuntimeError):
    """A rank exited while the others waited for it."""


class RankHung(TimeoutError):
    """Ranks kept the others waiting past the timeout."""


class SharedMemoryCollective:
    """The collectives of ``world`` processes on this machine over one shared file."""

    def __init__(self, path: str, rank: int, world: int, pids: list[int],
                 timeout_s: float) -> None:
        """Map ``path`` (``create``d by one rank) as rank ``rank``; ``pids``: every rank's."""
        self.rank, self.world, self.pids, self.timeout_s = rank, world, pids, timeout_s
        size = _size(world)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self._flags = raw[:world * _FLAG_BYTES].view(np.int64)[::_FLAG_BYTES // 8]
        slots = raw[world * _FLAG_BYTES:]
        self._slots = [[torch.from_numpy(slots[(b * world + r) * SLOT_BYTES:
                                               (b * world + r + 1) * SLOT_BYTES])
                        for r in range(world)] for b in range(2)]
        self._seq = 0

    @staticmethod
    def create(path: str, world: int) -> None:
        with open(path, "wb") as f:
            f.truncate(_size(world))

    def _publish_and_wait(self) -> None:
        self._flags[self.rank] = self._seq
        flags, seq = self._flags, self._seq
        spins, start = 0, time.monotonic()
        checked = start
        while (flags < seq).any():
            spins += 1
            if spins < _SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()
            now = time.monotonic()
            if now - checked > _LIVENESS_EVERY_S:
                checked = now
                self._check_alive(now - start)

    def _check_alive(self, waited: float) -> None:
        for r, pid in enumerate(self.pids):
            if r != self.rank and self._flags[r] < self._seq and not _alive(pid):
                raise RankGone(f"rank {r} (pid {pid}) exited")
        if waited > self.timeout_s:
            late = [r for r in range(self.world) if self._flags[r] < self._seq]
            raise RankHung(f"rank(s) {late} hung past VLLM_NEURONX_RANK_TIMEOUT="
                           f"{self.timeout_s:g} s")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (``x`` contiguous), the same bits on every rank."""
        items = SLOT_BYTES // x.element_size()
        flat = x.view(-1)
        for start in range(0, flat.numel(), items):
            part = flat[start:start + items]
            self._seq += 1
            slots = self._slots[self._seq % 2]
            n = part.numel() * part.element_size()
            slots[self.rank][:n].copy_(part.view(torch.uint8))
            self._publish_and_wait()
            total = slots[0][:n].view(part.dtype).clone()
            for r in range(1, self.world):
                total += slots[r][:n].view(part.dtype)
            part.copy_(total)
        return x

    def fits_gather(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= SLOT_BYTES

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (one slot's bytes at most) side by side along the last dim."""
        x = x.contiguous()
        n = x.numel() * x.element_size()
        self._seq += 1
        slots = self._slots[self._seq % 2]
        slots[self.rank][:n].copy_(x.view(-1).view(torch.uint8))
        self._publish_and_wait()
        parts = [slots[r][:n].view(x.dtype).view(x.shape) for r in range(self.world)]
        return torch.cat(parts, dim=-1)


def _size(world: int) -> int:
    return world * _FLAG_BYTES + 2 * world * SLOT_BYTES


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
