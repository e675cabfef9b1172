"""Test-only fault injection: a backend that fails on cue (VLLM_NEURONX_TEST_FAULT).

Reliability tests need the model to fail in the middle of serving, inside a real
engine behind a real server, without mocking either. ``KIND:N`` makes the N-th
call of that kind (counted from 1) raise ``InjectedFault``; other calls run
normally. KIND is ``forward`` (any call), ``prefill`` or ``decode`` (the protocol's
``is_prefill``, NxDI's own rule), so a test can fail the prefill of a second request
while a first one is streaming. The backend object
stays what it is (same class, same attributes): the runner cannot tell.
Never set in production.
"""

from __future__ import annotations

import functools

from vllm_neuronx.backends.protocol import NeuronBackend

KINDS = ("forward", "prefill", "decode")


class InjectedFault(RuntimeError):
    """The failure a test asked for; its message says so, to tell it from a real bug."""


def parse(spec: str) -> tuple[str, int]:
    """``"prefill:2"`` -> ("prefill", 2); anything else is a clear error."""
    kind, _, count = spec.partition(":")
    if kind not in KINDS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"VLLM_NEURONX_TEST_FAULT={spec!r}: expected KIND:N with KIND one of "
            f"{', '.join(KINDS)} and N >= 1 (the N-th call of that kind raises)"
        )
    return kind, int(count)


def inject(backend: NeuronBackend, spec: str) -> NeuronBackend:
    """Make the backend's checked call (``run``, which ``forward`` calls too) raise at the
    call ``spec`` names."""
    kind, at = parse(spec)
    run = backend.run
    calls = 0

    @functools.wraps(run)
    def failing_run(batch):
        nonlocal calls
        if kind == "forward" or (kind == "prefill") == batch.is_prefill:
            calls += 1
            if calls == at:
                raise InjectedFault(f"injected fault: {kind} call {at} (VLLM_NEURONX_TEST_FAULT)")
        return run(batch)

    backend.run = failing_run
    return backend
