"""Simulated ``neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe``
(NxDI >= 0.5).

MoENeuronConfig through the class methods; computed, like every simulated model, by
vllm_neuronx's CPU model of the family (q/k norms, dense and expert layers).
"""

from __future__ import annotations

from neuronx_distributed_inference.models.config import (
    DECODER_ATTRIBUTES,
    InferenceConfig,
    MoENeuronConfig,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM


class Qwen3MoeInferenceConfig(InferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "num_experts", "num_experts_per_tok"]

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


class NeuronQwen3MoeForCausalLM(NeuronBaseForCausalLM):
    @classmethod
    def get_config_cls(cls):
        return Qwen3MoeInferenceConfig
