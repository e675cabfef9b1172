"""A request's LoRA adapter is checked when the request arrives, not when its step runs.

vLLM 0.16 checks only that LoRA is enabled; the adapter itself is read by the worker in the
step that first uses it. The worker has no way to fail one request (a step's output
cannot carry an error), so a bad adapter there kills the engine: offline, where an
adapter reaches the worker by its first request, one wrong path in a ``LoRARequest``
stops every request in flight. The wrap checks the adapter folder against the model
(``lora.peft.inspect``: its JSON and tensor shapes, no tensor data, cached by mtime)
after upstream's check, so ``LLM.generate`` raises a ValueError naming the adapter before
any of its requests is queued and the engine serves the next call. On the server the
adapters were checked when they were loaded (``--lora-modules``, /v1/load_lora_adapter):
the cached check passes.
"""

from __future__ import annotations

from vllm_neuronx import platform_config
from vllm_neuronx.lora import peft


def _targets() -> tuple[str, ...]:
    """The projections the backend adapts: NxDI's compiled target_modules, else all."""
    settings = platform_config.current()
    if settings is None or settings.backend != "nxdi":
        return peft.TARGETS
    from vllm_neuronx.backends.nxdi import lora_serving_kwargs

    args = lora_serving_kwargs(settings.neuron_config) or {}
    return tuple(args.get("target_modules") or peft.TARGETS)


def checked_adapter(validate):
    """InputProcessor._validate_lora: upstream's check, then the adapter's."""

    def _validate_lora(self, lora_request, *args, **kwargs):
        validate(self, lora_request, *args, **kwargs)
        if lora_request is None or not self.lora_config:
            return
        dims = peft.ModelDims.from_hf(self.model_config.hf_text_config)
        peft.inspect(lora_request.lora_name, lora_request.lora_path, dims,
                     self.lora_config.max_lora_rank, targets=_targets())

    return _validate_lora
