"""The Llama family (Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3) and its
mixture-of-experts kin (Mixtral, Qwen3-MoE) in plain PyTorch.

One readable file, no framework: a decoder that runs NxDI's two graphs, context
encoding (prefill into a KV line) and token generation (one token per line over
the first ``bucket`` positions), on a contiguous KV cache
``[lines, kv_heads, max_len, head_dim]`` per layer. The numerics follow Hugging
Face transformers (fp32 RMSNorm and rotary tables, softmax in fp32) so greedy
tokens match it.

Nothing here is native: the backend may hand in how a linear layer multiplies
(``linear``, e.g. a kernel over packed bf16 weights) and how the KV cache is
allocated (``zeros``); native.py runs whole steps natively beside this file.
Either graph takes a step's LoRA adapters (lora.py): their deltas are added to the
fused projections' outputs where PEFT adds them (qkv before the q/k norms and the
rotary, o, and a dense layer's gate_up and down; experts take none).
With a ``collective`` the model is one tensor-parallel rank's shard (tensor_parallel.py):
it all-reduces the attention's and the MLP's outputs and gathers the LM head's logits.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vllm_neuronx.backends.cpu.quantize import FP8_DTYPE, fp8_kv

if TYPE_CHECKING:
    from vllm_neuronx.backends.cpu.lora import LoraStep
    from vllm_neuronx.backends.cpu.tensor_parallel import Collective

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
# Families that differ from Llama only in the attention's details (HF's modeling files):
# Qwen2 has biases on q, k and v (its config does not say so); Qwen3 RMS-normalises each
# query and key head before the rotary (q_norm, k_norm).
QKV_BIAS_ALWAYS = ("Qwen2ForCausalLM",)
QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Mixture of experts: per token, a router picks ``experts_per_token`` of ``num_experts``
# MLPs (softmax over all, top-k, renormalised over the chosen unless Qwen3-MoE's
# norm_topk_prob says not) and sums their outputs weighted by those probabilities.
# HF checkpoint names of the router and of each expert's gate, up and down projections:
MOE_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.",
                           ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj",
                                                             "down_proj")),
}
# The weights every token multiplies (the rest are norms and the embedding table).
MATMULS = ("qkv", "o", "gate_up", "down", "lm_head", "router")
# Decode attention reads K/V up to the longest row, in steps of this many positions.
ATTEND_STEP = 16


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True, slots=True)
class BlockKV:
    """The block KV layout (prefix caching, chunked prefill): ``num_blocks`` blocks of
    ``block_size`` positions each per layer, ``[num_blocks, block_size, kv_heads, head_dim]``,
    indexed by vLLM's block ids. Block 0 is vLLM's null block: never allocated to a
    sequence, it is what padded block-table entries point at."""

    num_blocks: int  # including the null block
    block_size: int


@dataclass(slots=True)
class Capture:
    """What a step hands back besides logits, for speculation's EAGLE heads: the last hidden
    state of every row (before the final norm), and the hidden states entering
    ``aux_layers`` (vLLM's ``aux_hidden_states``: EAGLE3's features), concatenated."""

    aux_layers: tuple[int, ...] = ()
    hidden: torch.Tensor | None = None  # [..., hidden]: the rows' shape, then hidden
    aux: torch.Tensor | None = None  # [..., len(aux_layers) * hidden]


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """The shape of a Llama-family model, read from its HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    qk_norm: bool = False
    # Mixture of experts (0 experts: every layer has the dense MLP).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0  # each expert's intermediate size
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts
    moe_names: tuple = ()  # MOE_NAMES' entry of the architecture

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaSpec:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(
                f"the CPU backend does not support architectures {archs}; "
                f"supported: {list(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"rope scaling {kind!r} is not supported (llama3, linear)")
        heads = cfg["num_attention_heads"]
        moe = next((a for a in archs if a in MOE_NAMES), None)
        experts = (cfg.get("num_local_experts") or cfg.get("num_experts") or 0) if moe else 0
        layers = cfg["num_hidden_layers"]
        step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False))
            or any(a in QKV_BIAS_ALWAYS for a in archs),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding_window(cfg),
            qk_norm=any(a in QK_NORM for a in archs),
            num_experts=experts,
            experts_per_token=cfg.get("num_experts_per_tok", 0) if experts else 0,
            expert_size=(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
            if experts else 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            moe_layers=tuple(i for i in range(layers) if experts and i not in dense
                             and (i + 1) % step == 0),
            moe_names=MOE_NAMES[moe] if experts else (),
        )

    @classmethod
    def from_folder(cls, model_path: str) -> LlamaSpec:
        with open(os.path.join(model_path, "config.json")) as f:
            return cls.from_hf_config(json.load(f))


def sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window every layer attends within, or None. Qwen configs carry a window that
    applies only with ``use_sliding_window`` (and then to layers from
    ``max_window_layers`` on, as their ``layer_types`` list); one window for some layers
    and not others is refused rather than applied to all."""
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        return None
    kinds = set(cfg.get("layer_types") or ())
    if kinds == {"full_attention"}:
        return None
    if len(kinds) > 1:
        raise ValueError(
            f"layer_types {sorted(kinds)}: a sliding window on some layers only is not "
            "supported by the CPU backend")
    return window


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Rotary inverse frequencies in fp32, with llama3 or linear scaling."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(spec: LlamaSpec, max_len: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin [max_len, head_dim] of every position, in ``dtype``."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(spec))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_sizes(spec: LlamaSpec) -> tuple[int, int, float]:
    """(query width, key/value width, softmax scale) of one attention layer."""
    return (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim,
            1.0 / math.sqrt(spec.head_dim))


def to_dtype(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in ``dtype``, contiguous; tied weights (one tensor) stay one tensor."""
    converted: dict[int, torch.Tensor] = {}
    for tensor in weights.values():
        if id(tensor) not in converted:
            converted[id(tensor)] = tensor.to(dtype).contiguous()
    return {name: converted[id(tensor)] for name, tensor in weights.items()}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype is torch.float32:  # one fused op; the same arithmetic as below
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, t, d]; cos/sin [b, 1, t, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights, rotary tables and the KV cache of one model, and its two graphs."""

    def __init__(
        self,
        spec: LlamaSpec,
        weights: dict[str, Any],
        *,
        num_lines: int,
        max_len: int,
        dtype: torch.dtype,
        linear: Callable[..., torch.Tensor] = F.linear,
        zeros: Callable[..., torch.Tensor] = torch.zeros,
        kv_fp8: bool = False,
        kv_dtype: torch.dtype | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        blocks: BlockKV | None = None,
        collective: Collective | None = None,
    ) -> None:
        """``kv_dtype``: the KV cache's (default ``dtype``; float8_e4m3fn with ``kv_fp8``):
        a bf16 model computed in fp32 keeps its K/V in bf16, as NxDI and vLLM do.
        ``kv``: K and V caches to share (another model's of this shape: a draft reading
        the target's), instead of allocating them with ``zeros``. ``blocks``: the block KV
        layout instead of one line of ``max_len`` per sequence (``block_rows`` runs it).
        ``collective``: the tensor-parallel ranks this model is one shard of (``spec``
        and ``weights`` the rank's: tensor_parallel.shard_weights), or None."""
        self.spec = spec
        self.collective = collective
        self.dtype = dtype
        self.max_len = max_len
        # Our layout (convert_hf_weights); a matmul weight is whatever ``linear`` takes.
        self.w = weights
        self.linear = linear
        self.blocks = blocks
        if blocks is None:
            shape = (spec.num_layers, num_lines, spec.num_kv_heads, max_len, spec.head_dim)
        else:
            shape = (spec.num_layers, blocks.num_blocks, blocks.block_size, spec.num_kv_heads,
                     spec.head_dim)
        # kv_cache_quant: K/V stored as float8_e4m3fn (quantize.fp8_kv), widened to read;
        # else rounded to kv_dtype where it is narrower than dtype.
        self.kv_fp8 = kv_fp8
        kv_dtype = FP8_DTYPE if kv_fp8 else kv_dtype or dtype
        if kv is None:
            kv = zeros(shape, dtype=kv_dtype), zeros(shape, dtype=kv_dtype)
        elif any(c.shape != shape or c.dtype != kv_dtype for c in kv):
            raise ValueError(f"shared K/V caches must be {list(shape)} {kv_dtype}")
        self.k_cache, self.v_cache = kv
        self.cos, self.sin = rope_tables(spec, max_len, dtype)
        self.q_size, self.kv_size, self.scale = attention_sizes(spec)
        # The sliding window where it masks anything inside a KV line, else None.
        window = spec.sliding_window
        self.window = window if window and window < max_len else None

    # -- weights ------------------------------------------------------------
    @staticmethod
    def convert_hf_weights(
        spec: LlamaSpec, hf: dict[str, torch.Tensor], dtype: torch.dtype,
        quantize: Callable[[list[str], list[torch.Tensor]], Any] | None = None,
    ) -> dict[str, Any]:
        """HF names -> our fused layout (qkv and gate_up stacked), in ``dtype``.

        ``quantize`` gets each matmul's HF modules (dotted names, e.g.
        ``model.layers.0.self_attn.q_proj``) and their weights, and returns the fused
        weight quantized (kept as it returns it), or None (stacked, in ``dtype``)."""

        def key(name: str) -> str:
            for k in (f"model.{name}", name):
                if k in hf:
                    return k
            raise KeyError(f"weight {name!r} missing from the checkpoint")

        def get(name: str) -> torch.Tensor:
            return hf[key(name)]

        out: dict[str, Any] = {
            "embed": get("embed_tokens.weight"),
            "norm": get("norm.weight"),
        }
        quantized: dict[str, Any] = {}

        def linear(ours: str, *modules: str) -> None:
            """One matmul from HF modules (stacked along their rows)."""
            names = [key(m + ".weight").removesuffix(".weight") for m in modules]
            parts = [hf[n + ".weight"] for n in names]
            q = quantize(names, parts) if quantize is not None else None
            if q is not None:
                quantized[ours] = q
            else:
                out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]

        untied = "lm_head.weight" in hf and not spec.tie_word_embeddings
        if untied:
            linear("lm_head", "lm_head")
        else:  # HF's lm_head is the embedding's Parameter: quantizing it makes a copy
            q = quantize(["lm_head"], [out["embed"]]) if quantize is not None else None
            if q is not None:
                quantized["lm_head"] = q
            else:
                out["lm_head"] = out["embed"]
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            linear(p + "qkv", *[p + f"self_attn.{n}_proj" for n in "qkv"])
            linear(p + "o", p + "self_attn.o_proj")
            if spec.is_moe(i):
                router, expert, (gate, up, down) = spec.moe_names
                linear(p + "router", p + router)
                for e in range(spec.num_experts):
                    x = p + expert.format(e=e)
                    linear(p + f"experts.{e}.gate_up", x + gate, x + up)
                    linear(p + f"experts.{e}.down", x + down)
            else:
                linear(p + "gate_up", p + "mlp.gate_proj", p + "mlp.up_proj")
                linear(p + "down", p + "mlp.down_proj")
            out[p + "ln1"] = get(p + "input_layernorm.weight")
            out[p + "ln2"] = get(p + "post_attention_layernorm.weight")
            if spec.qk_norm:
                out[p + "q_norm"] = get(p + "self_attn.q_norm.weight")
                out[p + "k_norm"] = get(p + "self_attn.k_norm.weight")
            if spec.attention_bias:
                out[p + "qkv_bias"] = torch.cat(
                    [get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
                )
                if f"model.{p}self_attn.o_proj.bias" in hf or f"{p}self_attn.o_proj.bias" in hf:
                    out[p + "o_bias"] = get(p + "self_attn.o_proj.bias")
            if spec.mlp_bias:
                out[p + "gate_up_bias"] = torch.cat(
                    [get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")]
                )
                out[p + "down_bias"] = get(p + "mlp.down_proj.bias")
        return {**to_dtype(out, dtype), **quantized}

    @staticmethod
    def is_matmul(name: str) -> bool:
        return name.rsplit(".", 1)[-1] in MATMULS

    # -- the decoder ----------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ weight^T + bias."""
        return self.linear(x, self.w[name], self.w.get(name + "_bias"))

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A row-parallel output summed over the tensor-parallel ranks."""
        return x if self.collective is None else self.collective.all_reduce(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The table may stay in bf16 when compute is fp32: rows widen exactly.
        return F.embedding(input_ids, self.w["embed"]).to(self.dtype)

    def _layer(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
        lora: LoraStep | None = None,
    ) -> torch.Tensor:
        s, w, p = self.spec, self.w, f"layers.{i}."
        b, t, _ = x.shape
        h = rms_norm(x, w[p + "ln1"], s.rms_norm_eps)
        qkv = self._linear(h, p + "qkv")
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(b, t, s.num_heads + s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=2)
            qk = torch.cat([rms_norm(q, w[p + "q_norm"], s.rms_norm_eps),
                            rms_norm(k, w[p + "k_norm"], s.rms_norm_eps)], dim=2)
        # Rotary on query and key heads together: half the small ops per layer.
        qk = apply_rope(qk.transpose(1, 2), cos, sin)
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        v = v.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        attn = attend(i, q, k, v).transpose(1, 2).reshape(b, t, self.q_size)  # [b, t, q]
        o = self._linear(attn, p + "o")
        if lora is not None:
            lora.apply(i, "o", attn, o)
        x = x + self._reduce(o)
        h = rms_norm(x, w[p + "ln2"], s.rms_norm_eps)
        if s.is_moe(i):
            return x + self._reduce(self._experts(p, h))
        return x + self._reduce(self._mlp(p, h, lora, i))

    def _mlp(self, prefix: str, h: torch.Tensor, lora: LoraStep | None = None,
             layer: int = 0) -> torch.Tensor:
        gate_up = self._linear(h, prefix + "gate_up")
        if lora is not None:
            lora.apply(layer, "gate_up", h, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        down = self._linear(act, prefix + "down")
        if lora is not None:
            lora.apply(layer, "down", act, down)
        return down

    def _experts(self, p: str, h: torch.Tensor) -> torch.Tensor:
        """Each token through its chosen experts, summed by the router's weights, the
        experts taken in index order as HF does."""
        s = self.spec
        flat = h.reshape(-1, h.shape[-1])
        probs = F.softmax(self._linear(flat, p + "router"), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, s.experts_per_token, dim=-1)
        if s.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = self._mlp(p + f"experts.{e}.", flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out.view(h.shape)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.w["norm"], self.spec.rms_norm_eps)
        logits = self._linear(h, "lm_head")
        if self.collective is not None:  # each rank's vocabulary slice, padded at the end
            logits = self.collective.all_gather(logits)[..., :self.spec.vocab_size].contiguous()
        return logits.float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of last hidden states (before the final norm) [..., hidden]."""
        return self._logits(h)

    def _layers(self, x, cos, sin, attend, lora, capture: Capture | None) -> torch.Tensor:
        """Every layer over x, keeping what ``capture`` asks for."""
        aux = []
        for i in range(self.spec.num_layers):
            if capture is not None and i in capture.aux_layers:
                aux.append((capture.aux_layers.index(i), x))
            x = self._layer(i, x, cos, sin, attend, lora)
        if capture is not None:
            capture.hidden = x
            if capture.aux_layers:
                capture.aux = torch.cat([t for _, t in sorted(aux, key=lambda a: a[0])], -1)
        return x

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """K or V values as the cache holds them."""
        return fp8_kv(x) if self.kv_fp8 else x.to(self.k_cache.dtype)

    def _window_mask(self, mask: torch.Tensor, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        if self.window is None:
            return mask
        k_pos = torch.arange(k_len)
        return mask & (q_pos[..., None] - k_pos < self.window)

    @torch.inference_mode()
    def context_encode(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        seq_ids: torch.Tensor,
        prompt_rows: Sequence[int] = (),
        lora: LoraStep | None = None,
        capture: Capture | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Prefill ``n`` right-padded prompts [n, width] into KV lines ``seq_ids``
        (with ``lora``: each row's adapter).

        Returns fp32 logits of each prompt's last real token, [n, vocab], and for
        each row in ``prompt_rows`` the fp32 logits of all its positions, [len, vocab].
        ``capture`` gets the hidden states of every position, [n, width, ...].
        """
        n, t = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self.cos[:t][None, None], self.sin[:t][None, None]
        positions = torch.arange(t)
        mask = self._window_mask(positions[None, :] <= positions[:, None], positions, t)
        lines = seq_ids.tolist()

        def attend(i, q, k, v):
            k, v = self._stored(k), self._stored(v)
            for row, line in enumerate(lines):
                self.k_cache[i, line, :, :t] = k[row]
                self.v_cache[i, line, :, :t] = v[row]
            k, v = k.to(self.dtype), v.to(self.dtype)  # attend over what the cache holds
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True
            )

        x = self._layers(x, cos, sin, attend, lora, capture)
        last = x[torch.arange(n), lengths - 1]
        every = {row: self._logits(x[row, : int(lengths[row])]) for row in prompt_rows}
        return self._logits(last), every

    @torch.inference_mode()
    def token_generate(
        self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
        bucket: int, lora: LoraStep | None = None,
    ) -> torch.Tensor:
        """Decode one token per row: input_ids/positions [m], seq_ids [m] sorted (with
        ``lora``: each row's adapter).

        Each row writes its K/V at its position and attends over its own line.
        The bucket bounds the positions; attention reads only up to the longest
        row (rounded up to ``ATTEND_STEP``), since positions past it are masked
        anyway and reading them is most of a decode step's memory traffic.
        Returns fp32 logits [m, vocab].
        """
        x = self.decode_rows(input_ids[:, None], positions[:, None], seq_ids, bucket, lora)
        return self._logits(x[:, 0])

    @torch.inference_mode()
    def decode_rows(
        self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
        bucket: int, lora: LoraStep | None = None, capture: Capture | None = None,
    ) -> torch.Tensor:
        """``t`` tokens per line: input_ids/positions [m, t] (each row's positions
        consecutive), seq_ids [m] sorted and unique. Every token's K/V is written before
        any attends, so t tokens at p..p+t-1 are a speculation's verify pass (t = 1: a
        decode). Returns the last hidden states [m, t, hidden], before the final norm
        (``logits`` makes them logits); ``capture`` gets them and the aux layers'."""
        s = self.spec
        m, t = input_ids.shape
        span = min(bucket, round_up(int(positions.max()) + 1, ATTEND_STEP))
        x = self.embed(input_ids)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [m, 1, t, d]
        visible = torch.arange(span) <= positions[..., None]  # [m, t, span]
        visible = self._window_mask(visible, positions, span)
        # Query heads grouped by their KV head: [m, kv_heads, group * t, d] attends as a
        # "query length" of group * t, so K/V are read once per KV head, not repeated.
        bias = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        group = s.num_heads // s.num_kv_heads
        if t == 1:  # the same for every query head of a group
            bias = bias[:, None]
        else:
            bias = bias[:, None, None].expand(m, 1, group, t, span).reshape(m, 1, group * t,
                                                                            span)
        # Sorted, unique seq_ids on consecutive lines (one row, or every line) are a
        # view of the cache; only scattered lines need a gathering copy.
        first = int(seq_ids[0])
        lines = slice(first, first + m) if int(seq_ids[-1]) - first == m - 1 else None
        rows = seq_ids[:, None].expand(m, t)

        def attend(i, q, k, v):
            # k, v [m, kv_heads, t, d] -> the cache's [m, t, kv_heads, d] at (line, position)
            self.k_cache[i, rows, :, positions] = self._stored(k.transpose(1, 2))
            self.v_cache[i, rows, :, positions] = self._stored(v.transpose(1, 2))
            if lines is not None:
                keys, values = self.k_cache[i, lines, :, :span], self.v_cache[i, lines, :, :span]
            else:
                keys = self.k_cache[i, :, :, :span].index_select(0, seq_ids)
                values = self.v_cache[i, :, :, :span].index_select(0, seq_ids)
            keys, values = keys.to(self.dtype), values.to(self.dtype)
            out = F.scaled_dot_product_attention(
                q.reshape(m, s.num_kv_heads, group * t, s.head_dim), keys, values,
                attn_mask=bias, scale=self.scale,
            )
            return out.view(m, s.num_heads, t, s.head_dim)

        return self._layers(x, cos, sin, attend, lora, capture)

    @torch.inference_mode()
    def block_rows(
        self, input_ids: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor,
        slot_mapping: torch.Tensor, lora: LoraStep | None = None,
    ) -> torch.Tensor:
        """The block layout's one graph: ``t`` tokens per sequence, input_ids/positions
        [n, t] (each row's positions consecutive, padding past them), written at
        ``slot_mapping`` [n, t] (block * block_size + offset; -1: padding, not written), and
        each attending to its sequence's positions up to its own through ``block_table``
        [n, W] (vLLM's block ids; padded with the null block 0). A prefix-cached prefill's
        suffix, a decode (t = 1) and a chunk of a prompt are all this. Returns the last
        hidden states [n, t, hidden], before the final norm (``logits`` makes them logits)."""
        s, bs = self.spec, self.blocks.block_size
        n, t = input_ids.shape
        span = round_up(int(positions.max()) + 1, ATTEND_STEP)
        width = min(-(-span // bs), block_table.shape[1])  # blocks with a visible position
        table = block_table[:, :width]
        x = self.embed(input_ids)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, t, d]
        visible = torch.arange(width * bs) <= positions[..., None]  # [n, t, width * bs]
        visible = self._window_mask(visible, positions, width * bs)
        real = slot_mapping >= 0
        slots = slot_mapping[real]

        def attend(i, q, k, v):
            # Indexed through byte views where the cache is fp8: torch's CPU indexing takes
            # no float8 (the bytes move unchanged).
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            if self.kv_fp8:
                k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
            # k, v [n, kv_heads, t, d] -> the cache's [blocks * block_size, kv_heads, d]
            for cache, new in ((k_cache, k), (v_cache, v)):
                stored = self._stored(new.transpose(1, 2)[real])
                cache.view(-1, s.num_kv_heads, s.head_dim)[slots] = \
                    stored.view(torch.uint8) if self.kv_fp8 else stored
            # [n, width, bs, kv_heads, d] -> [n, kv_heads, width * bs, d]
            keys, values = (cache[table].flatten(1, 2).transpose(1, 2)
                            for cache in (k_cache, v_cache))
            if self.kv_fp8:
                keys, values = keys.view(FP8_DTYPE), values.view(FP8_DTYPE)
            return F.scaled_dot_product_attention(
                q, keys.to(self.dtype), values.to(self.dtype), attn_mask=visible[:, None],
                scale=self.scale, enable_gqa=True)

        return self._layers(x, cos, sin, attend, lora, None)
