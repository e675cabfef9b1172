"""Simulated ``neuronx_distributed_inference.models.qwen2.modeling_qwen2`` (NxDI >= 0.4).

NxDI's Qwen2 class configures like its Llama; the simulator computes it, like every
simulated model, with vllm_neuronx's CPU model of the family (its q/k/v biases).
"""

from __future__ import annotations

from neuronx_distributed_inference.models.llama.modeling_llama import (
    LlamaInferenceConfig,
    NeuronLlamaForCausalLM,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseModel


class Qwen2InferenceConfig(LlamaInferenceConfig):
    pass


class NeuronQwen2Model(NeuronBaseModel):
    """NxDI's traced decoder of the family (the fused speculation worker_cls)."""

    _sim_model_types = ("qwen2",)


class NeuronQwen2ForCausalLM(NeuronLlamaForCausalLM):
    _model_cls = NeuronQwen2Model

    @classmethod
    def get_config_cls(cls):
        return Qwen2InferenceConfig
