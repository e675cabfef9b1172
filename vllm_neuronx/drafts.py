"""Drafts made from a model itself, to try speculative decoding with nothing to download.

``INT8_DRAFT`` quantizes only the draft, with NxDI's own keys: the model drafts for itself
from int8 weights (``speculative_config={"model": MODEL, ...}`` with
``override_neuron_config=INT8_DRAFT``), while it verifies in its own dtype, so the tokens are
its own. An int8 copy agrees with the model on about 95% of SmolLM2's greedy tokens and
reads half the bytes per step (the CPU backend; NxDI refuses quantized weights with fused
speculation).

``first_layers_draft`` keeps a Llama-family model's first layers with its embedding, final
norm and LM head: a draft model of its own folder (an early exit). Untrained for the
purpose, it agrees with the target on few tokens (SmolLM2's first 4 or 8 of 30 layers: about
1%); a draft distilled from the target, or the family's small sibling, agrees more.

``eagle_head_from_first_layer`` writes an EAGLE-1 head (vLLM's format, with the LM head NxDI
wants inside) made of the model's first layer: it reads the next token only, not the
model's features, so it is an early exit too and agrees as rarely. It shows the EAGLE path
working; a trained head (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B for its model) is what
gains.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The target's linear layers in float ("layers", "lm_head" name them all), its draft's all
# quantized ("embed" names no linear layer): NxDI's draft config takes
# draft_model_modules_to_not_convert as its modules_to_not_convert.
INT8_DRAFT = {"quantized": True, "quantization_type": "per_channel_symmetric",
              "quantization_dtype": "int8", "modules_to_not_convert": ["layers", "lm_head"],
              "draft_model_modules_to_not_convert": ["embed"]}

_LAYER = re.compile(r"^layers\.(\d+)\.")
# What a draft folder needs besides weights and config (the tokenizer, for vLLM's checks).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja")


def first_layers_draft(model_path: str, folder: str, num_layers: int) -> str:
    """Write ``folder``: ``model_path``'s first ``num_layers`` layers as an HF checkpoint
    (config, model.safetensors, tokenizer files). Returns the folder."""
    config, every = _read(model_path)
    total = config["num_hidden_layers"]
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers}: {model_path} has {total} layers")
    tensors = {}
    for name, t in every.items():
        layer = _LAYER.match(name)
        if layer is None or int(layer.group(1)) < num_layers:
            tensors["model." + name if name != "lm_head.weight" else name] = t
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


def _read(model_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and every tensor of an HF folder, names without ``model.``."""
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name.removeprefix("model.")] = f.get_tensor(name)
    return config, tensors


def eagle_head_from_first_layer(model_path: str, folder: str) -> str:
    """Write ``folder``: an EAGLE-1 head for ``model_path`` made of its first layer.

    EAGLE-1's fc takes [token embedding, feature] and its layer has no input norm, so fc
    passes the embedding through scaled to unit RMS on average (the feature is ignored),
    the input norm's weight is folded into q/k/v, the residual branches (o_proj, down_proj)
    take the same scale, and the final norm's weight is folded into the head's LM head."""
    config, w = _read(model_path)
    embed = w["embed_tokens.weight"].float()
    hidden = config["hidden_size"]
    scale = 1.0 / float(embed.pow(2).mean(-1).sqrt().mean())
    fc = torch.zeros(hidden, 2 * hidden)
    fc[:, :hidden] = torch.eye(hidden) * scale
    ln1 = w["layers.0.input_layernorm.weight"].float()
    tensors = {"fc.weight": fc}
    for name, t in w.items():
        if not name.startswith("layers.0.") or "input_layernorm" in name:
            continue
        t = t.float()
        if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") and name.endswith("weight"):
            t = t * ln1[None, :]
        elif name.split(".")[-2] in ("o_proj", "down_proj"):
            t = t * scale
        tensors[name] = t
    head = w.get("lm_head.weight", embed).float()
    tensors["lm_head.weight"] = head * w["norm.weight"].float()[None, :]
    dtype = getattr(torch, config.get("torch_dtype") or "float32")
    os.makedirs(folder, exist_ok=True)
    save_file({n: t.to(dtype).contiguous() for n, t in tensors.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config.update(num_hidden_layers=1, architectures=["LlamaForCausalLM"],
                  tie_word_embeddings=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder
