"""``--quantization neuron_quant``: the name the Neuron user guide uses, made known to vLLM.

Upstream (0.16) has no such method, so vLLM would refuse it before any backend could
say something useful. Registered here, it reaches the backend's validation:
transformers-neuronx quantizes with NEURON_QUANT_DTYPE, NxDI refuses it and points
to the neuron config's quantization keys, the CPU backend refuses it. vLLM itself
never quantizes anything for us (no quant method per layer).
"""

from __future__ import annotations

import torch

NAME = "neuron_quant"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    @register_quantization_config(NAME)
    class NeuronQuantConfig(QuantizationConfig):
        """Marker config: the Neuron framework quantizes, not vLLM's layers."""

        def get_name(self) -> str:
            return NAME

        @classmethod
        def get_supported_act_dtypes(cls) -> list[torch.dtype]:
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        @classmethod
        def from_config(cls, config: dict) -> NeuronQuantConfig:
            return cls()

        def get_quant_method(self, layer, prefix: str):
            return None
