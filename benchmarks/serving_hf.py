"""HF transformers ``generate`` in static batches: the offline row of the serving benchmark.

The prompts are the ones ``vllm bench serve`` sends (its random dataset, built by its
own code with the same seed and lengths), tokenized as the servers tokenize them. Each
run splits its requests into static batches of ``concurrency`` rows; a batch starts
when the one before ends, as a closed-loop client with that concurrency would send
them. Per batch a streamer stamps each generated token:

- TTFT: batch start -> first generated token (prefill plus one sampling step);
- TPOT: (last token - first token) / (tokens - 1);
- the run's duration is the sum of its batches (loading and warm-up excluded).

Prints one JSON line per run (``{"run": ...}``) as it finishes, for the parent to
stamp the peak RSS, and ``{"ready": seconds}`` once the model is loaded.

    .venv/bin/python benchmarks/serving_hf.py --model DIR --runs 1x8,32x64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """Stamps the time of each generated step; the first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_prompts(model: str, input_len: int, output_len: int, requests: int, seed: int):
    """The prompts (text) vllm bench serve's random dataset sends for these settings."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(requests),
        "--seed", str(seed), "--tokenizer", model,
    ])
    tokenizer = get_tokenizer(model)
    return [sample.prompt for sample in get_samples(args, tokenizer)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, as numpy computes it (vllm bench uses numpy)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def generate_batch(model, tokenizer, prompts: list[str], output_len: int) -> TokenClock:
    """One static batch, left-padded, exactly ``output_len`` new tokens per row, greedy."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    clock = TokenClock()
    with torch.inference_mode():
        model.generate(
            **batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, streamer=clock,
        )
    return clock


def run(model, tokenizer, prompts: list[str], concurrency: int, output_len: int) -> dict:
    """All requests in static batches of ``concurrency``; the same columns as vllm bench."""
    ttfts, tpots = [], []
    duration = 0.0
    for first in range(0, len(prompts), concurrency):
        rows = prompts[first:first + concurrency]
        start = time.perf_counter()
        clock = generate_batch(model, tokenizer, rows, output_len)
        duration += clock.stamps[-1] - start
        ttft = clock.stamps[0] - start
        tpot = (clock.stamps[-1] - clock.stamps[0]) / max(len(clock.stamps) - 1, 1)
        ttfts += [ttft] * len(rows)
        tpots += [tpot] * len(rows)
    return {
        "completed": len(prompts),
        "total_output_tokens": len(prompts) * output_len,
        "duration": duration,
        "output_throughput": len(prompts) * output_len / duration,
        "request_throughput": len(prompts) / duration,
        "median_ttft_ms": statistics.median(ttfts) * 1e3,
        "p99_ttft_ms": percentile(ttfts, 99) * 1e3,
        "median_tpot_ms": statistics.median(tpots) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", default="1x8,32x64", help="CONCURRENCYxREQUESTS,...")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    generate_batch(model, tokenizer, ["Hello"], 4)  # first-call costs out of the timings
    ready = time.time() - psutil.Process().create_time()
    print(json.dumps({"ready": ready}), flush=True)

    for spec in args.runs.split(","):
        concurrency, requests = (int(x) for x in spec.split("x"))
        prompts = bench_prompts(args.model, args.input_len, args.output_len, requests, args.seed)
        generate_batch(model, tokenizer, prompts[:concurrency], 4)  # warm this batch's shapes
        result = run(model, tokenizer, prompts, concurrency, args.output_len)
        print(json.dumps({"run": spec, **result}), flush=True)


if __name__ == "__main__":
    main()
