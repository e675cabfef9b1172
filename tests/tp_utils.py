"""Tensor-parallel CPU backends in one process, for tests: one thread per rank, joined by
a real collective over shared memory (each rank's tensors summed or concatenated in rank
order behind a barrier), so every rank gets the same bits, as gloo gives them."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vllm_neuronx.backends.cpu import CpuBackend

TIMEOUT_S = 60.0  # a rank that never arrives fails the others instead of hanging them


class ThreadGroup:
    """What ``world`` threads share: a barrier and one slot per rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * world

    def ranks(self) -> list[ThreadCollective]:
        return [ThreadCollective(self, rank) for rank in range(self.world)]


class ThreadCollective:
    """The backend's ``Collective`` for one rank of a ``ThreadGroup``."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world = group, rank, group.world

    def _exchange(self, x: torch.Tensor, combine: Callable[[list[torch.Tensor]], torch.Tensor]
                  ) -> torch.Tensor:
        g = self.group
        g.slots[self.rank] = x
        g.barrier.wait()  # every rank's tensor is in
        out = combine(list(g.slots))
        g.barrier.wait()  # every rank has read them: the slots may be reused
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        def total(parts):
            out = parts[0].clone()
            for part in parts[1:]:
                out += part
            return out

        return self._exchange(x, total)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._exchange(x, lambda parts: torch.cat(parts, dim=-1))


def on_ranks(backends: list[CpuBackend], fn: Callable[[CpuBackend], Any]) -> list[Any]:
    """``fn`` on every rank's backend at once (one thread each): their results in rank
    order. A rank that fails breaks the barrier so that the others fail too."""
    groups = {id(b.ranks.group): b.ranks.group for b in backends if b.ranks is not None}

    def run(b):
        try:
            return fn(b)
        except BaseException:
            for g in groups.values():
                g.barrier.abort()
            raise

    with ThreadPoolExecutor(len(backends)) as pool:
        futures = [pool.submit(run, b) for b in backends]
        return [f.result() for f in futures]


def tp_backends(model_path: str, neuron_config: dict, folder: str, *, compile: bool = True
                ) -> list[CpuBackend]:
    """``neuron_config['tp_degree']`` ranks of one model, compiled once into ``folder``
    (unless ``compile`` is false: the artifacts are there already, those of any degree)
    and each loaded from it with its ``ThreadCollective``."""
    world = int(neuron_config["tp_degree"])
    backends = [CpuBackend(model_path, neuron_config) for _ in range(world)]
    if compile:
        os.makedirs(folder, exist_ok=True)
        backends[0].compile(folder)
    for b, ranks in zip(backends, ThreadGroup(world).ranks(), strict=True):
        b.ranks = ranks
    on_ranks(backends, lambda b: b.load(folder))
    return backends


def tp_forward(backends: list[CpuBackend], *args, **kwargs) -> list[Any]:
    """The same forward call on every rank at once: each rank's output, in rank order."""
    return on_ranks(backends, lambda b: b.forward(*args, **kwargs))
