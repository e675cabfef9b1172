"""Simulated ``neuronx_distributed_inference.models.mixtral.modeling_mixtral``.

Configuration only (MoENeuronConfig through the class methods); the simulator
computes Llama-family models, so compiling a Mixtral is refused.
"""

from __future__ import annotations

from neuronx_distributed_inference.models.config import (
    DECODER_ATTRIBUTES,
    InferenceConfig,
    MoENeuronConfig,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM


class MixtralInferenceConfig(InferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "num_local_experts", "num_experts_per_tok"]

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


class NeuronMixtralForCausalLM(NeuronBaseForCausalLM):
    @classmethod
    def get_config_cls(cls):
        return MixtralInferenceConfig

    def _sim_check_compilable(self) -> None:
        raise NotImplementedError("the simulator computes Llama-family models only")
