"""Weights and KV values quantized as NxD quantizes them (quant_config.py says what the
keys ask for), so the CPU backend's tokens are those of the model a Neuron device runs.

- int8: torch's own quantizers, as NxD calls them: per channel, each row's absolute
  maximum over 127; per tensor, torch's MinMaxObserver (the absolute maximum over
  127.5); values rounded to nearest even and clamped to [-128, 127].
- f8e4m3: each row's (or the tensor's) absolute maximum over 240 (Neuron's fp8 range),
  values clamped to +-240 and cast to float8_e4m3fn.
- The KV cache (``kv_cache_quant``): a direct cast to float8_e4m3fn, clamped to its
  +-448 so that no value turns into NaN.

A weight is dequantized as ``values * scale`` per output row. Fused weights (q, k and
v; gate and up) quantize each HF module on its own, then stack: a per-tensor scale
stays the scale of its module's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_neuronx.quant_config import FP8, FP8_WEIGHT_MAX, QuantConfig

FP8_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
# torch's default for its observers' smallest scale (NxD's PerChannelAbsMaxObserver too).
_EPS = torch.finfo(torch.float32).eps
_FP8_MIN_SCALE = 1e-5  # NxD's floor for per-channel fp8 scales


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A [n, k] weight as int8 or float8_e4m3fn values and the scale of each row."""

    values: torch.Tensor  # [n, k]
    scale: torch.Tensor  # [n] fp32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.values.to(torch.float32) * self.scale[:, None]).to(dtype)


def _int8(w: torch.Tensor, per_channel: bool) -> QuantizedWeight:
    n = w.shape[0]
    zero = torch.zeros(n, dtype=torch.int64)
    if per_channel:
        scale = torch.clamp(w.abs().amax(dim=1) / 127.0, min=_EPS)
        q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        return QuantizedWeight(q.int_repr(), scale)
    scale = torch.clamp(w.abs().max() / 127.5, min=_EPS)
    q = torch.quantize_per_tensor(w, float(scale), 0, torch.qint8)
    return QuantizedWeight(q.int_repr(), torch.full((n,), float(q.q_scale())))


def _fp8(w: torch.Tensor, per_channel: bool) -> QuantizedWeight:
    if per_channel:
        scale = torch.clamp(w.abs().amax(dim=1) / FP8_WEIGHT_MAX, min=_FP8_MIN_SCALE)
    else:
        scale = (w.abs().max() / FP8_WEIGHT_MAX).expand(w.shape[0])
    values = torch.clamp(w / scale[:, None], -FP8_WEIGHT_MAX, FP8_WEIGHT_MAX).to(FP8_DTYPE)
    return QuantizedWeight(values, scale.float().contiguous())


def quantize(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """One HF module's [n, k] weight (any float dtype), quantized in fp32."""
    w = weight.to(torch.float32)
    return (_fp8 if config.dtype == FP8 else _int8)(w, config.per_channel)


def quantize_parts(parts: list[torch.Tensor], config: QuantConfig) -> QuantizedWeight:
    """HF modules fused along their rows (q, k, v): each quantized on its own."""
    quantized = [quantize(p, config) for p in parts]
    if len(quantized) == 1:
        return quantized[0]
    return QuantizedWeight(torch.cat([q.values for q in quantized]),
                           torch.cat([q.scale for q in quantized]))


def fp8_kv(x: torch.Tensor) -> torch.Tensor:
    """K or V values as the fp8 KV cache holds them."""
    return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_DTYPE)
