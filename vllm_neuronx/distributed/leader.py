"""Rank 0: vLLM's process drives the rank group through the backend protocol.

Every forward is broadcast to the followers before it runs here, so every process
calls its backend with the same inputs (NxDI's multi-node rule, and the CPU backend's
ranks' all-reduces line up); the step ends when every rank says how it went. A rank
that fails, hangs or leaves fails the step here with ``RankFailure``, which ends the
engine (its requests fail, the server exits non-zero); a closed leader stops every
follower.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.distributed import topology as topo
from vllm_neuronx.distributed.group import LocalRanks, RankFailure, RankGroup, free_port
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

STOP = None  # the call that ends the followers' loop


def load_ranks(model_path: str, settings, *, seed: int = 0):
    """The worker's load: the backend (loader.load_backend), on every rank of the group
    where the settings need more than this process, then seen through a ``Leader``."""
    from vllm_neuronx.loader import load_backend

    topology = topo.resolve(settings.backend, settings.neuron_config)
    if topology is None:
        return load_backend(model_path, settings, seed=seed)
    if not topology.is_leader:
        raise nc.NeuronConfigError(
            f"VLLM_NEURONX_RANK={topology.rank}: only rank 0 runs vLLM; the other ranks run "
            "python -m vllm_neuronx.distributed.follower (the launcher starts them)")
    if topology.spawn:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if cores is not None and topology.world > cores:
            logger.warning(
                "tensor_parallel_size=%d on the CPU backend runs %d processes on %d cores: "
                "each step all-reduces across all of them twice a layer. One machine serves "
                "fastest with tensor_parallel_size=1 (the native step); use more to try the "
                "ranks' mechanics", topology.world, topology.world, cores)
    group, spawned = join(topology, settings, model_path, seed)
    error = backend = result = None
    try:
        backend, result = load_backend(model_path, settings, seed=seed, ranks=group)
    except Exception as e:
        error = e
    try:
        check_loaded(group, error)
    except BaseException:
        if spawned is not None:
            spawned.close(grace=0)
        raise
    return Leader(backend, group, spawned), result


def join(topology: topo.Topology, settings, model_path: str, seed: int) -> tuple[
        RankGroup, LocalRanks | None]:
    """Join (or, on one machine, first start) the group, then check that every rank runs
    the same model with the same settings."""
    spawned = None
    master = topology.master
    if topology.spawn:
        master = f"127.0.0.1:{free_port()}"
        fd, path = tempfile.mkstemp(prefix="vllm-neuronx-ranks-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"settings": asdict(settings), "model_path": model_path, "seed": seed}, f,
                      default=str)
        spawned = LocalRanks(topology.world, master, path)
    try:
        group = RankGroup(topology, master)
        check_same_settings(group, settings, model_path)
    except BaseException:
        if spawned is not None:
            spawned.close(grace=0)
        raise
    finally:
        if topology.spawn:
            os.unlink(path)
    return group, spawned


def check_same_settings(group: RankGroup, settings, model_path: str) -> None:
    """Every rank's settings against rank 0's: a difference is named, on every rank."""
    ours = topo.fingerprint(settings.backend, settings.neuron_config, model_path)
    every = group.all_gather_object(ours, timeout=group.timeout * 10)
    for rank, theirs in enumerate(every):
        diffs = topo.differences(every[0], theirs)
        if diffs:
            raise RankFailure(
                f"rank {rank} was started with settings that differ from rank 0's "
                f"(rank 0 != rank {rank}): {'; '.join(diffs)}. Start every node with the "
                "same model and arguments")


def check_loaded(group: RankGroup, error: BaseException | None) -> None:
    """After every rank loaded (or compiled) its model: a rank that could not is named."""
    every = group.all_gather_object(None if error is None else f"{type(error).__name__}: "
                                    f"{error}", timeout=group.timeout * 10)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    if error is not None:
        raise error
    if failed:
        raise RankFailure("; ".join(f"rank {r} could not load the model: {e}"
                                    for r, e in failed))


@dataclass(frozen=True, slots=True)
class HandleRef:
    """An adapter handle (``prepare_adapter``'s) as it travels: each rank holds its own."""

    id: int


# The protocol's calls that change a backend's state: every rank runs them, in order.
MIRRORED = ("forward", "run", "init_lora", "prepare_adapter", "release_adapter", "adapter_indices")


class Leader:
    """The backend as the runner sees it on rank 0: calls go to every rank."""

    def __init__(self, backend, group: RankGroup, spawned: LocalRanks | None) -> None:
        self.backend = backend
        self.group = group
        self.spawned = spawned
        self.broken: str | None = None
        self._handles: dict[int, tuple[HandleRef, object]] = {}  # id(handle) -> (ref, it)
        self._next_ref = 0

    def __getattr__(self, name: str):
        if name in MIRRORED:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        return getattr(self.backend, name)

    def _ref(self, value):
        """Handles in an argument (or a list of them) -> their HandleRefs."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._ref(v) for v in value)
        known = self._handles.get(id(value))
        return known[0] if known is not None else value

    def _call(self, method: str, args: tuple, kwargs: dict):
        """Broadcast the call, run it here, then agree with every rank on how it went."""
        if self.broken:
            raise RankFailure(self.broken)
        ref = None
        if method == "prepare_adapter":
            ref, self._next_ref = HandleRef(self._next_ref), self._next_ref + 1
        try:
            self.group.send((method, ref, self._ref(args), kwargs))
        except RankFailure as e:
            self._break(str(e))
        error = None
        try:
            out = getattr(self.backend, method)(*args, **kwargs)
        except RankFailure as e:
            self._break(str(e))
        except ValueError as e:  # the contract's checks and a bad adapter: before any
            error = e  # collective, the same on every rank (the same inputs)
        except BaseException as e:  # mid-step: the ranks' collectives no longer line up
            self.broken = f"rank 0 failed a step: {type(e).__name__}: {e}"
            raise
        try:
            failed = self.group.agree(error is not None)
        except RankFailure as e:
            self._break(str(e))
        if error is not None:
            raise error
        if failed:
            self._break(f"rank(s) {failed} failed a {method} call that rank 0 ran (see "
                        "their logs): the group stopped")
        if ref is not None:
            self._handles[id(out)] = (ref, out)
        elif method == "release_adapter":
            self._handles.pop(id(args[0]), None)
        return out

    def _break(self, why: str):
        self.broken = why
        if self.spawned is not None:
            gone = self.spawned.dead()
            if gone:
                why += "; " + ", ".join(f"rank {r} exited with status {s}" for r, s in gone)
        raise RankFailure(why)

    def close(self) -> None:
        """Stop every follower (they exit 0), then reap the ones started here."""
        if not self.broken:
            try:
                self.group.send(STOP)
            except RankFailure as e:
                logger.warning("could not stop the followers: %s", e)
        self.broken = self.broken or "the engine shut down"
        if self.spawned is not None:
            self.spawned.close()
