"""The one thread that makes every backend call under asynchronous scheduling, in order.

A step's output goes to whoever waits for it (vLLM's output thread) only once the next
queued step has reached the backend, or when nothing else is queued: woken earlier, the
waiter's output handling would compete for the GIL with the next step's launch, which
is the host time the device waits for.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class DeviceThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._held: tuple[Future, object] | None = None  # a step's output not yet given
        self._thread = threading.Thread(target=self._loop, name="NeuronDevice", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, step: bool = False) -> Future:
        """``fn(*args)`` after every call submitted before it. A ``step`` calls
        ``launching()`` right before its backend call."""
        future: Future = Future()
        self._jobs.put((future, fn, args, step))
        return future

    @property
    def current(self) -> bool:
        """Whether the caller runs on this thread."""
        return threading.current_thread() is self._thread

    def launching(self) -> None:
        """The step before this one may be handled now."""
        if self._held is not None:
            future, result = self._held
            self._held = None
            future.set_result(result)

    def _loop(self) -> None:
        while True:
            if self._jobs.empty():
                self.launching()  # nothing queued behind the last step: give it now
            item = self._jobs.get()
            if item is None:
                self.launching()
                return
            future, fn, args, step = item
            if not step:
                self.launching()
            try:
                result = fn(*args)
            except BaseException as e:
                self.launching()
                future.set_exception(e)
                continue
            if step:
                self._held = (future, result)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()
