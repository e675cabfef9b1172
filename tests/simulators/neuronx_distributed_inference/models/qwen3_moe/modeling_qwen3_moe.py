"""Simulated ``neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe``
(NxDI >= 0.5).

Configured like the Mixtral class (MoENeuronConfig) with Qwen3-MoE's expert count;
computed, like every simulated model, by vllm_neuronx's CPU model of the family.
"""

from __future__ import annotations

from neuronx_distributed_inference.models.config import DECODER_ATTRIBUTES
from neuronx_distributed_inference.models.mixtral.modeling_mixtral import (
    MixtralInferenceConfig,
    NeuronMixtralForCausalLM,
)
from neuronx_distributed_inference.models.model_base import NeuronBaseModel


class Qwen3MoeInferenceConfig(MixtralInferenceConfig):
    def get_required_attributes(self) -> list[str]:
        return [*DECODER_ATTRIBUTES, "num_experts", "num_experts_per_tok"]


class NeuronQwen3MoeModel(NeuronBaseModel):
    """NxDI's traced decoder of the family (the fused speculation worker_cls)."""

    _sim_model_types = ("qwen3_moe",)


class NeuronQwen3MoeForCausalLM(NeuronMixtralForCausalLM):
    _model_cls = NeuronQwen3MoeModel

    @classmethod
    def get_config_cls(cls):
        return Qwen3MoeInferenceConfig
