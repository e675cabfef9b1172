"""Native kernels of the CPU backend, compiled into the artifacts like a device's.

One for now: the bf16-weight matmul of CPUs without bf16 units
(``matmul_bf16.c``, see why there). ``build`` runs the system C compiler at
compile time and stores the shared library beside the weights; ``load`` maps it
back when this CPU can run it. Without a compiler or AVX-512 the backend widens the
weights to fp32 and uses torch's matmuls: more memory and slower, the same tokens.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass

import torch

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "matmul_bf16.c")
LIBRARY = "matmul_bf16.so"
NEEDS = ("avx512f", "avx512bw")
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded,
# so the kernel's threads are torch's (torch.set_num_threads applies to both).
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-fopenmp", "-shared", "-fPIC")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
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
        logger.info("CPU backend: no AVX-512 here; bf16 weights are widened to fp32")
        return False
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("CPU backend: no C compiler; bf16 weights are widened to fp32")
        return False
    out = os.path.join(folder, LIBRARY)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, SOURCE, "-o", out],
            capture_output=True, text=True, check=False, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.warning("CPU backend: cannot run %s (%s); bf16 weights are widened to fp32",
                       compiler, e)
        return False
    if result.returncode != 0:
        logger.warning(
            "CPU backend: building the bf16 kernel failed; bf16 weights are widened to "
            "fp32:\n%s",
            result.stderr.strip(),
        )
        return False
    return True


# From this many rows (a prefill) torch's fp32 sgemm beats the kernel by more than it
# costs to widen the weight for the call: SmolLM2, 32 prompts of 128 prefilled 8 at a
# time, took 5.4 s in the kernel and 5.0 s widened through MKL (interleaved, best of 4).
WIDEN_ROWS = 256


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [n, k] weight in the kernel's panel layout."""

    data: torch.Tensor  # [panels, k, panel] bf16
    n: int


class Bf16Matmul:
    """``x [m, k] fp32 @ w[n, k]^T`` over bf16 weights packed by ``pack``."""

    __slots__ = ("_fn", "panel")

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self._fn = lib.matmul_bf16
        self._fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        self._fn.restype = None
        self.panel = int(lib.matmul_bf16_panel())

    def pack(self, weight: torch.Tensor) -> PackedWeight:
        """[n, k] -> [panels, k, panel] bf16: each panel's columns contiguous per k."""
        n, k = weight.shape
        padded = -(-n // self.panel) * self.panel
        out = torch.zeros((padded, k), dtype=torch.bfloat16)
        out[:n] = weight
        data = out.view(padded // self.panel, self.panel, k).transpose(1, 2).contiguous()
        return PackedWeight(data, n)

    def __call__(self, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """x [m, k] -> [m, n] fp32."""
        x = x.float().contiguous()
        m, k = x.shape
        if weight.data.shape[1] != k:
            raise ValueError(f"x has {k} columns, the weight {weight.data.shape[1]}")
        if m >= WIDEN_ROWS:  # MKL's sgemm, over the weight widened to [k, n] fp32
            panels = weight.data.shape[0]
            wide = torch.empty((k, panels, self.panel), dtype=torch.float32)
            wide.copy_(weight.data.permute(1, 0, 2))  # one pass: unpack and widen
            return x @ wide.view(k, panels * self.panel)[:, : weight.n]
        y = torch.empty((m, weight.n), dtype=torch.float32)
        self._fn(x.data_ptr(), weight.data.data_ptr(), y.data_ptr(), m, weight.n, k)
        return y


def load(folder: str) -> Bf16Matmul | None:
    """The kernel built into ``folder``, or None (the caller widens the weights)."""
    path = os.path.join(folder, LIBRARY)
    if not os.path.exists(path) or not runs_here():
        return None
    try:
        return Bf16Matmul(path)
    except OSError as e:  # e.g. a folder on a noexec mount (Docker's /dev/shm)
        logger.warning(
            "CPU backend: cannot load the bf16 kernel from %s (%s); bf16 weights are "
            "widened to fp32",
            path,
            e,
        )
        return None
