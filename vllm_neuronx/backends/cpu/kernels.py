"""Native kernels of the CPU backend, compiled into the artifacts like a device's.

One for now: the bf16 GEMV of small decode batches (``gemv_bf16.c``, see why
there). ``build`` runs the system C compiler at compile time and stores the
shared library beside the weights; ``load`` maps it back when this CPU can run it.
Without a compiler or AVX-512 the backend keeps torch's fp32 matmuls: slower at
batch 1, the same tokens.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "gemv_bf16.c")
LIBRARY = "gemv_bf16.so"
NEEDS = ("avx512f", "avx512bw")
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded,
# so the kernel's threads are torch's (torch.set_num_threads applies to both).
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-fopenmp", "-shared", "-fPIC")
# Up to this many rows the kernel beats torch's fp32 matmul (SmolLM2's 30 layers on
# 2 cores: 19 against 33 ms at 1 row, 29 against 73 at 8, 51 against 84 at 16; whole
# decode steps at 24 rows: 108-121 against 127-136 ms); at 32 the two tie, both
# bound by multiplies.
MAX_ROWS = 24


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def source_digest() -> str:
    """Part of the artifacts' key: a changed kernel is a new compile."""
    with open(SOURCE, "rb") as f:
        return hashlib.sha256(f.read() + " ".join(FLAGS).encode()).hexdigest()[:12]


def runs_here() -> bool:
    return all(flag in cpu_flags() for flag in NEEDS)


def build(folder: str) -> bool:
    """Compile the kernel into ``folder``; False (logged) where it cannot run or build."""
    if not runs_here():
        logger.info("CPU backend: no AVX-512 here; small batches use torch's fp32 matmul")
        return False
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("CPU backend: no C compiler; small batches use torch's fp32 matmul")
        return False
    out = os.path.join(folder, LIBRARY)
    result = subprocess.run(
        [compiler, *FLAGS, SOURCE, "-o", out], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        logger.warning(
            "CPU backend: building the bf16 kernel failed; small batches use torch's fp32 "
            "matmul:\n%s",
            result.stderr.strip(),
        )
        return False
    return True


class Bf16Gemv:
    """``x [m, k] fp32 @ w[n, k]^T`` with bf16 weights; worth it for m up to ``max_rows``."""

    __slots__ = ("_fn", "max_rows")

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self._fn = lib.gemv_bf16
        self._fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        self._fn.restype = None
        self.max_rows = MAX_ROWS

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        return (
            weight.dtype is torch.bfloat16
            and weight.dim() == 2
            and weight.shape[1] % 16 == 0
            and weight.is_contiguous()
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        y = torch.empty((m, weight.shape[0]), dtype=torch.float32)
        self._fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, weight.shape[0], k)
        return y


def load(folder: str) -> Bf16Gemv | None:
    path = os.path.join(folder, LIBRARY)
    if not os.path.exists(path) or not runs_here():
        return None
    return Bf16Gemv(path)
