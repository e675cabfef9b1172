"""Once the server is shutting down, a new HTTP request gets 503, not 500.

On SIGTERM upstream's server drains: with ``--shutdown-timeout N`` the requests
in flight get up to N seconds to finish while the HTTP server still accepts
connections. A request arriving then reaches a renderer that is already shut
down and gets HTTP 500 "cannot schedule new futures after shutdown" (and a
traceback in the log). We refuse it at the door: 503 in vLLM's error shape,
saying the server is shutting down, with ``Connection: close`` so the client
reconnects elsewhere. /metrics stays readable while draining.

Two changes upstream: ``AsyncLLM.shutdown`` notes on the engine client that a
shutdown has begun, and the app's middleware (``init_entrypoints_middleware``
as ``build_app`` calls it) gains one that reads the note.
"""

from __future__ import annotations

import functools
from http import HTTPStatus

ASYNC_LLM = "vllm.v1.engine.async_llm"
APP = "vllm.entrypoints.launchers.app"
DRAINING = "_neuronx_draining"
OPEN_PATHS = frozenset({"/metrics"})
MESSAGE = (
    "The server is shutting down: requests already running are finishing, new requests "
    "are refused. Retry on another instance or after a restart."
)


def draining(engine_client) -> bool:
    return bool(getattr(engine_client, DRAINING, False))


class RefuseWhileDraining:
    """ASGI middleware: 503 for every HTTP request but /metrics once a shutdown began."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            state = getattr(scope.get("app"), "state", None)
            if draining(getattr(state, "engine_client", None)):
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)

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
    cls = module.AsyncLLM
    shutdown = cls.shutdown
    if getattr(shutdown, "__neuronx_drain__", False):
        return

    @functools.wraps(shutdown)
    def noting_shutdown(self, *args, **kwargs):
        setattr(self, DRAINING, True)
        return shutdown(self, *args, **kwargs)

    noting_shutdown.__neuronx_drain__ = True
    cls.shutdown = noting_shutdown


def patch_app(module) -> None:
    init = module.init_entrypoints_middleware
    if getattr(init, "__neuronx_drain__", False):
        return

    @functools.wraps(init)
    def init_with_drain(args, app, *rest, **kwargs):
        result = init(args, app, *rest, **kwargs)
        app.add_middleware(RefuseWhileDraining)  # added last: runs first
        return result

    init_with_drain.__neuronx_drain__ = True
    module.init_entrypoints_middleware = init_with_drain


PATCHES = {ASYNC_LLM: patch_async_llm, APP: patch_app}
