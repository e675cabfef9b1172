"""Simulated ``neuronx_distributed_inference.models.application_base``: the lifecycle.

construct -> compile(folder) writes neuron_config.json and model.pt ("the traced
graphs": here the compiled shapes, no weights) -> load(folder) reads model.pt and
the weights, which come, as in NxDI, from the HF checkpoint at
``config._name_or_path`` (or the quantized checkpoint), not from the folder.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file, save_file

import neuronx_distributed_inference as sim
from neuronx_distributed_inference.models.config import InferenceConfig, NeuronConfig, to_plain

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
)

_QUANTIZED_SUFFIXES = ("_proj.weight", "lm_head.weight")


def _compiled_signature(neuron_config: NeuronConfig) -> dict:
    plain = to_plain(vars(neuron_config))
    return {k: plain.get(k) for k in COMPILED_SHAPE_FIELDS}


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
        self.config.save(compiled_model_path)
        if dry_run:
            return
        graphs = {
            "model_cls": type(self).__name__,
            "neuron_config": _compiled_signature(self.neuron_config),
            "buckets": self._sim_buckets(),
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
        """Quantize the HF checkpoint's linear weights (per-tensor symmetric int8) and save
        them to ``config.neuron_config.quantized_checkpoints_path`` (a folder gets
        safetensors, any other path a torch .pt file)."""
        sim.SIM_CALLS["save_quantized_state_dict"] += 1
        nc = config.neuron_config
        if (nc.quantization_type, nc.quantization_dtype) != ("per_tensor_symmetric", "int8"):
            raise NotImplementedError("the simulator quantizes per_tensor_symmetric int8 only")
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint

        out: dict[str, torch.Tensor] = {}
        for name, tensor in read_hf_checkpoint(model_path).items():
            if name.endswith(_QUANTIZED_SUFFIXES):
                scale = tensor.float().abs().max().clamp(min=1e-12) / 127.0
                out[name] = (tensor.float() / scale).round().clamp(-127, 127).to(torch.int8)
                out[name.removesuffix(".weight") + ".scale"] = scale.reshape(1)
            else:
                out[name] = tensor.contiguous()
        path = nc.quantized_checkpoints_path
        if os.path.isdir(path):
            save_file(out, os.path.join(path, "model.safetensors"))
        else:
            torch.save(out, path)

    @staticmethod
    def _sim_read_quantized(path: str) -> dict[str, torch.Tensor]:
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no quantized checkpoint in {path}")
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(f))
        elif os.path.isfile(path):
            state = torch.load(path, weights_only=True)
        else:
            raise FileNotFoundError(f"quantized checkpoint {path} does not exist")
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
