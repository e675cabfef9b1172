"""Simulator-only state: call counters and the error it raises for broken preconditions."""

from __future__ import annotations

SIM_CALLS: dict[str, int] = {}

_COUNTERS = (
    "from_pretrained",  # model objects built
    "to_neuron",  # weights loaded onto the "device"
    "compile",  # to_neuron calls that compiled (no load(dir) before them)
    "save",  # compiled graphs written
    "load",  # compiled-graph folders registered (model.load(dir))
    "forward",  # model(...) calls
    "context",  # context-encoding graph runs (one per sequence)
    "decode",  # token-generation graph runs (one per decode call)
    "update_generation_config",
)


def reset_counters() -> None:
    SIM_CALLS.clear()
    SIM_CALLS.update(dict.fromkeys(_COUNTERS, 0))


def count(name: str) -> None:
    SIM_CALLS[name] += 1


reset_counters()


class SimulatorError(RuntimeError):
    """A call that real transformers-neuronx would mis-execute (or crash on)."""
