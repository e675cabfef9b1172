"""SIGTERM or SIGINT during a compile stops the compile, so its temp folder is removed.

vLLM 0.16's engine core answers the first SIGTERM by raising SystemExit (0.33's
noted it and carried on: a compile, minutes on Neuron, ran to its end while the
parent force-killed the engine, leaving a partial ``.compiling-*`` folder). Inside
``stop_on_termination()`` the signal first reaches the handler that was there
(vLLM's, Python's KeyboardInterrupt); if that one returns, ``CompileInterrupted`` is
raised, so either way the caller's cleanup runs and the process exits (a server
logs "compile interrupted" only in the second case).
A signal set to be ignored stays ignored. Raised inside a C extension (say,
safetensors reading a tensor), the exception can come out as another error:
any error leaving the block after a signal is reported as ``CompileInterrupted``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CompileInterrupted(SystemExit):
    """A compile stopped by a termination signal; exit status 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"compile interrupted by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def stop_on_termination() -> Iterator[None]:
    """Raise ``CompileInterrupted`` in the block when SIGTERM or SIGINT arrives.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    received: list[int] = []

    def handler(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        received.append(signum)
        if callable(before):
            before(signum, frame)
        raise CompileInterrupted(signum)

    for sig in SIGNALS:
        if previous[sig] is not None:  # None: a handler not set from Python; leave it
            signal.signal(sig, handler)
    try:
        yield
    except Exception as e:
        if received:
            raise CompileInterrupted(received[0]) from e
        raise
    finally:
        for sig, before in previous.items():
            if before is not None:
                signal.signal(sig, before)
