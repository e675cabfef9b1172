"""SIGTERM or SIGINT during a compile stops the compile, so its temp folder is removed.

vLLM's engine core answers SIGTERM by noting that a shutdown was asked for and
carrying on: a compile (minutes on Neuron) would run to its end, and the parent
force-kills the engine after a few seconds, leaving a partial ``.compiling-*``
folder behind. Inside ``stop_on_termination()`` the signal first reaches the
handler that was there (vLLM's note, Python's KeyboardInterrupt), then raises
``CompileInterrupted`` so the caller's cleanup runs and the process exits.
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
