"""A server whose engine died exits with status 1, not 0.

When the engine core fails (the model raised during a step, or its process
died), upstream 0.33 answers the requests in flight with HTTP 500 (an error
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
from vllm_neuronx.patches import drain, wrap_once

logger = get_logger(__name__)

WORKER = "vllm.entrypoints.launchers.api_server.entry"
# Modules holding terminate_if_errored: where it is defined, and one that imported it by name.
CHECKERS = (
    "vllm.entrypoints.launchers.launcher",
    "vllm.entrypoints.serve.exception_handling.handlers.vllm_error",
)
EXIT_STATUS = 1
_died = False  # this process saw its engine die without being asked to stop


def patch_checker(module) -> None:
    def noting_death(terminate):
        def noting_terminate(server, engine):
            global _died
            if engine.errored and not drain.draining(engine) and not _died:
                _died = True
                logger.error("The engine died; the server will exit with status %d", EXIT_STATUS)
            return terminate(server, engine)

        return noting_terminate

    wrap_once(module, "terminate_if_errored", noting_death)


def patch_worker(module) -> None:
    def reporting_death(run):
        async def run_then_report(*args, **kwargs):
            await run(*args, **kwargs)
            if _died:
                raise SystemExit(EXIT_STATUS)

        return run_then_report

    wrap_once(module, "run_server_worker", reporting_death)


# Module -> its patch, applied right after the module is imported.
PATCHES = {
    **{name: patch_checker for name in CHECKERS},
    WORKER: patch_worker,
}
