"""vLLM's LoRA settings a Neuron backend cannot honour: refused at start-up, by name.

``enable_lora``, ``max_loras``, ``max_lora_rank`` and ``max_cpu_loras`` are served (the
scheduler, the worker's host pool and the backend's adapter slots). The others ask for
something no backend here does, so they are refused rather than accepted and ignored.
"""

from __future__ import annotations

from vllm_neuronx import neuron_config as nc


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_lora_config(lora_config, model_dtype, backend: str) -> None:
    """Refuse the LoRA settings the ``backend`` does not serve, naming the setting."""
    if lora_config is None:
        return
    if lora_config.fully_sharded_loras:
        raise nc.NeuronConfigError(
            f"fully_sharded_loras: the {backend} backend places adapter weights itself (NxDI "
            "shards them with the model's tensor parallelism); this setting would change "
            "nothing, remove it")
    dtype = lora_config.lora_dtype
    if dtype not in (None, "auto") and _dtype_name(dtype) != _dtype_name(model_dtype):
        raise nc.NeuronConfigError(
            f"lora_dtype={_dtype_name(dtype)}: the {backend} backend applies adapters in the "
            f"model's dtype ({_dtype_name(model_dtype)}); use lora_dtype='auto'")
    if lora_config.default_mm_loras:
        raise nc.NeuronConfigError(
            "default_mm_loras: multimodal input is not served, so no adapter can be chosen "
            "by modality; remove it")
    if lora_config.enable_tower_connector_lora:
        raise nc.NeuronConfigError(
            "enable_tower_connector_lora: adapters apply to the language model's attention "
            "and MLP projections only (no vision tower is served); remove it")
