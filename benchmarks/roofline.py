"""Roofline of this machine for the default model: what serving it could reach at best.

A decode step is either memory bound (it reads all weights, plus the KV cache) or
compute bound (it multiplies a batch by all weights). The two ceilings are the
hardware's, measured here with the threads a server gets:

- memory read bandwidth: a sum over a tensor far larger than the caches (on huge pages);
- peak multiply rate: the fastest GFLOP/s any kernel on this machine reaches at a
  large shape (``PREFILL_ROWS`` rows, every linear shape of the model): torch in
  bf16 and fp32, and the CPU backend's own kernel (kernels.py) where it runs here.

Every shape is bounded by those two, not by the rate torch happens to reach at that
shape: at a few rows torch's GEMV is overhead, not the hardware, and a bound set by
it would be beaten by a better kernel. The rates per shape and kernel are measured
and reported too (batch 1, 32 and ``PREFILL_ROWS``), so a kernel's share of the peak
shows where it stands.

Then the bound of a whole serving run (``serving_bound``): every request's prompt is
prefilled and its tokens decoded at the run's concurrency, so output tok/s is capped
by both. It reads weights and KV in bf16: the best any engine serving a bf16 model
can do here.

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
PACE_SHAPE = (576, 3072)  # pace(): in K, out N of SmolLM2's gate/up projection
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
    peak_gflops: float,
) -> dict[str, float]:
    """Best decode tok/s: the slower of the memory time and the compute time of one
    step, at the machine's read bandwidth and peak multiply rate."""
    read = weight_bytes(m, dtype) + kv_bytes(m, batch, context, dtype)
    memory_s = read / (bandwidth_gbs * 1e9)
    flops = sum(linear_flops(m, batch).values()) + attention_flops(m, batch, context)
    compute_s = flops / (peak_gflops * 1e9)
    step_s = max(memory_s, compute_s)
    return {
        "batch": batch,
        "context": context,
        "dtype": dtype,
        "bytes_per_step": read,
        "flops_per_step": flops,
        "memory_ms": memory_s * 1e3,
        "compute_ms": compute_s * 1e3,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "tok_s": batch / step_s,
    }


def prefill_seconds_per_token(m: LlamaShape, prompt: int, peak_gflops: float) -> float:
    """Compute time of one prompt token at the peak rate: every linear but the LM head
    (one row per prompt), and causal attention over half the prompt on average."""
    flops = linear_flops(m, 1)
    total = sum(f for name, f in flops.items() if name != "lm head")
    total += flops["lm head"] / prompt + attention_flops(m, 1, prompt // 2)
    return total / (peak_gflops * 1e9)


def serving_bound(m: LlamaShape, concurrency: int, input_len: int, output_len: int,
                  bandwidth_gbs: float, peak_gflops: float) -> dict:
    """Best output tok/s of ``concurrency`` requests at a time, each of ``input_len``
    prompt and ``output_len`` generated tokens, with bf16 weights and KV.

    A wave of requests costs its prefills plus ``output_len`` decode steps at batch
    ``concurrency`` (memory or compute bound, as ``decode_bound``), prefills at the
    peak rate.
    """
    context = input_len + output_len // 2 if concurrency > 1 else 0
    step = decode_bound(m, concurrency, context, "bf16", bandwidth_gbs, peak_gflops)
    step_s = concurrency / step["tok_s"]
    prefill_s = concurrency * input_len * prefill_seconds_per_token(m, input_len, peak_gflops)
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


def _our_kernel():
    """The CPU backend's bf16 matmul (kernels.py) built for this CPU, with its variant's
    name, or (None, None) where no variant runs here or it cannot build."""
    import tempfile

    from vllm_neuronx.backends.cpu import kernels

    variant = kernels.chosen()
    if variant is None:
        return None, None
    # The library stays mapped once loaded, so its folder goes at once.
    with tempfile.TemporaryDirectory(prefix="roofline-") as folder:
        if not kernels.build(folder, variant):
            return None, None
        return kernels.load(folder, variant), variant.name


def _read(megabytes: int) -> tuple[Callable[[], object], int]:
    """A sum over ``megabytes`` of fp32 (far larger than the caches) and the bytes it reads.

    On huge pages where the kernel allows, like the CPU backend's weights: 4 KB pages read
    more slowly, and the bound would understate the machine."""
    import torch

    from vllm_neuronx.backends.cpu.memory import huge_page_bytes

    x = huge_page_bytes(megabytes * (1 << 20)).view(torch.float32).fill_(1.0)
    return x.sum, x.numel() * 4


def _kernels(m: LlamaShape, context: int, megabytes: int = 1024) -> dict[str, tuple]:
    """name -> (callable, bytes or FLOPs per call): the read, and every matmul per kernel
    ("bf16", "fp32": torch; "ours-<variant>": kernels.py over packed bf16) and batch."""
    import torch

    kernels = {"bandwidth": _read(megabytes)}
    group = m.heads // m.kv_heads
    ours, variant = _our_kernel()
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for batch in (*BATCHES, PREFILL_ROWS):
            key = f"{dtype}_batch{batch}"
            for name, (k, n, _) in linear_shapes(m).items():
                a = torch.randn(batch, k, dtype=torch_dtype)
                w = torch.randn(n, k, dtype=torch_dtype)
                kernels[f"{key}/{name}"] = (
                    lambda a=a, w=w: torch.nn.functional.linear(a, w), 2 * batch * k * n)
                if ours is not None and dtype == "fp32":  # fp32 rows, bf16 weights
                    packed = ours.pack(w.to(torch.bfloat16))
                    kernels[f"ours-{variant}_batch{batch}/{name}"] = (
                        lambda a=a, packed=packed: ours(a, packed), 2 * batch * k * n)
            q = torch.randn(batch * m.kv_heads, group, m.head_dim, dtype=torch_dtype)
            keys = torch.randn(batch * m.kv_heads, m.head_dim, context, dtype=torch_dtype)
            kernels[f"{key}/attention"] = (
                lambda q=q, keys=keys: torch.bmm(q, keys),
                2 * batch * m.heads * m.head_dim * context)
    return kernels


def peak(rates: dict[str, dict[str, float]]) -> tuple[float, str]:
    """The fastest multiply rate measured at ``PREFILL_ROWS`` rows, and which kernel
    and shape reached it."""
    best = max((rate, f"{key}/{shape}") for key, shapes in rates.items()
               if key.endswith(f"_batch{PREFILL_ROWS}")
               for shape, rate in shapes.items() if shape != "attention")
    return best


def measure(config: dict, threads: int, serving: dict = SERVING) -> dict:
    """Measured rates and the bounds they give, as one JSON-ready dict."""
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
    peak_gflops, peak_by = peak(rates)
    bounds = [
        decode_bound(m, batch, CONTEXT if batch > 1 else 0, dtype, bandwidth, peak_gflops)
        for dtype in DTYPE_BYTES
        for batch in BATCHES
    ]
    return {
        "threads": threads,
        "bandwidth_gbs": bandwidth,
        "peak_gflops": peak_gflops,
        "peak_by": peak_by,
        "matmul_gflops": rates,
        "weight_mb": {dtype: weight_bytes(m, dtype) / 1e6 for dtype in DTYPE_BYTES},
        "decode_bounds": bounds,
        "serving_bounds": [
            serving_bound(m, c, serving["input_len"], serving["output_len"], bandwidth,
                          peak_gflops)
            for c in serving["concurrency"]
        ],
    }


def pace(threads: int, megabytes: int = 256) -> dict[str, float]:
    """How fast this machine runs right now, in a second: the read bandwidth and torch's
    bf16 rate at one prefill shape (the gate/up projection of ``PREFILL_ROWS`` rows).

    A VM's speed can move 2x within minutes (other tenants on the host); taken before
    each peer of a serving run and at its end, it shows whether the peers were measured
    on the same machine, so to speak, or a ratio between them carries the drift.
    """
    import torch

    torch.set_num_threads(threads)
    read, read_bytes = _read(megabytes)
    k, n = PACE_SHAPE
    a = torch.randn(PREFILL_ROWS, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    seconds = best_seconds({"read": read, "bf16": lambda: torch.nn.functional.linear(a, w)},
                           rounds=4)
    return {"threads": threads, "read_gbs": round(read_bytes / seconds["read"] / 1e9, 1),
            "bf16_gflops": round(2 * PREFILL_ROWS * k * n / seconds["bf16"] / 1e9)}


def format_roofline(result: dict) -> str:
    """Human-readable lines for the measured rates and bounds."""
    lines = [f"memory read bandwidth: {result['bandwidth_gbs']:.1f} GB/s "
             f"({result['threads']} threads)",
             f"peak multiply rate: {result['peak_gflops']:.0f} GFLOP/s ({result['peak_by']})"]
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
    parser.add_argument("--pace", action="store_true",
                        help="only the machine's pace now (pace()): a second, no model")
    args = parser.parse_args()
    if args.pace:
        result = pace(args.threads)
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
        return
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
