"""Refuse ``best_of`` above ``n`` instead of ignoring it.

vLLM 0.33 dropped best_of from SamplingParams; its OpenAI request models still
accept the field (or keep it as an unknown extra) and never use it, so a client
asking for the best of 5 silently gets 1. We answer HTTP 400 naming it.
"""

from __future__ import annotations

import functools

REQUEST_MODULES = {
    "vllm.entrypoints.openai.completion.protocol": "CompletionRequest",
    "vllm.entrypoints.openai.chat_completion.protocol": "ChatCompletionRequest",
}


def requested_best_of(request) -> int | None:
    value = getattr(request, "best_of", None)
    if value is None:
        value = (getattr(request, "model_extra", None) or {}).get("best_of")
    return value


def patch_module(module, class_name: str) -> None:
    cls = getattr(module, class_name, None)
    original = getattr(cls, "to_sampling_params", None)
    if original is None or getattr(original, "__neuronx__", False):
        return

    @functools.wraps(original)
    def to_sampling_params(self, *args, **kwargs):
        best_of = requested_best_of(self)
        n = getattr(self, "n", None) or 1
        if best_of is not None and best_of != n and best_of != 1:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"best_of={best_of} is not supported: vLLM 0.33 no longer implements it; "
                f"use n={best_of} and pick by logprobs on the client",
                parameter="best_of",
                value=best_of,
            )
        return original(self, *args, **kwargs)

    to_sampling_params.__neuronx__ = True
    cls.to_sampling_params = to_sampling_params
