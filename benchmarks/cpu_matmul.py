"""The CPU backend's matmul alone, by kernel variant and row count, against torch.

SmolLM2's matmuls of one layer (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536),
four layers' worth of distinct weights, at 1 to 512 rows (a decode batch, or a prefill's
tokens), through each kernel variant this CPU runs (``backends/cpu/kernels.py``;
``amx`` twice: tiles from its ``amx_rows`` as it runs, and its fp32 FMAs at every row count) and
through torch (oneDNN's bf16 and MKL's fp32 over weights it holds unpacked). The candidates
alternate within each round (best of ``--rounds``), so the machine's drift hits them alike.
This is the measurement behind ``CPU_CLASSES``, the variant each CPU class runs.

    .venv/bin/python benchmarks/cpu_matmul.py [--rows 1,8,32,128,512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_neuronx.backends.cpu import kernels
from vllm_neuronx.backends.cpu.backend import cpu_threads

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 4
OUT = Path(__file__).parent / "results" / "cpu_matmul.json"


def variant_runs(weights: list[torch.Tensor], folder: str) -> dict:
    """name -> (a call's setup, the matmuls) for each variant this CPU runs."""
    runs = {}
    for variant in kernels.VARIANTS:
        if not kernels.runs_here(variant) or not kernels.build(folder, variant):
            continue
        matmul = kernels.load(folder, variant)
        packed = [matmul.pack(w) for w in weights]
        if matmul.amx_rows:
            use = matmul.lib.matmul_use_amx
            runs[f"{variant.name} (tiles from {matmul.amx_rows} rows)"] = (
                matmul, packed, lambda use=use, rows=matmul.amx_rows: use(rows))
            runs[f"{variant.name} fp32 FMAs only"] = (matmul, packed, lambda use=use: use(0))
        else:
            runs[variant.name] = (matmul, packed, lambda: None)
    return runs


def candidates_at(rows: int, runs: dict, weights: list[torch.Tensor],
                  wide: list[torch.Tensor]) -> dict:
    """name -> a call running every matmul once at ``rows`` rows."""
    x = {k: torch.randn(rows, k) for k in {k for _, k in SHAPES}}
    out = {n: torch.empty(rows, n) for n in {n for n, _ in SHAPES}}

    def kernel(run):
        matmul, packed, setup = run
        setup()
        for w in packed:
            matmul._fn(x[w.k].data_ptr(), ctypes.byref(w.describe()), out[w.n].data_ptr(), rows)

    candidates = {name: (lambda run=run: kernel(run)) for name, run in runs.items()}
    candidates["torch bf16 (oneDNN)"] = lambda: [
        F.linear(x[w.shape[1]].bfloat16(), w) for w in weights]
    candidates["torch fp32 (MKL, weights widened)"] = lambda: [
        F.linear(x[w.shape[1]], w) for w in wide]
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(cpu_threads())
    torch.manual_seed(0)
    weights = [torch.randn(n, k).bfloat16() for n, k in SHAPES] * LAYERS
    wide = [w.float() for w in weights]
    folder = tempfile.mkdtemp()
    runs = variant_runs(weights, folder)
    header = (f"{kernels.cpu_model()}, {torch.get_num_threads()} threads, ISA "
              f"{' '.join(kernels.vector_flags())}; this CPU's class: "
              f"{getattr(kernels.cpu_class(), 'name', 'none')} -> {kernels.chosen_name()}")
    print(header, flush=True)
    results = {"machine": header, "rows": {}}
    for rows in [int(r) for r in args.rows.split(",")]:
        candidates = candidates_at(rows, runs, weights, wide)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(args.rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        flops = 2 * rows * sum(n * k for n, k in SHAPES) * LAYERS
        results["rows"][rows] = {name: {"ms": round(s * 1e3, 2),
                                        "gflops": round(flops / s / 1e9)}
                                 for name, s in best.items()}
        print(f"rows {rows:4d}: " + "; ".join(
            f"{name} {s * 1e3:.2f} ms ({flops / s / 1e9:.0f} GFLOP/s)"
            for name, s in best.items()), flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
