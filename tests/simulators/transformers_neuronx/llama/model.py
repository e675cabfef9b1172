"""``transformers_neuronx.llama.model``."""

from transformers_neuronx.base import NeuronModelBase


class LlamaForSampling(NeuronModelBase):
    hf_architecture = "LlamaForCausalLM"
