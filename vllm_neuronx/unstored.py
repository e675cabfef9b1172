"""Serving when the artifact cache cannot be written (disk full, read-only, no permission).

A full disk or a read-only cache must not stop a server whose model compiles
fine: the compile goes to a private scratch folder instead (RAM-backed
``/dev/shm`` first, then the temporary folder), is loaded, and the scratch
folder is removed at once, so the model lives in memory only and the next start
compiles again. One error line says where storing failed and why. A read-only
cache that already holds intact artifacts is simply loaded (without the file
lock, which cannot be created there and is not needed when nobody can write).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from vllm_neuronx.artifacts import CacheResult
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

# What a full, read-only or forbidden cache raises.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
SCRATCH_PREFIX = "vllm-neuronx-unstored-"


def storage_error(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it chains) is a storage failure, or None.

    Writers outside Python's I/O (safetensors, torch) raise their own types with
    the OS message inside, e.g. "I/O error: No space left on device (os error 28)".
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return os.strerror(exc.errno)
        text = str(exc)
        for number in STORAGE_ERRNOS:
            if f"os error {number})" in text or os.strerror(number) in text:
                return os.strerror(number)
        exc = exc.__cause__ or exc.__context__
    return None


def scratch_parents() -> list[str]:
    """Where a private scratch folder may go: RAM first, then the temporary folder."""
    parents = [p for p in ("/dev/shm",) if os.path.isdir(p) and os.access(p, os.W_OK)]
    return [*parents, tempfile.gettempdir()]


def compile_unstored(
    folder: str,
    reason: str,
    compile_fn: Callable[[str], None],
    load_fn: Callable[[str], None],
) -> CacheResult:
    """Compile into a scratch folder, load, remove it; ``folder`` is where storing failed."""
    start = time.perf_counter()
    logger.error(
        "Could not store compiled artifacts in %s (%s); serving from memory: the model is "
        "compiled into a temporary folder, loaded and the folder removed, so the next start "
        "compiles again. Free space or fix permissions there, or point "
        "NEURON_COMPILED_ARTIFACTS at a writable folder.",
        folder,
        reason,
    )
    failures = []
    for parent in scratch_parents():
        scratch = None
        try:
            scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
            compile_fn(scratch)
            load_fn(scratch)
            return CacheResult(folder, True, time.perf_counter() - start, stored=False)
        except Exception as e:
            why = storage_error(e)
            if why is None:
                raise
            failures.append(f"{parent}: {why}")
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    raise OSError(
        f"could not store compiled artifacts in {folder} ({reason}), nor compile them in a "
        f"temporary folder ({'; '.join(failures)})"
    )


def load_read_only(folder: str, load_fn: Callable[[str], None], reason: str) -> CacheResult:
    """Load intact artifacts from a folder we cannot lock or write."""
    start = time.perf_counter()
    load_fn(folder)
    seconds = time.perf_counter() - start
    logger.info("Loaded compiled artifacts from %s (read-only: %s) in %.1f s", folder, reason,
                seconds)
    return CacheResult(folder, False, seconds)
