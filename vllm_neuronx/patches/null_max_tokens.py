"""An explicit ``"max_tokens": null`` on /v1/completions, answered as upstream means it.

vLLM 0.16 reads it as "up to the context" when it builds the sampling (or beam search)
parameters, generates, and then asserts ``request.max_tokens is not None`` where it
builds the response, streamed or not: the request is computed and answered HTTP 500
with an empty message. The wraps record on the request the budget vLLM computed, so the
response is built as for any number.
"""

from __future__ import annotations


def _recording(original):
    def params(self, max_tokens, *args, **kwargs):
        if self.max_tokens is None:
            self.max_tokens = max_tokens
        return original(self, max_tokens, *args, **kwargs)

    return params


def completion_sampling_params(original):
    """CompletionRequest.to_sampling_params: records the computed max_tokens."""
    return _recording(original)


def completion_beam_search_params(original):
    """CompletionRequest.to_beam_search_params: records the computed max_tokens."""
    return _recording(original)
