"""The pins: one line for every install, and one that pip can satisfy beside NxDI.

Our pins (requirements/*.txt) must satisfy what vLLM, NxDI and torch-neuronx declare
(requirements/declared.txt, sources in requirements/PINS.md); the Neuron install may add
only Neuron packages; the patch-set's vLLM is the pinned one; and this venv is the pinned
stack, so what the tests see is what a Neuron host runs.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from vllm_neuronx.patches import PINNED_VLLM

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"
NEURON_PACKAGES = {"neuronx-cc", "torch-neuronx", "neuronx-distributed",
                   "neuronx-distributed-inference"}


def requirements(name: str) -> dict[str, Requirement]:
    """Requirement lines of one file, following '-r' includes, by canonical name."""
    found: dict[str, Requirement] = {}
    for raw in (REQUIREMENTS / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found.update(requirements(line[3:].strip()))
        elif line:
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def pinned(reqs: dict[str, Requirement]) -> dict[str, str]:
    """name -> version for the exact (==) pins."""
    out = {}
    for name, req in reqs.items():
        [spec] = list(req.specifier) or [None]
        if spec is not None and spec.operator == "==":
            out[name] = spec.version
    return out


def python_pin() -> SpecifierSet:
    setup = (REQUIREMENTS.parent / "setup.py").read_text()
    return SpecifierSet(re.search(r'python_requires="([^"]+)"', setup).group(1))


def declared() -> list[tuple[str, Requirement]]:
    lines = []
    for raw in (REQUIREMENTS / "declared.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            who, requirement = line.split(":", 1)
            lines.append((who.strip(), Requirement(requirement.strip())))
    return lines


NEURON = pinned(requirements("neuron.txt"))


@pytest.mark.parametrize("who,requirement", declared(), ids=lambda v: str(v))
def test_our_pins_satisfy_what_upstream_declares(who, requirement):
    name = canonicalize_name(requirement.name)
    if name == "python":
        allowed = python_pin()
        assert all(requirement.specifier.contains(v) for v in ("3.11", "3.12", "3.13")
                   if allowed.contains(v)), (who, requirement, allowed)
        return
    declarer = Requirement(who)
    assert NEURON[canonicalize_name(declarer.name)] in declarer.specifier, (who, NEURON)
    assert name in NEURON, f"{who} declares {requirement}, which we do not pin"
    assert requirement.specifier.contains(NEURON[name], prereleases=True), (
        f"{who} declares {requirement}; we pin {name}=={NEURON[name]}")


def test_the_neuron_install_adds_only_neuron_packages():
    cpu, neuron = requirements("cpu.txt"), requirements("neuron.txt")
    common = requirements("common.txt")
    assert set(neuron) - set(common) == NEURON_PACKAGES
    for name in set(cpu) & set(neuron):
        assert str(cpu[name]) == str(neuron[name])
    assert {"vllm", "torch", "transformers"} <= set(common)


def test_the_patch_set_reads_the_pin_from_the_installed_metadata():
    assert PINNED_VLLM == NEURON["vllm"]


def test_this_venv_runs_the_pinned_stack():
    for name in ("vllm", "torch", "transformers"):
        installed = importlib.metadata.version(name).split("+")[0]
        assert installed == NEURON[name], (name, installed)
    assert python_pin().contains(platform.python_version())
