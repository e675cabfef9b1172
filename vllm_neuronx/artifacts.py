"""Compiled-artifact cache shared by every backend (NEURON_COMPILED_ARTIFACTS).

- Variable set and artifacts there: load them, no recompile.
- Variable set but nothing loadable there: compile with the current config, store there.
- Variable unset: ``<model dir>/neuron-compiled-artifacts/<key>``, reused on the next start
  (the earlier code bases deleted this folder first; we keep it).
The key covers all that changes the compiled result. Writes go to a temporary
folder, then a rename; a file lock makes concurrent starts compile once; a folder
without its manifest (partial, or corrupt) is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from filelock import FileLock

from vllm_neuronx import envs
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

MANIFEST = "vllm-neuronx-manifest.json"
DEFAULT_SUBDIR = "neuron-compiled-artifacts"


def model_identity(model_path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the model's files: a new checkpoint is a new key."""
    rows = []
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            st = os.stat(path)
            rows.append((name, st.st_size, st.st_mtime_ns))
    return rows


def artifact_key(neuron_config: dict, backend: str, backend_version: str, model_path: str) -> str:
    payload = json.dumps(
        {
            "neuron_config": neuron_config,
            "backend": backend,
            "backend_version": backend_version,
            "torch": torch.__version__,
            "model": model_identity(model_path),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def artifacts_folder(model_path: str, key: str) -> str:
    explicit = envs.NEURON_COMPILED_ARTIFACTS
    if explicit:
        return os.path.abspath(explicit)
    return os.path.join(model_path, DEFAULT_SUBDIR, key)


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of a complete folder, or None (missing, partial, unreadable)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        for name, size in manifest["files"].items():
            if os.path.getsize(os.path.join(folder, name)) != size:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(folder: str, key: str, neuron_config: dict, backend: str) -> None:
    files = {
        name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
    }
    manifest = {
        "key": key,
        "backend": backend,
        "neuron_config": neuron_config,
        "files": files,
        "created": time.time(),
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


@dataclass(slots=True)
class CacheResult:
    folder: str
    compiled: bool  # False when existing artifacts were loaded
    seconds: float


def load_or_compile(
    *,
    folder: str,
    key: str,
    neuron_config: dict,
    backend: str,
    compile_fn: Callable[[str], None],
    load_fn: Callable[[str], None],
) -> CacheResult:
    """Load ``folder`` if complete, else compile into a temp folder, rename, load."""
    start = time.perf_counter()
    parent = os.path.dirname(folder.rstrip(os.sep)) or "."
    os.makedirs(parent, exist_ok=True)
    with FileLock(folder.rstrip(os.sep) + ".lock"):
        if read_manifest(folder) is not None:
            try:
                load_fn(folder)
                seconds = time.perf_counter() - start
                logger.info("Loaded compiled artifacts from %s in %.1f s", folder, seconds)
                return CacheResult(folder, False, seconds)
            except Exception as e:  # corrupt content behind a valid manifest
                logger.warning("Artifacts in %s failed to load (%s); recompiling", folder, e)
        elif os.path.exists(folder) and os.listdir(folder):
            logger.warning("Artifacts in %s are incomplete; recompiling", folder)
        tmp = tempfile.mkdtemp(prefix=".compiling-", dir=parent)
        try:
            compile_fn(tmp)
            _write_manifest(tmp, key, neuron_config, backend)
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        load_fn(folder)
        seconds = time.perf_counter() - start
        logger.info("Compiled and stored artifacts in %s in %.1f s", folder, seconds)
        return CacheResult(folder, True, seconds)
