"""vllm-neuronx install.

The default install is the CPU one (requirements/cpu.txt). With
VLLM_TARGET_DEVICE=neuron it takes the NxDI stack from requirements/neuron.txt
(AWS's Neuron package index must be reachable: --extra-index-url
https://pip.repos.neuron.amazonaws.com). Upstream vLLM itself must be installed
as pure Python first (VLLM_TARGET_DEVICE=empty); scripts/setup.sh does it.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    """Requirement lines, following '-r other.txt' includes."""
    lines = []
    for raw in (ROOT / "requirements" / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            lines += read_requirements(line[3:].strip())
        else:
            lines.append(line)
    return lines


target = os.environ.get("VLLM_TARGET_DEVICE", "cpu").lower()
requirements = read_requirements("neuron.txt" if target == "neuron" else "cpu.txt")

setup(
    name="vllm-neuronx",
    version="0.1.0",
    description=("vLLM on AWS Neuron through NxD Inference, and on the CPU through the same "
                 "contract"),
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["vllm_neuronx", "vllm_neuronx.*"]),
    # The CPU backend compiles its native kernels from source on the user's machine.
    package_data={"vllm_neuronx.backends.cpu": ["*.c"]},
    install_requires=requirements,
    extras_require={"test": read_requirements("test.txt")},
    entry_points={
        "vllm.platform_plugins": ["neuron = vllm_neuronx:register"],
        "vllm.general_plugins": ["neuron_patches = vllm_neuronx:register_patches"],
        "console_scripts": ["vllm-neuronx-default-model = vllm_neuronx.default_model:main"],
    },
)
