"""A server whose engine died exits with status 1, not 0.

When the engine core fails (the model raised during a step, or its process
died), upstream (0.16) answers the requests in flight with HTTP 500 (an error
chunk then ``[DONE]`` when streaming), turns /health to 503, and its watchdog
stops the HTTP server, which then returns normally: the process exits 0, as
after a requested shutdown, so a supervisor (systemd, Kubernetes, a shell's
``&&``) cannot tell a crash from a clean stop. We change upstream in two places:

- ``terminate_if_errored`` (the watchdog's and the engine error handler's check)
  notes an engine death when it finds the engine errored while no shutdown was
  asked for (``patches.drain`` marks the engine client once ``shutdown`` is
  called: an engine found dead after that is the shutdown's own doing).
- ``run_server_worker`` (every API server process runs it) raises
  ``SystemExit(1)`` once the server has stopped, when a death was noted.

``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1`` keeps upstream's meaning (the server stays
up, /health answers 503); it exits 1 when it is stopped.
"""

from __future__ import annotations

from vllm_neuronx.log import get_logger
from vllm_neuronx.patches import drain

logger = get_logger(__name__)

EXIT_STATUS = 1
_died = False  # this process saw its engine die without being asked to stop


def noting_death(terminate):
    """terminate_if_errored: notes a death that no shutdown asked for."""

    def noting_terminate(server, engine):
        global _died
        if engine.errored and not drain.draining(engine) and not _died:
            _died = True
            logger.error("The engine died; the server will exit with status %d", EXIT_STATUS)
        return terminate(server, engine)

    return noting_terminate


def reporting_death(run):
    """run_server_worker: exits 1 once the server stopped, when a death was noted."""

    async def run_then_report(*args, **kwargs):
        await run(*args, **kwargs)
        if _died:
            raise SystemExit(EXIT_STATUS)

    return run_then_report
