"""A shutdown drains the HTTP requests already accepted, refuses new ones, and ends.

Upstream vLLM 0.16 has no ``--shutdown-timeout``: on SIGTERM its API server cancels
the HTTP server at once and stops the engine. Requests in flight are cut: a
stream's client waits on an open connection that may never end, and a request
arriving meanwhile fails with a traceback. (vLLM 0.33 added ``--shutdown-timeout``;
this patch gives 0.16 the same flag, with a drain at the HTTP door.)

With ``--shutdown-timeout N`` a SIGTERM starts a drain: every HTTP request but
/metrics gets 503 in vLLM's error shape, saying the server is shutting down
(``Connection: close``, so clients reconnect elsewhere); the requests accepted
before get up to N seconds to finish, the engine serving them as usual; then the
server stops as upstream's does. Whatever is still open then, or at once without a
drain (the default, N = 0), ends as aborted (finish_reason "abort") before the
engine stops, so no client is left waiting.

Changes upstream: the app gets a middleware that refuses and counts requests,
through upstream's own ``--middleware`` (our default for it); ``serve_http`` gets
our SIGTERM handler in place of upstream's; ``AsyncLLM.shutdown`` aborts the
requests still open first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from http import HTTPStatus

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

DRAINING = "_neuronx_draining"
MIDDLEWARE = "vllm_neuronx.patches.drain.RefuseWhileDraining"
OPEN_PATHS = frozenset({"/metrics"})
MESSAGE = (
    "The server is shutting down: requests already running are finishing, new requests "
    "are refused. Retry on another instance or after a restart."
)
_accepted = 0  # HTTP requests let in and not yet answered (changed on the event loop only)


def add_cli_arg(group) -> None:
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=0.0,
        help="Seconds a SIGTERM gives the requests already accepted to finish while new "
        "ones get 503; 0 stops at once (requests still open end as aborted).",
    )


def draining(engine_client) -> bool:
    return bool(getattr(engine_client, DRAINING, False))


def server_args(app):
    """The API server's parsed flags (upstream keeps them on ``app.state.args``)."""
    return getattr(getattr(app, "state", None), "args", None)


def error_body(message: str, status: HTTPStatus) -> dict:
    """vLLM's error shape, as its OpenAI server answers."""
    from vllm.entrypoints.openai.engine.protocol import ErrorInfo, ErrorResponse

    info = ErrorInfo(message=message, type=status.phrase, code=status.value)
    return ErrorResponse(error=info).model_dump()


class RefuseWhileDraining:
    """ASGI middleware: 503 for every HTTP request but /metrics once a shutdown began;
    counts the requests it lets in until they are answered."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        global _accepted
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        if draining(getattr(state, "engine_client", None)):
            await self._refuse(scope, receive, send)
            return
        _accepted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _accepted -= 1

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        from fastapi.responses import JSONResponse

        status = HTTPStatus.SERVICE_UNAVAILABLE
        response = JSONResponse(error_body(MESSAGE, status), status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def draining_serve(serve_http):
    """serve_http: a SIGTERM drains for --shutdown-timeout seconds before the stop."""

    async def serve_http_draining(app, *args, **kwargs):
        serving = asyncio.ensure_future(serve_http(app, *args, **kwargs))
        await asyncio.sleep(0)  # upstream's first step installs its signal handlers
        if not serving.done():
            timeout = getattr(server_args(app), "shutdown_timeout", 0.0) or 0.0
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, _begin_drain, app, serving, timeout)
            if timeout > 0:
                loop.create_task(_keep_sigterm_ours(serving))
        return await serving

    return serve_http_draining


async def _keep_sigterm_ours(serving: asyncio.Future) -> None:
    """uvicorn installs its own SIGTERM handler when its server starts (signal.signal,
    beside asyncio's), and on SIGTERM stops accepting connections at once: a drain would
    leave new requests and /metrics unanswered instead of 503 and 200. Once uvicorn's
    handler is in, SIGTERM gets a Python handler that does nothing; the C-level handler
    still wakes the event loop, which runs ours (``_begin_drain``), and the drain's end
    stops uvicorn as upstream's handler does."""
    while not serving.done():
        handler = signal.getsignal(signal.SIGTERM)
        if type(getattr(handler, "__self__", None)).__module__.startswith("uvicorn"):
            signal.signal(signal.SIGTERM, _loop_wakes)
            return
        await asyncio.sleep(0.05)


def _loop_wakes(signum, frame) -> None:
    """SIGTERM's Python handler while a drain may run: the event loop, woken by the
    signal, runs the drain."""


def _begin_drain(app, serving: asyncio.Future, timeout: float) -> None:
    engine = app.state.engine_client
    again = draining(engine)
    setattr(engine, DRAINING, True)
    if again or timeout <= 0 or not _accepted:
        serving.cancel()  # what upstream's handler does: stop the HTTP server now
        return
    logger.info("Shutting down: draining %d HTTP request(s) for up to %.0f s",
                _accepted, timeout)
    asyncio.get_running_loop().create_task(_stop_after_drain(serving, timeout))


async def _stop_after_drain(serving: asyncio.Future, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _accepted and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if _accepted:
        logger.warning("Shutting down: the drain timed out with %d request(s) open", _accepted)
    serving.cancel()


def aborting_shutdown(shutdown):
    """AsyncLLM.shutdown: requests still open end as aborted before the engine stops."""

    def shutdown_aborting_open(self, *args, **kwargs):
        setattr(self, DRAINING, True)
        processor = getattr(self, "output_processor", None)
        open_ids = list(getattr(processor, "request_states", ()))
        if open_ids:
            logger.warning("Shutting down: ending %d unfinished request(s) as aborted",
                           len(open_ids))
            processor.abort_requests(open_ids, internal=True)
        return shutdown(self, *args, **kwargs)

    return shutdown_aborting_open
