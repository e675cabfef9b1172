"""SIGTERM or SIGINT while the API server starts stops it, and it exits 0.

Upstream's API server handles SIGTERM during its start-up by raising
KeyboardInterrupt from the handler. While it waits for the engine core (a ZMQ
poll in ``wait_for_engine_startup``) pyzmq 27 runs that handler inside its poll
and drops the exception: the signal is lost, the engine finishes starting (a
whole compile, on Neuron) and the server serves on as if never asked to stop.

``run_server_worker`` (every API server process runs it) gets its own handler
for the start-up, replaced by upstream's graceful one once the HTTP server
runs. Before the engine core exists it raises KeyboardInterrupt as upstream
does; after, it terminates the engine core (a compile in it stops and removes
its temp folder, see ``vllm_neuronx.interrupt``) and cancels the start-up at
its next await. Either way the start-up fails, the worker logs one line and
returns, and the process exits 0, as after a SIGTERM while serving.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StartupStop:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.info("%s during start-up: stopping the engine and exiting", self.signal_name)
        children = multiprocessing.active_children()
        if not children:
            raise KeyboardInterrupt(self.signal_name)
        for child in children:
            child.terminate()
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


def stoppable(run):
    """run_server_worker: a SIGTERM or SIGINT during start-up stops it."""

    async def run_server_worker(*args, **kwargs):
        stop = _StartupStop()
        stop.install()
        try:
            return await run(*args, **kwargs)
        except (Exception, KeyboardInterrupt, asyncio.CancelledError) as e:
            if stop.signal_name is None:
                raise
            logger.info("Start-up stopped by %s (%s)", stop.signal_name, type(e).__name__)

    return run_server_worker
