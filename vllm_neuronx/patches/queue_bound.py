"""A bound on the requests in flight: past it, HTTP 503 naming the bound.

Upstream vLLM 0.16 queues every request it is sent, however many already wait:
under overload latency grows without limit and nothing tells a client or a load
balancer to go elsewhere. (vLLM 0.33 added ``--max-num-queued-reqs``; this patch
gives 0.16 the same flag.)

With ``--max-num-queued-reqs N`` the API server admits a completion or chat request
only while the sequences it has in flight (waiting or running, each of a request's
n or best_of candidates counted) stay within N; past it the request gets HTTP 503
in vLLM's error shape, naming the bound, and the requests admitted go on
untouched. A request is in flight from its admission until its answer (or its
stream) ends. Without the flag nothing is bounded, as upstream.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm_neuronx.patches.best_of import raw_best_of
from vllm_neuronx.patches.drain import server_args

_in_flight = 0  # sequences admitted and not yet answered (changed on the event loop only)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_cli_arg(group) -> None:
    group.add_argument(
        "--max-num-queued-reqs",
        type=_positive_int,
        default=None,
        help="At most this many sequences waiting or running at once (n and best_of "
        "candidates each count); past it requests get HTTP 503. Default: no bound.",
    )


def message(bound: int, n: int) -> str:
    need = "" if n == 1 else f"; this request needs {n} places (n={n})"
    return (f"The request queue is full: at most {bound} requests may be waiting or running "
            f"at once (--max-num-queued-reqs={bound}){need}. Retry later or on another "
            "instance.")


def places(request) -> int:
    """Sequences a request puts in flight: its n, or its best_of when larger."""
    n = getattr(request, "n", None) or 1
    best_of = raw_best_of(request)
    if isinstance(best_of, int) and not isinstance(best_of, bool) and best_of > n:
        return best_of
    return n


def admitting(create):
    """OpenAIServingCompletion.create_completion / OpenAIServingChat.create_chat_completion:
    admit within the bound, release when the answer or its stream ends."""

    async def create_if_admitted(self, request, raw_request=None, *args, **kwargs):
        global _in_flight
        app = getattr(raw_request, "app", None)
        bound = getattr(server_args(app), "max_num_queued_reqs", None)
        if bound is None:
            return await create(self, request, raw_request, *args, **kwargs)
        n = places(request)
        if _in_flight + n > bound:
            status = HTTPStatus.SERVICE_UNAVAILABLE
            return self.create_error_response(message(bound, n), err_type=status.phrase,
                                              status_code=status)
        _in_flight += n
        try:
            result = await create(self, request, raw_request, *args, **kwargs)
        except BaseException:
            _in_flight -= n
            raise
        if not hasattr(result, "__anext__"):
            _in_flight -= n
            return result
        return _releasing(result, n)

    return create_if_admitted


async def _releasing(stream, n: int):
    global _in_flight
    try:
        async for chunk in stream:
            yield chunk
    finally:
        _in_flight -= n
