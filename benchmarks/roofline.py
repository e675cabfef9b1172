"""Roofline of this machine for the default model: what decode could reach at best.

Decode is either memory bound (every step reads all weights, plus the KV cache) or
compute bound (every step multiplies a batch by all weights). This measures the two
rates that set those bounds on this machine, with the threads a server gets, and
derives the best decode tok/s at batch 1 and at batch 32 with 192 tokens of context:

- memory read bandwidth: a sum over a tensor far larger than the caches (on huge pages);
- matmul GFLOP/s for every linear shape of the model at the batch (bf16 and fp32),
  plus the attention product at that context, and at a batched prefill's 512 rows.

Then the bound of a whole serving run (``serving_bound``): every request's prompt is
prefilled and its tokens decoded at the run's concurrency, so output tok/s is capped
by both. The "bf16 weights" bounds read weights and KV in bf16 and multiply at the
faster of this CPU's bf16 and fp32 rates (without bf16 units, bf16 widened to fp32):
the best any engine serving a bf16 model can do here.

    .venv/bin/python benchmarks/roofline.py [--threads 2] [--json out.json]

`benchmarks/serving.py` runs it in the same run as the serving table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

BATCHES = (1, 32)
PREFILL_ROWS = 512  # a batched prefill: 4 prompts of 128 multiplied at once
CONTEXT = 192  # 128 prompt tokens + half of the 128 generated ones
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
SERVING = {"input_len": 128, "output_len": 128, "concurrency": (1, 32)}


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder that set its cost per decoded token."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict) -> LlamaShape:
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab=config["vocab_size"],
        )


def linear_shapes(m: LlamaShape) -> dict[str, tuple[int, int, int]]:
    """(in K, out N, how many per step) of every matmul against weights in one decode step.

    The embedding lookup reads one row per token and is left out; the LM head is
    counted whether or not it is tied to the embedding, since it is read every step.
    """
    kv = m.kv_heads * m.head_dim
    return {
        "q/o proj": (m.hidden, m.hidden, 2 * m.layers),
        "k/v proj": (m.hidden, kv, 2 * m.layers),
        "gate/up proj": (m.hidden, m.intermediate, 2 * m.layers),
        "down proj": (m.intermediate, m.hidden, m.layers),
        "lm head": (m.hidden, m.vocab, 1),
    }


def weight_bytes(m: LlamaShape, dtype: str) -> int:
    """Bytes of weights one decode step reads."""
    params = sum(k * n * count for k, n, count in linear_shapes(m).values())
    return params * DTYPE_BYTES[dtype]


def kv_bytes(m: LlamaShape, batch: int, context: int, dtype: str) -> int:
    """Bytes of K and V one decode step reads for ``batch`` sequences of ``context`` tokens."""
    return 2 * m.layers * batch * context * m.kv_heads * m.head_dim * DTYPE_BYTES[dtype]


def linear_flops(m: LlamaShape, batch: int) -> dict[str, int]:
    """FLOPs of each linear shape in one decode step (2 per multiply-add)."""
    return {name: 2 * batch * k * n * count for name, (k, n, count) in linear_shapes(m).items()}


def attention_flops(m: LlamaShape, batch: int, context: int) -> int:
    """FLOPs of QK^T and PV over ``context`` cached tokens in one decode step."""
    return 2 * 2 * m.layers * batch * m.heads * m.head_dim * context


def decode_bound(
    m: LlamaShape,
    batch: int,
    context: int,
    dtype: str,
    bandwidth_gbs: float,
    matmul_gflops: dict[str, float],
) -> dict[str, float]:
    """Best decode tok/s: the slower of the memory time and the compute time of one step.

    ``matmul_gflops`` maps every name of ``linear_shapes`` and "attention" to its rate
    at this batch and dtype.
    """
    read = weight_bytes(m, dtype) + kv_bytes(m, batch, context, dtype)
    memory_s = read / (bandwidth_gbs * 1e9)
    flops = linear_flops(m, batch)
    compute_s = sum(f / (matmul_gflops[name] * 1e9) for name, f in flops.items())
    compute_s += attention_flops(m, batch, context) / (matmul_gflops["attention"] * 1e9)
    step_s = max(memory_s, compute_s)
    return {
        "batch": batch,
        "context": context,
        "dtype": dtype,
        "bytes_per_step": read,
        "flops_per_step": sum(flops.values()) + attention_flops(m, batch, context),
        "memory_ms": memory_s * 1e3,
        "compute_ms": compute_s * 1e3,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "tok_s": batch / step_s,
    }


def best_multiplies(rates: dict[str, dict[str, float]], batch: int) -> dict[str, float]:
    """Per shape, the faster of the bf16 and fp32 rates at ``batch`` rows."""
    bf16, fp32 = rates[f"bf16_batch{batch}"], rates[f"fp32_batch{batch}"]
    return {name: max(bf16[name], fp32[name]) for name in fp32}


def prefill_seconds_per_token(m: LlamaShape, prompt: int, rates: dict[str, float]) -> float:
    """Compute time of one prompt token at prefill rates: every linear but the LM head
    (one row per prompt), and causal attention over half the prompt on average."""
    flops = linear_flops(m, 1)
    seconds = sum(f / (rates[name] * 1e9) for name, f in flops.items() if name != "lm head")
    seconds += flops["lm head"] / prompt / (rates["lm head"] * 1e9)
    return seconds + attention_flops(m, 1, prompt // 2) / (rates["attention"] * 1e9)


def serving_bound(m: LlamaShape, concurrency: int, input_len: int, output_len: int,
                  bandwidth_gbs: float, rates: dict[str, dict[str, float]]) -> dict:
    """Best output tok/s of ``concurrency`` requests at a time, each of ``input_len``
    prompt and ``output_len`` generated tokens, with bf16 weights and KV.

    A wave of requests costs its prefills plus ``output_len`` decode steps at batch
    ``concurrency`` (memory or compute bound, as ``decode_bound``); the multiply rates
    are measured at batch 1 and 32 and at ``PREFILL_ROWS`` for prefill.
    """
    batch = 1 if concurrency == 1 else 32
    context = input_len + output_len // 2 if concurrency > 1 else 0
    step = decode_bound(m, concurrency, context, "bf16", bandwidth_gbs,
                        best_multiplies(rates, batch))
    step_s = concurrency / step["tok_s"]
    prefill_s = concurrency * input_len * prefill_seconds_per_token(
        m, input_len, best_multiplies(rates, PREFILL_ROWS))
    wave_s = prefill_s + output_len * step_s
    return {
        "concurrency": concurrency,
        "input_len": input_len,
        "output_len": output_len,
        "decode_step_ms": step_s * 1e3,
        "decode_bound": step["bound"],
        "prefill_ms_per_wave": prefill_s * 1e3,
        "output_tok_s": concurrency * output_len / wave_s,
    }


def _calls_for(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of ``fn`` (a power of two) last about ``seconds``."""
    fn()
    calls = 1
    while calls < 1 << 16:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= seconds:
            break
        calls *= 2
    return calls


def _time_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def best_seconds(kernels: dict[str, Callable[[], object]], rounds: int = 12,
                 chunk_s: float = 0.02) -> dict[str, float]:
    """Fastest time per call of each kernel over ``rounds`` interleaved rounds.

    On a shared machine other processes take the cores in bursts; interleaving the
    kernels spreads each one's samples over the whole measurement, so no kernel is
    measured only during a burst, and the best sample is the machine's own rate.
    """
    calls = {name: _calls_for(fn, chunk_s) for name, fn in kernels.items()}
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(rounds):
        for name, fn in kernels.items():
            best[name] = min(best[name], _time_per_call(fn, calls[name]))
    return best


def _kernels(m: LlamaShape, context: int, megabytes: int = 1024) -> dict[str, tuple]:
    """name -> (callable, bytes or FLOPs per call): the read, every matmul, per dtype and batch."""
    import torch

    from vllm_neuronx.backends.cpu.memory import huge_page_bytes

    # On huge pages where the kernel allows, like the CPU backend's weights: 4 KB pages
    # read more slowly, and the bound would understate the machine.
    x = huge_page_bytes(megabytes * (1 << 20)).view(torch.float32).fill_(1.0)
    kernels = {"bandwidth": (x.sum, x.numel() * 4)}
    group = m.heads // m.kv_heads
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for batch in (*BATCHES, PREFILL_ROWS):
            key = f"{dtype}_batch{batch}"
            for name, (k, n, _) in linear_shapes(m).items():
                a = torch.randn(batch, k, dtype=torch_dtype)
                w = torch.randn(n, k, dtype=torch_dtype)
                kernels[f"{key}/{name}"] = (
                    lambda a=a, w=w: torch.nn.functional.linear(a, w), 2 * batch * k * n)
            q = torch.randn(batch * m.kv_heads, group, m.head_dim, dtype=torch_dtype)
            keys = torch.randn(batch * m.kv_heads, m.head_dim, context, dtype=torch_dtype)
            kernels[f"{key}/attention"] = (
                lambda q=q, keys=keys: torch.bmm(q, keys),
                2 * batch * m.heads * m.head_dim * context)
    return kernels


def measure(config: dict, threads: int, serving: dict = SERVING) -> dict:
    """Measured rates and the decode bounds they give, as one JSON-ready dict."""
    import torch

    torch.set_num_threads(threads)
    m = LlamaShape.from_config(config)
    kernels = _kernels(m, CONTEXT)
    seconds = best_seconds({name: fn for name, (fn, _) in kernels.items()})
    bandwidth = kernels["bandwidth"][1] / seconds["bandwidth"] / 1e9
    rates: dict[str, dict[str, float]] = {}
    for name, (_, flops) in kernels.items():
        if name != "bandwidth":
            key, shape = name.split("/", 1)
            rates.setdefault(key, {})[shape] = flops / seconds[name] / 1e9
    bounds = [
        decode_bound(m, batch, CONTEXT if batch > 1 else 0, dtype, bandwidth,
                     rates[f"{dtype}_batch{batch}"])
        for dtype in DTYPE_BYTES
        for batch in BATCHES
    ]
    return {
        "threads": threads,
        "bandwidth_gbs": bandwidth,
        "matmul_gflops": rates,
        "weight_mb": {dtype: weight_bytes(m, dtype) / 1e6 for dtype in DTYPE_BYTES},
        "decode_bounds": bounds,
        "serving_bounds": [
            serving_bound(m, c, serving["input_len"], serving["output_len"], bandwidth, rates)
            for c in serving["concurrency"]
        ],
    }


def format_roofline(result: dict) -> str:
    """Human-readable lines for the measured rates and bounds."""
    lines = [f"memory read bandwidth: {result['bandwidth_gbs']:.1f} GB/s "
             f"({result['threads']} threads)"]
    for key, rates in result["matmul_gflops"].items():
        shown = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
        lines.append(f"matmul GFLOP/s {key}: {shown}")
    for b in result["decode_bounds"]:
        context = f", {b['context']} tokens of context" if b["context"] else ""
        lines.append(
            f"decode bound {b['dtype']} batch {b['batch']}{context}: {b['tok_s']:.0f} tok/s "
            f"({b['bound']} bound: memory {b['memory_ms']:.2f} ms, "
            f"compute {b['compute_ms']:.2f} ms per step)"
        )
    for b in result.get("serving_bounds", ()):
        lines.append(
            f"serving bound, bf16 weights, concurrency {b['concurrency']} "
            f"({b['input_len']} in / {b['output_len']} out): {b['output_tok_s']:.0f} output "
            f"tok/s (decode step {b['decode_step_ms']:.1f} ms, {b['decode_bound']} bound; "
            f"prefill {b['prefill_ms_per_wave']:.0f} ms per wave of {b['concurrency']})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--input-len", type=int, default=SERVING["input_len"])
    parser.add_argument("--output-len", type=int, default=SERVING["output_len"])
    parser.add_argument("--concurrency", type=int, nargs="+",
                        default=list(SERVING["concurrency"]))
    args = parser.parse_args()
    if args.model is None:
        from vllm_neuronx.default_model import default_model_path

        args.model = default_model_path()
    with open(f"{args.model}/config.json") as f:
        config = json.load(f)
    result = measure(config, args.threads, {"input_len": args.input_len,
                                             "output_len": args.output_len,
                                             "concurrency": args.concurrency})
    print(format_roofline(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
