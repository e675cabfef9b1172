"""Simulated ``neuronx_distributed_inference.utils.hf_adapter.load_pretrained_config``.

Like NxDI it copies every key of the HF config's ``to_dict()`` onto the
InferenceConfig and moves the HF dtype into the NeuronConfig unless the user set
torch_dtype. Nothing else is translated, so transformers 5 configs lack the
top-level ``rope_theta`` NxDI's Llama requires, exactly as they would on a device.
"""

from __future__ import annotations

import os

from neuronx_distributed_inference.models.config import to_torch_dtype


def load_pretrained_config(model_path_or_name: str | os.PathLike | None = None, hf_config=None):
    """A load_config hook for InferenceConfig (give exactly one of the two arguments)."""

    def load_config(self) -> None:
        if (model_path_or_name is None) == (hf_config is None):
            raise ValueError('Please provide only one of "model_path_or_name" or "hf_config"')
        if model_path_or_name is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path_or_name)
        else:
            config = hf_config
        values = config.to_dict()
        hf_dtype = values.pop("dtype", None)
        hf_dtype = values.pop("torch_dtype", None) or hf_dtype
        neuron_config = getattr(self, "neuron_config", None)
        if hf_dtype is not None and neuron_config is not None:
            if not neuron_config.overrides_torch_dtype:
                neuron_config.torch_dtype = to_torch_dtype(hf_dtype)
        for key, value in values.items():
            setattr(self, key, value)
        if model_path_or_name is not None and not getattr(self, "_name_or_path", None):
            self._name_or_path = str(model_path_or_name)

    return load_config
