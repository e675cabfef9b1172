"""A shutdown drains the HTTP requests already accepted, refuses new ones, and ends.

Upstream, on SIGTERM with ``--shutdown-timeout N``, the API server asks the
engine to stop at once, and the engine finishes the requests it holds for up to
N seconds. Three things go wrong on the way:

- A request accepted just before (its stream's headers already sent) reaches
  the engine after the signal, and the engine refuses it: the client gets an
  empty answer with finish_reason "abort".
- A request arriving during the drain reaches a renderer already shut down:
  HTTP 500 "cannot schedule new futures after shutdown", traceback in the log.
- Requests still open when the engine stops (the default ``--shutdown-timeout
  0`` aborts at once; a drain can time out) hear of it by a race: the engine is
  killed before its abort outputs arrive, and either its death reaches them
  (an HTTP 500 error chunk, a traceback each) or nothing does and their
  streams stay open; the server then waits for those connections to close, as
  long as the clients keep them.

Here the drain happens at the HTTP door: once a shutdown begins, every request
but /metrics gets 503 in vLLM's error shape, saying the server is shutting down
(``Connection: close``, so clients reconnect elsewhere); the requests accepted
before get up to N seconds to finish, the engine serving them as usual; then
the engine is stopped as upstream does, with the time left. Whatever is still
open then, or at once without a drain, ends as aborted (finish_reason "abort").

Changes upstream: ``AsyncLLM.shutdown`` marks the shutdown, waits for the
accepted HTTP requests and aborts the leftovers; the app's middleware
(``init_entrypoints_middleware`` as ``build_app`` calls it) gains one that
refuses and counts requests.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from http import HTTPStatus

from vllm_neuronx.log import get_logger
from vllm_neuronx.patches import wrap_once

logger = get_logger(__name__)

ASYNC_LLM = "vllm.v1.engine.async_llm"
APP = "vllm.entrypoints.launchers.app"
DRAINING = "_neuronx_draining"
OPEN_PATHS = frozenset({"/metrics"})
MESSAGE = (
    "The server is shutting down: requests already running are finishing, new requests "
    "are refused. Retry on another instance or after a restart."
)
_accepted = 0  # HTTP requests let in and not yet answered (changed on the event loop only)


def draining(engine_client) -> bool:
    return bool(getattr(engine_client, DRAINING, False))


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
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        status = HTTPStatus.SERVICE_UNAVAILABLE
        error = create_error_response(MESSAGE, err_type=status.phrase, status_code=status)
        response = JSONResponse(error.model_dump(), status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def patch_async_llm(module) -> None:
    def drain_first(shutdown):
        def draining_shutdown(self, timeout: float | None = None):
            setattr(self, DRAINING, True)
            why = "no drain"
            if timeout:
                timeout, why = _drain_http(self, timeout), "the drain timed out"
            if timeout == 0:  # upstream kills the engine at once: tell the clients first
                _on_its_loop(self, functools.partial(_abort_open_requests, why=why), wait=5.0)
            try:
                return shutdown(self, timeout=timeout)
            finally:
                stopped = functools.partial(_abort_open_requests, why="the engine stopped")
                _on_its_loop(self, stopped)

        return draining_shutdown

    wrap_once(module.AsyncLLM, "shutdown", drain_first)


def _drain_http(async_llm, timeout: float) -> float:
    """Wait up to ``timeout`` s for the HTTP requests accepted before the shutdown; the
    seconds left. Only from another thread than the loop's (upstream's SIGTERM path)."""
    loop = _loop_of(async_llm)
    if loop is None or _running_loop() is loop:
        return timeout
    deadline = time.monotonic() + timeout
    # One round trip through the loop: a request that saw no shutdown is counted by now.
    _on_its_loop(async_llm, lambda _: None, wait=timeout)
    if _accepted:
        logger.info("Shutting down: draining %d HTTP request(s) for up to %.0f s",
                    _accepted, timeout)
    while _accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    return max(0.0, deadline - time.monotonic())


def _abort_open_requests(async_llm, why: str) -> None:
    processor = getattr(async_llm, "output_processor", None)
    open_ids = list(getattr(processor, "request_states", ()))
    if open_ids:
        logger.warning("Shutting down (%s): ending %d unfinished request(s) as aborted",
                       why, len(open_ids))
        processor.abort_requests(open_ids, internal=True)


def _loop_of(async_llm):
    """The event loop the engine client's requests wait on, if it still runs."""
    handler = getattr(async_llm, "output_handler", None)
    loop = handler.get_loop() if handler is not None else None
    return None if loop is None or loop.is_closed() else loop


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _on_its_loop(async_llm, fn, wait: float = 0.0) -> None:
    """Run ``fn(async_llm)`` on its event loop (shutdown may run in a worker thread),
    waiting up to ``wait`` seconds for it; nothing to do if the loop is gone."""
    loop = _loop_of(async_llm)
    if loop is None:
        return
    if _running_loop() is loop:
        fn(async_llm)
        return
    done = threading.Event()

    def run() -> None:
        try:
            fn(async_llm)
        finally:
            done.set()

    loop.call_soon_threadsafe(run)
    done.wait(wait)


def patch_app(module) -> None:
    def with_drain(init):
        def init_with_drain(args, app, *rest, **kwargs):
            result = init(args, app, *rest, **kwargs)
            app.add_middleware(RefuseWhileDraining)  # added last: runs first
            return result

        return init_with_drain

    wrap_once(module, "init_entrypoints_middleware", with_drain)


PATCHES = {ASYNC_LLM: patch_async_llm, APP: patch_app}
