"""Refuse ``max_tokens`` past the room the prompt leaves, instead of cutting it short.

Upstream's OpenAI server quietly lowers an explicit ``max_tokens`` to
``max_model_len - prompt_len`` (``get_max_tokens``), so a client asking for 60
tokens gets 27 with finish_reason "length" and no explanation. On Neuron the
context is a compiled size users choose; we answer HTTP 400 naming the numbers,
as OpenAI's own API does. A request without max_tokens still gets the room left.
"""

from __future__ import annotations

# The module that defines get_max_tokens, and those that imported it by name.
MODULES = (
    "vllm.entrypoints.utils",
    "vllm.entrypoints.openai.engine.serving",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.responses.serving",
)


def strict(get_max_tokens):
    def checked(max_model_len, max_tokens, input_length, *args, **kwargs):
        allowed = get_max_tokens(max_model_len, max_tokens, input_length, *args, **kwargs)
        room = max_model_len - input_length
        if max_tokens is not None and allowed < max_tokens and room < max_tokens:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"max_tokens={max_tokens} does not fit: the prompt has {input_length} tokens "
                f"and max_model_len is {max_model_len}, which leaves room for {room}",
                parameter="max_tokens",
                value=max_tokens,
            )
        return allowed

    return checked
