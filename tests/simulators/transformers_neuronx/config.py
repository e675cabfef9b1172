"""``transformers_neuronx.config``: the four config classes vLLM builds, same signatures.

Unlike TNx (which asserts on some and ignores others), every unknown keyword is
a TypeError here, and values are checked when the config is built.
"""

from __future__ import annotations

import copy
import math

from transformers_neuronx.constants import LAYOUTS

QUANT_DTYPES = ("s8", "f8e4m3fn")
QUANTIZE_METHODS = ("vector_dynamic", "direct_cast")
AMP_DTYPES = ("f32", "bf16", "f16")
LOGITS_DTYPES = ("float32", "float16", "bfloat16")


class QuantizationConfig:
    """Weight quantization (``quant=`` of NeuronConfig)."""

    def __init__(
        self,
        quant_dtype="s8",
        dequant_dtype="f16",
        quantize_method="vector_dynamic",
        quantize_attn=True,
        no_quantize_list=None,
    ):
        if quant_dtype not in QUANT_DTYPES:
            raise NotImplementedError(
                f"{quant_dtype} is not implemented. Available options are {','.join(QUANT_DTYPES)}"
            )
        if quantize_method not in QUANTIZE_METHODS:
            raise NotImplementedError(
                f"{quantize_method} is not implemented. Available options are "
                f"{','.join(QUANTIZE_METHODS)}"
            )
        if dequant_dtype not in AMP_DTYPES:
            raise ValueError(f"dequant_dtype {dequant_dtype!r} must be one of {AMP_DTYPES}")
        self.quant_dtype = quant_dtype
        self.dequant_dtype = dequant_dtype
        self.quantize_method = quantize_method
        self.quantize_attn = bool(quantize_attn)
        self.no_quantize_list = list(no_quantize_list or [])


class ContinuousBatchingConfig:
    """KV lines shared by ``batch_size_for_shared_caches`` sequences."""

    def __init__(self, **kwargs):
        known = {
            "max_num_seqs",
            "batch_size_for_shared_caches",
            "max_model_len",
            "optimized_paged_attention",
            "enable_chunked_prefill",
        }
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unexpected key word arguments: {sorted(unknown)}")
        seqs = kwargs.get("max_num_seqs")
        if seqs is None:
            if "batch_size_for_shared_caches" not in kwargs:
                raise TypeError("ContinuousBatchingConfig needs batch_size_for_shared_caches")
            seqs = kwargs["batch_size_for_shared_caches"]
        if not isinstance(seqs, int) or isinstance(seqs, bool) or seqs < 1:
            raise ValueError(f"batch_size_for_shared_caches must be a positive int, got {seqs!r}")
        self.max_num_seqs = seqs
        self.max_model_len = kwargs.get("max_model_len")
        self.optimized_paged_attention = bool(kwargs.get("optimized_paged_attention") or False)
        self.enable_chunked_prefill = bool(kwargs.get("enable_chunked_prefill") or False)
        if self.enable_chunked_prefill and not self.optimized_paged_attention:
            raise AssertionError("chunked prefill is only supported with optimized paged attention")
        self.block_size = None
        self.num_blocks = None

    @property
    def batch_size_for_shared_caches(self) -> int:
        return self.max_num_seqs


class GenerationConfig:
    """On-device sampling settings (``on_device_generation=`` / update_generation_config)."""

    def __init__(
        self,
        *,
        max_length=None,
        do_sample=False,
        top_k=50,
        top_p=1.0,
        top_p_min_tokens=1,
        global_top_k=None,
        eos_token_id=None,
        temperature=1.0,
        dynamic=False,
        deterministic=False,
        per_batch_line=False,
    ):
        self.max_length = max_length
        self.do_sample = do_sample
        self.per_batch_line = per_batch_line
        self.top_k = top_k
        self.top_p = [float(p) for p in top_p] if isinstance(top_p, list) else float(top_p)
        self.temperature = (
            [float(t) for t in temperature] if isinstance(temperature, list) else float(temperature)
        )
        self.top_p_min_tokens = top_p_min_tokens
        self.global_top_k = global_top_k
        self.eos_token_id = eos_token_id
        self.dynamic = dynamic
        self.deterministic = deterministic

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.__dict__ == other.__dict__

    __hash__ = None  # mutable, compared by value

    def validated(self, batch_size: int, vocab_size: int) -> GenerationConfig:
        """A copy with per-line lists expanded, after range checks (TNx's validation,
        plus the value ranges the device sampler assumes)."""
        cfg = copy.deepcopy(self)
        if cfg.global_top_k is not None:
            if not cfg.dynamic:
                raise AssertionError(
                    "Dynamic on device generation must be enabled when global_top_k is set."
                )
            _check_int("global_top_k", cfg.global_top_k, 1, vocab_size)
        limit = cfg.global_top_k or vocab_size
        fields = ("top_k", "top_p", "temperature", "top_p_min_tokens")
        if cfg.per_batch_line:
            for name in fields:
                value = getattr(cfg, name)
                if not isinstance(value, list):
                    setattr(cfg, name, [value] * batch_size)
                elif len(value) != batch_size:
                    raise AssertionError(
                        f"For per batch-line sampling, {name} must have batch_size={batch_size} "
                        f"entries, got {len(value)}"
                    )
        else:
            for name in fields:
                if isinstance(getattr(cfg, name), list):
                    raise AssertionError(
                        "Sampling parameters cannot be of type list when per_batch_line = False"
                    )
        values = {n: getattr(cfg, n) for n in fields}
        rows = zip(*(v if isinstance(v, list) else [v] for v in values.values()), strict=True)
        for line, (top_k, top_p, temperature, min_tokens) in enumerate(rows):
            where = f" (batch line {line})" if cfg.per_batch_line else ""
            _check_int(f"top_k{where}", top_k, 1, limit)
            _check_int(f"top_p_min_tokens{where}", min_tokens, 1, vocab_size)
            if not (isinstance(top_p, float) and 0.0 < top_p <= 1.0):
                raise ValueError(f"top_p{where} must be in (0, 1], got {top_p!r}")
            if not (
                isinstance(temperature, float) and temperature > 0 and math.isfinite(temperature)
            ):
                raise ValueError(f"temperature{where} must be > 0, got {temperature!r}")
        return cfg


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


# TNx NeuronConfig keywords and defaults (the simulator models the ones marked below).
_NEURON_CONFIG_DEFAULTS = {
    "sparse_attn": None,
    "quant": None,
    "kv_cache_quant": None,
    "continuous_batching": None,
    "attention_layout": "HSB",
    "collectives_layout": "HSB",
    "cache_layout": "SBH",
    "padding_side": "left",
    "group_query_attention": None,
    "sequence_parallel_norm": False,
    "sequence_parallel_norm_threshold": 2048,
    "bf16_rms_norm": False,
    "on_device_embedding": False,
    "on_device_generation": None,
    "all_reduce_dtype": None,
    "cast_logits_dtype": "float32",
    "fuse_qkv": False,
    "qkv_tiling": False,
    "weight_tiling": False,
    "mlp_in_weight_tiling_permute_order": [1, 2, 0, 3],
    "mlp_out_weight_tiling_permute_order": [1, 2, 0, 3],
    "log_softmax_scores": False,
    "shard_over_sequence": False,
    "output_all_logits": False,
    "attn_output_transposed": False,
    "fused_rmsnorm_qkv": False,
    "fused_rmsnorm_mlp": False,
    "mlp_out_weight_transpose": False,
    "fuse_mlp": False,
    "is_eagle_target": False,
    "is_eagle_draft": False,
    "has_pre_attention_norm": True,
    "compilation_worker_count": None,
    "duplicate_q_weight_sos": False,
}
# Features that change results and that the simulator does not model: refused
# when set, rather than silently ignored.
NOT_MODELLED = {
    "sparse_attn": None,
    "kv_cache_quant": None,
    "log_softmax_scores": False,
    "shard_over_sequence": False,
    "output_all_logits": False,
    "is_eagle_target": False,
    "is_eagle_draft": False,
    "on_device_embedding": False,
    "has_pre_attention_norm": True,
}


class NeuronConfig:
    """Features and layouts of the compiled model; keyword-only, as in TNx."""

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(_NEURON_CONFIG_DEFAULTS)
        if unknown:
            raise TypeError(f"Unexpected NeuronConfig keyword arguments: {sorted(unknown)}")
        values = copy.deepcopy(_NEURON_CONFIG_DEFAULTS)
        values.update(kwargs)
        for name, value in values.items():
            setattr(self, name, value)
        for name in ("attention_layout", "collectives_layout", "cache_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {LAYOUTS}")
        if self.padding_side not in ("left", "right"):
            raise AssertionError(f"padding_side={self.padding_side!r} must be 'left' or 'right'")
        if self.cast_logits_dtype not in LOGITS_DTYPES:
            raise AssertionError(
                f"cast_logits_dtype={self.cast_logits_dtype!r} not in {LOGITS_DTYPES}"
            )
        for name, cls in (
            ("quant", QuantizationConfig),
            ("continuous_batching", ContinuousBatchingConfig),
            ("on_device_generation", GenerationConfig),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__} or None, got {type(value)}")
        if self.qkv_tiling and not self.fuse_qkv:
            raise AssertionError("QKV weight tiling is only supported when QKV fusion is enabled.")
        self.lhs_aligned = self.padding_side == "right"
        if self.continuous_batching is not None:
            # TNx forces right padding (left-aligned sequences) with continuous batching.
            self.lhs_aligned = True
            self.padding_side = "right"

    def check_modelled(self) -> None:
        for name, off in NOT_MODELLED.items():
            if getattr(self, name) != off:
                raise NotImplementedError(f"the TNx simulator does not model NeuronConfig {name}")
        if self.continuous_batching is None:
            raise NotImplementedError(
                "the TNx simulator models continuous batching only (vLLM's mode); pass "
                "continuous_batching=ContinuousBatchingConfig(...)"
            )
        if self.continuous_batching.optimized_paged_attention:
            raise NotImplementedError("the TNx simulator does not model paged attention")
        if self.cache_layout == "BSH":
            raise NotImplementedError(
                "the TNx simulator does not model the BSH cache layout (1-D query packing)"
            )
