"""Whether this process serves through our platform, or leaves vLLM its own.

vLLM 0.16 lets an activated out-of-tree platform win over every builtin one, so a
plugin that always answered would take ``vllm serve`` away from a GPU on any host
where vllm-neuronx happens to be installed. We answer only where Neuron is wanted:
a Neuron device is present, the user asked for Neuron, or vLLM has no other
usable platform (the plain CPU machine, where our CPU backend is the default and
the user guide's scripts run as written).

What can be asked, and when: vLLM resolves its platform at the first access of
``vllm.platforms.current_platform``, which ``vllm.engine.arg_utils`` makes at its
import, so ``from vllm import LLM`` resolves it before any ``LLM(...)`` exists.
Environment variables and the command line (``sys.argv``) are known by then;
``LLM(device="neuron")`` is not, and so cannot move a host off its GPU: there,
set ``VLLM_NEURON_FRAMEWORK`` (or ``VLLM_PLUGINS=neuron``) before importing vLLM.

The decision is ``decide``, pure (probe results, environment, argv in; the answer
and its reason out); ``here`` probes this host and decides once per process.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

PLUGIN_NAME = "neuron"  # our vllm.platform_plugins entry point (setup.py)
# vLLM's builtin platforms that, when usable, keep us out unless Neuron is asked for.
# Its "cpu" probe is not one: it needs vLLM's CPU build (or answers for any macOS),
# and our CPU backend is this project's own answer for a CPU machine.
OTHER_PLATFORMS = ("cuda", "rocm", "xpu", "tpu")
HOW_TO_ASK = (
    "to serve on Neuron, set VLLM_NEURON_FRAMEWORK (or VLLM_PLUGINS=neuron) before vLLM "
    "starts, or pass --device neuron on the command line; LLM(device='neuron') comes too "
    "late to choose the platform"
)


@dataclass(frozen=True, slots=True)
class Probes:
    """What this host has, as the probes found it."""

    neuron_device: bool
    other_platforms: tuple[str, ...]  # the OTHER_PLATFORMS vLLM could use here


@dataclass(frozen=True, slots=True)
class Activation:
    active: bool
    reason: str


def decide(probes: Probes, env: Mapping[str, str], argv: Sequence[str]) -> Activation:
    """Activate where Neuron is present or asked for, or where nothing else could serve."""
    if "VLLM_PLUGINS" in env:  # split as vLLM splits it, so we agree on what it names
        named = env["VLLM_PLUGINS"].split(",")
        if PLUGIN_NAME not in named:
            return Activation(False, f"VLLM_PLUGINS={env['VLLM_PLUGINS']!r} leaves out "
                                     f"the {PLUGIN_NAME!r} platform plugin")
        return Activation(True, f"VLLM_PLUGINS names the {PLUGIN_NAME!r} platform plugin")
    for name in ("VLLM_NEURON_FRAMEWORK", "VLLM_NEURONX_FORCE_BACKEND"):
        if env.get(name):
            return Activation(True, f"{name}={env[name]} is set")
    if device_flag(argv) == "neuron":
        return Activation(True, "--device neuron is on the command line")
    if probes.neuron_device:
        return Activation(True, "a Neuron device is present (/dev/neuron*)")
    if probes.other_platforms:
        found = ", ".join(p.upper() for p in probes.other_platforms)
        return Activation(False, f"vLLM can use {found} on this host and nothing asked for "
                                 f"Neuron; {HOW_TO_ASK}")
    return Activation(True, "no Neuron device and no other vLLM platform (CUDA, ROCm, XPU, "
                            "TPU): serving on the CPU backend")


def device_flag(argv: Sequence[str]) -> str | None:
    """The value of ``--device`` on a command line, if any (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--device" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--device="):
            value = arg.split("=", 1)[1]
    return value


def neuron_device_present() -> bool:
    """The device node the Neuron runtime opens; the same test chooses the backend.

    vLLM up to 0.9 detected Neuron by the import of transformers_neuronx or
    neuronx_distributed_inference; without a device those serve nothing here (the
    framework choice then runs our CPU backend), so a package alone does not take a
    GPU host away from its GPU.
    """
    from vllm_neuronx.framework import neuron_device_present as present

    return present()


def other_platforms() -> tuple[str, ...]:
    """The OTHER_PLATFORMS whose vLLM probe finds them usable: vLLM's own probes, so
    "usable" means what vLLM would pick without us."""
    from vllm.platforms import builtin_platform_plugins

    found = []
    for name in OTHER_PLATFORMS:
        try:
            usable = builtin_platform_plugins[name]() is not None
        except Exception as e:  # vLLM swallows its probes' errors too
            logger.debug("vLLM's %s probe failed: %s", name, e)
            usable = False
        if usable:
            found.append(name)
    return tuple(found)


def probe() -> Probes:
    return Probes(neuron_device=neuron_device_present(), other_platforms=other_platforms())


@functools.cache
def here() -> Activation:
    """This process's decision, logged once: at INFO in the user's process when we stay
    out (the one line that says why and how to ask), at DEBUG otherwise."""
    decision = decide(probe(), os.environ, getattr(sys, "argv", []))
    if decision.active:
        logger.debug("Neuron platform activates: %s", decision.reason)
    else:
        level = "info" if multiprocessing.parent_process() is None else "debug"
        getattr(logger, level)("vllm-neuronx stays out of the way: %s", decision.reason)
    return decision
