"""``transformers_neuronx.mistral.model``."""

from transformers_neuronx.base import NeuronModelBase


class MistralForSampling(NeuronModelBase):
    hf_architecture = "MistralForCausalLM"
