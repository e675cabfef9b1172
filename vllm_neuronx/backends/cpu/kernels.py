"""The CPU backend's native library, compiled into the artifacts like a device's.

The matmul over packed bf16, int8 or fp8 weights (``matmul.c``, wrapped here as
``PackedMatmul``) and a whole decode step built on it (``decode_step.c``, driven by
native.py); see why in each. ``build`` runs the system C compiler at compile time and
stores the shared library beside the weights; ``load`` maps it back when this CPU can
run it, after checking that the structs it shares with Python (declared once, in
kernels.h) have the layout Python's ctypes view gives them. One source builds per
instruction set (``VARIANTS``: AMX, AVX-512, AVX2 + FMA; simd.h). ``chosen`` picks the
variant ``CPU_CLASSES`` gives this CPU (one table, with the measurement behind each row),
or the one ``VLLM_NEURONX_CPU_KERNEL`` names.
Without a compiler or a variant (or with ``VLLM_NEURONX_CPU_KERNEL=torch``) the backend
runs torch's matmuls: bf16 where the CPU has bf16 units, else over weights widened to
fp32 (more memory and slower, the same tokens).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_neuronx import envs
from vllm_neuronx.backends.cpu import memory
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(HERE, name)
                for name in ("matmul.c", "decode_step.c", "layout.c"))
HEADERS = tuple(os.path.join(HERE, name) for name in ("kernels.h", "simd.h"))
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded,
# so the kernel's threads are torch's (torch.set_num_threads applies to both).
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
TORCH = "torch"  # no variant: bf16 weights widened to fp32 for torch's matmuls


@dataclass(frozen=True, slots=True)
class Variant:
    """One build of the same sources (simd.h maps their vector operations)."""

    name: str
    needs: tuple[str, ...]  # /proc/cpuinfo flags
    flags: tuple[str, ...]  # the compiler's ISA flags
    # From this many rows (a prefill) torch's fp32 sgemm, over the weight widened for
    # the call, beats the kernel; smaller prefills run natively (native.py). None: never.
    widen_rows: int | None
    # On CPUs with AMX (amx_bf16): bf16 weights through AMX tiles from this many rows
    # (matmul.c); None: never.
    amx_rows: int | None = None

    @property
    def library(self) -> str:
        return f"cpu_kernels-{self.name}.so"


VARIANTS = (
    # bf16 weights packed in k-pairs, multiplied as stored: by AMX tiles from amx_rows
    # rows (each row of x split into two bf16 halves, so the sums are fp32's to about
    # 2^-17), by fp32 FMAs under (matmul.c). From 10 rows, a 16-row tile half empty beats
    # the FMA blocks (SmolLM2's 120 matmuls, all 30 layers, AMX Xeon, 2 cores: 10 rows
    # 25.9 against 28.3 ms, 12 rows 17.9 against 21.6, 15 rows 17.4 against 23.2; 9 rows
    # 27.0 against 25.8, 8 rows 16.9 against 15.7).
    Variant("amx", ("avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"),
            ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
            widen_rows=None, amx_rows=10),
    # bf16, int8 or fp8 weights widened to fp32 in registers; from widen_rows rows, MKL's
    # sgemm over the weight widened for the call.
    Variant("avx512", ("avx512f", "avx512bw"), ("-mavx512f", "-mavx512bw"), widen_rows=256),
    Variant("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), widen_rows=None),
)
CHOICES = (*(v.name for v in VARIANTS), TORCH)


@dataclass(frozen=True, slots=True)
class CpuClass:
    """A class of x86-64 CPU and the variant it runs for every phase (decode and prefill),
    with the measurement that chose it."""

    name: str
    needs: tuple[str, ...]  # /proc/cpuinfo flags
    variant: str  # a VARIANTS name, or TORCH
    measured: str


# The choice table, first match wins (without VLLM_NEURONX_CPU_KERNEL). Figures: 2 cores
# (benchmarks/README.md, "Kernel variants per CPU class").
CPU_CLASSES = (
    CpuClass("AMX (Xeon Sapphire Rapids and later)", ("amx_bf16", "amx_tile", "avx512_bf16"),
             "amx", "SmolLM2's matmuls (cpu_matmul.py): AMX tiles 278 GFLOP/s at 16 rows and "
             "658 at 128 against 181 and 210 for avx512's fp32 FMAs and 150 and 611 for "
             "oneDNN's bf16; under 10 rows (where tiles start) all bound by the weights' "
             "bytes. Served 3.1x / 1.4x the torch path at c1 / c32"),
    CpuClass("AVX512-BF16 without AMX (AMD Zen 4, Intel Cooper Lake)", ("avx512_bf16",),
             TORCH, "Zen 4 (issue 15): served 24.7 / 278.5 tok/s at c1 / c32 on the torch "
             "path (oneDNN bf16) against 16.6 / 132.0 with avx512 forced, although that step "
             "alone is 3.9x faster (9.1 against 35.5 ms); on the AMX Xeon vdpbf16ps ran "
             "below fp32 FMAs. Kept until a Zen 4 run explains the serving figures"),
    CpuClass("AVX-512", ("avx512f", "avx512bw"), "avx512",
             "Xeon without bf16 units: decode b=1 11-13 ms against 24 through torch"),
    CpuClass("AVX2 + FMA", ("avx2", "fma", "f16c"), "avx2",
             "AMD EPYC, AVX2 only: decode b=1 13.4 ms against 59.7 through torch, c1 "
             "serving 4.2x"),
)


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo has none)."""
    return frozenset((_cpuinfo("flags") or "").split())


# The flags that decide a kernel variant here, or a peer's build (llama.cpp's VNNI, AMX).
VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_bf16", "amx_int8")


def vector_flags() -> list[str]:
    """This CPU's ``VECTOR_FLAGS``, for benchmark headers."""
    return [flag for flag in VECTOR_FLAGS if flag in cpu_flags()]


def chosen_name() -> str:
    """The variant the backend would run here (or "torch"), for benchmark headers."""
    variant = chosen()
    return variant.name if variant else TORCH


def cpu_model() -> str:
    """This CPU's model name, for benchmark headers."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def runs_here(variant: Variant) -> bool:
    return all(flag in cpu_flags() for flag in variant.needs)


def cpu_class() -> CpuClass | None:
    """This CPU's row of CPU_CLASSES; None: no variant runs (not x86-64 with AVX2)."""
    flags = cpu_flags()
    return next((c for c in CPU_CLASSES if all(f in flags for f in c.needs)), None)


class KernelChoiceError(ValueError):
    """VLLM_NEURONX_CPU_KERNEL names no variant, or one this CPU cannot run."""


def chosen() -> Variant | None:
    """The variant VLLM_NEURONX_CPU_KERNEL names, else the one CPU_CLASSES gives this CPU;
    None means the torch path (no native code)."""
    want = (envs.VLLM_NEURONX_CPU_KERNEL or "auto").strip().lower()
    by_name = {v.name: v for v in VARIANTS}
    if want == "auto":
        row = cpu_class()
        return by_name.get(row.variant) if row is not None else None
    if want == TORCH:
        return None
    if want not in by_name:
        raise KernelChoiceError(
            f"VLLM_NEURONX_CPU_KERNEL={want!r}: choose one of {', '.join(CHOICES)} (or auto)")
    variant = by_name[want]
    if not runs_here(variant):
        missing = sorted(set(variant.needs) - cpu_flags())
        raise KernelChoiceError(
            f"VLLM_NEURONX_CPU_KERNEL={want}: this CPU lacks {', '.join(missing)}; it runs "
            f"{', '.join([v.name for v in VARIANTS if runs_here(v)] + [TORCH])}")
    return variant


@functools.cache
def source_digest() -> str:
    """Part of the artifacts' key: a changed kernel is a new compile."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in (*SOURCES, *HEADERS):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _built_before(compiler: str, variant: Variant) -> str:
    """Where this user keeps ``variant`` as ``compiler`` builds the current sources: every
    artifacts folder compiled for this model or another takes a copy instead of a new build
    (gcc spends about 15 s on decode_step.c's specialisations). The key holds the sources
    and flags (``source_digest``) and the compiler binary itself."""
    from vllm_neuronx.default_model import cache_root

    real = os.path.realpath(compiler)
    stat = os.stat(real)
    key = hashlib.sha256(f"{source_digest()} {' '.join(variant.flags)} {real} "
                         f"{stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(cache_root().parent, "kernels", key, variant.library)


def _keep(path: str, cached: str) -> None:
    """A copy of the library just built at ``path`` for later builds (atomic; best effort:
    a cache that cannot be written only means the next build compiles again)."""
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = f"{cached}.{os.getpid()}.partial"
        shutil.copyfile(path, partial)
        os.replace(partial, cached)
    except OSError as e:
        logger.debug("CPU backend: not keeping the kernel in %s (%s)", cached, e)


def build(folder: str, variant: Variant) -> bool:
    """Compile ``variant`` into ``folder`` (or copy the same build kept from before);
    False (logged) where it cannot build."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("CPU backend: no C compiler; the weights are widened to fp32")
        return False
    out = os.path.join(folder, variant.library)
    try:
        cached = _built_before(compiler, variant)
        if os.path.exists(cached):
            shutil.copyfile(cached, out)
            return True
    except OSError:
        cached = None
    try:
        result = subprocess.run(
            [compiler, *FLAGS, *variant.flags, *SOURCES, "-o", out, "-lm"],
            capture_output=True, text=True, check=False, timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.warning("CPU backend: cannot run %s (%s); the weights are widened to fp32",
                       compiler, e)
        return False
    if result.returncode != 0:
        logger.warning(
            "CPU backend: building the %s kernel failed; the weights are widened to "
            "fp32:\n%s",
            variant.name,
            result.stderr.strip(),
        )
        return False
    if cached is not None:
        _keep(out, cached)
    return True


# Rows one native decode step takes at most (its scratch is sized for them).
NATIVE_ROWS = 255


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# kernels.h's WEIGHT_* for each dtype a packed weight holds.
WEIGHT_KINDS = {torch.bfloat16: 0, torch.int8: 1, torch.float8_e4m3fn: 2}


class Weight(ctypes.Structure):
    """kernels.h's ``Weight``, as ctypes sees it (checked at load: ``check_layout``)."""

    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("kind", ctypes.c_int),
                ("n", ctypes.c_int), ("k", ctypes.c_int)]


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [n, k] weight in the kernel's panel layout: bf16 values, or int8 / fp8 values
    with the scale of each output column."""

    # [panels, k, panel] bf16, int8 or float8_e4m3fn; bf16 on the avx512bf16 build:
    # [panels, kpad / 2, panel, 2] (pairs along k, k padded with zeros; matmul.c)
    data: torch.Tensor
    n: int
    k: int
    scale: torch.Tensor | None = None  # [n] fp32 (quantized weights)

    def describe(self) -> Weight:
        """The descriptor matmul.c reads (pointers into this weight's tensors)."""
        return Weight(self.data.data_ptr(),
                      None if self.scale is None else self.scale.data_ptr(),
                      WEIGHT_KINDS[self.data.dtype], self.n, self.k)

    @property
    def paired(self) -> bool:
        return self.data.dim() == 4


class PackedMatmul:
    """``x [m, k] fp32 @ w[n, k]^T`` over weights packed by ``pack_all``."""

    __slots__ = ("_fn", "_widen", "amx_rows", "k_align", "lib", "panel", "widen_rows")

    def __init__(self, path: str, widen_rows: int | None, amx_rows: int | None = None) -> None:
        self.widen_rows = widen_rows
        lib = self.lib = ctypes.CDLL(path)
        self._fn = lib.matmul
        self._fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(Weight), ctypes.c_void_p,
                             ctypes.c_int]
        self._fn.restype = None
        self._widen = lib.widen_weight
        self._widen.argtypes = [ctypes.POINTER(Weight), ctypes.c_void_p]
        self._widen.restype = None
        self.panel = int(lib.matmul_panel())
        # > 1: bf16 weights packed in pairs along k, k padded to a multiple of it
        self.k_align = int(lib.matmul_k_align())
        # AMX from this many rows, where the CPU has it and Linux grants its tile state
        self.amx_rows = None
        if amx_rows and "amx_bf16" in cpu_flags():
            use = lib.matmul_use_amx
            use.argtypes, use.restype = [ctypes.c_int], ctypes.c_int
            self.amx_rows = use(amx_rows) or None

    def pack(self, weight) -> PackedWeight:
        return self.pack_all({"w": weight})["w"]

    def pack_all(self, weights: dict) -> dict[str, PackedWeight]:
        """Each [n, k] weight (a bf16 tensor, or a ``QuantizedWeight``) -> its values as
        [panels, k, panel] (each panel's columns contiguous per k, zero past n), all in
        one buffer on huge pages (memory.py)."""
        panel = self.panel
        values = {name: w if isinstance(w, torch.Tensor) else w.values
                  for name, w in weights.items()}

        def paired(w: torch.Tensor) -> bool:  # bf16 in k-pairs (the amx build)
            return self.k_align > 1 and w.dtype is torch.bfloat16

        def rows(w: torch.Tensor) -> int:  # k as packed: padded where paired
            return round_up(w.shape[1], self.k_align) if paired(w) else w.shape[1]

        # Each weight's bytes rounded up to whole cache lines, so the next starts on one.
        sizes = {name: round_up(round_up(w.shape[0], panel) * rows(w) * w.itemsize, 64)
                 for name, w in values.items()}
        buffer = memory.huge_page_bytes(sum(sizes.values()))
        packed, offset = {}, 0
        for name, weight in values.items():
            n, k = weight.shape
            kpad = rows(weight)
            panels = -(-n // panel)
            data = buffer[offset:offset + sizes[name]].view(weight.dtype)
            data = data[:panels * kpad * panel]
            offset += sizes[name]
            # [n, kpad] zero-padded to whole panels, then each panel's columns innermost
            whole = torch.zeros((panels * panel, kpad), dtype=weight.dtype)
            whole[:n, :k] = weight
            if paired(weight):
                # pairs along k: [panels, kpad / 2, panel, 2]
                data = data.view(panels, kpad // 2, panel, 2)
                data.copy_(whole.view(panels, panel, kpad // 2, 2).transpose(1, 2))
            else:
                data = data.view(panels, k, panel)
                data.copy_(whole.view(panels, panel, k).transpose(1, 2))
            given = weights[name]
            scale = None if isinstance(given, torch.Tensor) else given.scale.float().contiguous()
            packed[name] = PackedWeight(data, n, k, scale)
        return packed

    def __call__(self, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """x [m, k] -> [m, n] fp32."""
        x = x.float().contiguous()
        m, k = x.shape
        if weight.k != k:
            raise ValueError(f"x has {k} columns, the weight {weight.k}")
        if self.widen_rows is not None and m >= self.widen_rows and not weight.paired:
            # MKL's sgemm, over the weight widened to [k, n] fp32
            panels = weight.data.shape[0]
            wide = torch.empty((k, panels * self.panel), dtype=torch.float32)
            self._widen(ctypes.byref(weight.describe()), wide.data_ptr())  # scaled, one pass
            return x @ wide[:, : weight.n]
        y = torch.empty((m, weight.n), dtype=torch.float32)
        self._fn(x.data_ptr(), ctypes.byref(weight.describe()), y.data_ptr(), m)
        return y

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear`` for the model's torch path, by the kernel where the weight is
        packed for it."""
        if not isinstance(weight, PackedWeight):
            return F.linear(x, weight, bias)
        out = self(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.n)

    def fp8_from_floats(self, x: torch.Tensor) -> torch.Tensor:
        """matmul.c's rounding of fp32 values to e4m3fn (as the native KV cache writes)."""
        x = x.float().contiguous()
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        fn = self.lib.fp8_from_floats
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        fn(x.data_ptr(), out.data_ptr(), x.numel())
        return out


class Lora(ctypes.Structure):
    """kernels.h's ``Lora``, as ctypes sees it (checked at load: ``check_layout``)."""

    _fields_ = [("a", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("spans", ctypes.c_void_p),
                ("rank", ctypes.c_int), ("parts", ctypes.c_int)]


# The fused matmuls a LoRA adapter adapts, as Layer names their deltas (lora_<kind>).
LORA_KINDS = ("qkv", "o", "gate_up", "down")


class Layer(ctypes.Structure):
    """kernels.h's ``Layer``, as ctypes sees it (checked at load: ``check_layout``)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("ln1", "ln2", "qkv", "o", "gate_up", "down", "k_cache", "v_cache",
                 "qkv_bias", "q_norm", "k_norm", "router", "expert_gate_up", "expert_down",
                 *(f"lora_{kind}" for kind in LORA_KINDS))]


class Model(ctypes.Structure):
    """kernels.h's ``Model``, as ctypes sees it (checked at load: ``check_layout``)."""

    _fields_ = [
        *[(name, ctypes.c_int) for name in ("hidden", "intermediate", "heads", "kv_heads",
                                            "head_dim", "layers", "max_len", "window",
                                            "vocab", "experts", "experts_per_token",
                                            "norm_topk", "expert_size", "kv_fp8", "kv_bf16",
                                            "block_size", "lora_slots", "lora_rank")],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *[(name, ctypes.c_void_p) for name in ("cos", "sin", "norm", "lm_head")],
        ("layer", ctypes.POINTER(Layer)),
    ]


class _FieldLayout(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_long), ("size", ctypes.c_long)]


class LayoutMismatch(RuntimeError):
    """Python's view of a shared struct is not the compiler's: passing it would corrupt
    memory, so the library is refused."""


def check_layout(lib: ctypes.CDLL, structs=(Weight, Lora, Layer, Model)) -> None:
    """Compare each struct's fields (name, offset, size) and size with what the C
    compiler laid out (``struct_layout`` in layout.c)."""
    fn = lib.struct_layout
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_long)]
    fn.restype = ctypes.POINTER(_FieldLayout)
    for struct in structs:
        size = ctypes.c_long()
        table = fn(struct.__name__.encode(), ctypes.byref(size))
        native = []
        for i in range(len(struct._fields_) + 1):
            if not table or table[i].name is None:
                break
            native.append((table[i].name.decode(), table[i].offset, table[i].size))
        ours = [(name, getattr(struct, name).offset, getattr(struct, name).size)
                for name, _ in struct._fields_]
        if native != ours or size.value != ctypes.sizeof(struct):
            raise LayoutMismatch(
                f"kernels.h's {struct.__name__} is {native} ({size.value} bytes) but "
                f"Python's ctypes view is {ours} ({ctypes.sizeof(struct)} bytes); update "
                "kernels.py to match kernels.h"
            )


def load(folder: str, variant: Variant) -> PackedMatmul | None:
    """The kernel built into ``folder``, or None (the caller widens the weights)."""
    path = os.path.join(folder, variant.library)
    if not os.path.exists(path) or not runs_here(variant):
        return None
    try:
        matmul = PackedMatmul(path, variant.widen_rows, variant.amx_rows)
    except OSError as e:  # e.g. a folder on a noexec mount (Docker's /dev/shm)
        logger.warning(
            "CPU backend: cannot load the kernel from %s (%s); the weights are "
            "widened to fp32",
            path,
            e,
        )
        return None
    check_layout(matmul.lib)
    return matmul
