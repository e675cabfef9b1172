"""EAGLE head folders for tiny targets (tests/conftest.py's make_tiny_llama), in the format
vLLM 0.16's SpeculativeConfig accepts with method "eagle" / "eagle3", and the target's
features as the head reads them (from HF transformers).

* ``write_eagle_head``: a random EAGLE-1 head (``config.json`` of the target's shape with
  one layer, architectures LlamaForCausalLM, which vLLM's EAGLEConfig renames
  EagleLlamaForCausalLM; ``fc.weight`` [H, 2H] and ``layers.0.*`` without an input norm;
  no ``lm_head``/``embed_tokens`` by default, as vLLM loads it; NxDI's style, with the
  target's ``lm_head`` copied in, on request).
* ``write_eagle3_head``: a random EAGLE3 head (LlamaForCausalLMEagle3: ``fc.weight``
  [H, 3H], ``midlayer.*`` with q/k/v over 2H and ``hidden_norm``, ``norm``, ``lm_head``
  over a draft vocabulary, ``d2t``/``t2d``). vLLM reads the streams entering target layers
  (2, L // 2, L - 3): three distinct layers need L >= 7, so for smaller targets the head's
  config names ``eagle_aux_hidden_state_layer_ids`` (any three of 1..L-1: L >= 4).
* ``make_eagle_target`` + ``write_layer_eagle_head``: a one-layer target whose embedding
  rows all have RMS 1, and an EAGLE-1 head made of that target's layer, so the head's
  proposals mostly agree with the target (it only misses attending to the first token).
* ``hf_features``: the features of every position from HF: EAGLE-1's final hidden state
  after the norm, or EAGLE3's three streams concatenated.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

STD = 0.08  # make_tiny_llama's spread of the weights (HF's 0.02, times 4)


def _target(target_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(target_path, "config.json")) as f:
        cfg = json.load(f)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(target_path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(target_path, name)))
    return cfg, tensors


def _lm_head(cfg: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])


def _write(out_path, cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(out_path, exist_ok=True)
    with open(os.path.join(out_path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({n: t.contiguous() for n, t in tensors.items()},
              os.path.join(out_path, "model.safetensors"))
    return str(out_path)


def _layer(prefix: str, cfg: dict, in_width: int, g: torch.Generator, *,
           input_norm: bool, hidden_norm: bool = False) -> dict[str, torch.Tensor]:
    """One random Llama layer's tensors (norm weights near 1, so they count)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg[
        "num_attention_heads"]
    d = cfg.get("head_dim") or h // heads

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=g) * STD

    def norm():
        return 1.0 + 0.1 * torch.randn(h, generator=g)

    t = {
        f"{prefix}self_attn.q_proj.weight": mat(heads * d, in_width),
        f"{prefix}self_attn.k_proj.weight": mat(kv * d, in_width),
        f"{prefix}self_attn.v_proj.weight": mat(kv * d, in_width),
        f"{prefix}self_attn.o_proj.weight": mat(h, heads * d),
        f"{prefix}mlp.gate_proj.weight": mat(inter, h),
        f"{prefix}mlp.up_proj.weight": mat(inter, h),
        f"{prefix}mlp.down_proj.weight": mat(h, inter),
        f"{prefix}post_attention_layernorm.weight": norm(),
    }
    if input_norm:
        t[f"{prefix}input_layernorm.weight"] = norm()
    if hidden_norm:
        t[f"{prefix}hidden_norm.weight"] = norm()
    return t


def write_eagle_head(target_path: str, out_path, *, seed: int = 1, num_layers: int = 1,
                     lm_head: str | None = None, embed: str | None = None,
                     fc_bias: bool = False, prefix: str = "") -> str:
    """A random EAGLE-1 head for the target at ``target_path``.

    ``lm_head`` / ``embed``: None (absent: vLLM's format, the target's are used), "target"
    (the target's copied in: NxDI's format) or "random". ``fc_bias``: an fc.bias (NxDI's
    ``fc_bias``; vLLM 0.16's fc has none). ``prefix``: e.g. "model." on every name."""
    cfg, target = _target(target_path)
    g = torch.Generator().manual_seed(seed)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tensors = {"fc.weight": torch.randn(h, 2 * h, generator=g) * STD}
    if fc_bias:
        tensors["fc.bias"] = torch.randn(h, generator=g) * STD
    for i in range(num_layers):
        tensors.update(_layer(f"layers.{i}.", cfg, h, g, input_norm=i > 0))
    for name, kind, source in (("lm_head.weight", lm_head, _lm_head(cfg, target)),
                               ("embed_tokens.weight", embed,
                                target["model.embed_tokens.weight"])):
        if kind == "target":
            tensors[name] = source.clone()
        elif kind == "random":
            tensors[name] = torch.randn(vocab, h, generator=g) * STD
        elif kind is not None:
            raise ValueError(f"{name}: {kind!r}")
    head_cfg = {**cfg, "architectures": ["LlamaForCausalLM"], "num_hidden_layers": num_layers,
                "tie_word_embeddings": False}
    if fc_bias:
        head_cfg["fc_bias"] = True
    return _write(out_path, head_cfg, {prefix + n: t for n, t in tensors.items()})


def eagle3_aux_layer_ids(num_target_layers: int) -> list[int] | None:
    """None where vLLM's default (2, L // 2, L - 3) names three distinct layers, else three
    of 1..L-1 for the head's config (a target of at least 4 layers)."""
    n = num_target_layers
    default = (2, n // 2, n - 3)
    if len(set(default)) == 3 and all(1 <= i < n for i in default):
        return None
    if n < 4:
        raise ValueError(f"an EAGLE3 head reads three distinct target layers of 1..L-1: a "
                         f"target of {n} layers has too few (make one of 4 or more)")
    return [1, n // 2, n - 1]


def write_eagle3_head(target_path: str, out_path, *, seed: int = 2,
                      draft_vocab: int | None = None, aux_layer_ids: list[int] | None = None,
                      embed: str | None = None, d2t: bool = True,
                      norm_before_residual: bool = False) -> str:
    """A random EAGLE3 head (vLLM's / the EAGLE authors' keys) for the target.

    ``draft_vocab``: the head's vocabulary (default half the target's), mapped to the
    target's by ``d2t`` (a random sorted subset of the target's ids, always with id 0 and
    the target's eos); ``d2t=False`` writes none (then draft_vocab must be the target's).
    ``aux_layer_ids``: written to the config (default: ``eagle3_aux_layer_ids``)."""
    cfg, target = _target(target_path)
    g = torch.Generator().manual_seed(seed)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    draft_vocab = draft_vocab or (vocab // 2 if d2t else vocab)
    tensors = {"fc.weight": torch.randn(h, 3 * h, generator=g) * STD,
               "norm.weight": 1.0 + 0.1 * torch.randn(h, generator=g),
               "lm_head.weight": torch.randn(draft_vocab, h, generator=g) * STD}
    tensors.update(_layer("midlayer.", cfg, 2 * h, g, input_norm=True, hidden_norm=True))
    if d2t:
        keep = {0, int(cfg.get("eos_token_id") or 0)}
        rest = [i for i in torch.randperm(vocab, generator=g).tolist() if i not in keep]
        ids = torch.tensor(sorted(keep | set(rest[: draft_vocab - len(keep)])))
        tensors["d2t"] = ids - torch.arange(draft_vocab)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
        tensors["t2d"] = t2d
    if embed == "target":
        tensors["embed_tokens.weight"] = target["model.embed_tokens.weight"].clone()
    elif embed == "random":
        tensors["embed_tokens.weight"] = torch.randn(vocab, h, generator=g) * STD
    head_cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": cfg["intermediate_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "num_hidden_layers": 1,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "torch_dtype": "float32",
    }
    if norm_before_residual:
        head_cfg["norm_before_residual"] = True
    ids = aux_layer_ids or eagle3_aux_layer_ids(cfg["num_hidden_layers"])
    if ids is not None:
        head_cfg["eagle_aux_hidden_state_layer_ids"] = list(ids)
    return _write(out_path, head_cfg, tensors)


# -- a head that agrees with its target -------------------------------------------------
def make_eagle_target(path, *, seed: int = 0, **overrides) -> str:
    """A tiny one-layer Llama whose embedding rows all have RMS 1 (its norm weights are HF's
    ones), for ``write_layer_eagle_head``: its input norm is then the identity."""
    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(path, seed=seed, num_hidden_layers=1, **overrides)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    e = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = e / e.pow(2).mean(-1, keepdim=True).sqrt()
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def write_layer_eagle_head(target_path: str, out_path) -> str:
    """An EAGLE-1 head that is the one-layer target's layer. EAGLE-1's fc output is both
    the layer's attention input and its residual, where the target has norm(e) and e: equal
    when the embedding rows have RMS 1 and the input norm's weight is 1 (HF's init;
    ``make_eagle_target``), so fc passes the embedding through (and ignores the feature).
    The head's lm_head folds in the target's final norm weight (EAGLE-1 has no final norm,
    and the norm's 1/rms scale cannot change an argmax). The head's row at position j
    (token j+1) is then the target at j+1 without attention to token 0."""
    cfg, target = _target(target_path)
    if cfg["num_hidden_layers"] != 1:
        raise ValueError("write_layer_eagle_head needs a one-layer target (make_eagle_target)")
    e = target["model.embed_tokens.weight"]
    rms = e.pow(2).mean(-1).sqrt()
    ln1 = target["model.layers.0.input_layernorm.weight"]
    if not (torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
            and torch.allclose(ln1, torch.ones_like(ln1))):
        raise ValueError("the target's embedding rows must have RMS 1 and its input norm "
                         "weight 1 (make_eagle_target)")
    h = cfg["hidden_size"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    fc = torch.zeros(h, 2 * h)
    fc[:, :h] = torch.eye(h) / (1.0 + eps) ** 0.5
    tensors = {"fc.weight": fc,
               "lm_head.weight": _lm_head(cfg, target) * target["model.norm.weight"]}
    for name, t in target.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            tensors[name.removeprefix("model.")] = t.clone()
    head_cfg = {**cfg, "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
    return _write(out_path, head_cfg, tensors)


# -- the target's features ------------------------------------------------------------
def hf_features(target_path: str, token_ids: list[int], aux_layer_ids=None,
                model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [n, V], features [n, F]) of the target at every position of
    ``token_ids``: F = H, the final hidden state after the norm (EAGLE-1), or with
    ``aux_layer_ids`` the streams entering those layers concatenated in layer order,
    3H (EAGLE3)."""
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    states = out.hidden_states  # [0] embeddings, [i] entering layer i, [-1] after the norm
    if aux_layer_ids is None:
        return out.logits[0].float(), states[-1][0]
    return out.logits[0].float(), torch.cat([states[i][0] for i in sorted(aux_layer_ids)], -1)
