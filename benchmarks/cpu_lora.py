"""LoRA decode steps of the CPU backend alone: adapters in the native step against the
torch path and against the base model, interleaved in one process.

SmolLM2 (bf16 weights, computed as the backend computes them on this CPU), decode of
``--batch`` rows at context 192 (cpu_backend.py's), three kinds of step on one backend:

- base: every row's line bound to the base model (the step passes no slots);
- native: the rows' lines bound round-robin to 4 random rank-16 adapters on all 7
  projections (PEFT-made, as the tests make them), the step in decode_step.c;
- torch: the same rows and adapters on llama.py's torch path (what a step with adapter
  rows ran before the native step took adapters);
- native-dense: as native, but each fused delta read as one dense block of B (its zero
  blocks too), which is what the per-part spans save.

Each round times every kind for ``--steps`` steps (median, after 2 warm-up steps); the
kinds alternate within a round, so a busy neighbour slows them alike.

    .venv/bin/python benchmarks/cpu_lora.py [--rounds 6] [--steps 10] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from cpu_backend import time_decode

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import kernels
from vllm_neuronx.backends.cpu.backend import CpuBackend
from vllm_neuronx.backends.cpu.lora import FusedDelta, LoraWeights
from vllm_neuronx.default_model import default_model_path
from vllm_neuronx.lora import peft

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.lora_utils import make_peft_adapter  # noqa: E402  (the tests' PEFT adapters)

ADAPTERS, RANK = 4, 16


def dense(w: LoraWeights) -> LoraWeights:
    """The same adapter, each fused delta one block (spans over all of B)."""
    parts = {key: FusedDelta(d.a, d.bt, torch.tensor([[0, d.rank, 0, d.bt.shape[1]]],
                                                     dtype=torch.int32))
             for key, d in w.parts.items()}
    return LoraWeights(w.spec, parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    model, batch = default_model_path(), args.batch
    print(f"SmolLM2 bf16 on {kernels.cpu_model()}, {os.cpu_count()} cores, ISA "
          f"{' '.join(kernels.vector_flags())}, kernel {kernels.chosen_name()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        # Lines 0..batch-1 run the base model, batch..2*batch-1 the adapters.
        cfg = nc.default_neuron_config(tp_degree=1, max_num_seqs=2 * batch, max_model_len=256,
                                       dtype="bfloat16")
        b = CpuBackend(model, cfg)
        b.compile(folder)
        b.load(folder)
        b.init_lora(max_loras=ADAPTERS, max_lora_rank=RANK, max_cpu_loras=ADAPTERS)
        handles = []
        for i in range(ADAPTERS):
            path = make_peft_adapter(model, os.path.join(folder, f"a{i}"), seed=i, r=RANK,
                                     alpha=2 * RANK, b_scale=0.1)
            handles.append(b.prepare_adapter(peft.inspect(f"a{i}", path, b.dims, RANK)))
        base_lines = torch.arange(batch)
        lora_lines = torch.arange(batch, 2 * batch)
        rows = [handles[i % ADAPTERS] for i in range(batch)]
        b.adapters.bind(lora_lines, b.adapter_indices(rows, ()))
        native = b.native
        assert native is not None, "no native step on this CPU"
        slots = {h: b.adapters.where[h] for h in handles}
        dense_handles = {h: dense(h) for h in handles}

        def run(kind: str) -> float:
            if kind == "base":
                return time_decode(b, base_lines.shape[0], args.steps, b.vocab_size, base_lines)
            if kind == "torch":
                b.native = None
                try:
                    return time_decode(b, lora_lines.shape[0], args.steps, b.vocab_size, lora_lines)
                finally:
                    b.native = native
            if kind == "native-dense":
                for h, slot in slots.items():
                    native.set_slot(slot, dense_handles[h])
                try:
                    return time_decode(b, lora_lines.shape[0], args.steps, b.vocab_size, lora_lines)
                finally:
                    for h, slot in slots.items():
                        native.set_slot(slot, h)
            return time_decode(b, lora_lines.shape[0], args.steps, b.vocab_size, lora_lines)

        kinds = ("base", "native", "torch", "native-dense")
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                results[kind].append(run(kind) * 1e3)
            print(f"round {r}: " + ", ".join(f"{k} {results[k][-1]:.1f}" for k in kinds)
                  + " ms/step", flush=True)
    summary = {k: {"median_ms": round(statistics.median(v), 1),
                   "min_ms": round(min(v), 1), "max_ms": round(max(v), 1)}
               for k, v in results.items()}
    base = summary["base"]["median_ms"]
    for k, s in summary.items():
        print(f"{k}: {s['median_ms']} ms/step (rounds {s['min_ms']}-{s['max_ms']}), "
              f"{base / s['median_ms']:.2f}x of base", flush=True)
    print(json.dumps({"batch": batch, "cpu": kernels.cpu_model(),
                      "isa": kernels.vector_flags(), "results": summary}))


if __name__ == "__main__":
    main()
