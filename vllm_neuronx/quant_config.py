"""The neuron config's quantization keys, read and checked once for every backend.

NxDI (and NxD core beneath it) define what the keys mean; the CPU backend honours the
same keys with the same arithmetic (backends/cpu/quantize.py):

- ``quantized``: quantize the weights of the linear layers, from the HF checkpoint,
  into ``quantized_checkpoints_path`` (NxDI) before compiling;
- ``quantization_type``: ``per_tensor_symmetric`` (NxDI's default: one scale per
  weight, the amax over 127.5 for int8 as torch's MinMaxObserver makes it) or
  ``per_channel_symmetric`` (one scale per output row, the amax over 127);
- ``quantization_dtype``: ``int8`` (NxDI's default) or ``f8e4m3`` (float8_e4m3fn,
  scaled to Neuron's fp8 range of +-240; NxDI then needs XLA_HANDLE_SPECIAL_SCALAR=1
  and UNSAFE_FP8FNCAST=1);
- ``modules_to_not_convert``: modules left in float, matched as NxD matches them
  (an entry that is a substring of the module's dotted name); per channel only: NxD's
  per-tensor quantizer ignores the list while NxDI builds those modules in float;
- ``kv_cache_quant``: the KV cache in float8_e4m3fn, written by a direct cast (no
  scale), read back widened.

A value outside these is an error that names the key, here, before any backend
compiles anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_neuronx import neuron_config as nc

PER_TENSOR = "per_tensor_symmetric"
PER_CHANNEL = "per_channel_symmetric"
QUANTIZATION_TYPES = (PER_TENSOR, PER_CHANNEL)
INT8 = "int8"
FP8 = "f8e4m3"
# NxD's QuantizedDtype names (upper-cased there) for the two dtypes served.
_DTYPE_ALIASES = {"int8": INT8, "f8e4m3": FP8, "f8e4m3fn": FP8}
QUANTIZATION_DTYPES = (INT8, FP8)
# NxD's DtypeBound: Neuron's fp8 e4m3 stops at 240 (torch's e4m3fn at 448).
FP8_WEIGHT_MAX = 240.0
# The environment NxDI's fp8 graphs need (its inference_demo sets it for fp8 weights or
# an fp8 KV cache).
FP8_ENV = {"XLA_HANDLE_SPECIAL_SCALAR": "1", "UNSAFE_FP8FNCAST": "1"}


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """What the quantization keys of one neuron config ask for."""

    weights: bool  # ``quantized``
    per_channel: bool
    dtype: str  # INT8 or FP8
    not_convert: tuple[str, ...]
    kv_fp8: bool  # ``kv_cache_quant``

    @property
    def any(self) -> bool:
        return self.weights or self.kv_fp8

    @property
    def needs_fp8_env(self) -> bool:
        """NxDI's fp8 graphs need FP8_ENV."""
        return (self.weights and self.dtype == FP8) or self.kv_fp8

    def converts(self, module: str) -> bool:
        """Whether the linear layer ``module`` (HF's dotted name, e.g.
        ``model.layers.0.mlp.down_proj`` or ``lm_head``) is quantized: NxD leaves out a
        module when an entry of modules_to_not_convert is a substring of its name."""
        return self.weights and not any(entry in module for entry in self.not_convert)

    @classmethod
    def for_draft(cls, cfg: Mapping[str, Any]) -> QuantConfig:
        """A fused draft model's quantization, as NxDI derives it: the target's keys, with
        ``modules_to_not_convert`` replaced by ``draft_model_modules_to_not_convert`` when
        that is set (NxDI's draft config copies the target's and swaps the list). So a
        target whose list names every layer stays in float while its draft is quantized."""
        draft_list = cfg.get("draft_model_modules_to_not_convert")
        if not draft_list:
            return cls.from_neuron_config(cfg)
        return cls.from_neuron_config({**cfg, "modules_to_not_convert": draft_list})

    @classmethod
    def from_neuron_config(cls, cfg: Mapping[str, Any]) -> QuantConfig:
        """The keys of ``cfg``, checked; NxDI's defaults where they are absent."""
        kind = cfg.get("quantization_type") or PER_TENSOR
        if kind not in QUANTIZATION_TYPES:
            raise nc.NeuronConfigError(
                f"quantization_type={kind!r} is not supported; use one of "
                f"{list(QUANTIZATION_TYPES)}")
        raw_dtype = cfg.get("quantization_dtype") or INT8
        dtype = _DTYPE_ALIASES.get(str(raw_dtype).lower())
        if dtype is None:
            raise nc.NeuronConfigError(
                f"quantization_dtype={raw_dtype!r} is not supported; use one of "
                f"{list(QUANTIZATION_DTYPES)}")
        not_convert = cfg.get("modules_to_not_convert") or ()
        if isinstance(not_convert, str) or not all(isinstance(m, str) and m
                                                   for m in not_convert):
            raise nc.NeuronConfigError(
                f"modules_to_not_convert={not_convert!r} must be a list of module names "
                'such as ["lm_head", "mlp.down_proj"]')
        if not_convert and kind != PER_CHANNEL:
            raise nc.NeuronConfigError(
                f"modules_to_not_convert needs quantization_type {PER_CHANNEL!r}: NxD's "
                f"{kind} quantizer quantizes every linear layer, listed or not")
        for key in ("quantized", "kv_cache_quant"):
            if not isinstance(cfg.get(key, False), bool):
                raise nc.NeuronConfigError(f"{key}={cfg[key]!r} must be true or false")
        return cls(weights=bool(cfg.get("quantized")), per_channel=kind == PER_CHANNEL,
                   dtype=dtype, not_convert=tuple(not_convert),
                   kv_fp8=bool(cfg.get("kv_cache_quant")))
