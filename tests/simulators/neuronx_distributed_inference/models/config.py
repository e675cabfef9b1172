"""Simulated ``neuronx_distributed_inference.models.config``.

NeuronConfig knows the field names NxDI's NeuronConfig pops from its kwargs
(releases 0.3 to 0.9). NxDI only logs a warning for any other key and drops it;
here it is a TypeError naming the key, so a misspelled or renamed key (upstream
vLLM's ``lora_serving_config``) fails the test instead of vanishing.
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

# Every NeuronConfig keyword NxDI accepts (NeuronConfig.__init__ of the newest public source,
# the 2.29-v2 sync; NxDI 0.10.18399 announces no change to it).
NEURON_CONFIG_FIELDS = frozenset(
    """
    activation_quantization_type allow_input_truncation apply_seq_ids_mask async_mode
    attention_dp_degree attention_dtype attn_block_cte_nki_kernel_enabled
    attn_block_tkg_nki_kernel_cache_update attn_block_tkg_nki_kernel_cascaded_attention
    attn_block_tkg_nki_kernel_disable_gpsimd_sb2sb attn_block_tkg_nki_kernel_enabled
    attn_block_tkg_nki_kernel_use_online_softmax attn_cls attn_kernel_enabled
    attn_tkg_builtin_kernel_enabled attn_tkg_nki_kernel_enabled batch_size
    bucket_n_active_tokens buckets cast_type cc_pipeline_tiling_factor chunked_prefill_config
    context_encoding_buckets cp_degree ctx_batch_size
    disable_argmax_kernel disable_kv_cache_tiling disable_numeric_cc_token dma_order_config
    draft_model_modules_to_not_convert eagle_rolling_buffer_kernel_enabled enable_bucketing
    enable_cte_modular_flow enable_eagle_draft_input_norm enable_eagle_speculation
    enable_fused_speculation enable_output_completion_notifications enable_spill_reload_dge
    enable_ve_data_parallel ep_degree ep_dispatch_cc_option expert_mlp_nki_kernel_enabled
    flash_decoding_enabled fused_qkv fused_rmsnorm_skip_gamma is_block_kv_layout
    is_continuous_batching is_eagle3 is_eagle_draft is_full_model_shuffled
    is_medusa is_mxfp4_compute is_prefix_caching k_cache_transposed kv_cache_batch_size
    kv_cache_padding_size kv_cache_quant kv_quant_config layer_boundary_markers lm_head_pad
    lm_head_pad_alignment_size local_ranks_size logical_nc_config logical_neuron_cores
    lora_config max_batch_size max_context_length max_length max_new_tokens
    medusa_speculation_length medusa_tree mlp_cp_degree mlp_kernel_enabled
    mlp_kernel_fuse_residual_add mlp_tkg_nki_kernel_enabled modules_to_not_convert
    moe_fused_nki_kernel_enabled n_active_tokens n_positions num_medusa_heads on_cpu
    on_device_sampling_config out_proj_kernel_enabled output_logits overrides_torch_dtype
    pa_block_size pa_num_blocks padded_hidden_size padded_intermediate_size padding_side
    pp_degree pre_rope_rmsnorm prefix_buckets qk_layernorm qkv_cte_nki_kernel_fuse_rope
    qkv_kernel_enabled qkv_kernel_fuse_residual_add qkv_kernel_nbsd_layout
    qkv_nki_kernel_enabled quantization_block_axis quantization_block_size quantization_dtype
    quantization_scale_dtype quantization_type quantize_clamp_bound quantized
    quantized_checkpoints_path quantized_mlp_kernel_enabled rmsnorm_quantize_kernel_enabled
    router_topk_nki_kernel_enabled rpl_reduce_dtype save_sharded_checkpoint
    scratchpad_page_size seq_len seq_len_threshold_for_cc_tiling sequence_parallel_enabled
    shared_mlp_nki_kernel_enabled skip_sharding skip_warmup spec_batch_size speculation_length
    start_rank_id strided_context_parallel_kernel_enabled switch_cc target tensor_capture_config
    tensor_replacement_config tkg_batch_size token_generation_batches token_generation_buckets
    token_tree_config torch_dtype tp_degree vocab_parallel weight_gather_seq_len_threshold
    weights_to_skip_layout_optimization windowed_context_encoding_size world_size
    """.split()
)

# MoENeuronConfig's own keywords (it passes the rest to NeuronConfig).
MOE_FIELDS = frozenset(
    """
    capacity_factor glu_mlp glu_type hidden_act_scaling_factor hidden_act_bias
    gate_clamp_upper_limit gate_clamp_lower_limit up_clamp_upper_limit up_clamp_lower_limit
    use_index_calc_kernel moe_mask_padded_tokens early_expert_affinity_modulation
    disable_normalize_top_k_affinities fused_shared_experts
    shared_experts_sequence_parallel_enabled return_expert_index return_router_logits
    hybrid_sharding_config moe_tp_degree moe_ep_degree transpose_shared_experts_weights
    blockwise_matmul_config router_config
    """.split()
)

ON_DEVICE_SAMPLING_FIELDS = {
    "do_sample": False,
    "top_k": 1,
    "top_p": 1.0,
    "temperature": 1.0,
    "dynamic": False,
    "deterministic": False,
    "global_topk": 256,
    "on_device_sampling_config": True,
    "top_k_kernel_enabled": False,
    "sampling_dp_degree": 1,
}


def _refuse_unknown(cls_name: str, kwargs: dict, known: frozenset | set) -> None:
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(
            f"{cls_name} got unexpected keyword arguments {unknown} (real NxDI would only "
            "log a warning and ignore them)"
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
        _refuse_unknown("OnDeviceSamplingConfig", kwargs, set(ON_DEVICE_SAMPLING_FIELDS))
        for name, default in ON_DEVICE_SAMPLING_FIELDS.items():
            setattr(self, name, kwargs.get(name, default))
        if not isinstance(self.global_topk, int) or self.global_topk < 1:
            raise ValueError(f"global_topk must be a positive integer, got {self.global_topk!r}")


class NeuronConfig:
    """The compile-time settings of one model (shapes, parallelism, features)."""

    def __init__(self, **kwargs) -> None:
        _refuse_unknown(type(self).__name__, kwargs, NEURON_CONFIG_FIELDS)
        get = kwargs.pop
        self.batch_size = get("batch_size", 1)
        self.padding_side = get("padding_side", "right")
        self.allow_input_truncation = get("allow_input_truncation", False)
        self.seq_len = get("seq_len", 128)
        self.n_active_tokens = get("n_active_tokens", self.seq_len)
        self.n_positions = get("n_positions", self.seq_len)
        self.output_logits = get("output_logits", False)
        if "torch_dtype" in kwargs:
            self.torch_dtype = to_torch_dtype(get("torch_dtype"))
            self.overrides_torch_dtype = get("overrides_torch_dtype", True)
        else:
            self.torch_dtype = torch.bfloat16
            self.overrides_torch_dtype = get("overrides_torch_dtype", False)
        self.max_context_length = get("max_context_length", self.seq_len)
        self.max_length = get("max_length", self.seq_len)
        if self.max_context_length > self.max_length:
            raise ValueError("max_context_length cannot be more than max_length")
        self.ctx_batch_size = get("ctx_batch_size", self.batch_size)
        self.tkg_batch_size = get("tkg_batch_size", self.batch_size)
        self.max_batch_size = get("max_batch_size", self.batch_size)
        self.kv_cache_batch_size = get("kv_cache_batch_size", self.batch_size)
        self.is_continuous_batching = get("is_continuous_batching", False)

        ods = get("on_device_sampling_config", None)
        if isinstance(ods, dict):
            ods = OnDeviceSamplingConfig(**ods)
        self.on_device_sampling_config = ods

        self.enable_bucketing = get("enable_bucketing", False)
        self.buckets = get("buckets", [self.seq_len])
        self.context_encoding_buckets = get("context_encoding_buckets", None)
        self.token_generation_buckets = get("token_generation_buckets", None)
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

        self.quantized = get("quantized", False)
        self.quantized_checkpoints_path = get("quantized_checkpoints_path", None)
        if self.quantized and self.quantized_checkpoints_path is None:
            raise ValueError("quantized_checkpoints_path is required")
        self.quantization_type = get("quantization_type", "per_tensor_symmetric")
        self.quantization_dtype = get("quantization_dtype", "int8")
        self.modules_to_not_convert = get("modules_to_not_convert", None)

        lora = get("lora_config", None)
        if isinstance(lora, dict):
            from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

            lora = LoraServingConfig(**lora)
        self.lora_config = lora

        self.tp_degree = get("tp_degree", 1)
        self.pp_degree = get("pp_degree", 1)
        self.ep_degree = get("ep_degree", 1)
        world = self.tp_degree * self.pp_degree * self.ep_degree
        self.world_size = get("world_size", None) or world
        self.speculation_length = get("speculation_length", 0)
        self.enable_fused_speculation = get("enable_fused_speculation", False)
        self.is_prefix_caching = get("is_prefix_caching", False)
        self.is_block_kv_layout = get("is_block_kv_layout", False)
        self.apply_seq_ids_mask = get("apply_seq_ids_mask", False)
        self.sequence_parallel_enabled = get("sequence_parallel_enabled", False)
        self.save_sharded_checkpoint = get("save_sharded_checkpoint", False)
        self.skip_warmup = get("skip_warmup", False)
        self.async_mode = get("async_mode", False)
        # Known fields this simulator does not model are kept as given.
        for name, value in kwargs.items():
            setattr(self, name, value)


class MultimodalVisionNeuronConfig(NeuronConfig):
    def __init__(self, **kwargs) -> None:
        self.skip_vision = kwargs.pop("skip_vision", False)
        super().__init__(**kwargs)


class MoENeuronConfig(NeuronConfig):
    """NeuronConfig plus the mixture-of-experts settings (Mixtral, DBRX, Qwen3-MoE)."""

    def __init__(self, capacity_factor: float | None = None, glu_mlp: bool = True, **kwargs):
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.glu_mlp = glu_mlp
        for name in sorted(MOE_FIELDS - {"capacity_factor", "glu_mlp"}):
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
        self.moe_tp_degree = getattr(self, "moe_tp_degree", 1)
        self.moe_ep_degree = getattr(self, "moe_ep_degree", 1)
        super().__init__(**kwargs)


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
        if merged.get("fused_spec_config") is not None:
            raise NotImplementedError("the simulator does not model fused speculation")
        return cls(**merged)

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig
