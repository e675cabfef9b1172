"""Prefix caching and chunked prefill on the CPU backend: multi-turn chat, one run.

    .venv/bin/python benchmarks/prefix_caching.py [--quick] [--out FILE]

Every figure is measured in this run, on the default model (SmolLM2-135M-Instruct, bf16),
each engine in a process of its own, driven step by step (``LLMEngine.step``) so that each
token's arrival is timed where the engine hands it out:

1. **Cached prefix (TTFT).** Multi-turn chats: each turn's prompt is the conversation so
   far (448 tokens) plus a new user message (64), one request at a time. Cold: the
   conversation was never seen; warm: its 448 tokens are in the cache from the turn
   before. Target: warm TTFT <= 0.3x cold.
2. **Long prompts beside decodes (TPOT p99).** 8 requests decode 96 tokens each while
   prompts of 900 tokens arrive; the decoding requests' time per output token, p99, with
   the seed's contiguous layout (a long prompt's prefill step stops every decode) and
   with chunked prefill (``max_num_batched_tokens`` tokens a step, decodes in every step).
   Target: chunked <= 0.5x contiguous.
3. **Plain serving (no shared prefixes).** 32 random prompts of 128 tokens, 128 output
   tokens, all at once: output tok/s of the block layout (prefix caching on) against the
   contiguous layout, both engines up at once and measured in alternating rounds (the
   median of the rounds' ratios). Target: >= 0.9x.

It prints the CPU model, its ISA flags and the kernel variant with the figures and writes
them to benchmarks/results/prefix_caching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MAX_MODEL_LEN = 1024
BLOCK = 32
CHUNK = 128  # chunked prefill's tokens per step (max_num_batched_tokens)
LAYOUTS = {  # engine arguments of each layout
    "contiguous": {},
    "prefix": {"enable_prefix_caching": True, "block_size": BLOCK},
    "chunked": {"enable_prefix_caching": True, "enable_chunked_prefill": True,
                "block_size": BLOCK, "max_num_batched_tokens": CHUNK},
}


def tokens(rng, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def engine(layout: str, max_num_seqs: int):
    from vllm import LLM

    from vllm_neuronx.default_model import default_model_path

    llm = LLM(model=default_model_path(), device="neuron", dtype="bfloat16",
              max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN, disable_log_stats=True,
              **LAYOUTS[layout])
    return llm, llm.llm_engine


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def run(engine, requests: dict[str, tuple[list[int], int]], arrivals: dict[str, int] | None
        = None) -> dict[str, list[float]]:
    """Run requests to the end; ``arrivals``: the step at which each request is added
    (default: all at once). Returns each request's token times, from its arrival."""
    arrivals = arrivals or dict.fromkeys(requests, 0)
    added: dict[str, float] = {}
    times: dict[str, list[float]] = {r: [] for r in requests}
    step = 0
    while len(added) < len(requests) or engine.has_unfinished_requests():
        for req_id, at in arrivals.items():
            if at <= step and req_id not in added:
                prompt, n = requests[req_id]
                engine.add_request(req_id, {"prompt_token_ids": prompt}, greedy(n))
                added[req_id] = time.perf_counter()
        now_outputs = engine.step()
        now = time.perf_counter()
        for out in now_outputs:
            have = len(out.outputs[0].token_ids)
            while len(times[out.request_id]) < have:
                times[out.request_id].append(now - added[out.request_id])
        step += 1
    return times


def cached_ttft(layout: str, turns: int, vocab: int) -> dict:
    """Each chat: turn 1 writes its 448 tokens; turn 2 adds 64 to them (warm). Cold: a
    chat of the same shape never seen. One request at a time."""
    import random

    _, eng = engine(layout, 4)
    rng = random.Random(0)
    cold, warm = [], []
    for chat in range(turns + 1):  # the first chat warms the engine up
        history, other = tokens(rng, 448, vocab), tokens(rng, 448, vocab)
        run(eng, {"turn1": (history, 1)})
        t_warm = run(eng, {"turn2": (history + tokens(rng, 64, vocab), 1)})["turn2"][0]
        t_cold = run(eng, {"cold": (other + tokens(rng, 64, vocab), 1)})["cold"][0]
        if chat:
            warm.append(t_warm)
            cold.append(t_cold)
    return {"cold_ttft_ms": [round(t * 1e3, 1) for t in cold],
            "warm_ttft_ms": [round(t * 1e3, 1) for t in warm]}


def long_prompts_tpot(layout: str, vocab: int, quick: bool) -> dict:
    """8 decoding requests; 900-token prompts arrive while they decode."""
    import random

    _, eng = engine(layout, 12)
    rng = random.Random(1)
    run(eng, {"warm": (tokens(rng, 900, vocab), 2)})
    out_len = 48 if quick else 96
    requests = {f"d{i}": (tokens(rng, 32, vocab), out_len) for i in range(8)}
    arrivals = dict.fromkeys(requests, 0)
    for i in range(2 if quick else 4):
        requests[f"long{i}"] = (tokens(rng, 900, vocab), 4)
        arrivals[f"long{i}"] = 4 + i * (out_len // 5)
    times = run(eng, requests, arrivals)
    gaps = sorted(b - a for r in requests if r.startswith("d")
                  for a, b in zip(times[r], times[r][1:], strict=False))
    return {"tpot_p50_ms": round(gaps[len(gaps) // 2] * 1e3, 1),
            "tpot_p99_ms": round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3, 1),
            "tpot_max_ms": round(gaps[-1] * 1e3, 1)}


def plain_throughput(vocab: int, quick: bool) -> dict:
    """Both layouts' engines side by side (two engine processes), measured in alternating
    rounds: the machine drifts 15-40% between runs, so only a round's pair compares."""
    import random

    engines = {layout: engine(layout, 32)[1] for layout in ("contiguous", "prefix")}
    rng = random.Random(2)
    for eng in engines.values():
        run(eng, {"warm": (tokens(rng, 128, vocab), 4)})
    out_len = 32 if quick else 128
    rates: dict[str, list[float]] = {layout: [] for layout in engines}
    for round_ in range(2 if quick else 4):
        requests = {f"r{i}": (tokens(rng, 128, vocab), out_len) for i in range(32)}
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for layout in order:
            start = time.perf_counter()
            run(engines[layout], requests)
            rates[layout].append(round(32 * out_len / (time.perf_counter() - start), 1))
    return {"output_tok_s": rates,
            "round_ratios": [round(b / a, 3) for a, b in zip(rates["contiguous"],
                                                             rates["prefix"], strict=True)]}


def child(args) -> None:
    from vllm_neuronx.default_model import default_model_path

    with open(os.path.join(default_model_path(), "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    what, layout = args.child.split(":")
    if what == "ttft":
        result = cached_ttft(layout, 3 if args.quick else 6, vocab)
    elif what == "tpot":
        result = long_prompts_tpot(layout, vocab, args.quick)
    else:
        result = plain_throughput(vocab, args.quick)
    print("RESULT " + json.dumps(result), flush=True)


def measure(what: str, layout: str, quick: bool) -> dict:
    argv = [sys.executable, __file__, "--child", f"{what}:{layout}"] + (["--quick"] * quick)
    print(f"[prefix_caching] {what} with the {layout} layout ...", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{what}:{layout} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chats and tokens")
    parser.add_argument("--out", default=str(HERE / "results" / "prefix_caching.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from serving_report import machine_info

    machine = machine_info()
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores; {machine['isa']}; kernel variant "
          f"{machine['cpu_kernel_variant']})")
    ttft = measure("ttft", "prefix", args.quick)
    tpot = {layout: measure("tpot", layout, args.quick) for layout in ("contiguous", "chunked")}
    plain = measure("plain", "both", args.quick)
    cold, warm = statistics.median(ttft["cold_ttft_ms"]), statistics.median(ttft["warm_ttft_ms"])
    ratios = {
        "warm_over_cold_ttft": round(warm / cold, 3),
        "chunked_over_contiguous_tpot_p99": round(
            tpot["chunked"]["tpot_p99_ms"] / tpot["contiguous"]["tpot_p99_ms"], 3),
        "block_over_contiguous_output_tok_s": statistics.median(plain["round_ratios"]),
    }
    print(f"1. TTFT with 448 of 512 tokens cached: median {warm:.1f} ms warm, {cold:.1f} ms "
          f"cold -> {ratios['warm_over_cold_ttft']}x (target <= 0.3x)")
    print("2. decode TPOT while 900-token prompts arrive: p99 "
          f"{tpot['chunked']['tpot_p99_ms']} ms chunked ({CHUNK} tokens a step), "
          f"{tpot['contiguous']['tpot_p99_ms']} ms contiguous -> "
          f"{ratios['chunked_over_contiguous_tpot_p99']}x (target <= 0.5x)")
    rates = plain["output_tok_s"]
    print(f"3. plain serving, 32 x 128/128, alternating rounds: {rates['prefix']} tok/s block "
          f"layout, {rates['contiguous']} contiguous; round ratios {plain['round_ratios']} -> "
          f"median {ratios['block_over_contiguous_output_tok_s']}x (target >= 0.9x)")
    result = {"machine": machine, "quick": args.quick, "cached_ttft": ttft, "tpot": tpot,
              "plain": plain, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
