"""Simulated ``neuronx_distributed_inference.models.mixtral.modeling_mixtral``.

MoENeuronConfig through the class methods; computed, like every simulated model, by
vllm_neuronx's CPU model of the family (its top-2 experts).
"""

from __future__ import annotations

from neuronx_distributed_inference.models.config import (
    DECODER_ATTRIBUTES,
    InferenceConfig,
    MoENeuronConfig,
)
from neuronx_distributed_inference.models.model_base import (
    NeuronBaseForCausalLM,
    NeuronBaseModel,
)


class MixtralInferenceConfig(InferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "num_local_experts", "num_experts_per_tok"]

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


class NeuronMixtralModel(NeuronBaseModel):
    """NxDI's traced decoder of the family (the fused speculation worker_cls)."""

    _sim_model_types = ("mixtral",)


class NeuronMixtralForCausalLM(NeuronBaseForCausalLM):
    _model_cls = NeuronMixtralModel

    @classmethod
    def get_config_cls(cls):
        return MixtralInferenceConfig
