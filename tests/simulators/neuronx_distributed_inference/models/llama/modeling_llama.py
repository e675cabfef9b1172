"""Simulated ``neuronx_distributed_inference.models.llama.modeling_llama``."""

from __future__ import annotations

from neuronx_distributed_inference.models.config import (
    DECODER_ATTRIBUTES,
    InferenceConfig,
    NeuronConfig,
)
from neuronx_distributed_inference.models.model_base import (
    NeuronBaseForCausalLM,
    NeuronBaseModel,
)


class LlamaInferenceConfig(InferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "hidden_act"]

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig


class NeuronLlamaModel(NeuronBaseModel):
    """NxDI's traced decoder of the family (the fused speculation worker_cls)."""

    _sim_model_types = ("llama", "mistral")


class NeuronLlamaForCausalLM(NeuronBaseForCausalLM):
    """Llama (and Mistral, through the same implementation) as NxDI serves it."""

    _model_cls = NeuronLlamaModel

    @classmethod
    def get_config_cls(cls) -> type[InferenceConfig]:
        return LlamaInferenceConfig
