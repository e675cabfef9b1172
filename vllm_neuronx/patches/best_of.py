"""``best_of`` on the completions API: sample best_of candidates, return the n most likely.

vLLM dropped best_of with V0 (0.16 included): SamplingParams has no such field,
and the completions and chat requests keep it as an unknown extra and ignore
it, so a client asking for the best of 5 silently gets one sample. We change
upstream in three places:

- ``CompletionRequest.to_sampling_params`` checks best_of (an integer >= n, not
  with ``stream``) and, when best_of > n, asks the engine for ``n=best_of``
  children (vLLM's usual fan-out: each child its own request and KV line,
  child i seeded ``seed + i``) with ``logprobs=0`` if the user asked none, so
  V1 fills each child's ``cumulative_logprob``. ``to_beam_search_params``
  refuses best_of > n (beam search has its own ranking).
- ``OpenAIServingCompletion.request_output_to_completion_response`` keeps each
  prompt's n candidates with the highest cumulative logprob (the sum of the
  sampled tokens' logprobs), best first, before upstream builds the response
  from the user's own request (so logprobs appear only if asked, with the
  user's k); afterwards the dropped candidates' tokens are added to usage, as
  they were generated (OpenAI bills them).
- ``ChatCompletionRequest.to_sampling_params`` refuses best_of other than n:
  OpenAI's chat API has no best_of.

Greedy sampling (temperature 0) would give best_of identical candidates and
vLLM refuses n > 1 there, so a greedy best_of request generates one (and
counts one). best_of equal to n is plain n.
"""

from __future__ import annotations

from vllm_neuronx import sampling


def _refuse(message: str, value) -> None:
    from vllm.exceptions import VLLMValidationError

    raise VLLMValidationError(message, parameter="best_of", value=value)


def raw_best_of(request):
    """The client's best_of as sent (a declared field, or an extra on 0.16's requests)."""
    value = getattr(request, "best_of", None)
    if value is None:
        value = (getattr(request, "model_extra", None) or {}).get("best_of")
    return value


def requested_best_of(request) -> int | None:
    """The client's best_of, checked: None when absent, else an integer >= n."""
    value = raw_best_of(request)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        _refuse(f"best_of must be an integer, got {value!r}", value)
    n = getattr(request, "n", None) or 1
    if value < n:
        _refuse(f"best_of={value} must be greater than or equal to n={n}", value)
    return value


def _ranked(request) -> int | None:
    """best_of when the request needs candidates ranked (best_of > n), else None."""
    best_of = requested_best_of(request)
    n = getattr(request, "n", None) or 1
    return best_of if best_of is not None and best_of > n else None


def _check_logits_on_host(best_of: int) -> None:
    """Ranking needs logprobs, which only a model returning logits gives."""
    from vllm_neuronx import platform_config

    settings = platform_config.current()
    if settings is not None and not settings.sampling.logits:
        _refuse(
            f"best_of={best_of} ranks candidates by their logprobs, which need the logits "
            f"on the host, but this model was compiled with on-device sampling that returns "
            f"only tokens (backend {settings.backend}); to serve it, "
            f"{settings.sampling.enable_logits}",
            best_of,
        )


def completion_sampling_params(original):
    """CompletionRequest.to_sampling_params: best_of > n asks for best_of children."""

    def to_sampling_params(self, *args, **kwargs):
        best_of = _ranked(self)
        if best_of is not None and self.stream:
            _refuse(f"best_of={best_of} cannot be streamed: candidates are ranked "
                    "once all are finished; use stream=false", best_of)
        params = original(self, *args, **kwargs)
        if best_of is None or params.temperature < sampling.GREEDY_EPS:
            return params
        _check_logits_on_host(best_of)
        params.n = best_of
        if params.logprobs is None:
            params.logprobs = 0  # the sampled token's logprob: V1 then sums them
        return params

    return to_sampling_params


def completion_beam_search_params(original):
    """CompletionRequest.to_beam_search_params: refuses best_of > n."""

    def to_beam_search_params(self, *args, **kwargs):
        best_of = _ranked(self)
        if best_of is not None:
            _refuse(f"best_of={best_of} cannot be combined with use_beam_search, "
                    "whose beams are ranked by n", best_of)
        return original(self, *args, **kwargs)

    return to_beam_search_params


def _likeliest(outputs, n: int):
    """The n outputs with the highest cumulative logprob, best first, re-indexed."""
    def score(output) -> float:
        value = output.cumulative_logprob
        return float("-inf") if value is None else value

    ordered = sorted(sorted(outputs, key=lambda o: o.index), key=score, reverse=True)
    kept = ordered[:n]
    for index, output in enumerate(kept):
        output.index = index
    return kept, ordered[n:]


def completion_response(original):
    """OpenAIServingCompletion.request_output_to_completion_response: keeps the n likeliest
    candidates and bills the dropped ones."""

    def request_output_to_completion_response(self, final_res_batch, request, *args, **kw):
        best_of = _ranked(request)
        if best_of is None:
            return original(self, final_res_batch, request, *args, **kw)
        request_id = kw.get("request_id", args[0] if args else "")
        dropped_tokens = 0
        for final_res in final_res_batch:
            for output in final_res.outputs:  # a failed candidate fails the request
                self._raise_if_error(output.finish_reason, request_id)
            final_res.outputs, dropped = _likeliest(final_res.outputs, request.n or 1)
            dropped_tokens += sum(len(output.token_ids) for output in dropped)
        response = original(self, final_res_batch, request, *args, **kw)
        # The same UsageInfo object is the request metadata's final usage.
        response.usage.completion_tokens += dropped_tokens
        response.usage.total_tokens += dropped_tokens
        return response

    return request_output_to_completion_response


def chat_sampling_params(original):
    """ChatCompletionRequest.to_sampling_params: refuses best_of other than n."""

    def to_sampling_params(self, *args, **kwargs):
        best_of = _ranked(self)
        if best_of is not None:
            _refuse(f"best_of={best_of} is not supported by chat completions (OpenAI's "
                    "chat API has no best_of); use /v1/completions", best_of)
        return original(self, *args, **kwargs)

    return to_sampling_params
