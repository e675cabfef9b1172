"""A JSON request body that is not an object is HTTP 400, not HTTP 500.

Upstream 0.16's request models run "before" validators that take the body for a dict
(``data.get(...)``): a body of ``null``, ``true``, ``3`` or ``[1]`` raises
AttributeError inside validation and the client gets a bare HTTP 500 with a
traceback in the log. Every JSON body our routes take is an object, so this
middleware answers any other with HTTP 400 in vLLM's error shape before routing;
malformed JSON is left to upstream, which already answers 400.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm_neuronx.patches.drain import error_body

MIDDLEWARE = "vllm_neuronx.patches.json_body.JsonObjectBodies"
WHITESPACE = b" \t\r\n"


class JsonObjectBodies:
    """ASGI middleware: POSTed JSON must start with '{'; the body is replayed as read."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        start = body.lstrip(WHITESPACE)[:1]
        if start and start != b"{":
            await _refuse(scope, receive, send, body)
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _is_json(scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


async def _refuse(scope, receive, send, body: bytes) -> None:
    from fastapi.responses import JSONResponse

    shown = body.strip()[:40].decode("utf-8", "replace")
    status = HTTPStatus.BAD_REQUEST
    message = f"The request body must be a JSON object, got {shown!r}"
    content = error_body(message, status)
    content["error"]["type"] = "BadRequestError"
    await JSONResponse(content, status_code=status)(scope, receive, send)
