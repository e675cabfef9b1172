"""Backend + compiled artifacts -> a model ready to run (the worker's load_model)."""

from __future__ import annotations

import os

from vllm_neuronx import artifacts, envs, faults, unstored
from vllm_neuronx.backends import NeuronBackend, backend_class
from vllm_neuronx.platform_config import NeuronSettings


def load_backend(
    model_path: str, settings: NeuronSettings, *, seed: int = 0, ranks=None
) -> tuple[NeuronBackend, artifacts.CacheResult]:
    """Construct the backend, then load its artifacts or compile and store them
    (or, when the cache cannot be written, compile and serve from memory). ``ranks``: the
    rank group (distributed/) whose collectives a tensor-parallel CPU backend shards over."""
    cls = backend_class(settings.backend)
    backend = cls(model_path, settings.neuron_config, seed=seed, draft=settings.draft)
    if ranks is not None and hasattr(backend, "ranks"):
        backend.ranks = ranks
    key = artifacts.artifact_key(
        settings.neuron_config, settings.backend, cls.version(), model_path, settings.draft
    )
    folder = artifacts.artifacts_folder(model_path, key)
    foreign = bool(
        envs.NEURON_COMPILED_ARTIFACTS
        and os.path.isdir(folder)
        and not os.path.exists(os.path.join(folder, artifacts.MANIFEST))
        and cls.stored_config(folder) is not None
    )
    try:
        result = artifacts.load_or_compile(
            folder=folder,
            key=key,
            neuron_config=settings.neuron_config,
            backend=settings.backend,
            compile_fn=backend.compile,
            load_fn=backend.load,
            foreign=foreign,
        )
    except Exception as e:
        # A full, read-only or forbidden cache: serve anyway (vllm_neuronx/unstored.py).
        reason = unstored.storage_error(e)
        if reason is None:
            raise
        if foreign or artifacts.read_manifest(folder) is not None:
            result = unstored.load_read_only(folder, backend.load, reason)
        else:
            result = unstored.compile_unstored(folder, reason, backend.compile, backend.load)
    if envs.VLLM_NEURONX_TEST_FAULT:
        faults.inject(backend, envs.VLLM_NEURONX_TEST_FAULT)
    return backend, result
