"""vLLM settings -> the NxDI neuron config, as one pure function.

The neuron config is a plain dict with NxDI's field names (``NeuronConfig(**d)``
takes it as is). Every backend reads the same dict, so the CPU backend honours
exactly what a Neuron device would be compiled for. NxDI silently drops keys it
does not know; we refuse them and name the key and the nearest known ones.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_neuronx import nxdi_keys

DEFAULT_GLOBAL_TOPK = 256
MIN_BUCKET = 128

# NxDI OnDeviceSamplingConfig fields and their defaults (vLLM turns `dynamic` on:
# per-row top_k/top_p/temperature come from the sampling tensor).
ON_DEVICE_SAMPLING_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "top_k": 1,
    "top_p": 1.0,
    "temperature": 1.0,
    "dynamic": True,
    "deterministic": False,
    "global_topk": DEFAULT_GLOBAL_TOPK,
}

# The override keys are NxDI's own, read from its source (nxdi_keys.py): the installed
# release's on a Neuron host, else the committed table of the releases we support.
# NEURON_CONFIG_KEYS, KNOWN_KEYS and ON_DEVICE_SAMPLING_KEYS are computed on use (the
# module's __getattr__ below), so they follow the installed NxDI.

# Keys the vLLM side consumes (LoRA adapters, transformers-neuronx extras).
VLLM_SIDE_KEYS = frozenset(
    "lora_modules target_modules cast_logits_dtype continuous_batching quant "
    "on_device_generation sparse_attn".split()
)


def neuron_config_keys() -> nxdi_keys.KeySet:
    """The NxDI keys the check accepts now (installed release, else supported releases)."""
    return nxdi_keys.current()


def __getattr__(name: str) -> frozenset[str]:
    """The key sets as constants, computed on use: the installed NxDI decides them."""
    if name == "NEURON_CONFIG_KEYS":
        return neuron_config_keys().top
    if name == "KNOWN_KEYS":
        return neuron_config_keys().top | VLLM_SIDE_KEYS
    if name == "ON_DEVICE_SAMPLING_KEYS":
        return neuron_config_keys().nested.get("on_device_sampling_config", frozenset())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_DTYPE_ALIASES = {
    "float": "float32",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "half": "float16",
    "float16": "float16",
    "fp16": "float16",
}


class NeuronConfigError(ValueError):
    """A neuron config that no backend can honour; the message names the field."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """vLLM's dtype (resolved torch.dtype or a string) -> NxDI's torch_dtype string."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise NeuronConfigError(f"torch_dtype {dtype} is not supported on Neuron")
        return _DTYPE_NAMES[dtype]
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise NeuronConfigError(
            f"torch_dtype {dtype!r} is not supported; use one of "
            f"{sorted(set(_DTYPE_ALIASES.values()))}"
        )
    return name


def default_neuron_config(
    *, tp_degree: int, max_num_seqs: int, max_model_len: int, dtype: torch.dtype | str,
    speculation_length: int = 0,
) -> dict[str, Any]:
    """The neuron config vLLM derives from its own settings (the user guide's table).
    With fused speculation a KV line holds k positions past max_model_len
    (``vllm_neuronx.speculation``)."""
    return {
        "tp_degree": tp_degree,
        "ctx_batch_size": 1,
        "batch_size": max_num_seqs,
        "max_context_length": max_model_len,
        "seq_len": max_model_len + speculation_length,
        "enable_bucketing": True,
        "is_continuous_batching": True,
        "quantized": False,
        "torch_dtype": dtype_name(dtype),
        "padding_side": "right",
        "on_device_sampling_config": dict(ON_DEVICE_SAMPLING_DEFAULTS),
    }


def parse_overrides(raw: Any) -> dict[str, Any]:
    """Accept a dict or a JSON object string; anything else is a named error."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise NeuronConfigError(f"override_neuron_config is not valid JSON: {e}") from e
    if not isinstance(raw, Mapping):
        raise NeuronConfigError(
            f"override_neuron_config must be a JSON object (dict), got {type(raw).__name__}"
        )
    return dict(raw)


def _unknown(what: str, key: str, known: frozenset[str], origin: str) -> NeuronConfigError:
    """The error for a key NxDI would drop: the key, the nearest known ones, and where
    the known keys come from (and which releases take it, if other ones do)."""
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    elsewhere = nxdi_keys.releases_taking(key) if what == "override_neuron_config" else []
    also = f"; it is a key of NxDI {', '.join(elsewhere)}" if elsewhere else ""
    return NeuronConfigError(
        f"unknown {what} key {key!r}{hint} (checked against the keys of {origin}){also}")


def check_known_keys(overrides: Mapping[str, Any]) -> None:
    """Refuse keys NxDI would drop with only a warning, naming the nearest valid keys."""
    keys = neuron_config_keys()
    known = keys.top | VLLM_SIDE_KEYS
    for key, value in overrides.items():
        if key not in known:
            raise _unknown("override_neuron_config", key, known, keys.origin)
        sub_keys = keys.nested.get(key)
        if sub_keys is not None and isinstance(value, Mapping):
            for sub in value:
                if sub not in sub_keys:
                    raise _unknown(key, sub, sub_keys, keys.origin)


def merge_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Overrides win; nested dicts merge per key; an explicit None replaces the value."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        base = merged.get(key)
        if isinstance(value, Mapping) and isinstance(base, Mapping):
            merged[key] = merge_overrides(base, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def generate_buckets(min_length: int, max_length: int) -> list[int]:
    """NxDI's autobucketing: powers of two from ``min_length``, then the maximum."""
    if max_length <= min_length:
        return [max_length]
    low = int(math.log2(min_length))
    high = round(math.log2(max_length))
    buckets = [2**i for i in range(low, high) if 2**i < max_length]
    return buckets + [max_length]


def context_buckets(cfg: Mapping[str, Any]) -> list[int]:
    """Prefill (context-encoding) buckets the config compiles."""
    max_ctx = cfg["max_context_length"]
    if not cfg.get("enable_bucketing"):
        return [max_ctx]
    return list(cfg.get("context_encoding_buckets") or generate_buckets(MIN_BUCKET, max_ctx))


def token_buckets(cfg: Mapping[str, Any]) -> list[int]:
    """Decode (token-generation) buckets the config compiles."""
    seq_len = cfg["seq_len"]
    if not cfg.get("enable_bucketing"):
        return [seq_len]
    return list(cfg.get("token_generation_buckets") or generate_buckets(MIN_BUCKET, seq_len))


def pick_bucket(buckets: Sequence[int], length: int) -> int:
    """NxDI's first fit: the first bucket strictly larger than ``length``;
    equality is allowed at the largest bucket only."""
    for bucket in buckets:
        if bucket > length:
            return bucket
    if buckets and buckets[-1] == length:
        return buckets[-1]
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _check_buckets(name: str, buckets: Any, limit: int, limit_name: str) -> None:
    if not isinstance(buckets, list) or not buckets:
        raise NeuronConfigError(f"{name} must be a non-empty list of integers")
    if any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in buckets):
        raise NeuronConfigError(f"{name} must hold positive integers, got {buckets}")
    if buckets != sorted(set(buckets)):
        raise NeuronConfigError(f"{name} must be sorted ascending without repeats, got {buckets}")
    if buckets[-1] > limit:
        raise NeuronConfigError(
            f"{name} {buckets} go past {limit_name}={limit}; the largest bucket must be "
            f"<= {limit_name}"
        )


def validate(cfg: Mapping[str, Any], *, max_num_seqs: int, max_model_len: int,
             speculation_length: int = 0) -> None:
    """Refuse a config that contradicts vLLM's settings or cannot run."""
    for key in ("batch_size", "tp_degree", "seq_len", "max_context_length", "ctx_batch_size"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NeuronConfigError(f"{key} must be a positive integer, got {value!r}")
    if cfg["batch_size"] != max_num_seqs:
        raise NeuronConfigError(
            f"batch_size={cfg['batch_size']} contradicts max_num_seqs={max_num_seqs}: "
            "each sequence owns one KV line, so set max_num_seqs instead"
        )
    if cfg["seq_len"] != max_model_len + speculation_length:
        extra = (f" + speculation_length {speculation_length}" if speculation_length else "")
        raise NeuronConfigError(
            f"seq_len={cfg['seq_len']} contradicts max_model_len={max_model_len}{extra}; "
            "set max_model_len instead"
        )
    if cfg["max_context_length"] > cfg["seq_len"]:
        raise NeuronConfigError(
            f"max_context_length={cfg['max_context_length']} exceeds seq_len={cfg['seq_len']}"
        )
    if cfg["ctx_batch_size"] > cfg["batch_size"]:
        raise NeuronConfigError(
            f"ctx_batch_size={cfg['ctx_batch_size']} exceeds batch_size={cfg['batch_size']}"
        )
    if cfg.get("padding_side", "right") != "right":
        raise NeuronConfigError("padding_side must be 'right' for vLLM")
    if cfg.get("is_continuous_batching") is not True and max_num_seqs > 1:
        raise NeuronConfigError(
            "is_continuous_batching must stay True when max_num_seqs > 1: vLLM admits "
            "requests into free KV lines while others decode"
        )
    dtype_name(cfg.get("torch_dtype", "bfloat16"))
    if cfg.get("enable_bucketing"):
        if cfg.get("context_encoding_buckets") is not None:
            _check_buckets(
                "context_encoding_buckets",
                cfg["context_encoding_buckets"],
                cfg["max_context_length"],
                "max_context_length",
            )
        if cfg.get("token_generation_buckets") is not None:
            _check_buckets(
                "token_generation_buckets",
                cfg["token_generation_buckets"],
                cfg["seq_len"],
                "seq_len",
            )
            if cfg["token_generation_buckets"][-1] != cfg["seq_len"]:
                raise NeuronConfigError(
                    f"token_generation_buckets {cfg['token_generation_buckets']} must end at "
                    f"seq_len={cfg['seq_len']} (max_model_len), or sequences could not reach it"
                )
    ods = cfg.get("on_device_sampling_config")
    if ods is not None:
        if not isinstance(ods, Mapping):
            raise NeuronConfigError("on_device_sampling_config must be an object or null")
        topk = ods.get("global_topk")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise NeuronConfigError(
                f"on_device_sampling_config.global_topk must be a positive integer, got {topk!r}"
            )


def resolve_neuron_config(
    *,
    tp_degree: int,
    max_num_seqs: int,
    max_model_len: int,
    dtype: torch.dtype | str,
    overrides: Any = None,
    on_device_sampling_disabled: bool = False,
    draft: Any = None,
    block: Any = None,
) -> dict[str, Any]:
    """Defaults from vLLM, then the user's overrides, then validation. ``draft``
    (``speculation.Draft``, or None) adds fused speculation's keys, ``block``
    (``block_kv.BlockLayout``, or None) the block KV layout's."""
    from vllm_neuronx import block_kv, speculation

    parsed = parse_overrides(overrides)
    check_known_keys(parsed)
    k = draft.speculation_length if draft is not None else 0
    cfg = merge_overrides(
        default_neuron_config(
            tp_degree=tp_degree,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            dtype=dtype,
            speculation_length=k,
        ),
        parsed,
    )
    try:
        speculation.apply(cfg, parsed, draft)
    except speculation.SpeculationError as e:
        raise NeuronConfigError(str(e)) from None
    cfg.update(block_kv.neuron_config_keys(block, max_num_seqs))
    cfg["torch_dtype"] = dtype_name(cfg["torch_dtype"])
    if on_device_sampling_disabled:
        cfg["on_device_sampling_config"] = None
    if draft is not None and cfg.get("on_device_sampling_config") is None:
        raise NeuronConfigError(
            "speculative decoding accepts the draft's tokens on the device, so it needs "
            "on-device sampling: unset NEURON_ON_DEVICE_SAMPLING_DISABLED and keep "
            "on_device_sampling_config")
    validate(cfg, max_num_seqs=max_num_seqs, max_model_len=max_model_len, speculation_length=k)
    return cfg


def asks_for(value: Any) -> bool:
    """Whether a key's value turns its feature on: False, None, 0 and empty do not."""
    return value not in (None, False, 0, "", [], {})


def global_topk(cfg: Mapping[str, Any]) -> int | None:
    """The first-stage candidate count of on-device sampling (None when it is off)."""
    ods = cfg.get("on_device_sampling_config")
    return None if ods is None else int(ods["global_topk"])
