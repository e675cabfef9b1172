"""/detokenize with token ids outside the vocabulary: HTTP 400 naming the id.

vLLM 0.16 hands the ids to the tokenizer unchecked: a negative id or one past 2^63 (JSON
has no integer limit) fails inside it and the client gets HTTP 500.
"""

from __future__ import annotations


def checked_ids(create):
    """OpenAIServingTokenization.create_detokenize: ids checked against the vocabulary."""

    async def create_detokenize(self, request, raw_request, *args, **kwargs):
        vocab = self.model_config.get_vocab_size()
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            return self.create_error_response(
                f"token id {bad} is out of vocabulary: token ids must be in [0, {vocab})",
                param="tokens")
        return await create(self, request, raw_request, *args, **kwargs)

    return create_detokenize
