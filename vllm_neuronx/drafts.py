"""Drafts made from a model itself, to try speculative decoding with nothing to download.

``first_layers_draft`` keeps a Llama-family model's first layers with its embedding, final
norm and LM head: a draft model that shares the target's vocabulary and its first layers'
features (an early exit). Untrained for the purpose, it agrees with the target on the easy
tokens only; a draft distilled from the target, or the family's small sibling, agrees more.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

from safetensors import safe_open
from safetensors.torch import save_file

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
# What a draft folder needs besides weights and config (the tokenizer, for vLLM's checks).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja")


def first_layers_draft(model_path: str, folder: str, num_layers: int) -> str:
    """Write ``folder``: ``model_path``'s first ``num_layers`` layers as an HF checkpoint
    (config, model.safetensors, tokenizer files). Returns the folder."""
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    total = config["num_hidden_layers"]
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers}: {model_path} has {total} layers")
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                layer = _LAYER.match(name)
                if layer is None or int(layer.group(1)) < num_layers:
                    tensors[name] = f.get_tensor(name)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists some families carry
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in _SIDE_FILES:
        if os.path.exists(os.path.join(model_path, name)):
            shutil.copy(os.path.join(model_path, name), os.path.join(folder, name))
    return folder
