"""A rank other than 0: load the same model, then run every call the leader broadcasts.

    python -m vllm_neuronx.distributed.follower <the server's own arguments>

The multi-node launcher starts it on every rank but 0 with the arguments rank 0's
server gets, so it resolves its settings exactly as the server does (through vLLM's
config and our platform); the leader starts its local CPU ranks with ``--settings``
(a file of its own settings). Exit status 0 when the leader stopped the group, 1 when
the leader is gone or the group failed, 2 for settings that cannot run.
"""

from __future__ import annotations

import json
import sys

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.distributed import leader as lead
from vllm_neuronx.distributed import topology as topo
from vllm_neuronx.distributed.group import RankFailure, RankGroup
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)


def settings_from_args(argv: list[str]):
    """(settings, model folder, seed) from vLLM server arguments, as the server gets them."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_neuronx.platform_config import NeuronSettings
    from vllm_neuronx.worker.worker import resolve_model_folder

    args = make_arg_parser(FlexibleArgumentParser(prog="vllm_neuronx.distributed.follower")
                           ).parse_args(argv)
    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    model = vllm_config.model_config
    return (NeuronSettings.of(vllm_config), resolve_model_folder(model.model, model.revision),
            model.seed or 0)


def settings_from_file(path: str):
    from vllm_neuronx.platform_config import NeuronSettings

    with open(path) as f:
        stored = json.load(f)
    return NeuronSettings.from_dict(stored["settings"]), stored["model_path"], stored["seed"]


def serve(settings, model_path: str, seed: int) -> int:
    """Join the group, load, then follow until the leader stops it."""
    from vllm_neuronx.loader import load_backend

    topology = topo.resolve(settings.backend, settings.neuron_config)
    if topology is None or topology.is_leader:
        raise nc.NeuronConfigError(
            "a follower needs VLLM_NEURONX_RANK >= 1 and VLLM_NEURONX_WORLD_SIZE > 1 (the "
            f"launcher sets them: {topo.LAUNCHER}); rank 0 runs the server")
    group = RankGroup(topology, topology.master)
    lead.check_same_settings(group, settings, model_path)
    backend, error = None, None
    try:
        backend, _ = load_backend(model_path, settings, seed=seed, ranks=group)
    except Exception as e:
        error = e
    lead.check_loaded(group, error)
    logger.info("rank %d of %d ready (%s backend)", group.rank, group.world, settings.backend)
    handles: dict[lead.HandleRef, object] = {}  # the leader's refs -> this rank's handles

    def local(value):
        if isinstance(value, (list, tuple)):
            return type(value)(local(v) for v in value)
        return handles[value] if isinstance(value, lead.HandleRef) else value

    while True:
        call = group.receive()
        if call is lead.STOP:
            logger.info("rank %d: stopped by the leader", group.rank)
            return 0
        method, ref, args, kwargs = call
        if method not in lead.MIRRORED:
            raise RankFailure(f"rank {group.rank}: unknown call {method!r} from the leader")
        failed = False
        try:
            out = getattr(backend, method)(*local(args), **kwargs)
        except ValueError:  # the contract's checks, failing the same way on rank 0
            failed = True
        else:
            if ref is not None:
                handles[ref] = out
            elif method == "release_adapter":
                handles.pop(args[0], None)
        group.agree(failed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--settings"] and len(argv) == 2:
            settings, model_path, seed = settings_from_file(argv[1])
        else:
            settings, model_path, seed = settings_from_args(argv)
        return serve(settings, model_path, seed)
    except nc.NeuronConfigError as e:
        logger.error("follower: %s", e)
        return 2
    except RankFailure as e:
        logger.error("follower: %s", e)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
