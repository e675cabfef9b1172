"""Which backend serves the model: VLLM_NEURON_FRAMEWORK, the device, what is installed.

A laptop runs the user guide's scripts verbatim (they set the NxDI framework) on
our CPU backend, with one warning that says why. A host with Neuron devices never
falls back silently: a framework that is not installed there is an error.
Choosing transformers-neuronx logs that AWS no longer supports it.
"""

from __future__ import annotations

import glob
import importlib.util
import multiprocessing
from dataclasses import dataclass, replace

from vllm_neuronx.log import get_logger

NXDI = "neuronx-distributed-inference"
TNX = "transformers-neuronx"
CPU = "cpu"
FRAMEWORK_TO_BACKEND = {NXDI: "nxdi", TNX: "tnx", CPU: "cpu"}
_MODULES = {NXDI: "neuronx_distributed_inference", TNX: "transformers_neuronx"}
# AWS's TNx page: "As of 9/16/2025, support has ended"; SDK 2.26 shipped its last
# release (requirements/PINS.md). Said at start-up, so users move before it breaks.
TNX_DEPRECATION = (
    "transformers-neuronx is deprecated: AWS ended its support on 2025-09-16 and Neuron SDK "
    "2.26 was the last to ship it (0.13.1315); use VLLM_NEURON_FRAMEWORK="
    "neuronx-distributed-inference"
)

logger = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FrameworkChoice:
    framework: str  # what the user asked for (or the default)
    backend: str  # "nxdi" | "tnx" | "cpu"
    warning: str | None = None
    deprecation: str | None = None  # the framework's end of support, said at start-up


def neuron_device_present() -> bool:
    return bool(glob.glob("/dev/neuron*"))


def installed(framework: str) -> bool:
    module = _MODULES.get(framework)
    return module is not None and importlib.util.find_spec(module) is not None


def choose(
    requested: str | None,
    *,
    device_present: bool,
    nxdi_installed: bool,
    tnx_installed: bool,
    forced_backend: str | None = None,
) -> FrameworkChoice:
    """Pure decision, so every branch tests without a device."""
    choice = _choose(requested, device_present=device_present, nxdi_installed=nxdi_installed,
                     tnx_installed=tnx_installed, forced_backend=forced_backend)
    if choice.framework == TNX or choice.backend == "tnx":
        return replace(choice, deprecation=TNX_DEPRECATION)
    return choice


def _choose(
    requested: str | None,
    *,
    device_present: bool,
    nxdi_installed: bool,
    tnx_installed: bool,
    forced_backend: str | None,
) -> FrameworkChoice:
    if requested:
        framework = requested.strip().lower()
        if framework not in FRAMEWORK_TO_BACKEND:
            raise ValueError(
                f"VLLM_NEURON_FRAMEWORK={requested!r} is not a framework; use one of "
                f"{sorted(FRAMEWORK_TO_BACKEND)}"
            )
    elif nxdi_installed or not tnx_installed:
        framework = NXDI
    else:
        framework = TNX
    if forced_backend:
        if forced_backend not in FRAMEWORK_TO_BACKEND.values():
            raise ValueError(f"VLLM_NEURONX_FORCE_BACKEND={forced_backend!r} is not a backend")
        return FrameworkChoice(framework, forced_backend)
    if framework == CPU:
        return FrameworkChoice(framework, "cpu")
    if not device_present:
        return FrameworkChoice(
            framework,
            "cpu",
            f"no Neuron device found (/dev/neuron*): {framework} runs on the CPU backend",
        )
    if not (nxdi_installed if framework == NXDI else tnx_installed):
        raise RuntimeError(
            f"VLLM_NEURON_FRAMEWORK={framework} but {_MODULES[framework]} is not installed on "
            "this Neuron host; install it (VLLM_TARGET_DEVICE=neuron pip install -e .) or set "
            "VLLM_NEURON_FRAMEWORK=cpu explicitly"
        )
    return FrameworkChoice(framework, FRAMEWORK_TO_BACKEND[framework])


def choose_from_env() -> FrameworkChoice:
    """This host's choice, made at each engine's start-up; the deprecation is logged here,
    in the user's process (an engine core has its choice from the config)."""
    from vllm_neuronx import envs

    choice = choose(
        envs.VLLM_NEURON_FRAMEWORK,
        device_present=neuron_device_present(),
        nxdi_installed=installed(NXDI),
        tnx_installed=installed(TNX),
        forced_backend=envs.VLLM_NEURONX_FORCE_BACKEND,
    )
    if choice.deprecation and multiprocessing.parent_process() is None:
        logger.warning(choice.deprecation)
    return choice
