"""A request the engine fails is HTTP 500 (or the error's own status), never HTTP 200.

Upstream 0.16's completion and chat routes catch an exception raised by their handler
and return ``create_error_response(e)``, an ``ErrorResponse`` object that FastAPI then
sends with status 200: a client whose engine died reads a success whose body says
"code": 500. The routes send an ``ErrorResponse`` the handler *returns* with its own
code, so the handlers return their errors instead of raising them.

Upstream's request parsing also raises KeyError, IndexError or AttributeError on some
malformed bodies (a tool call without "function", say), which its mapping would call
a server error: those are the client's, HTTP 400 naming the exception.
"""

from __future__ import annotations

# Raised by upstream's request parsing on malformed input, not by a failing engine.
MALFORMED = (LookupError, AttributeError)


def returning_errors(create):
    """OpenAIServingCompletion.create_completion / OpenAIServingChat.create_chat_completion:
    an exception becomes the ErrorResponse upstream would build for it."""

    async def create_or_error(self, request, raw_request=None, *args, **kwargs):
        try:
            return await create(self, request, raw_request, *args, **kwargs)
        except MALFORMED as e:
            return self.create_error_response(
                f"The request could not be processed ({type(e).__name__}: {e}); check its "
                "fields against the API")
        except Exception as e:
            return self.create_error_response(e)

    return create_or_error
