"""Simulated ``neuronx_distributed_inference.models.config``.

The config classes take their keys the way NxDI's do: each one popped from
``**kwargs`` by name, with NxDI's default (NxDI's main branch, the 2.29-v2 sync).
NxDI only logs a warning for a key left over and drops it; here it is a TypeError
naming the key, so a misspelled or renamed key (upstream vLLM's
``lora_serving_config``) fails the test instead of vanishing.
tests/test_neuron_config.py checks that vllm_neuronx's reader of NxDI's source finds
here the keys of the committed table's main release, no more and no fewer.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from typing import Any

import torch

CONFIG_FILE = "neuron_config.json"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


# NxD core's quantization_config: the QuantizationType values and the QuantizedDtype
# members (NxDI looks a dtype up by its upper-cased name).
QUANTIZATION_TYPES = ("per_tensor_symmetric", "per_channel_symmetric", "per_key_symmetric",
                      "blockwise_symmetric", "expert_wise_per_channel_symmetric")
QUANTIZED_DTYPES = {
    "INT8": torch.int8,
    "F8E4M3": torch.float8_e4m3fn,
    "F8E4M3FN": torch.float8_e4m3fn,
    "F8E5M2": torch.float8_e5m2,
    "F4E2M1FN_X4": torch.uint16,
    "F8E4M3FN_X4": torch.uint32,
    "F8E5M2_X4": torch.uint32,
}


def quantized_dtype(name: str) -> torch.dtype:
    """NxD's QuantizedDtype.get_dtype: an AssertionError for a name it lacks."""
    if str(name).upper() not in QUANTIZED_DTYPES:
        raise AssertionError(f"{name} is not a valid QuantizedDtype.")
    return QUANTIZED_DTYPES[str(name).upper()]


def _refuse_unknown(cls_name: str, kwargs: dict) -> None:
    """What is left after every known key was popped: NxDI logs it and drops it."""
    if kwargs:
        raise TypeError(
            f"{cls_name} got unexpected keyword arguments {sorted(kwargs)} (real NxDI would "
            "only log a warning and ignore them)"
        )


def to_torch_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unsupported dtype: {value}")
    return _DTYPES[name]


class OnDeviceSamplingConfig:
    def __init__(self, **kwargs) -> None:
        self.do_sample = kwargs.pop("do_sample", False)
        self.top_k = kwargs.pop("top_k", 1)
        self.top_p = kwargs.pop("top_p", 1.0)
        self.temperature = kwargs.pop("temperature", 1.0)
        self.dynamic = kwargs.pop("dynamic", False)
        self.deterministic = kwargs.pop("deterministic", False)
        self.global_topk = kwargs.pop("global_topk", 256)
        self.on_device_sampling_config = kwargs.pop("on_device_sampling_config", True)
        self.top_k_kernel_enabled = kwargs.pop("top_k_kernel_enabled", False)
        self.sampling_dp_degree = kwargs.pop("sampling_dp_degree", 1)
        _refuse_unknown("OnDeviceSamplingConfig", kwargs)
        if not isinstance(self.global_topk, int) or self.global_topk < 1:
            raise ValueError(f"global_topk must be a positive integer, got {self.global_topk!r}")


class NeuronConfig:
    """The compile-time settings of one model (shapes, parallelism, features).

    Every key is popped by name, in NxDI's order and with NxDI's default (the newest
    public source, the 2.29-v2 sync; NxDI 0.10.18399 announces no change to it), so
    the saved config holds every field as NxDI's does, and vllm_neuronx's reader of
    NxDI's source (nxdi_keys.py) finds here exactly the keys it finds in NxDI. Only
    the settings the simulator models are checked.
    """

    def __init__(self, **kwargs) -> None:
        self.batch_size = kwargs.pop("batch_size", 1)
        self.padding_side = kwargs.pop("padding_side", "right")
        self.allow_input_truncation = kwargs.pop("allow_input_truncation", False)
        self.seq_len = kwargs.pop("seq_len", 128)
        self.n_active_tokens = kwargs.pop("n_active_tokens", self.seq_len)
        self.n_positions = kwargs.pop("n_positions", self.seq_len)
        self.on_cpu = kwargs.pop("on_cpu", False)
        self.output_logits = kwargs.pop("output_logits", False)
        if "torch_dtype" in kwargs:
            self.torch_dtype = to_torch_dtype(kwargs.pop("torch_dtype"))
            self.overrides_torch_dtype = kwargs.pop("overrides_torch_dtype", True)
        else:
            self.torch_dtype = torch.bfloat16
            self.overrides_torch_dtype = False
        self.cast_type = kwargs.pop("cast_type", "config")
        self.rpl_reduce_dtype = kwargs.pop("rpl_reduce_dtype", None)
        self.attention_dtype = kwargs.pop("attention_dtype", None)
        self.max_context_length = kwargs.pop("max_context_length", self.seq_len)
        self.max_new_tokens = kwargs.pop("max_new_tokens", self.seq_len - self.max_context_length)
        self.max_length = kwargs.pop("max_length", self.seq_len)
        if self.max_context_length > self.max_length:
            raise ValueError("max_context_length cannot be more than max_length")
        self.vocab_parallel = kwargs.pop("vocab_parallel", False)
        self.enable_cte_modular_flow = kwargs.pop("enable_cte_modular_flow", False)
        self.layer_boundary_markers = kwargs.pop("layer_boundary_markers", False)
        self.fused_qkv = kwargs.pop("fused_qkv", False)
        self.sequence_parallel_enabled = kwargs.pop("sequence_parallel_enabled", False)
        self.weight_gather_seq_len_threshold = kwargs.pop("weight_gather_seq_len_threshold", 32768)
        self.attn_cls = kwargs.pop("attn_cls", "NeuronLlamaAttention")
        self.ctx_batch_size = kwargs.pop("ctx_batch_size", self.batch_size)
        self.tkg_batch_size = kwargs.pop("tkg_batch_size", self.batch_size)
        self.max_batch_size = kwargs.pop("max_batch_size", self.batch_size)
        self.is_continuous_batching = kwargs.pop("is_continuous_batching", False)
        self.kv_cache_batch_size = kwargs.pop("kv_cache_batch_size", self.batch_size)
        self.kv_cache_padding_size = kwargs.pop("kv_cache_padding_size", 0)

        self.on_device_sampling_config = kwargs.pop("on_device_sampling_config", None)
        if isinstance(self.on_device_sampling_config, dict):
            self.on_device_sampling_config = OnDeviceSamplingConfig(
                **self.on_device_sampling_config
            )
        self.disable_argmax_kernel = kwargs.pop("disable_argmax_kernel", False)
        self.async_mode = kwargs.pop("async_mode", False)

        self.enable_bucketing = kwargs.pop("enable_bucketing", False)
        self.buckets = kwargs.pop("buckets", [self.seq_len])
        self.bucket_n_active_tokens = kwargs.pop("bucket_n_active_tokens", False)
        self.context_encoding_buckets = kwargs.pop("context_encoding_buckets", None)
        self.prefix_buckets = kwargs.pop("prefix_buckets", None)
        self.token_generation_buckets = kwargs.pop("token_generation_buckets", None)
        if self.context_encoding_buckets is not None:
            self.context_encoding_buckets = sorted(self.context_encoding_buckets)
            if self.context_encoding_buckets[-1] > self.max_context_length:
                raise ValueError(
                    f"Context bucket {self.context_encoding_buckets[-1]} should be <= "
                    f"{self.max_context_length}"
                )
        if self.token_generation_buckets is not None:
            self.token_generation_buckets = sorted(self.token_generation_buckets)
            if self.token_generation_buckets[-1] > self.max_length:
                raise ValueError(
                    f"Token generation bucket {self.token_generation_buckets[-1]} should be "
                    f"<= {self.max_length}"
                )
        self.token_generation_batches = kwargs.pop("token_generation_batches", None)

        self.quantized = kwargs.pop("quantized", False)
        self.quantized_checkpoints_path = kwargs.pop("quantized_checkpoints_path", None)
        if self.quantized and self.quantized_checkpoints_path is None:
            raise AssertionError("quantized_checkpoints_path is required")  # NxDI asserts
        self.quantization_type = kwargs.pop("quantization_type", "per_tensor_symmetric")
        self.quantization_dtype = kwargs.pop("quantization_dtype", "int8")
        self.quantization_block_size = kwargs.pop("quantization_block_size", None)
        self.quantization_block_axis = kwargs.pop("quantization_block_axis", None)
        self.quantization_scale_dtype = kwargs.pop("quantization_scale_dtype", "f32")
        self.is_mxfp4_compute = kwargs.pop("is_mxfp4_compute", False)
        self.is_full_model_shuffled = kwargs.pop("is_full_model_shuffled", False)
        self.modules_to_not_convert = kwargs.pop("modules_to_not_convert", None)
        self.draft_model_modules_to_not_convert = kwargs.pop(
            "draft_model_modules_to_not_convert", None
        )
        self.kv_cache_quant = kwargs.pop("kv_cache_quant", False)
        if self.quantized:  # NxDI's _verify_quantized_config
            quantized_dtype(self.quantization_dtype)

        self.speculation_length = kwargs.pop("speculation_length", 0)
        self.spec_batch_size = kwargs.pop("spec_batch_size", self.batch_size)
        self.enable_fused_speculation = kwargs.pop("enable_fused_speculation", False)
        self.enable_eagle_speculation = kwargs.pop("enable_eagle_speculation", False)
        self.eagle_rolling_buffer_kernel_enabled = kwargs.pop(
            "eagle_rolling_buffer_kernel_enabled", False
        )
        self.is_eagle3 = kwargs.pop("is_eagle3", False)
        self.is_eagle_draft = kwargs.pop("is_eagle_draft", False)
        self.enable_eagle_draft_input_norm = kwargs.pop("enable_eagle_draft_input_norm", False)
        if self.enable_eagle_speculation:  # NxDI: EAGLE is always fused
            self.enable_fused_speculation = True
        self.token_tree_config = kwargs.pop("token_tree_config", None)
        self.enable_token_tree = self.token_tree_config is not None  # derived, saved too
        self.is_medusa = kwargs.pop("is_medusa", False)
        self.medusa_speculation_length = kwargs.pop("medusa_speculation_length", 0)
        self.num_medusa_heads = kwargs.pop("num_medusa_heads", 0)
        self.medusa_tree = kwargs.pop("medusa_tree", None)

        self.is_block_kv_layout = kwargs.pop("is_block_kv_layout", False)
        self.pa_num_blocks = kwargs.pop("pa_num_blocks", self.batch_size)
        self.pa_block_size = kwargs.pop("pa_block_size", self.seq_len)
        self.is_prefix_caching = kwargs.pop("is_prefix_caching", False)
        self.windowed_context_encoding_size = kwargs.pop("windowed_context_encoding_size", None)
        self.chunked_prefill_config = kwargs.pop("chunked_prefill_config", None)
        self.kv_quant_config = kwargs.pop("kv_quant_config", None)
        self.is_chunked_prefill = self.chunked_prefill_config is not None  # derived
        if self.is_chunked_prefill and not self.is_block_kv_layout:  # NxDI asserts it
            raise AssertionError("is_block_kv_layout has to be true for chunked prefill because "
                                 "it depends on block KV")
        self.tensor_replacement_config = kwargs.pop("tensor_replacement_config", None)
        self.tensor_capture_config = kwargs.pop("tensor_capture_config", None)

        self.lora_config = kwargs.pop("lora_config", None)
        if isinstance(self.lora_config, dict):
            from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

            self.lora_config = LoraServingConfig(**self.lora_config)

        self.tp_degree = kwargs.pop("tp_degree", 1)
        self.cp_degree = kwargs.pop("cp_degree", 1)
        self.mlp_cp_degree = kwargs.pop("mlp_cp_degree", 1)
        self.attention_dp_degree = kwargs.pop("attention_dp_degree", 1)
        self.pp_degree = kwargs.pop("pp_degree", 1)
        self.ep_degree = kwargs.pop("ep_degree", 1)
        self.save_sharded_checkpoint = kwargs.pop("save_sharded_checkpoint", False)
        self.skip_sharding = kwargs.pop("skip_sharding", False)
        self.enable_ve_data_parallel = kwargs.pop("enable_ve_data_parallel", False)
        self.qk_layernorm = kwargs.pop("qk_layernorm", False)
        self.pre_rope_rmsnorm = kwargs.pop("pre_rope_rmsnorm", False)
        self.world_size = kwargs.pop("world_size", None)
        if self.world_size is None:
            self.world_size = self.tp_degree * self.pp_degree * self.ep_degree
        self.start_rank_id = kwargs.pop("start_rank_id", 0)
        self.local_ranks_size = kwargs.pop("local_ranks_size", None)
        if self.local_ranks_size is None:
            self.local_ranks_size = self.world_size
        self.flash_decoding_enabled = kwargs.pop("flash_decoding_enabled", False)
        self.disable_kv_cache_tiling = kwargs.pop("disable_kv_cache_tiling", False)
        # Derived, saved too: NxDI tiles the KV cache (tiles of 128) for fused speculation
        # when max_length allows it (nothing to simulate beyond the flag).
        self.kv_cache_tiling = (
            not self.disable_kv_cache_tiling
            and (self.enable_eagle_speculation or self.enable_fused_speculation)
            and self.max_length > 128 and self.max_length % 128 == 0
        )
        self.k_cache_transposed = kwargs.pop("k_cache_transposed", False)

        # Kernels: a Neuron device's choice, nothing to simulate.
        self.attn_kernel_enabled = kwargs.pop("attn_kernel_enabled", None)
        self.strided_context_parallel_kernel_enabled = kwargs.pop(
            "strided_context_parallel_kernel_enabled", False
        )
        self.qkv_kernel_enabled = kwargs.pop("qkv_kernel_enabled", False)
        self.qkv_nki_kernel_enabled = kwargs.pop("qkv_nki_kernel_enabled", False)
        self.qkv_cte_nki_kernel_fuse_rope = kwargs.pop("qkv_cte_nki_kernel_fuse_rope", False)
        self.qkv_kernel_nbsd_layout = kwargs.pop("qkv_kernel_nbsd_layout", False)
        self.mlp_kernel_enabled = kwargs.pop("mlp_kernel_enabled", False)
        self.mlp_tkg_nki_kernel_enabled = kwargs.pop("mlp_tkg_nki_kernel_enabled", False)
        self.fused_rmsnorm_skip_gamma = kwargs.pop("fused_rmsnorm_skip_gamma", False)
        self.mlp_kernel_fuse_residual_add = kwargs.pop("mlp_kernel_fuse_residual_add", False)
        self.qkv_kernel_fuse_residual_add = kwargs.pop("qkv_kernel_fuse_residual_add", False)
        self.quantized_mlp_kernel_enabled = kwargs.pop("quantized_mlp_kernel_enabled", False)
        self.out_proj_kernel_enabled = kwargs.pop("out_proj_kernel_enabled", False)
        self.activation_quantization_type = kwargs.pop("activation_quantization_type", None)
        self.attn_tkg_nki_kernel_enabled = kwargs.pop("attn_tkg_nki_kernel_enabled", False)
        self.attn_tkg_builtin_kernel_enabled = kwargs.pop("attn_tkg_builtin_kernel_enabled", False)
        self.attn_block_tkg_nki_kernel_enabled = kwargs.pop(
            "attn_block_tkg_nki_kernel_enabled", False
        )
        self.attn_block_tkg_nki_kernel_cache_update = kwargs.pop(
            "attn_block_tkg_nki_kernel_cache_update", False
        )
        self.attn_block_tkg_nki_kernel_cascaded_attention = kwargs.pop(
            "attn_block_tkg_nki_kernel_cascaded_attention", False
        )
        self.attn_block_tkg_nki_kernel_use_online_softmax = kwargs.pop(
            "attn_block_tkg_nki_kernel_use_online_softmax", True
        )
        self.attn_block_tkg_nki_kernel_disable_gpsimd_sb2sb = kwargs.pop(
            "attn_block_tkg_nki_kernel_disable_gpsimd_sb2sb", False
        )
        self.attn_block_cte_nki_kernel_enabled = kwargs.pop(
            "attn_block_cte_nki_kernel_enabled", False
        )
        if self.attn_tkg_nki_kernel_enabled or self.attn_tkg_builtin_kernel_enabled:
            # NxDI's deprecated names turn the block TKG kernel on (config.py 459-467)
            self.attn_block_tkg_nki_kernel_enabled = True
        if self.k_cache_transposed and self.is_block_kv_layout:  # NxDI asserts it
            raise AssertionError("Transposed K cache is not yet supported by block KV cache "
                                 "feature.")
        self.rmsnorm_quantize_kernel_enabled = kwargs.pop("rmsnorm_quantize_kernel_enabled", False)
        self.quantize_clamp_bound = kwargs.pop("quantize_clamp_bound", float("inf"))
        self.moe_fused_nki_kernel_enabled = kwargs.pop("moe_fused_nki_kernel_enabled", None)
        self.router_topk_nki_kernel_enabled = kwargs.pop("router_topk_nki_kernel_enabled", None)
        self.expert_mlp_nki_kernel_enabled = kwargs.pop("expert_mlp_nki_kernel_enabled", None)
        self.shared_mlp_nki_kernel_enabled = kwargs.pop("shared_mlp_nki_kernel_enabled", None)

        self.logical_nc_config = self._get_lnc(kwargs)
        self.lm_head_pad = kwargs.pop("lm_head_pad", self.logical_nc_config > 1)
        self.lm_head_pad_alignment_size = kwargs.pop("lm_head_pad_alignment_size", 1)
        self.cc_pipeline_tiling_factor = kwargs.pop("cc_pipeline_tiling_factor", 2)
        self.seq_len_threshold_for_cc_tiling = kwargs.pop("seq_len_threshold_for_cc_tiling", 16384)
        self.target = kwargs.pop("target", None)
        self.enable_spill_reload_dge = kwargs.pop("enable_spill_reload_dge", False)
        self.weights_to_skip_layout_optimization = kwargs.pop(
            "weights_to_skip_layout_optimization", []
        )
        self.dma_order_config = kwargs.pop("dma_order_config", None)
        self.apply_seq_ids_mask = kwargs.pop("apply_seq_ids_mask", False)
        self.skip_warmup = kwargs.pop("skip_warmup", False)
        self.scratchpad_page_size = kwargs.pop(
            "scratchpad_page_size", 1024 if self.max_context_length >= 32 * 1024 else None
        )
        self.enable_output_completion_notifications = kwargs.pop(
            "enable_output_completion_notifications", False
        )
        self.padded_hidden_size = kwargs.pop("padded_hidden_size", None)
        self.padded_intermediate_size = kwargs.pop("padded_intermediate_size", None)
        self.disable_numeric_cc_token = kwargs.pop("disable_numeric_cc_token", False)
        self.switch_cc = kwargs.pop("switch_cc", False)
        self.ep_dispatch_cc_option = kwargs.pop("ep_dispatch_cc_option", "AR_AG")
        _refuse_unknown(type(self).__name__, kwargs)
        self._validate_batch_bucketing_compatibility()

    def _validate_batch_bucketing_compatibility(self) -> None:
        """NxDI's (config.py 645-690): batch bucketing refused with the features it lacks
        (the simulator checks the block layout's)."""
        if self.token_generation_batches is None:
            return
        features = [what for flag, what in (
            (self.is_prefix_caching, "prefix caching (is_prefix_caching=True)"),
            (self.is_block_kv_layout, "block KV layout (is_block_kv_layout=True)")) if flag]
        if features:
            raise ValueError(
                f"Batch bucketing (token_generation_batches={self.token_generation_batches}) "
                f"is not currently supported with the following features: "
                f"{', '.join(features)}. Please disable batch bucketing or the incompatible "
                "features.")

    def _get_lnc(self, kwargs: dict) -> int:
        """The logical core grouping: the deprecated name, then the current one, else 1
        (the simulator's "platform" is a trn1)."""
        lnc = 1
        if "logical_neuron_cores" in kwargs:
            lnc = int(kwargs.pop("logical_neuron_cores"))
        if "logical_nc_config" in kwargs:
            lnc = int(kwargs.pop("logical_nc_config"))
        return lnc


class MultimodalVisionNeuronConfig(NeuronConfig):
    def __init__(self, **kwargs) -> None:
        self.skip_vision = kwargs.pop("skip_vision", False)
        super().__init__(**kwargs)


class MoENeuronConfig(NeuronConfig):
    """NeuronConfig plus the mixture-of-experts settings (Mixtral, DBRX, Qwen3-MoE).

    NxDI hands its kwargs to NxD core's ``RouterConfig.from_kwargs``, which reads
    router_act_fn and router_dtype; the simulator pops them here.
    """

    def __init__(self, capacity_factor: float | None = None, glu_mlp: bool = True, **kwargs):
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.glu_mlp = glu_mlp
        self.glu_type = kwargs.pop("glu_type", "glu")
        self.hidden_act_scaling_factor = kwargs.pop("hidden_act_scaling_factor", 1.0)
        self.hidden_act_bias = kwargs.pop("hidden_act_bias", 0.0)
        self.gate_clamp_upper_limit = kwargs.pop("gate_clamp_upper_limit", None)
        self.gate_clamp_lower_limit = kwargs.pop("gate_clamp_lower_limit", None)
        self.up_clamp_upper_limit = kwargs.pop("up_clamp_upper_limit", None)
        self.up_clamp_lower_limit = kwargs.pop("up_clamp_lower_limit", None)
        self.use_index_calc_kernel = kwargs.pop("use_index_calc_kernel", False)
        self.moe_mask_padded_tokens = kwargs.pop("moe_mask_padded_tokens", False)
        self.early_expert_affinity_modulation = kwargs.pop(
            "early_expert_affinity_modulation", False
        )
        # Saved under the positive name, as NxDI does.
        self.normalize_top_k_affinities = not kwargs.pop(
            "disable_normalize_top_k_affinities", False
        )
        self.fused_shared_experts = kwargs.pop("fused_shared_experts", False)
        self.shared_experts_sequence_parallel_enabled = kwargs.pop(
            "shared_experts_sequence_parallel_enabled", False
        )
        self.return_expert_index = kwargs.pop("return_expert_index", False)
        self.return_router_logits = kwargs.pop("return_router_logits", False)
        self.hybrid_sharding_config = kwargs.pop("hybrid_sharding_config", None)
        self.moe_tp_degree = kwargs.pop("moe_tp_degree", 1)
        self.moe_ep_degree = kwargs.pop("moe_ep_degree", 1)
        self.transpose_shared_experts_weights = kwargs.pop(
            "transpose_shared_experts_weights", False
        )
        self.blockwise_matmul_config = kwargs.pop("blockwise_matmul_config", {})
        self.router_config = kwargs.pop("router_config", None)
        if self.router_config is None:
            self.router_config = {
                "act_fn": kwargs.pop("router_act_fn", "softmax"),
                "dtype": kwargs.pop("router_dtype", "float32"),
            }
        super().__init__(**kwargs)


class FusedSpecNeuronConfig:
    """The draft of fused speculation, as NxDI's (main: ``draft_model_cls`` since 0.7):
    ``worker_cls`` is the target application's ``_model_cls``, which NxDI also builds the
    draft with unless ``draft_model_cls`` (an application class) names another family."""

    def __init__(self, worker_cls, draft_config: InferenceConfig = None,
                 draft_model_path: str = None, draft_model_cls=None) -> None:
        self.worker_cls = worker_cls
        self.draft_model_cls = draft_model_cls
        self.draft_config = draft_config
        self.draft_model_path = draft_model_path


def _import_class(ref: dict):
    """A class saved as {"__module__", "__name__"} (to_plain), imported again."""
    import importlib

    return getattr(importlib.import_module(ref["__module__"]), ref["__name__"])


def to_plain(obj: Any) -> Any:
    """Config objects -> JSON-able values (dtypes as names, classes as module/name)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if inspect.isclass(obj):
        return {"__module__": obj.__module__, "__name__": obj.__name__}
    if callable(obj):
        return None
    if hasattr(obj, "__dict__"):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    return obj


# HF attributes every decoder model's config requires (each model adds its own).
DECODER_ATTRIBUTES = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "pad_token_id",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
)


class InferenceConfig:
    """The model's HF attributes plus its NeuronConfig; saved as neuron_config.json."""

    def __init__(
        self,
        neuron_config: NeuronConfig,
        fused_spec_config=None,
        load_config=None,
        metadata: dict | None = None,
        **kwargs,
    ) -> None:
        self.neuron_config = neuron_config
        self.fused_spec_config = fused_spec_config
        if load_config is not None:
            load_config(self)
        else:
            self.load_config()
        self.metadata = metadata
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.add_derived_config()
        self.validate_config()

    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1

    def load_config(self) -> None:
        """Model subclasses fill attributes here when no load_config hook is given."""

    def get_required_attributes(self) -> list[str]:
        return []

    def validate_config(self) -> None:
        missing = [a for a in self.get_required_attributes() if not hasattr(self, a)]
        if missing:
            raise ValueError(f"Config must define {missing}")

    def get_text_config(self):
        return getattr(self, "text_config", None) or self

    def save(self, model_path: str | os.PathLike) -> None:
        os.makedirs(model_path, exist_ok=True)
        with open(os.path.join(model_path, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(self.to_json_string() + "\n")

    def to_json_string(self) -> str:
        return json.dumps(to_plain(vars(self)), indent=2, sort_keys=True)

    @classmethod
    def load(cls, model_path: str | os.PathLike, **kwargs) -> InferenceConfig:
        return cls.from_json_file(os.path.join(model_path, CONFIG_FILE), **kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike, **kwargs) -> InferenceConfig:
        with open(json_file, encoding="utf-8") as f:
            return cls.from_json_string(f.read(), **kwargs)

    @classmethod
    def from_json_string(cls, json_string: str, **kwargs) -> InferenceConfig:
        merged = json.loads(json_string)
        merged.update(kwargs)
        if isinstance(merged.get("neuron_config"), dict):
            merged["neuron_config"] = cls.get_neuron_config_cls()(
                **copy.deepcopy(merged["neuron_config"])
            )
        fused = merged.get("fused_spec_config")
        if isinstance(fused, dict):  # as NxDI rebuilds it: classes re-imported by name
            fused = dict(fused)
            draft_cls = _import_class(fused["draft_model_cls"]) if fused.get(
                "draft_model_cls") else None
            config_cls = draft_cls.get_config_cls() if draft_cls is not None else cls
            draft = fused.get("draft_config")
            if isinstance(draft, dict):
                draft = dict(draft)
                if isinstance(draft.get("neuron_config"), dict):
                    draft["neuron_config"] = config_cls.get_neuron_config_cls()(
                        **copy.deepcopy(draft["neuron_config"]))
                fused["draft_config"] = config_cls(**draft)
            fused["worker_cls"] = _import_class(fused["worker_cls"])
            fused["draft_model_cls"] = draft_cls
            merged["fused_spec_config"] = FusedSpecNeuronConfig(**fused)
        return cls(**merged)

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig
