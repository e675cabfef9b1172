"""Requests the Neuron path cannot serve are refused up front, with the parameter named.

The earlier Neuron code bases ignored what on-device sampling cannot do
(penalties, seeds, logprobs...) with a log line; users only saw it in their
results. Offline ``LLM`` and the server both reach this through the platform's
``validate_request``, so they refuse the same things with the same words.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.platform_config import active_settings

# SamplingParams field -> (value meaning "off", what to say)
_UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "logprobs": None,
    "prompt_logprobs": None,
    "seed": None,
    "min_tokens": 0,
    "structured_outputs": None,
    "logits_processors": None,
}


class NeuronRequestError(VLLMValidationError, ValueError):
    """A request Neuron cannot serve: HTTP 400 on the server, a ValueError offline."""


def _is_off(value: Any, off: Any) -> bool:
    if off is None:
        return value is None or value == [] or value == {}
    return value == off


def validate_request(engine_input: Any, params: Any) -> None:
    settings = active_settings()
    if settings is None or not hasattr(params, "temperature"):
        return  # not a generation request, or not configured by our platform
    for field, off in _UNSUPPORTED.items():
        value = getattr(params, field, off)
        if not _is_off(value, off):
            raise NeuronRequestError(
                f"{field}={value!r} is not supported on Neuron yet: on-device sampling "
                "applies only temperature, top_k and top_p",
                parameter=field,
                value=value,
            )
    topk = nc.global_topk(settings.neuron_config)
    if topk is not None and params.top_k is not None and params.top_k > topk:
        raise NeuronRequestError(
            f"top_k={params.top_k} exceeds on-device sampling's global_topk={topk}; use "
            "top_k <= global_topk, or raise override_neuron_config "
            "on_device_sampling_config.global_topk",
            parameter="top_k",
            value=params.top_k,
        )
    prompt = engine_input.get("prompt_token_ids") if hasattr(engine_input, "get") else None
    if prompt is not None:
        max_len = settings.neuron_config["seq_len"]
        room = max_len - len(prompt)
        if params.max_tokens is not None and 0 < room < params.max_tokens:
            # Upstream would quietly cut the output short; say so instead.
            raise NeuronRequestError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(prompt)} "
                f"tokens and max_model_len is {max_len}, which leaves room for {room}",
                parameter="max_tokens",
                value=params.max_tokens,
            )
        longest = nc.context_buckets(settings.neuron_config)[-1]
        if len(prompt) > longest:
            raise NeuronRequestError(
                f"the prompt has {len(prompt)} tokens, more than the largest context-encoding "
                f"bucket ({longest})",
                parameter="input_tokens",
                value=len(prompt),
            )
