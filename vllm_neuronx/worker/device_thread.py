"""The one thread that makes every backend call under asynchronous scheduling, in order.

A step's output goes to whoever waits for it (vLLM's output thread) only once the next
queued step has reached the backend, or when nothing else is queued: woken earlier, the
waiter's output handling would compete for the GIL with the next step's launch, which
is the host time the device waits for.

This thread lets go of a call's function, arguments and result as soon as the call
returns, while its submitter still holds them (a step's output is not given yet), so
it never frees a step: freeing one's tensors and objects took about 40 µs on a 2-core
VM, between two device calls, when this thread held the last reference.
"""

from __future__ import annotations

import queue
import threading


class Result:
    """A call's outcome, given by releasing one lock: the cheapest wake a thread has.
    The device thread gives a step's output right before the next step's call, when it
    has just waited for the device; a ``concurrent.futures.Future``'s condition costs
    about 40 µs there on a 2-core VM, a lock's release about 10."""

    __slots__ = ("_gate", "_given", "_value", "_error")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._given = False
        self._value = self._error = None

    def done(self) -> bool:
        return self._given

    def result(self, timeout: float | None = None):
        if not self._gate.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the device thread has not given this call's result")
        self._gate.release()  # open for every other reader
        if self._error is not None:
            raise self._error
        return self._value

    def _give(self) -> None:
        self._given = True
        self._gate.release()


class DeviceThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._held: Result | None = None  # a step's output not yet given
        self._thread = threading.Thread(target=self._loop, name="NeuronDevice", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, step: bool = False) -> Result:
        """``fn(*args)`` after every call submitted before it. A ``step`` calls
        ``launching()`` right before its backend call."""
        result = Result()
        self._jobs.put((result, fn, args, step))
        return result

    @property
    def current(self) -> bool:
        """Whether the caller runs on this thread."""
        return threading.current_thread() is self._thread

    def launching(self) -> None:
        """The step before this one may be handled now."""
        held = self._held
        if held is not None:
            self._held = None
            held._give()

    def _loop(self) -> None:
        while True:
            if self._jobs.empty():
                self.launching()  # nothing queued behind the last step: give it now
            item = self._jobs.get()
            if item is None:
                self.launching()
                return
            result, fn, args, step = item
            item = None
            if not step:
                self.launching()
            try:
                result._value = fn(*args)
            except BaseException as e:
                self.launching()
                result._error = e
                result._give()
                result = fn = args = None
                continue
            fn = args = None
            if step:
                self._held = result
            else:
                result._give()
            result = None

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()
