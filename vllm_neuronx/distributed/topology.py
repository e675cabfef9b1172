"""Who runs which part of a model: the processes of the rank group, from the settings and
the environment alone (pure, so it tests without processes).

A backend that shards inside one process (NxDI over a node's NeuronCores,
transformers-neuronx) needs one process per node; the CPU backend needs one per
tensor-parallel rank. ``tp_degree`` is the total over every node and
``local_ranks_size`` the ranks of one node (NxDI's keys and defaults), so a backend
runs ``processes`` of them. More than one is a rank group: rank 0 is vLLM's, the others
follow (``follower.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_neuronx import neuron_config as nc

LAUNCHER = "examples/neuron/multi_node/launch.py"
# Neuron config keys that differ from node to node by design (the check of settings
# across ranks skips them).
PER_NODE_KEYS = frozenset({"start_rank_id"})


@dataclass(frozen=True, slots=True)
class Topology:
    """This process's place in the rank group."""

    rank: int
    world: int  # processes in the group
    master: str | None  # host:port of rank 0's store; None: rank 0 picks one (spawn)
    spawn: bool  # rank 0 starts ranks 1..world-1 on this machine itself

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def ranks_per_node(neuron_config: Mapping[str, Any]) -> tuple[int, int]:
    """(tp_degree, local_ranks_size) with NxDI's default (every rank on one node), or a
    named error."""
    tp = int(neuron_config.get("tp_degree") or 1)
    local = int(neuron_config.get("local_ranks_size") or tp)
    if tp < 1 or local < 1 or tp % local:
        raise nc.NeuronConfigError(
            f"tp_degree={tp} must be a whole number of nodes of local_ranks_size={local} "
            "ranks each (tp_degree is the total over every node)")
    start = neuron_config.get("start_rank_id")
    if start is not None and (int(start) % local or not 0 <= int(start) < tp):
        raise nc.NeuronConfigError(
            f"start_rank_id={start} must be a node's first rank: a multiple of "
            f"local_ranks_size={local} below tp_degree={tp}")
    return tp, local


def processes(backend: str, neuron_config: Mapping[str, Any]) -> int:
    """How many processes run one model: one per rank on the CPU backend, one per node
    where the framework shards over the node's NeuronCores itself."""
    tp, local = ranks_per_node(neuron_config)
    if backend == "cpu":
        return tp
    return tp // local


def resolve(backend: str, neuron_config: Mapping[str, Any],
            env: Mapping[str, str] | None = None) -> Topology | None:
    """This process's topology, or None for a model run by one process; a named error
    where the environment (the launcher's variables) and the settings disagree."""
    env = os.environ if env is None else env
    needed = processes(backend, neuron_config)
    tp, local = ranks_per_node(neuron_config)
    world_env = env.get("VLLM_NEURONX_WORLD_SIZE")
    if not world_env:
        if needed == 1:
            return None
        if backend == "cpu" and local == tp:  # one machine: the leader starts its ranks
            return Topology(rank=0, world=needed, master=None, spawn=True)
        raise nc.NeuronConfigError(
            f"tp_degree={tp} over nodes of local_ranks_size={local} runs {needed} processes "
            f"of the {backend} backend: start each node with {LAUNCHER} (torchrun or mpirun)")
    try:
        world, rank = int(world_env), int(env.get("VLLM_NEURONX_RANK", ""))
    except ValueError:
        raise nc.NeuronConfigError(
            f"VLLM_NEURONX_WORLD_SIZE={world_env!r} needs VLLM_NEURONX_RANK, both whole "
            "numbers (the multi-node launcher sets them)") from None
    if world != needed:
        raise nc.NeuronConfigError(
            f"VLLM_NEURONX_WORLD_SIZE={world}, but the {backend} backend runs tp_degree={tp} "
            f"over nodes of local_ranks_size={local} as {needed} processes")
    if not 0 <= rank < world:
        raise nc.NeuronConfigError(f"VLLM_NEURONX_RANK={rank} must be in [0, {world})")
    master = env.get("VLLM_NEURONX_MASTER")
    if world > 1 and not master:
        raise nc.NeuronConfigError("VLLM_NEURONX_MASTER (host:port of rank 0) is not set")
    if world == 1:
        return None
    return Topology(rank=rank, world=world, master=master, spawn=False)


def check_served(backend: str, neuron_config: Mapping[str, Any], *, draft: bool) -> None:
    """Refuse, naming it, what a rank group does not run (checked when vLLM's config is
    resolved, with the environment's topology)."""
    tp, local = ranks_per_node(neuron_config)
    if backend == "tnx" and local < tp:
        raise nc.NeuronConfigError(
            f"local_ranks_size={local} < tp_degree={tp}: transformers-neuronx runs on one "
            "node; use NxDI (VLLM_NEURON_FRAMEWORK=neuronx-distributed-inference) across nodes")
    if processes(backend, neuron_config) == 1:
        return
    if draft and backend == "cpu":
        raise nc.NeuronConfigError(
            f"speculative decoding with tensor_parallel_size={tp} is not served by the CPU "
            "backend (its draft runs unsharded, in one process); use tensor_parallel_size 1")
    resolve(backend, neuron_config)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise nc.NeuronConfigError(f"VLLM_NEURONX_MASTER={address!r} must be host:port")
    return host, int(port)


def fingerprint(backend: str, neuron_config: Mapping[str, Any], model_path: str) -> dict:
    """What every rank must agree on to run one model: the backend, the neuron config
    (less the per-node keys) and the model's config.json (folders may differ by node)."""
    try:
        with open(os.path.join(model_path, "config.json"), "rb") as f:
            model = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        model = f"unreadable ({model_path})"
    cfg = {k: v for k, v in neuron_config.items() if k not in PER_NODE_KEYS}
    return {"backend": backend, "model config.json": model,
            **{k: json.loads(json.dumps(v, default=str)) for k, v in sorted(cfg.items())}}


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """``key: ours != theirs`` for every key that differs."""
    keys = sorted(set(ours) | set(theirs))
    return [f"{k}: {ours.get(k)!r} != {theirs.get(k)!r}" for k in keys
            if ours.get(k) != theirs.get(k)]
