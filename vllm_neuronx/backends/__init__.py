"""Backends behind the one protocol; imported lazily so NxDI loads only when chosen."""

from __future__ import annotations

import importlib

from vllm_neuronx.backends.protocol import ForwardOutput, NeuronBackend, SamplingCapabilities

# backend name -> "module:class"
_BACKENDS = {
    "cpu": "vllm_neuronx.backends.cpu.backend:CpuBackend",
    "nxdi": "vllm_neuronx.backends.nxdi:NxdiBackend",
    "tnx": "vllm_neuronx.backends.tnx:TnxBackend",
}


def backend_class(name: str) -> type[NeuronBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ForwardOutput", "NeuronBackend", "SamplingCapabilities", "backend_class"]
