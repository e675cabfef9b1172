"""Accept the Neuron user guide's arguments on upstream's EngineArgs, LLM and CLI.

Upstream (0.16) has no ``device`` and never had ``override_neuron_config``, so
``LLM(..., device="neuron", override_neuron_config={...})`` raises TypeError and
``--device neuron --override-neuron-config '{...}'`` is an unknown flag. We add
both (LLM passes its kwargs to EngineArgs, so patching EngineArgs covers it):
the overrides travel in ``additional_config["override_neuron_config"]``, the
channel vLLM gives platforms. ``tensor_parallel_size`` becomes the backend's
``tp_degree`` and vLLM's own world size stays 1, since NxDI runs tensor
parallelism inside one process.

A ``speculative_config`` naming a draft ``model`` without a ``method`` gets
``"draft_model"``: vLLM 0.16 detects EAGLE, Medusa and MTP heads but raises
NotImplementedError ("Unsupported speculative method: 'None'") for a plain draft model,
although its own comment says an undetected model is a draft model (later releases do
so). Heads it detects keep no method, so it still detects them.

vLLM turns prefix caching, chunked prefill and async scheduling on unless told otherwise;
on Neuron the first two select the block KV layout (``block_kv``) and the third pays only
where a device runs the steps, so only the user's own word counts: what the user gave
(None: nothing) travels in ``additional_config["vllm_flags_asked"]``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.platform_config import ASKED_KEY, OVERRIDES_KEY

DEVICES = ("neuron", "auto", "cpu")
# vllm-neuron's default on Neuron: vLLM's own (256+) would compile a huge batch.
DEFAULT_MAX_NUM_SEQS = 32


def _check_device(device: Any) -> None:
    if device is not None and str(device) not in DEVICES:
        raise ValueError(f"device={device!r} is not supported by vllm-neuronx; use device='neuron'")


def neuronize(engine_args, device: Any = None, overrides: Any = None) -> None:
    """Fold the Neuron arguments into upstream's fields (safe to call twice)."""
    _check_device(device)
    parsed = nc.parse_overrides(overrides)
    nc.check_known_keys(parsed)
    additional = dict(engine_args.additional_config or {})
    merged = nc.merge_overrides(nc.parse_overrides(additional.get(OVERRIDES_KEY)), parsed)
    tp = engine_args.tensor_parallel_size
    if tp and tp != 1:
        merged.setdefault("tp_degree", tp)
        engine_args.tensor_parallel_size = 1
    if merged:
        additional[OVERRIDES_KEY] = merged
    asked = additional.setdefault(ASKED_KEY, {})
    for flag in ("enable_prefix_caching", "enable_chunked_prefill", "async_scheduling"):
        if getattr(engine_args, flag) is not None:
            asked[flag] = bool(getattr(engine_args, flag))
    engine_args.additional_config = additional
    if engine_args.max_num_seqs is None:
        engine_args.max_num_seqs = DEFAULT_MAX_NUM_SEQS
    spec = engine_args.speculative_config
    if isinstance(spec, dict) and spec.get("model") and not spec.get("method") and \
            not _detected_head(str(spec["model"])):
        engine_args.speculative_config = {**spec, "method": "draft_model"}


# What vLLM 0.16's SpeculativeConfig detects by itself: names, and model types (with
# its MTP types).
_DETECTED_NAMES = ("eagle-", "eagle3")
_DETECTED_TYPES = ("medusa", "mlp_speculator")


def _detected_head(model: str) -> bool:
    """Whether vLLM detects the speculative method of ``model`` itself (an EAGLE, Medusa,
    MLP-speculator or MTP head), by its name or its local config's model_type."""
    from typing import get_args

    from vllm.config.speculative import MTPModelTypes

    if any(name in model.lower() for name in _DETECTED_NAMES):
        return True
    try:
        with open(os.path.join(model, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in _DETECTED_TYPES or model_type in get_args(MTPModelTypes)


def json_object(text: str) -> dict:
    """argparse type for --override-neuron-config: a JSON object, or a named error."""
    try:
        return nc.parse_overrides(text)
    except nc.NeuronConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_neuron_cli_args(parser):
    group = parser.add_argument_group("Neuron (vllm-neuronx)")
    group.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="neuron (the Neuron user guide's flag): on a host with a GPU it also activates the "
             "Neuron platform (vllm_neuronx/activation.py).",
    )
    group.add_argument(
        "--override-neuron-config",
        type=json_object,
        default=None,
        help="JSON object of NxDI neuron config fields that override the defaults "
        "derived from vLLM's settings, e.g. '{\"enable_bucketing\": false}'.",
    )
    return parser


def init_args(original):
    """EngineArgs.__init__ (and AsyncEngineArgs'): also takes device= and the overrides."""

    def __init__(self, *args, device=None, override_neuron_config=None, **kwargs):
        original(self, *args, **kwargs)
        neuronize(self, device, override_neuron_config)

    return __init__


def cli_args(add_cli_args):
    """EngineArgs.add_cli_args: also the Neuron flags and the server's reliability flags."""

    def patched_add_cli_args(parser):
        from vllm_neuronx.patches import apply_to_main, drain, json_body, queue_bound

        parser = add_neuron_cli_args(add_cli_args(parser))
        group = parser.add_argument_group("Server reliability (vllm-neuronx)")
        queue_bound.add_cli_arg(group)
        drain.add_cli_arg(group)
        # Our middleware, through upstream's own --middleware (a user's are added to it).
        parser.set_defaults(middleware=[json_body.MIDDLEWARE, drain.MIDDLEWARE])
        apply_to_main()
        return parser

    return patched_add_cli_args


def from_cli(from_cli_args):
    """EngineArgs.from_cli_args: folds --device and --override-neuron-config in."""

    def patched_from_cli_args(cls, args: argparse.Namespace):
        engine_args = from_cli_args(cls, args)
        neuronize(
            engine_args,
            getattr(args, "device", None),
            getattr(args, "override_neuron_config", None),
        )
        return engine_args

    return patched_from_cli_args
