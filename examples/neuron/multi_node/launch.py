"""Start one process of a multi-node vllm-neuronx server, under torchrun or mpirun.

    torchrun ... launch.py [--neuron-cores-per-node N] -- --model ... [vllm serve args]
    mpirun ...   launch.py [--neuron-cores-per-node N] [--master-addr A --master-port P] -- ...

Every process runs the same model and calls forward with the same inputs: process
rank 0 runs vLLM's OpenAI server and broadcasts each step's inputs over a
torch.distributed (gloo) group; the others run ``vllm_neuronx.distributed.follower``
with the same arguments. This script only works out where this process stands and
``exec``s the real one (so signals reach it):

- NxDI (``--neuron-cores-per-node N``): one process per node drives its N NeuronCores.
  ``tp_degree`` is the TOTAL, nodes x N, as NxDI's docs have it (the seed's fork set it
  to the local count); ``local_ranks_size`` is N and ``start_rank_id`` node x N.
- CPU backend (no flag): one process per tensor-parallel rank, so ``tp_degree`` is the
  number of processes.

The plan is built by pure functions (environment + arguments -> ``Plan``), which the
tests check without starting anything; ``--dry-run`` prints it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
FOLLOWER_MODULE = "vllm_neuronx.distributed.follower"

OVERRIDE_FLAG = "--override-neuron-config"
TP_FLAG = "--tensor-parallel-size"
TP_ALIASES = (TP_FLAG, "-tp")
# vLLM's own multi-node flags start a different kind of deployment (one vLLM spread over
# nodes); here vLLM stays one process on rank 0 and the ranks follow it.
REFUSED_FLAGS = {
    "--nnodes": "the launcher counts nodes from the launcher's ranks",
    "--node-rank": "the launcher takes the node from the launcher's ranks",
    "--headless": "followers run vllm_neuronx.distributed.follower, not a headless vLLM",
}

# Ports derived from MASTER_PORT: torchrun's own store already listens on MASTER_PORT.
GROUP_PORT_OFFSET = 1  # rank 0's TCPStore for the rank group (VLLM_NEURONX_MASTER)
NEURON_RT_PORT_OFFSET = 2  # the Neuron runtime's root communicator (NEURON_RT_ROOT_COMM_ID)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
OPENMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE")


class LaunchError(ValueError):
    """The launcher's environment or arguments cannot make a consistent plan."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands, as the launcher (torchrun or mpirun) told it."""

    launcher: str  # "torchrun" or "mpirun"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class Plan:
    """What this process becomes: env additions, then ``python -m module *argv``."""

    launcher: str
    rank: int
    world_size: int
    node: int
    nodes: int
    tp_degree: int
    local_ranks_size: int
    start_rank_id: int
    module: str
    argv: list[str]
    env: dict[str, str]

    def command(self, python: str) -> list[str]:
        return [python, "-m", self.module, *self.argv]


def _int_var(env: Mapping[str, str], name: str, launcher: str) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        raise LaunchError(f"{launcher}: environment variable {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{launcher}: {name}={raw!r} is not an integer") from None


def read_ranks(env: Mapping[str, str], master_addr: str | None = None,
               master_port: int | None = None) -> Ranks:
    """The ranks from torchrun's variables (RANK...) or OpenMPI's (OMPI_COMM_WORLD_...).

    ``master_addr``/``master_port`` (the command line) win over MASTER_ADDR/MASTER_PORT.
    """
    if "RANK" in env or "LOCAL_WORLD_SIZE" in env:
        launcher, names = "torchrun", TORCHRUN_VARS
    elif any(name in env for name in OPENMPI_VARS):
        launcher, names = "mpirun", OPENMPI_VARS
    else:
        raise LaunchError(
            "no launcher ranks in the environment: run under torchrun (RANK, WORLD_SIZE, "
            "LOCAL_RANK, LOCAL_WORLD_SIZE) or OpenMPI's mpirun (OMPI_COMM_WORLD_RANK, "
            "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE)")
    rank, world, local_rank, local_world = (_int_var(env, n, launcher) for n in names)

    addr = master_addr or env.get("MASTER_ADDR")
    if not addr:
        raise LaunchError(f"{launcher}: MASTER_ADDR is not set (rank 0's address; "
                          "set it in the environment or pass --master-addr)")
    if master_port is not None:
        port = master_port
    else:
        port = _int_var(env, "MASTER_PORT", launcher) if env.get("MASTER_PORT") else None
        if port is None:
            raise LaunchError(f"{launcher}: MASTER_PORT is not set (set it in the "
                              "environment or pass --master-port)")
    top = port + max(GROUP_PORT_OFFSET, NEURON_RT_PORT_OFFSET)
    if port < 1 or top > 65535:
        raise LaunchError(f"MASTER_PORT={port}: the launcher also uses ports {port + 1} and "
                          f"{port + 2}, so it must lie in 1..{65535 - 2}")

    if world < 1 or local_world < 1:
        raise LaunchError(f"{launcher}: world size {world} and local world size {local_world} "
                          "must be at least 1")
    if world % local_world:
        raise LaunchError(f"{launcher}: world size {world} is not a multiple of the local "
                          f"world size {local_world}; every node must run as many processes")
    if not 0 <= rank < world:
        raise LaunchError(f"{launcher}: rank {rank} is outside world size {world}")
    if local_rank != rank % local_world:
        raise LaunchError(
            f"{launcher}: local rank {local_rank} is not rank {rank} mod local world size "
            f"{local_world}; place ranks node by node (mpirun --map-by slot)")
    if launcher == "torchrun" and env.get("GROUP_RANK", "").strip():
        group_rank = _int_var(env, "GROUP_RANK", launcher)
        if group_rank != rank // local_world:
            raise LaunchError(f"torchrun: GROUP_RANK {group_rank} is not rank {rank} // "
                              f"LOCAL_WORLD_SIZE {local_world}; nodes must be homogeneous")
    return Ranks(launcher, rank, world, local_rank, local_world, addr, port)


def _flag_name(arg: str) -> str:
    """``--tensor_parallel_size=4`` -> ``--tensor-parallel-size`` (vLLM takes both)."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _take_flag(args: list[str], names: Sequence[str]) -> tuple[int, str] | None:
    """Remove the one occurrence of a flag (``--f V`` or ``--f=V``): (index, value)."""
    found = [i for i, arg in enumerate(args) if _flag_name(arg) in names]
    if not found:
        return None
    if len(found) > 1:
        raise LaunchError(f"{names[0]} is given {len(found)} times; give it once")
    i = found[0]
    if "=" in args[i]:
        value = args.pop(i).split("=", 1)[1]
    else:
        if i + 1 >= len(args):
            raise LaunchError(f"{names[0]} needs a value")
        value = args.pop(i + 1)
        args.pop(i)
    return i, value


def merge_serve_args(serve_args: Sequence[str], neuron_keys: Mapping[str, int],
                     tp_degree: int) -> list[str]:
    """vLLM's arguments with the launcher's neuron config keys and TP size folded in.

    A user value that agrees is kept; one that contradicts is refused by name, since a
    server started with it would shard differently from the other nodes.
    """
    args = list(serve_args)
    for arg in args:
        if _flag_name(arg) in REFUSED_FLAGS:
            raise LaunchError(f"{_flag_name(arg)} is not taken by this launcher: "
                              f"{REFUSED_FLAGS[_flag_name(arg)]}")

    taken = _take_flag(args, (OVERRIDE_FLAG,))
    overrides: dict = {}
    at = len(args)
    if taken is not None:
        at, raw = taken
        try:
            overrides = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LaunchError(f"{OVERRIDE_FLAG} is not valid JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise LaunchError(f"{OVERRIDE_FLAG} must be a JSON object, got "
                              f"{type(overrides).__name__}")
    for key, value in neuron_keys.items():
        if key in overrides and overrides[key] != value:
            raise LaunchError(
                f"{OVERRIDE_FLAG} {key}={overrides[key]!r} contradicts the launcher's "
                f"{key}={value!r} (from the number of nodes and --neuron-cores-per-node); "
                f"remove {key} from {OVERRIDE_FLAG}")
    args[at:at] = [OVERRIDE_FLAG, json.dumps({**overrides, **neuron_keys})]

    taken = _take_flag(args, TP_ALIASES)
    at = len(args)
    if taken is not None:
        at, raw = taken
        try:
            given = int(raw)
        except ValueError:
            raise LaunchError(f"{TP_FLAG}={raw!r} is not an integer") from None
        if given != tp_degree:
            raise LaunchError(
                f"{TP_FLAG}={given} contradicts the launcher's tensor-parallel size "
                f"{tp_degree} (nodes x ranks per node); drop {TP_FLAG}, the launcher sets it")
    args[at:at] = [TP_FLAG, str(tp_degree)]
    return args


def build_plan(env: Mapping[str, str], serve_args: Sequence[str],
               neuron_cores_per_node: int | None = None, master_addr: str | None = None,
               master_port: int | None = None) -> Plan:
    """The whole plan for this process, from the launcher's environment and vLLM's args."""
    if not serve_args:
        raise LaunchError("give vLLM's serve arguments after '--' (at least --model)")
    ranks = read_ranks(env, master_addr, master_port)
    nodes = ranks.world_size // ranks.local_world_size
    node = ranks.rank // ranks.local_world_size
    if neuron_cores_per_node is not None:
        if neuron_cores_per_node < 1:
            raise LaunchError(f"--neuron-cores-per-node {neuron_cores_per_node} must be >= 1")
        if ranks.local_world_size != 1:
            raise LaunchError(
                f"--neuron-cores-per-node: NxDI runs one process per node, but the launcher "
                f"started {ranks.local_world_size} per node (LOCAL_WORLD_SIZE); start one "
                "(torchrun --nproc-per-node 1, mpirun --map-by ppr:1:node)")
        local_ranks_size = neuron_cores_per_node
    else:
        local_ranks_size = ranks.local_world_size
    tp_degree = nodes * local_ranks_size
    start_rank_id = node * local_ranks_size
    neuron_keys = {"tp_degree": tp_degree, "local_ranks_size": local_ranks_size,
                   "start_rank_id": start_rank_id}
    argv = merge_serve_args(serve_args, neuron_keys, tp_degree)
    env_add = {
        "VLLM_NEURONX_RANK": str(ranks.rank),
        "VLLM_NEURONX_WORLD_SIZE": str(ranks.world_size),
        "VLLM_NEURONX_MASTER": f"{ranks.master_addr}:{ranks.master_port + GROUP_PORT_OFFSET}",
        "NEURON_RT_ROOT_COMM_ID":
            f"{ranks.master_addr}:{ranks.master_port + NEURON_RT_PORT_OFFSET}",
        "NEURON_RANK_ID": str(node),
    }
    module = SERVER_MODULE if ranks.rank == 0 else FOLLOWER_MODULE
    return Plan(ranks.launcher, ranks.rank, ranks.world_size, node, nodes, tp_degree,
                local_ranks_size, start_rank_id, module, argv, env_add)


LAUNCHER_OPTIONS = {"--neuron-cores-per-node": 1, "--master-addr": 1, "--master-port": 1,
                    "--dry-run": 0}  # each with how many values follow it


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher options, vLLM's arguments): the first ``--`` separates them. torchrun
    drops a ``--`` that comes first (argparse does, before its script's arguments), so
    without one the launcher's options are those at the front."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in LAUNCHER_OPTIONS:
        i += 1 + (LAUNCHER_OPTIONS[argv[i]] if "=" not in argv[i] else 0)
    if i == 0 or i < len(argv):
        return argv[:i], argv[i:]
    raise LaunchError("separate the launcher's options from vLLM's arguments with '--'")


def parse_options(options: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__.split("\n\n")[0],
        usage="launch.py [--neuron-cores-per-node N] [--master-addr A] [--master-port P] "
              "[--dry-run] -- <vllm serve args>")
    parser.add_argument("--neuron-cores-per-node", type=int, default=None,
                        help="NxDI: NeuronCores (tensor-parallel ranks) each node's one "
                             "process drives; omit for the CPU backend (one process per rank)")
    parser.add_argument("--master-addr", default=None,
                        help="rank 0's address (default: MASTER_ADDR)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="base port (default: MASTER_PORT); +1 and +2 are used as well")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan as JSON instead of starting the process")
    return parser.parse_args(list(options))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, serve_args = split_argv(argv)
        opts = parse_options(options)
        plan = build_plan(os.environ, serve_args, opts.neuron_cores_per_node,
                          opts.master_addr, opts.master_port)
    except LaunchError as e:
        sys.exit(f"launch.py: {e}")
    command = plan.command(sys.executable)
    if opts.dry_run:
        print(json.dumps({**asdict(plan), "command": command}, indent=2))
        return
    print(f"launch.py: rank {plan.rank}/{plan.world_size}, node {plan.node}/{plan.nodes}, "
          f"tp_degree {plan.tp_degree}, start_rank_id {plan.start_rank_id}: {plan.module}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(sys.executable, command, {**os.environ, **plan.env})


if __name__ == "__main__":
    main()
