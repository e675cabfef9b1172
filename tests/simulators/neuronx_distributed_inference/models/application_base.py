"""Simulated ``neuronx_distributed_inference.models.application_base``: the lifecycle.

construct -> compile(folder) writes neuron_config.json and model.pt ("the traced
graphs": here the compiled shapes, no weights) -> load(folder) reads model.pt and
the weights, which come, as in NxDI, from the HF checkpoint at
``config._name_or_path`` (or the quantized checkpoint), not from the folder.

Quantized, as NxDI: ``save_quantized_state_dict`` writes the checkpoint NxD's way
(int8 or fp8 weights and float32 scales, NxDI's names); compile and load refuse a
quantized model whose checkpoint is absent, and compile refuses fp8 without
XLA_HANDLE_SPECIAL_SCALAR=1. The forward computes with the dequantized weights, so
the tokens are the quantized model's.

With a ``lora_config``, the application holds NxDI's ``lora_model_manager`` from its
construction (modules/lora_serving/lora_model.py); load puts the configured adapters in
it and in the device slots, and lets it stream more.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file, save_file

import neuronx_distributed_inference as sim
from neuronx_distributed_inference.models.config import (
    QUANTIZATION_TYPES,
    InferenceConfig,
    NeuronConfig,
    quantized_dtype,
    to_plain,
)
from neuronx_distributed_inference.modules.lora_serving import LoraModelManager

COMPILED_MODEL_FILE_NAME = "model.pt"

# Fields whose value is baked into the compiled graphs.
COMPILED_SHAPE_FIELDS = (
    "batch_size",
    "ctx_batch_size",
    "tkg_batch_size",
    "seq_len",
    "max_context_length",
    "max_length",
    "tp_degree",
    "torch_dtype",
    "enable_bucketing",
    "context_encoding_buckets",
    "token_generation_buckets",
    "is_continuous_batching",
    "on_device_sampling_config",
    "quantized",
    "quantization_type",
    "quantization_dtype",
    "modules_to_not_convert",
    "kv_cache_quant",
    "lora_config",  # the LoRA modules, their slots and ranks are part of the graphs
    # the block KV layout: the cache's blocks and the [prefill, prefix] buckets
    "is_block_kv_layout",
    "is_prefix_caching",
    "pa_num_blocks",
    "pa_block_size",
    "prefix_buckets",
    "attn_block_tkg_nki_kernel_enabled",
    # fused speculation: the draft's k runs and the target's k-wide pass are traced in
    "speculation_length",
    "enable_fused_speculation",
    "enable_eagle_speculation",
    "is_eagle3",
    "is_eagle_draft",
)

PER_TENSOR, PER_CHANNEL = "per_tensor_symmetric", "per_channel_symmetric"
FP8_MAX = {torch.float8_e4m3fn: 240.0,  # NxD's DtypeBound: Neuron's e4m3 stops at 240
           torch.float8_e5m2: torch.finfo(torch.float8_e5m2).max}


def _quantization_type(value: str) -> str:
    """NxD's QuantizationType(value): a ValueError for a value it lacks."""
    if value not in QUANTIZATION_TYPES:
        raise ValueError(f"{value!r} is not a valid QuantizationType")
    return value


def _is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """An nn.Linear's weight in an HF decoder (what torch's quantize_dynamic converts):
    2-D weights but the embeddings (norms are 1-D, fused MoE experts 3-D)."""
    return name.endswith(".weight") and tensor.dim() == 2 and "embed" not in name


def _quantize(w: torch.Tensor, per_channel: bool,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NxD's quantization of one weight: (quantized weight, float32 scale).

    int8 as torch's observers: per channel (PerChannelAbsMaxObserver) the row's amax
    over 127, floored at float32's eps, scale [rows, 1]; per tensor (MinMaxObserver,
    symmetric) the amax over 127.5, scale [1]; then round and clamp to [-128, 127].
    fp8 (quantize_fp8_per_channel / _per_tensor): the amax over the dtype's bound
    (per channel floored at 1e-5), clamp to the bound, cast.
    """
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    if dtype == torch.int8:
        eps = torch.finfo(torch.float32).eps
        scale = (amax / 127.0 if per_channel else amax / 127.5).clamp(min=eps)
        q = (w / scale).round().clamp(-128, 127).to(torch.int8)
        return q, scale if per_channel else scale.reshape(1)
    if dtype not in FP8_MAX:
        raise ValueError(f"dtype: {dtype} is not supported to quantize model on CPU")
    bound = FP8_MAX[dtype]
    scale = (amax / bound).clamp(min=1e-5) if per_channel else amax / bound
    return (w / scale).clamp(-bound, bound).to(dtype), scale


def _quantized_files(path: str) -> list[str]:
    """The quantized checkpoint's files; NxDI's FileNotFoundError when there is none."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) \
        else [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"Quantized checkpoint file not found: {path}")
    return files


def _compiled_signature(neuron_config: NeuronConfig) -> dict:
    plain = to_plain(vars(neuron_config))
    return {k: plain.get(k) for k in COMPILED_SHAPE_FIELDS}


def _draft_signature(config: InferenceConfig) -> dict | None:
    """What the fused graphs bake in of the draft (None without fused speculation): its
    shapes and compiled settings, its family, and where its weights load from."""
    fused = getattr(config, "fused_spec_config", None)
    if fused is None or fused.draft_config is None:
        return None
    draft = fused.draft_config
    return {
        "draft_model_path": fused.draft_model_path,
        "draft_model_cls": None if fused.draft_model_cls is None
        else fused.draft_model_cls.__name__,
        "neuron_config": _compiled_signature(draft.neuron_config),
        "model": {k: getattr(draft, k, None) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size")},
    }


class NeuronApplicationBase(torch.nn.Module):
    def __init__(
        self,
        model_path: str,
        config: InferenceConfig | None = None,
        neuron_config: NeuronConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:  # reopen a compiled folder from its neuron_config.json
            config = self.get_config_cls().load(model_path)
        if neuron_config is not None:
            config.neuron_config = neuron_config
        self.validate_config(config)
        self.config = config
        self.neuron_config = config.neuron_config
        self.fused_spec_config = config.fused_spec_config
        self.on_device_sampling = self.neuron_config.on_device_sampling_config is not None
        self.model_path = model_path
        self.is_compiled = os.path.isfile(os.path.join(model_path, COMPILED_MODEL_FILE_NAME))
        self.is_loaded_to_neuron = False
        if self.neuron_config.lora_config is not None:
            self.lora_model_manager = LoraModelManager(self.neuron_config.lora_config)

    @classmethod
    def validate_config(cls, config: InferenceConfig) -> None:
        if not hasattr(config, "neuron_config"):
            raise ValueError("Config must include a NeuronConfig")

    @classmethod
    def get_config_cls(cls) -> type[InferenceConfig]:
        raise NotImplementedError("get_config_cls is not implemented")

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return cls.get_config_cls().get_neuron_config_cls()

    # -- compile / load -----------------------------------------------------------------
    def compile(self, compiled_model_path, debug=False, pre_shard_weights_hook=None,
                dry_run=False):
        sim.SIM_CALLS["compile"] += 1
        self._sim_check_compilable()
        self._sim_check_quantized()
        self.config.save(compiled_model_path)
        if dry_run:
            return
        graphs = {
            "model_cls": type(self).__name__,
            "neuron_config": _compiled_signature(self.neuron_config),
            "buckets": self._sim_buckets(),
            "draft": _draft_signature(self.config),
        }
        torch.save(graphs, os.path.join(compiled_model_path, COMPILED_MODEL_FILE_NAME))
        self.is_compiled = True

    def load(self, compiled_model_path, start_rank_id=None, local_ranks_size=None,
             skip_warmup=False):
        sim.SIM_CALLS["load"] += 1
        graph_file = os.path.join(compiled_model_path, COMPILED_MODEL_FILE_NAME)
        if not os.path.isfile(graph_file):
            raise FileNotFoundError(
                f"{graph_file} does not exist: compile() must write the folder before load()"
            )
        graphs = torch.load(graph_file, weights_only=True)
        compiled = graphs["neuron_config"]
        ours = _compiled_signature(self.neuron_config)
        diff = {k: (compiled.get(k), ours.get(k)) for k in ours if compiled.get(k) != ours.get(k)}
        draft = _draft_signature(self.config)
        if graphs.get("draft") != draft:
            diff["fused_spec_config"] = (graphs.get("draft"), draft)
        if graphs["model_cls"] != type(self).__name__ or diff:
            raise ValueError(
                f"{compiled_model_path} was compiled for a different model or config "
                f"(field: (compiled, this instance)): {diff or graphs['model_cls']}"
            )
        self._sim_initialize(self._sim_state_dict())
        self.is_loaded_to_neuron = True

    def reset(self) -> None:
        """NxDI marks the KV cache as unpopulated; the simulator's lines start empty."""

    # -- quantization ----------------------------------------------------------------------
    @classmethod
    def save_quantized_state_dict(cls, model_path: str, config: InferenceConfig) -> None:
        """Quantize the HF checkpoint's linear weights as NxD does and save them to
        ``config.neuron_config.quantized_checkpoints_path`` (a folder gets safetensors,
        any other path a torch .pt file)."""
        sim.SIM_CALLS["save_quantized_state_dict"] += 1
        nc = config.neuron_config
        kind = _quantization_type(nc.quantization_type)
        if kind not in (PER_TENSOR, PER_CHANNEL):  # NxDI's generate_quantized_state_dict
            raise RuntimeError(f"{nc.quantization_type} not supported")
        dtype = quantized_dtype(nc.quantization_dtype)
        # NxD's per-tensor path takes no modules_to_not_convert: every linear layer.
        skip = (nc.modules_to_not_convert or []) if kind == PER_CHANNEL else []
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint

        out: dict[str, torch.Tensor] = {}
        for name, tensor in read_hf_checkpoint(model_path).items():
            # NxDI saves hf_model.model's and hf_model.lm_head's state dicts: no "model."
            name = name.removeprefix("model.")
            module = name.removesuffix(".weight")
            if _is_linear_weight(name, tensor) and not any(entry in module for entry in skip):
                out[name], out[module + ".scale"] = _quantize(tensor, kind == PER_CHANNEL, dtype)
            else:
                out[name] = tensor.contiguous()
        path = nc.quantized_checkpoints_path
        if os.path.isdir(path):
            save_file(out, os.path.join(path, "model.safetensors"))
        else:
            torch.save(out, path)

    def _sim_check_quantized(self) -> None:
        """What a quantized compile needs in NxDI: a quantization type its model wrapper
        builds, the quantized checkpoint (the simulator asks for it at compile, where NxDI
        reads it to shard the weights with save_sharded_checkpoint and at load otherwise,
        so a compile before save_quantized_state_dict fails here), and for fp8 the
        environment NxDI's inference_demo sets."""
        nc = self.neuron_config
        if nc.quantized:
            kind = _quantization_type(nc.quantization_type)
            if kind not in (PER_TENSOR, PER_CHANNEL):
                raise NotImplementedError(f"the simulator does not model {kind}")
            _quantized_files(nc.quantized_checkpoints_path)
        fp8 = nc.quantized and quantized_dtype(nc.quantization_dtype).is_floating_point
        if (fp8 or nc.kv_cache_quant) and os.environ.get("XLA_HANDLE_SPECIAL_SCALAR") != "1":
            # Standing in for hardware: there an fp8 graph traced without it compiles but
            # gives wrong results; here it is an error.
            raise RuntimeError("fp8 weights or kv_cache_quant need XLA_HANDLE_SPECIAL_SCALAR=1 "
                               "in the environment when compiling (NxDI's inference_demo "
                               "sets it)")

    @staticmethod
    def _sim_read_quantized(path: str) -> dict[str, torch.Tensor]:
        """The quantized checkpoint, dequantized (weight * scale): the simulator computes
        with the weights the quantized model has."""
        state: dict[str, torch.Tensor] = {}
        for f in _quantized_files(path):
            state.update(load_file(f) if f.endswith(".safetensors")
                         else torch.load(f, weights_only=True))
        out = {}
        for name, tensor in state.items():
            if name.endswith(".scale"):
                continue
            scale = state.get(name.removesuffix(".weight") + ".scale")
            out[name] = tensor.float() * scale if scale is not None else tensor
        return out

    # -- hooks the causal-LM base fills in ----------------------------------------------------
    def _sim_check_compilable(self) -> None:
        raise NotImplementedError

    def _sim_buckets(self) -> dict:
        raise NotImplementedError

    def _sim_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _sim_initialize(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError
