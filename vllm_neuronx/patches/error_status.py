"""A request the engine fails is HTTP 500 (or the error's own status), never HTTP 200.

Upstream 0.16's completion and chat routes catch an exception raised by their handler
and return ``create_error_response(e)``, an ``ErrorResponse`` object that FastAPI then
sends with status 200: a client whose engine died reads a success whose body says
"code": 500. The routes send an ``ErrorResponse`` the handler *returns* with its own
code, so the handlers return their errors instead of raising them.
"""

from __future__ import annotations


def returning_errors(create):
    """OpenAIServingCompletion.create_completion / OpenAIServingChat.create_chat_completion:
    an exception becomes the ErrorResponse upstream would build for it."""

    async def create_or_error(self, request, raw_request=None, *args, **kwargs):
        try:
            return await create(self, request, raw_request, *args, **kwargs)
        except Exception as e:
            return self.create_error_response(e)

    return create_or_error
