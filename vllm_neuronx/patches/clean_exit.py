"""A script that ends with its ``LLM`` alive exits quietly, its engine core stopped first.

Upstream 0.16 starts the engine core as a daemon process and stops it from a weakref
finalizer. At interpreter exit, multiprocessing's own exit hook runs first and
terminates the daemon; the client's monitor thread sees its engine die and logs
"ERROR ... Engine core proc EngineCore_DP0 died unexpectedly" as the last line of
the user guide's quickstart, which did nothing wrong. We register each engine
client's shutdown at exit, after multiprocessing's hook, so it runs before it
(atexit runs last-registered first): the client stops its engine core, and the
monitor knows it was asked to.
"""

from __future__ import annotations

import atexit
import weakref


def _shutdown_if_alive(client_ref: weakref.ref) -> None:
    client = client_ref()
    if client is not None:
        client.shutdown()


def shutdown_at_exit(init):
    """MPClient.__init__: the client's shutdown also runs at interpreter exit."""

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        atexit.register(_shutdown_if_alive, weakref.ref(self))

    return __init__
