"""Simulated ``neuronx_distributed_inference.modules.generation.sampling``.

The per-row sampling tensor is [batch, 3] = (top_k, top_p, temperature). The
checks are NxDI 0.3's, the strictest release: top_k is -1 or 1..global_topk and
temperature > 0. NxDI 0.10 (SDK 2.26 on) also accepts top_k 0 and temperature 0
(rewritten to greedy rows); our rows never use either, and keeping the stricter rule
checks that they stay valid on every release.
"""

from __future__ import annotations

from typing import Any

import torch


def _as_tensor(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    return torch.tensor(value if isinstance(value, list) else [value])


def prepare_sampling_params(batch_size, top_k=(1,), top_p=(1.0,), temperature=(1.0,)):
    """Stack per-row (top_k, top_p, temperature); one value is broadcast to the batch."""
    top_k, top_p, temperature = (
        _as_tensor(list(v) if isinstance(v, tuple) else v) for v in (top_k, top_p, temperature)
    )
    if not top_k.shape[0] == top_p.shape[0] == temperature.shape[0]:
        raise ValueError("sampling params shapes don't match")
    if top_k.shape[0] == 1:
        top_k, top_p, temperature = (
            t.broadcast_to(batch_size) for t in (top_k, top_p, temperature)
        )
    return torch.stack([top_k, top_p, temperature], dim=1).to(torch.float32)


def validate_sampling_params(params: torch.Tensor, on_device_sampling_config) -> None:
    if params.dim() != 2 or params.shape[1] != 3:
        raise ValueError(f"Expected tensor of shape (batch_size, 3), but got {tuple(params.shape)}")
    params = params.to(torch.float32)
    top_k, top_p, temperature = params[:, 0], params[:, 1], params[:, 2]
    if isinstance(on_device_sampling_config, dict):
        global_topk = on_device_sampling_config["global_topk"]
    else:
        global_topk = on_device_sampling_config.global_topk
    if not torch.all((top_k == -1) | ((top_k > 0) & (top_k <= global_topk))):
        raise ValueError(
            f"Invalid top-k values found. top-k must be -1 or greater than 0 but less than or "
            f"equal to global_topk={global_topk}. Found top_k={top_k.tolist()}."
        )
    if not torch.equal(top_k, top_k.floor()):
        raise ValueError(f"Invalid top-k values found: not integral. Found top_k={top_k.tolist()}")
    if not torch.all((top_p > 0) & (top_p <= 1)):
        raise ValueError(f"Invalid top-p values found: must be in (0, 1]. Found {top_p.tolist()}")
    if not torch.all(temperature > 0):
        raise ValueError(
            f"Invalid temperature values found: must be > 0. Found {temperature.tolist()}"
        )
