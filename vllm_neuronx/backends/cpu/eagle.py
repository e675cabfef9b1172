"""EAGLE heads (EAGLE-1 and EAGLE3) in plain PyTorch, with KV lines of their own.

An EAGLE head is a one-layer (rarely more) Llama decoder that drafts from the target's
hidden states instead of from tokens alone. This file reads a head folder in the format
vLLM 0.16 loads (``config.json`` + ``*.safetensors``, or ``pytorch_model.bin``), runs the
head's decoder over KV lines ``[layers, lines, kv_heads, max_len, head_dim]`` indexed like
the target's (seq_id = line), and returns logits over the TARGET's vocabulary.

The math follows vLLM 0.16 (``vllm/model_executor/models/llama_eagle.py`` and
``llama_eagle3.py``), which NxDI's EAGLE draft (``models/llama/modeling_llama.py``,
``models/model_base.py``, at 4bcdc54) matches for one-layer heads:

EAGLE-1 (``llama_eagle.py`` 100-116; NxDI ``model_base.py`` 1585-1587)::

    h = fc(cat(embed(token), feature))          # fc [H, 2H] (+ bias where NxDI's fc_bias)
    layer 0 without its input_layernorm (vLLM: nn.Identity, llama_eagle.py 43-47; NxDI:
    no input_layernorm unless enable_eagle_draft_input_norm), later layers as Llama's
    out = h + attn + mlp ...                     # the residual stream, NO final norm
    logits = lm_head(out); hidden = out          # (out, out): llama_eagle.py 115-116

EAGLE3 (``llama_eagle3.py`` 95-122, 195-215, 329-360; NxDI ``modeling_llama.py``
974-1003)::

    g = fc(features)                             # fc [H, 3*Ht] over three target layers;
                                                 # skipped when the input is already H wide
    a = cat(input_layernorm(embed(token)), hidden_norm(g))      # 2H wide
    residual = g (hidden_norm(g) with norm_before_residual)
    x = residual + o_proj(attn(a)); x = x + mlp(post_attention_layernorm(x))
    logits_draft = lm_head(norm(x))              # over draft_vocab_size
    logits[:, arange(draft_vocab) + d2t] = logits_draft, -inf elsewhere  (compute_logits)
    hidden = x                                   # the PRE-norm stream (norm's 2nd output)

Input alignment (vLLM 0.16 ``vllm/v1/spec_decode/eagle.py``; NxDI ``model_base.py``):

* The feature of position j is the target's hidden state at j: EAGLE-1 the target's FINAL
  hidden state AFTER its final norm (vLLM: ``LlamaModel.forward`` returns
  ``self.norm(hidden_states, residual)``, ``llama.py`` 435, and the runner passes that,
  ``gpu_model_runner.py`` 4044/4082; NxDI: ``model_base.py`` 1426-1437 takes
  ``full_hidden_states`` after ``self.norm``). EAGLE3: the target's residual stream
  ENTERING layers ``aux_layer_ids`` (vLLM ``llama.py`` 420-428 appends
  ``hidden_states + residual`` before running layer idx, in layer order), concatenated,
  3*Ht wide; vLLM's default ids are ``(2, L // 2, L - 3)`` (``llama.py`` 562-569) unless the
  head's config has ``eagle_aux_hidden_state_layer_ids`` (``gpu_model_runner.py``
  4291-4313). NxDI takes the OUTPUTS of layers ``(1, L // 2 - 1, L - 4)``
  (``model_base.py`` 1402-1405): the same tensors.
* The head's row at position j takes the token at j + 1 with the feature of j, and writes
  the head's KV at position j ("the draft runs one position behind the target"). vLLM's
  first pass (``eagle.py`` ``set_inputs_first_pass`` 718-734): input ids shifted left by
  one (``input_ids[:n-1] = target_token_ids[1:]``), the last slot of each request given the
  token just sampled, positions and hidden states the target's, unshifted. NxDI's prefill
  (``model_base.py`` 2049-2071) and fused decode (2532-2598, 2655-2691) do the same.
* Later proposal steps (``eagle.py`` 544-700): the input is the token just proposed, the
  position one more, and the feature is the head's own ``hidden`` output of the previous
  step (``hidden_states`` = the 2nd value the model returns: EAGLE-1 its output stream,
  EAGLE3 its pre-norm stream; H wide, so EAGLE3 skips fc: ``combine_hidden_states`` is
  applied to the target's features only, ``eagle.py`` 396-401). NxDI: ``prev_hidden`` is
  the draft's ``full_hidden_states`` (pre-norm), ``model_base.py`` 1433-1437 and 2598.

So at a fused step whose input is token x at position p (NxDI ``_eagle_token_gen_forward``,
``model_base.py`` 2517-2750): the head holds KV up to p - 2 and the target's feature
f_{p-1}; it runs (x, f_{p-1}) at p - 1 -> d_1, then (d_1, hidden) at p -> d_2, ...,
(d_{k-2}, hidden) at p + k - 3 -> d_{k-1}; the target verifies x, d_1..d_{k-1} at
p..p+k-1, giving f_p..f_{p+k-1}; then the head is rerun on (x, f_{p-1}), (d_1, f_p), ...,
(d_{k-1}, f_{p+k-2}) at p - 1 .. p + k - 2, overwriting its proposal-time KV with entries
made from the target's features (one call: rows share a line at consecutive positions).
The feature kept for the next step is f at the position of the last token the step keeps
before its new one: f_{p+a} with a drafts accepted (NxDI's rolling buffer,
``model_base.py`` 2532 and 2729-2733); in general f_{p'-1} for the next input at p'.
At prefill of t_0..t_{L-1} the head takes (t_{j+1}, f_j) at j = 0..L-2 and keeps f_{L-1}.

Differences between vLLM's and NxDI's heads (we follow vLLM, and load both checkpoints):
vLLM 0.16 builds EAGLE-1's fc without a bias and takes lm_head/embed_tokens from the
target when the head has none; NxDI requires lm_head in the head (aws-neuron-sdk#1143),
reads fc.bias when the config says ``fc_bias``, drops input_layernorm on every EAGLE-1
layer (vLLM only on layer 0) and has no ``d2t`` (its EAGLE3 lm_head spans the target's
vocabulary). A head's own ``lm_head`` / ``embed_tokens`` are used where present, the
target's otherwise.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vllm_neuronx.backends.cpu.llama import (
    LlamaSpec,
    apply_rope,
    attention_sizes,
    rms_norm,
    rope_tables,
)

METHODS = ("eagle", "eagle3")


class EagleHeadError(ValueError):
    """A head folder that cannot drive the target; the message names the folder."""


def default_aux_layer_ids(num_target_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE3 layers for Llama (``LlamaForCausalLM.
    get_eagle3_aux_hidden_state_layers``): the streams entering these target layers."""
    n = num_target_layers
    return (2, n // 2, n - 3)


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            tensors.update(load_file(f))
        return tensors
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    for f in files:
        tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not files:
        raise EagleHeadError(f"EAGLE head {path}: no *.safetensors or pytorch_model*.bin files")
    return tensors


def _ours(name: str) -> str:
    """A checkpoint's name in vLLM's spelling: no ``model.`` prefix, EAGLE3's
    ``midlayer.`` as ``layers.0.`` (``llama_eagle3.py`` 229-230)."""
    name = name.removeprefix("model.")
    if name.startswith("midlayer."):
        name = "layers.0." + name.removeprefix("midlayer.")
    return name


class EagleHead:
    """One EAGLE-1 or EAGLE3 head: weights, rotary tables, KV lines, and its step."""

    def __init__(
        self,
        method: str,
        spec: LlamaSpec,
        weights: dict[str, Any],
        *,
        vocab_size: int,
        num_lines: int,
        max_len: int,
        dtype: torch.dtype,
        aux_layer_ids: tuple[int, ...] | None = None,
        norm_before_residual: bool = False,
        logit_scale: float = 1.0,
        target_linear: Callable[..., torch.Tensor] = F.linear,
        borrowed: frozenset[str] = frozenset(),
        zeros: Callable[..., torch.Tensor] = torch.zeros,
        path: str = "<memory>",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r}: one of {METHODS}")
        self.method = method
        self.spec = spec
        self.w = weights
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.max_len = max_len
        self.path = path
        self.aux_layer_ids = aux_layer_ids
        self.norm_before_residual = norm_before_residual
        self.logit_scale = logit_scale
        self.target_linear = target_linear
        self.borrowed = borrowed  # "embed" / "lm_head" taken from the target
        shape = (spec.num_layers, num_lines, spec.num_kv_heads, max_len, spec.head_dim)
        self.k_cache = zeros(shape, dtype=dtype)
        self.v_cache = zeros(shape, dtype=dtype)
        self.cos, self.sin = rope_tables(spec, max_len, dtype)
        self.q_size, self.kv_size, self.scale = attention_sizes(spec)
        fc = weights.get("fc")
        self.fc_in = int(fc.shape[1]) if fc is not None else None
        # The target's vocabulary ids of the head's logits (EAGLE3's d2t), or None.
        self.draft_to_target: torch.Tensor | None = weights.get("draft_to_target")

    # -- what the caller feeds ------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def feature_size(self) -> int:
        """Width of the target's feature of one position: EAGLE-1 H (the final hidden
        state after the norm), EAGLE3 3 * Ht (three layers' streams), or H for an EAGLE3
        head without aux hidden states."""
        if self.method == "eagle3" and self.fc_in is not None:
            return self.fc_in
        return self.spec.hidden_size

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features as the head's H-wide hidden input: EAGLE3's fc over the
        three layers (vLLM's ``combine_hidden_states``), else unchanged. Rows so combined
        may be mixed in one ``forward`` with rows fed the head's own ``hidden``."""
        features = features.to(self.dtype)
        if self.method == "eagle3" and self.fc_in is not None and features.shape[-1] == self.fc_in:
            return F.linear(features, self.w["fc"], self.w.get("fc_bias"))
        return features

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str, target_spec: LlamaSpec, **kwargs: Any) -> EagleHead:
        """A head folder (vLLM's or NxDI's keys) for a target of ``target_spec``; the
        keywords are ``from_checkpoint``'s."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise EagleHeadError(f"EAGLE head {path}: no config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        return cls.from_checkpoint(cfg, _read_tensors(path), target_spec, path=path, **kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        cfg: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        target_spec: LlamaSpec,
        *,
        num_lines: int,
        max_len: int,
        dtype: torch.dtype,
        target_weights: dict[str, Any] | None = None,
        target_linear: Callable[..., torch.Tensor] = F.linear,
        method: str | None = None,
        zeros: Callable[..., torch.Tensor] = torch.zeros,
        path: str = "<memory>",
    ) -> EagleHead:
        """The head of a config dict and its checkpoint's tensors, for a target of
        ``target_spec``, with ``num_lines`` KV lines of ``max_len`` in ``dtype``.

        ``target_weights``: the target's weights in our layout (``embed``, ``lm_head``;
        HF names are accepted too), lent where the head has none; ``target_linear``
        multiplies the target's lm_head (the backend's packed kernel, say). ``method``:
        "eagle" or "eagle3" (vLLM's); None reads it from the config's architectures.
        """

        def fail(why: str) -> EagleHeadError:
            return EagleHeadError(f"EAGLE head {path}: {why}")

        archs = cfg.get("architectures") or []
        if method is None:
            method = "eagle3" if any("Eagle3" in a for a in archs) else "eagle"
        if method not in METHODS:
            raise fail(f"method {method!r} is not an EAGLE method ({', '.join(METHODS)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        try:
            spec = LlamaSpec.from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"],
                                             "sliding_window": None})
        except (KeyError, ValueError) as e:
            raise fail(f"config.json: {e}") from None
        if spec.num_layers < 1:
            raise fail("num_hidden_layers must be at least 1")
        hf = {_ours(n): t for n, t in tensors.items()}
        H, Ht, V = spec.hidden_size, target_spec.hidden_size, target_spec.vocab_size
        vocab = int(cfg.get("vocab_size") or V)
        if vocab != V:
            raise fail(f"vocab_size {vocab} differs from the target's {V}")
        eagle_cfg = cfg.get("eagle_config") or {}
        use_aux = method == "eagle3" and eagle_cfg.get("use_aux_hidden_state", True)

        def get(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
            if name not in hf:
                raise fail(f"{name} is missing from the checkpoint")
            t = hf[name]
            if shape is not None and tuple(t.shape) != shape:
                raise fail(f"{name} has shape {list(t.shape)}, expected {list(shape)} "
                           f"(hidden_size {H}, the target's {Ht})")
            return t

        w: dict[str, Any] = {}
        # fc: EAGLE-1 [H, 2H] over (embedding, feature); EAGLE3 [H, 3 * Ht].
        if method == "eagle":
            if H != Ht:
                raise fail(f"hidden_size {H} differs from the target's {Ht}: an EAGLE head "
                           "reads the target's hidden states")
            w["fc"] = get("fc.weight", (H, 2 * H))
        elif use_aux:
            t_hidden = int(cfg.get("target_hidden_size") or H)
            if t_hidden != Ht:
                raise fail(f"fc reads the target's hidden size {t_hidden} (target_hidden_size "
                           f"or hidden_size), but the target's is {Ht}")
            w["fc"] = get("fc.weight", (H, 3 * Ht))
        elif H != Ht:
            raise fail(f"hidden_size {H} differs from the target's {Ht} (no aux hidden states)")
        if "fc.bias" in hf and "fc" in w:
            w["fc_bias"] = get("fc.bias", (H,))
        in0 = 2 * H if method == "eagle3" else H  # layer 0's attention input width
        qkv = spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            width = in0 if i == 0 else H
            w[p + "qkv"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if tuple(w[p + "qkv"].shape) != (qkv, width):
                raise fail(f"{p}self_attn.q/k/v_proj stack to {list(w[p + 'qkv'].shape)}, "
                           f"expected {[qkv, width]} (hidden_size {H}, "
                           f"{spec.num_heads} heads of {spec.head_dim})")
            w[p + "o"] = get(p + "self_attn.o_proj.weight", (H, spec.num_heads * spec.head_dim))
            if spec.attention_bias or p + "self_attn.q_proj.bias" in hf:
                w[p + "qkv_bias"] = torch.cat(
                    [get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if p + "self_attn.o_proj.bias" in hf:
                    w[p + "o_bias"] = get(p + "self_attn.o_proj.bias")
            inter = spec.intermediate_size
            w[p + "gate_up"] = torch.cat([get(p + "mlp.gate_proj.weight", (inter, H)),
                                          get(p + "mlp.up_proj.weight", (inter, H))])
            w[p + "down"] = get(p + "mlp.down_proj.weight", (H, inter))
            if spec.mlp_bias:
                w[p + "gate_up_bias"] = torch.cat([get(p + "mlp.gate_proj.bias"),
                                                   get(p + "mlp.up_proj.bias")])
                w[p + "down_bias"] = get(p + "mlp.down_proj.bias")
            # EAGLE-1's layer 0 has no input norm (vLLM's Identity); EAGLE3's normalises
            # the embedding with it, and the hidden input with hidden_norm.
            if i > 0 or method == "eagle3":
                w[p + "ln1"] = get(p + "input_layernorm.weight", (H,))
            if i == 0 and method == "eagle3":
                w[p + "hidden_norm"] = get(p + "hidden_norm.weight", (H,))
            w[p + "ln2"] = get(p + "post_attention_layernorm.weight", (H,))
        if method == "eagle3":
            w["norm"] = get("norm.weight", (H,))

        borrowed = set()
        lent = target_weights or {}

        def target(*names: str) -> Any:
            return next((lent[n] for n in names if n in lent), None)

        if "embed_tokens.weight" in hf:
            w["embed"] = get("embed_tokens.weight", (V, H))
        else:
            embed = target("embed", "model.embed_tokens.weight", "embed_tokens.weight")
            if embed is None:
                raise fail("embed_tokens.weight is missing and no target weights were given")
            if H != Ht:
                raise fail(f"no embed_tokens.weight, and the target's embedding is {Ht} wide, "
                           f"not hidden_size {H}")
            w["embed"] = embed
            borrowed.add("embed")
        draft_vocab = int(cfg.get("draft_vocab_size") or V) if method == "eagle3" else V
        if "lm_head.weight" in hf:
            w["lm_head"] = get("lm_head.weight", (draft_vocab, H))
        else:
            head = target("lm_head", "lm_head.weight")
            if head is None and target_spec.tie_word_embeddings:
                head = target("embed", "model.embed_tokens.weight", "embed_tokens.weight")
            if head is None:
                raise fail("lm_head.weight is missing and no target weights were given")
            if draft_vocab != V or H != Ht:
                raise fail(f"no lm_head.weight, and the target's lm_head ({V} x {Ht}) cannot "
                           f"stand in for a {draft_vocab} x {H} one")
            w["lm_head"] = head
            borrowed.add("lm_head")
        if method == "eagle3":
            if "d2t" in hf:
                d2t = get("d2t", (draft_vocab,)).long()
                ids = torch.arange(draft_vocab) + d2t
                if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != len(ids):
                    raise fail(f"d2t maps the draft vocabulary outside the target's {V} ids "
                               "or onto one id twice")
                w["draft_to_target"] = ids
            elif draft_vocab != V:
                raise fail(f"draft_vocab_size {draft_vocab} < vocab_size {V} needs d2t")

        aux = None
        if use_aux:
            L = target_spec.num_layers
            given = cfg.get("eagle_aux_hidden_state_layer_ids")
            ids = tuple(given) if given else default_aux_layer_ids(L)
            # vLLM collects each listed layer's input once, in layer order (llama.py 420-428),
            # and cannot read layer 0's (no residual yet): three distinct ids in 1..L-1.
            if len(set(ids)) != 3 or not all(1 <= i < L for i in ids):
                raise fail(f"EAGLE3 needs three distinct target layers in 1..{L - 1} to read "
                           f"({'eagle_aux_hidden_state_layer_ids ' if given else 'the default '}"
                           f"{list(ids)} for a target of {L} layers); set "
                           "eagle_aux_hidden_state_layer_ids in the head's config.json")
            aux = tuple(sorted(ids))
        own = {n: t.to(dtype).contiguous() for n, t in w.items()
               if n not in borrowed and n != "draft_to_target"}
        kept = {n: w[n] for n in borrowed}
        if "draft_to_target" in w:
            kept["draft_to_target"] = w["draft_to_target"]
        return cls(method, spec, {**own, **kept}, vocab_size=V, num_lines=num_lines,
                   max_len=max_len, dtype=dtype, aux_layer_ids=aux,
                   norm_before_residual=bool(cfg.get("norm_before_residual", False)),
                   logit_scale=float(cfg.get("logit_scale", 1.0)),
                   target_linear=target_linear, borrowed=frozenset(borrowed), zeros=zeros,
                   path=path)

    # -- the step -----------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name], self.w.get(name + "_bias"))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.w["embed"]).to(self.dtype)

    def _attend(self, i: int, q, k, v, positions: torch.Tensor, lines: torch.Tensor):
        """q [m, heads, d], k/v [m, kv_heads, d]: every row's K/V stored first, then each
        row attends over its line up to its position."""
        s = self.spec
        m = q.shape[0]
        group = s.num_heads // s.num_kv_heads
        self.k_cache[i, lines, :, positions] = k
        self.v_cache[i, lines, :, positions] = v
        if lines.unique().numel() == m:  # one row per line: batched, as token_generate
            span = int(positions.max()) + 1
            keys = self.k_cache[i, :, :, :span].index_select(0, lines)
            values = self.v_cache[i, :, :, :span].index_select(0, lines)
            visible = torch.arange(span)[None, :] <= positions[:, None]
            out = F.scaled_dot_product_attention(
                q.view(m, s.num_kv_heads, group, s.head_dim), keys, values,
                attn_mask=visible[:, None, None, :], scale=self.scale)
            return out.reshape(m, s.num_heads, s.head_dim)
        out = torch.empty_like(q)
        for line in lines.unique().tolist():
            rows = (lines == line).nonzero().flatten()
            r, pos = rows.numel(), positions[rows]
            span = int(pos.max()) + 1
            keys, values = self.k_cache[i, line, :, :span], self.v_cache[i, line, :, :span]
            qr = q[rows].transpose(0, 1).reshape(s.num_kv_heads, group * r, s.head_dim)
            visible = (torch.arange(span)[None, :] <= pos[:, None]).repeat(group, 1)
            o = F.scaled_dot_product_attention(qr, keys, values, attn_mask=visible,
                                               scale=self.scale)
            out[rows] = o.view(s.num_heads, r, s.head_dim).transpose(0, 1)
        return out

    def _layer(self, i: int, x: torch.Tensor, attn_in: torch.Tensor, positions, lines):
        """x: the residual stream [m, H]; attn_in: the attention's input."""
        s, p = self.spec, f"layers.{i}."
        m = x.shape[0]
        qkv = self._linear(attn_in, p + "qkv")
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(m, s.num_heads + s.num_kv_heads, s.head_dim)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        qk = apply_rope(qk, cos, sin)
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        v = v.view(m, s.num_kv_heads, s.head_dim)
        attn = self._attend(i, q, k, v, positions, lines).reshape(m, self.q_size)
        x = x + self._linear(attn, p + "o")
        h = rms_norm(x, self.w[p + "ln2"], s.rms_norm_eps)
        gate, up = self._linear(h, p + "gate_up").chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, p + "down")

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        lines: torch.Tensor,
        *,
        logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One head step over m rows: row r is (token_ids[r], features[r]) at
        ``positions[r]`` of KV line ``lines[r]`` (the token at j + 1 with the feature of
        j, at j). Rows may share a line at consecutive positions (at most one row per
        (line, position)): every row's K/V is written before any row attends.

        ``features`` [m, F]: the target's features (``feature_size`` wide; EAGLE3's go
        through fc) or the head's own ``hidden`` of a previous step (H wide), or rows of
        both already through ``combine``. Returns fp32 logits over the target's
        vocabulary [m, V] (EAGLE3: -inf off the draft vocabulary; None with
        ``logits=False``: a prefill only writes the head's KV) and ``hidden`` [m, H], the
        feature of the row's next proposal step.
        """
        s, w = self.spec, self.w
        token_ids, positions, lines = token_ids.long(), positions.long(), lines.long()
        if token_ids.numel() == 0:
            return (torch.empty(0, self.vocab_size),
                    torch.empty(0, s.hidden_size, dtype=self.dtype))
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in 0..{self.max_len - 1}")
        e = self.embed(token_ids)
        g = self.combine(features)
        if g.shape[-1] != s.hidden_size:
            raise ValueError(f"features are {features.shape[-1]} wide; this head takes "
                             f"{self.feature_size} (the target's) or {s.hidden_size} (its own)")
        if self.method == "eagle":
            x = F.linear(torch.cat([e, g], dim=-1), w["fc"], w.get("fc_bias"))
            attn_in = x  # layer 0: no input norm
        else:
            normed = rms_norm(g, w["layers.0.hidden_norm"], s.rms_norm_eps)
            x = normed if self.norm_before_residual else g
            attn_in = torch.cat([rms_norm(e, w["layers.0.ln1"], s.rms_norm_eps), normed], -1)
        for i in range(s.num_layers):
            if i > 0:
                attn_in = rms_norm(x, w[f"layers.{i}.ln1"], s.rms_norm_eps)
            x = self._layer(i, x, attn_in, positions, lines)
        if not logits:
            return None, x
        out = x if self.method == "eagle" else rms_norm(x, w["norm"], s.rms_norm_eps)
        if "lm_head" in self.borrowed:
            scores = self.target_linear(out, w["lm_head"], None).float()
        else:
            scores = F.linear(out, w["lm_head"]).float()
        if self.logit_scale != 1.0:
            scores = scores * self.logit_scale
        if self.draft_to_target is not None:
            full = scores.new_full((scores.shape[0], self.vocab_size), float("-inf"))
            full[:, self.draft_to_target] = scores
            scores = full
        return scores, x
