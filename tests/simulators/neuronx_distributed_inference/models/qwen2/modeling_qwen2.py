"""Simulated ``neuronx_distributed_inference.models.qwen2.modeling_qwen2`` (NxDI >= 0.4).

Computed like every simulated model, by vllm_neuronx's CPU model of the family
(its q/k/v biases), under the same preconditions as Llama.
"""

from __future__ import annotations

from neuronx_distributed_inference.models.config import (
    DECODER_ATTRIBUTES,
    InferenceConfig,
    NeuronConfig,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM


class Qwen2InferenceConfig(InferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "hidden_act"]

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig


class NeuronQwen2ForCausalLM(NeuronBaseForCausalLM):
    @classmethod
    def get_config_cls(cls) -> type[InferenceConfig]:
        return Qwen2InferenceConfig
