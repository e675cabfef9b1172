"""Simulated ``neuronx_distributed_inference.models.qwen3.modeling_qwen3`` (NxDI >= 0.5).

NxDI's Qwen3 class configures like its Llama; the simulator computes it, like every
simulated model, with vllm_neuronx's CPU model of the family (its per-head q/k norms).
"""

from __future__ import annotations

from neuronx_distributed_inference.models.llama.modeling_llama import (
    LlamaInferenceConfig,
    NeuronLlamaForCausalLM,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseModel


class Qwen3InferenceConfig(LlamaInferenceConfig):
    pass


class NeuronQwen3Model(NeuronBaseModel):
    """NxDI's traced decoder of the family (the fused speculation worker_cls)."""

    _sim_model_types = ("qwen3",)


class NeuronQwen3ForCausalLM(NeuronLlamaForCausalLM):
    _model_cls = NeuronQwen3Model

    @classmethod
    def get_config_cls(cls):
        return Qwen3InferenceConfig
