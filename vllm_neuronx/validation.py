"""Requests the selected backend cannot serve are refused up front, with the parameter named.

The earlier Neuron code bases ignored what on-device sampling cannot do
(penalties, seeds, logprobs...) with a log line; users only saw it in their
results. Here every sampling parameter is either honoured or refused: plain
requests (temperature, top_k, top_p) are sampled on the device; the others
(``sampling.HOST_PARAMETERS``) on the host from the logits, which is possible
only where the compiled model returns logits (the backend's
``SamplingCapabilities``, in the current NeuronSettings). Offline ``LLM`` and the
server both reach this through the platform's ``validate_request``, so they
refuse the same things with the same words.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_neuronx import neuron_config as nc
from vllm_neuronx import platform_config, sampling, unserved


class NeuronRequestError(VLLMValidationError, ValueError):
    """A request Neuron cannot serve: HTTP 400 on the server, a ValueError offline."""


def _refuse(message: str, field: str, value: Any) -> None:
    raise NeuronRequestError(message, parameter=field, value=value)


def _check_sampling(params: Any, settings) -> None:
    caps = settings.sampling
    host = sampling.host_parameters(params)
    if host and not caps.logits:
        field, value = host[0]
        _refuse(
            f"{field}={value!r} needs the logits on the host, but this model was compiled "
            f"with on-device sampling that returns only tokens (backend {settings.backend}, "
            f"which applies only temperature, top_k and top_p); to serve it, "
            f"{caps.enable_logits}",
            field,
            value,
        )
    prompt_logprobs = getattr(params, "prompt_logprobs", None)
    if prompt_logprobs is not None and not caps.prompt_logits:
        _refuse(
            f"prompt_logprobs={prompt_logprobs!r} is not supported by the {settings.backend} "
            "backend: its context encoding returns the logits of the last prompt position "
            "only (the NxDI contract), so prompt tokens cannot be scored; use logprobs "
            "(generated tokens) instead",
            "prompt_logprobs",
            prompt_logprobs,
        )
    block = settings.block_layout
    if prompt_logprobs is not None and block is not None and block.chunked_prefill:
        _refuse(
            f"prompt_logprobs={prompt_logprobs!r} is not served with chunked prefill (a "
            "prompt's logits come a chunk at a time); start the engine without "
            "--enable-chunked-prefill to score prompts",
            "prompt_logprobs",
            prompt_logprobs,
        )
    topk = nc.global_topk(settings.neuron_config)
    if host or topk is None or params.top_k is None or params.top_k <= topk:
        return  # the host sampler applies any top_k
    _refuse(
        f"top_k={params.top_k} exceeds on-device sampling's global_topk={topk}; use "
        "top_k <= global_topk, or raise override_neuron_config "
        "on_device_sampling_config.global_topk",
        "top_k",
        params.top_k,
    )


def _check_token_ids(prompt, vocab_size: int | None) -> None:
    """Every prompt token must index the model's embedding: upstream 0.16 checks only the
    tokenizer's largest id, so a negative id (or one past a model vocabulary smaller than
    its tokenizer's) would reach the model and kill the engine with every request in it."""
    if not prompt:
        return
    low, high = min(prompt), max(prompt)
    bad = low if low < 0 else high if vocab_size is not None and high >= vocab_size else None
    if bad is not None:
        raise NeuronRequestError(
            f"token id {bad} is out of vocabulary: prompt token ids must be in "
            f"[0, {vocab_size if vocab_size is not None else 'vocab_size'})",
            parameter="prompt_token_ids",
            value=bad,
        )


def validate_request(engine_input: Any, params: Any) -> None:
    settings = platform_config.current()
    if settings is None or not hasattr(params, "temperature"):
        return  # not a generation request, or not configured by our platform
    _check_sampling(params, settings)
    parts = unserved.multimodal_parts(engine_input)
    if parts:
        raise NeuronRequestError(
            f"{unserved.MULTIMODAL.reason(settings.backend)}: the request carries "
            f"{', '.join(parts)}; send text only",
            parameter="multi_modal_data",
            value=parts,
        )
    prompt = engine_input.get("prompt_token_ids") if hasattr(engine_input, "get") else None
    if prompt is not None:
        _check_token_ids(prompt, settings.vocab_size)
        max_len = settings.max_model_len
        room = max_len - len(prompt)
        if params.max_tokens is not None and 0 < room < params.max_tokens:
            # Upstream would quietly cut the output short; say so instead.
            raise NeuronRequestError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(prompt)} "
                f"tokens and max_model_len is {max_len}, which leaves room for {room}",
                parameter="max_tokens",
                value=params.max_tokens,
            )
        chunked = settings.block_layout is not None and settings.block_layout.chunked_prefill
        longest = nc.context_buckets(settings.neuron_config)[-1]
        if len(prompt) > longest and not chunked:  # chunks are never wider than the budget
            raise NeuronRequestError(
                f"the prompt has {len(prompt)} tokens, more than the largest context-encoding "
                f"bucket ({longest})",
                parameter="input_tokens",
                value=len(prompt),
            )
