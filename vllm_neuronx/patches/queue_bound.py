"""A request refused for a full queue is told so, with the bound.

Upstream bounds the requests in flight (waiting or running) with
``--max-num-queued-reqs`` and answers past it HTTP 503 "The engine is currently
busy and cannot accept new requests", which says neither why nor what the
limit is. We keep upstream's check, status and rejection metric, and raise the
same error type (``QueueOverflowError``) with a message naming the bound.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError, QueueOverflowError

from vllm_neuronx.patches import wrap_once

ASYNC_LLM = "vllm.v1.engine.async_llm"


class QueueFull(QueueOverflowError):
    def __init__(self, bound: int, n: int = 1) -> None:
        need = "" if n == 1 else f"; this request needs {n} places (n={n})"
        GracefulHTTPError.__init__(
            self,
            f"The request queue is full: at most {bound} requests may be waiting or running "
            f"at once (--max-num-queued-reqs={bound}){need}. Retry later or on another "
            "instance.",
            HTTPStatus.SERVICE_UNAVAILABLE,
        )


def patch_module(module) -> None:
    def naming_the_bound(original):
        def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
            try:
                original(self, n, request_id)
            except QueueOverflowError as e:
                raise QueueFull(self.scheduler_config.max_num_queued_reqs, n) from e

        return check_admission

    wrap_once(module.AsyncLLM, "check_admission", naming_the_bound)
