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

Multi-node, as NxDI and its runtime: the model runs ``tp_degree`` ranks (``world_size``,
tp_degree * pp_degree * ep_degree by default), ``local_ranks_size`` of them in this
process from ``start_rank_id`` (one process per node); the ranks are checked at compile
and load (``_sim_check_ranks``), a load of part of the ranks needs the runtime's
NEURON_RT_ROOT_COMM_ID=host:port, and each load is recorded in ``SIM_LOADS``. Every node
computes the whole model (the simulator shards nothing), as every node returns the same
outputs on a device.
"""

from __future__ import annotations

import glob
import os
import re

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
    # NxD's SPMD models are built for world_size ranks, local_ranks_size of them per
    # process (model_builder.py 1064); start_rank_id is a load argument (spmd.py 181-184)
    "world_size",
    "local_ranks_size",
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

# What NxDI's multi-node examples set on every node (examples/multi_node.md, and
# scripts/nxdi_distributed_launcher.py defaults it to the first host): the address the
# Neuron runtime's collectives meet at when the ranks span processes.
ROOT_COMM_ENV = "NEURON_RT_ROOT_COMM_ID"
SHARDED_CHECKPOINT = "weights/tp{rank}_sharded_checkpoint.safetensors"

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


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _sim_check_ranks(nc: NeuronConfig, start_rank_id, local_ranks_size) -> list[int]:
    """The ranks this process runs, start_rank_id .. start_rank_id + local_ranks_size - 1,
    refused where NxD could not shard or connect them (a device would fail or hang):

    * world_size must be a multiple of tp * pp * cp and of tp * pp * ep (NxD's
      parallel_state.initialize_model_parallel raises this RuntimeError, 572-589); the
      simulator models no data parallelism, so world_size is tp * pp * ep;
    * start_rank_id a multiple of local_ranks_size (examples/multi_node.md: "Please
      ensure --start_rank_id is multiple of --local_ranks_size"; inference_demo.py 795
      sets it to node_rank * local_ranks_size);
    * the ranks inside the world (NxD shards ranks 0 .. world_size - 1 only), and
      local_ranks_size a divisor of world_size: each node runs local_ranks_size ranks,
      so any other value leaves ranks that no node loads and the collectives wait on.
    """
    world, tp = nc.world_size, nc.tp_degree
    if not _is_count(world, 1) or not _is_count(tp, 1):
        raise ValueError(f"world_size={world!r} and tp_degree={tp!r} must be positive integers")
    for parallel, what in ((tp * nc.pp_degree * nc.cp_degree, "context_parallel_size"),
                           (tp * nc.pp_degree * nc.ep_degree, "expert_model_parallel_size")):
        if world % parallel:
            raise RuntimeError(
                f"invalid implied data parallel degree: `world_size` ({world}) is not "
                f"divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({nc.pp_degree}) x {what}")
    if world != tp * nc.pp_degree * nc.ep_degree:
        raise NotImplementedError(
            f"the simulator models world_size = tp_degree * pp_degree * ep_degree only, got "
            f"world_size={world} (no data parallelism)")
    if not _is_count(local_ranks_size, 1):
        raise ValueError(f"local_ranks_size={local_ranks_size!r} must be a positive integer")
    if not _is_count(start_rank_id, 0):
        raise ValueError(f"start_rank_id={start_rank_id!r} must be a non-negative integer")
    if world % local_ranks_size:
        raise ValueError(
            f"local_ranks_size={local_ranks_size} does not divide world_size={world} "
            f"(tp_degree={tp}): every node runs local_ranks_size ranks, so some ranks would "
            "be loaded by no node")
    if start_rank_id % local_ranks_size:
        raise ValueError(
            f"start_rank_id={start_rank_id} is not a multiple of local_ranks_size="
            f"{local_ranks_size} (node * local_ranks_size)")
    if start_rank_id + local_ranks_size > world:
        raise ValueError(
            f"start_rank_id={start_rank_id} + local_ranks_size={local_ranks_size} goes past "
            f"world_size={world}: ranks {start_rank_id}..{start_rank_id + local_ranks_size - 1}"
            f" do not all exist")
    return list(range(start_rank_id, start_rank_id + local_ranks_size))


def _sim_root_comm_id() -> str:
    """The runtime's rendezvous for ranks that span processes: NEURON_RT_ROOT_COMM_ID,
    host:port. Without it a device's collectives cannot find the other nodes."""
    value = os.environ.get(ROOT_COMM_ENV, "")
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise RuntimeError(
            f"{ROOT_COMM_ENV}={value!r}: this process loads part of the ranks "
            "(local_ranks_size < world_size), so the Neuron runtime needs "
            f"{ROOT_COMM_ENV}=host:port of the first node, the same on every node")
    return value


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
        nc = self.neuron_config
        # NxDI's ModelBuilder gets the config's ranks (application_base.py 148-163)
        ranks = _sim_check_ranks(nc, nc.start_rank_id, nc.local_ranks_size)
        self._sim_check_compilable()
        self._sim_check_quantized()
        self.config.save(compiled_model_path)
        if dry_run:
            return
        if nc.save_sharded_checkpoint:  # this node's ranks only (model_builder.py 852)
            for rank in ranks:
                path = os.path.join(compiled_model_path, SHARDED_CHECKPOINT.format(rank=rank))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file({"rank": torch.tensor([rank])}, path)
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
        ranks = self._sim_load_ranks(compiled_model_path, start_rank_id, local_ranks_size)
        self._sim_initialize(self._sim_state_dict())
        self.is_loaded_to_neuron = True
        nc = self.neuron_config
        sim.SIM_LOADS.append({
            "tp_degree": nc.tp_degree, "world_size": nc.world_size,
            "local_ranks_size": len(ranks), "start_rank_id": ranks[0], "ranks": ranks,
            ROOT_COMM_ENV: os.environ.get(ROOT_COMM_ENV),
        })

    def _sim_load_ranks(self, compiled_model_path, start_rank_id, local_ranks_size) -> list[int]:
        """NxDI's load_weights: the arguments default to the config's (application_base.py
        382-385); the ranks are checked as at compile, then what a device needs of them."""
        nc = self.neuron_config
        start = nc.start_rank_id if start_rank_id is None else start_rank_id
        local = nc.local_ranks_size if local_ranks_size is None else local_ranks_size
        ranks = _sim_check_ranks(nc, start, local)
        if local != nc.local_ranks_size:
            raise ValueError(
                f"load(local_ranks_size={local}) but the model was compiled with "
                f"local_ranks_size={nc.local_ranks_size}: its SPMD models run that many ranks")
        if nc.save_sharded_checkpoint:  # the compile's shards of these ranks
            for rank in ranks:
                path = os.path.join(compiled_model_path, SHARDED_CHECKPOINT.format(rank=rank))
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"No such file: {path} (save_sharded_checkpoint keeps the shards of "
                        "the ranks the compiling node ran; compile on this node)")
        elif start != nc.start_rank_id:
            # Sharding on load shards the config's ranks (ModelBuilder.shard_checkpoint)
            # but initializes from the argument's: the wrong weights on a device.
            raise ValueError(
                f"load(start_rank_id={start}) differs from the config's start_rank_id="
                f"{nc.start_rank_id}: the weights are sharded on load for the config's ranks")
        if local < nc.world_size:
            _sim_root_comm_id()
        return ranks

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
