"""Gloo all-reduce times on this machine, at the payloads of one decode step and one prefill.

Tensor parallelism costs two all-reduces per layer (after attention, after the MLP), each
of [tokens, hidden] activations. This measures one such all-reduce over a standalone
``torch.distributed.ProcessGroupGloo`` on a TCPStore (as the rank group uses), with the
processes spawned here, for world 2 and 4, fp32 and bf16 (when gloo takes it), and
multiplies out the communication of one step:

    step cost = 2 all-reduces x layers (32 for Llama-3.1-8B, 80 for 70B) x one all-reduce

    .venv/bin/python benchmarks/allreduce.py [--worlds 2,4] [--dtypes float32,bfloat16]
        [--reps 50] [--out benchmarks/results/allreduce.json]

Each figure is the slowest rank's time for one all-reduce after a barrier; best and median
of the reps. The processes share this machine's cores (world 4 on 2 cores is
oversubscribed), so the figures bound the cost of TP over loopback here, not over a network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

HIDDEN = {"Llama-3.1-8B": 4096, "Llama-3.1-70B": 8192}
LAYERS = {"Llama-3.1-8B": 32, "Llama-3.1-70B": 80}
DECODE_TOKENS = (1, 8, 32)
PREFILL_TOKENS = 2048
ALL_REDUCES_PER_LAYER = 2
BIG_BYTES = 4 << 20  # payloads above this get fewer reps, to keep a run under 3 minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads() -> list[tuple[str, str, int, int]]:
    """(model, phase, tokens, hidden) for every all-reduce measured."""
    rows = []
    for model, hidden in HIDDEN.items():
        rows += [(model, "decode", t, hidden) for t in DECODE_TOKENS]
        rows.append((model, "prefill", PREFILL_TOKENS, hidden))
    return rows


def worker(rank: int, world: int, port: int, dtypes: list[str], reps: int, queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60))
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        try:
            probe = torch.ones(4, dtype=dtype)
            group.allreduce([probe]).wait()
            supported = bool(probe[0].item() == world)
        except RuntimeError:
            supported = False
        if not supported:
            results.append({"dtype": dtype_name, "supported": False})
            continue
        for model, phase, tokens, hidden in payloads():
            x = torch.randn(tokens, hidden).to(dtype)
            n = reps if x.nbytes <= BIG_BYTES else max(3, reps // 6)
            times = []
            for i in range(n + 2):  # two warm-up reps
                group.barrier().wait()
                start = time.perf_counter()
                group.allreduce([x]).wait()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            # The step waits for the slowest rank: take each rep's maximum over ranks.
            slowest = torch.tensor(times, dtype=torch.float64)
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MAX
            group.allreduce([slowest], opts).wait()
            results.append({"dtype": dtype_name, "supported": True, "model": model,
                            "phase": phase, "tokens": tokens, "hidden": hidden,
                            "bytes": x.nbytes, "reps": n,
                            "best_ms": slowest.min().item() * 1e3,
                            "median_ms": statistics.median(slowest.tolist()) * 1e3})
            # Bytes per second of payload at the median (what a bandwidth model divides by).
            results[-1]["payload_gb_s"] = x.nbytes / results[-1]["median_ms"] / 1e6
    if rank == 0:
        queue.put(results)
    group.barrier().wait()


def measure(world: int, dtypes: list[str], reps: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, dtypes, reps, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"all-reduce worker exited with {p.exitcode}")
    return [{"world": world, **row} for row in results]


def step_costs(rows: list[dict]) -> list[dict]:
    """Communication per decode step or prefill: 2 all-reduces x layers x the median."""
    out = []
    for row in rows:
        if not row["supported"]:
            continue
        count = ALL_REDUCES_PER_LAYER * LAYERS[row["model"]]
        out.append({k: row[k] for k in ("world", "dtype", "model", "phase", "tokens")}
                   | {"all_reduces": count, "step_ms": count * row["median_ms"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    dtypes = args.dtypes.split(",")

    from serving_report import machine_info

    machine = machine_info()
    print(f"gloo all-reduce on {machine['cpu']}, {machine['cores']} cores, "
          f"ISA {' '.join(machine['isa'])}; torch {torch.__version__}; loopback TCP, processes "
          f"spawned here (world > cores is oversubscribed); shared machine: noisy")
    started = time.perf_counter()
    rows = []
    for world in worlds:
        rows += measure(world, dtypes, args.reps)

    print(f"\n{'world':>5} {'dtype':>8} {'model':>13} {'phase':>7} {'tokens':>6} "
          f"{'KiB':>7} {'reps':>4} {'best ms':>8} {'median ms':>9} {'GB/s':>6}")
    for r in rows:
        if not r["supported"]:
            print(f"{r['world']:>5} {r['dtype']:>8}  gloo does not all-reduce this dtype")
            continue
        print(f"{r['world']:>5} {r['dtype']:>8} {r['model']:>13} {r['phase']:>7} "
              f"{r['tokens']:>6} {r['bytes'] / 1024:>7.0f} {r['reps']:>4} "
              f"{r['best_ms']:>8.3f} {r['median_ms']:>9.3f} {r['payload_gb_s']:>6.2f}")

    steps = step_costs(rows)
    print(f"\nper-step communication (2 all-reduces/layer x layers x median):\n"
          f"{'world':>5} {'dtype':>8} {'model':>13} {'phase':>7} {'tokens':>6} "
          f"{'all-reduces':>11} {'ms/step':>9}")
    for s in steps:
        print(f"{s['world']:>5} {s['dtype']:>8} {s['model']:>13} {s['phase']:>7} "
              f"{s['tokens']:>6} {s['all_reduces']:>11} {s['step_ms']:>9.1f}")

    result = {"machine": machine, "torch": torch.__version__,
              "seconds": time.perf_counter() - started,
              "all_reduce": rows, "per_step": steps}
    print("\n" + json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
