"""Simulated ``neuronx_distributed_inference.modules.lora_serving.lora_checkpoint``: how
NxDI reads one adapter.

A folder: ``adapter_config.json`` (``lora_alpha``, ``use_rslora``) and a ``.safetensors``,
``.bin`` or ``.pt`` file of tensors; a file: NxD's checkpoint with a ``lora_config``
entry. A tensor belongs to the model's LoRA module of the same layer, section and
projection (``layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}``, whatever the prefix);
tensors of modules the model has no LoRA module for are ignored, as in NxDI. Each
module's A is scaled by ``lora_alpha / rank`` (``/ sqrt(rank)`` with rsLoRA), rank = A's
rows, and by 1.0 when ``lora_alpha`` is missing or 0.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

_KEY = re.compile(r"layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.weight)?$")


def _tensors(file: str) -> dict:
    if file.endswith(".safetensors"):
        return load_file(file)
    if file.endswith((".bin", ".pt")):
        return torch.load(file, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"Invalid checkpoint filename {file} for LoRA adapter.")


def load_lora_state_dict(path: str) -> tuple[tuple[float, bool] | None, dict]:
    """((lora_alpha, use_rslora) or None, the tensors) of a folder or NxD file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Invalid checkpoint path {path}.")
    config, state = None, None
    if os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if name.strip() == "adapter_config.json":
                with open(full) as f:
                    config = json.load(f)
            elif name.endswith((".safetensors", ".bin", ".pt")):
                state = _tensors(full)
        if state is None:
            raise ValueError(
                f"No valid LoRA adapter checkpoint in {path}.Supported checkpoint formats "
                "include '*.safetensors', '*.bin', and '.pt'."
            )
    else:
        state = _tensors(path)
        config = state.pop("lora_config", None)
    scaling = None if config is None else (config.get("lora_alpha", 0),
                                           config.get("use_rslora", False))
    return scaling, state


def module_weights(state: dict, scaling) -> dict[tuple[int, str, str], tuple]:
    """(layer, section, proj) -> (A scaled as NxDI scales it, B); a module with only one
    of the two is left out (NxDI keeps the other at zero: no delta)."""
    found: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.search(key)
        if match is not None and torch.is_tensor(tensor):
            layer, section, proj, which = match.groups()
            found.setdefault((int(layer), section, proj), {})[which] = tensor
    out = {}
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            continue
        a, b = pair["A"].float(), pair["B"].float()
        scale = 1.0
        if scaling is not None and scaling[0]:
            alpha, rslora = scaling
            scale = alpha / a.shape[0] ** 0.5 if rslora else alpha / a.shape[0]
        out[module] = (a * scale, b)
    return out
