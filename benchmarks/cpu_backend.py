"""The CPU backend alone: prefill and decode speed of SmolLM2, no vLLM around it.

Each speed lever of the CPU backend is measured here, step by step, before it is
judged in the serving benchmark. Decode steps run at a context of 192 tokens (the
middle of a 128-in / 128-out request); prefill runs 32 prompts of 128 tokens the
way the scheduler hands them over (as many as free lines allow), then 8 prompts of 448
tokens, two a call (longer than one native step: cut across steps).

    .venv/bin/python benchmarks/cpu_backend.py [--dtype bfloat16] [--steps 20]
        [--kernel avx512,avx2,torch] [--phases] [--engine]
        [--model DIR | --family qwen2|mixtral]

``--kernel`` measures each kernel variant in turn (VLLM_NEURONX_CPU_KERNEL) in one run;
by default, the one the backend chooses on this CPU. The header names the CPU model,
its vector ISA flags and the variant of every figure.

``--model`` takes any HF folder the backend serves; ``--family`` makes a random-weight
model of that family in SmolLM2's shape (Mixtral: 8 experts of a quarter of its MLP,
2 per token, so about as many weights), to compare families at one size.

``--phases`` times each decode batch again, phase by phase of the native step (norms,
the q/k/v, o, gate/up and down matmuls, rotary and cache stores, attention, the MLP's
activation, experts, the LM head), so that a phase can be set against its own floor
(e.g. a matmul's weight bytes at the machine's read bandwidth).

``--engine`` then runs the same backend inside vLLM's engine, its core in a child
process as under the server, and serves one request and then 32 at a time (128 prompt
tokens, 128 generated). It prints the backend's decode step as the engine saw it
beside the step measured alone, and the engine's own time between steps: where the
two differ, the machine or the engine takes the difference, not the backend.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

import torch
from roofline import pace

from vllm_neuronx import neuron_config as nc
from vllm_neuronx import sampling
from vllm_neuronx.backends.cpu import kernels
from vllm_neuronx.backends.cpu.backend import CpuBackend, compute_dtype
from vllm_neuronx.default_model import default_model_path

LINES, SEQ_LEN, PROMPT, CONTEXT = 32, 512, 128, 192
# Long prompts: this many of this many tokens, two a call (more than one native step holds).
LONG_LINES, LONG_PROMPT = 8, 448


# --quant: the neuron config keys of each weight format (quant_config.py).
QUANT = {
    "none": {},
    "int8": {"quantized": True, "quantization_type": "per_channel_symmetric",
             "quantization_dtype": "int8"},
    "fp8": {"quantized": True, "quantization_type": "per_channel_symmetric",
            "quantization_dtype": "f8e4m3"},
}


def make_backend(model: str, dtype: str, folder: str, overrides: dict | None = None) -> CpuBackend:
    cfg = {**nc.default_neuron_config(tp_degree=1, max_num_seqs=LINES, max_model_len=SEQ_LEN,
                                      dtype=dtype), **(overrides or {})}
    backend = CpuBackend(model, cfg)
    backend.compile(folder)
    backend.load(folder)
    return backend


def greedy(n: int) -> torch.Tensor:
    return sampling.sampling_tensor([sampling.GREEDY_ROW] * n)


def time_prefill(backend: CpuBackend, batch: int, vocab: int, lines: int = LINES,
                 prompt: int = PROMPT) -> float:
    """Seconds to prefill ``lines`` prompts of ``prompt`` tokens, ``batch`` prompts per call."""
    ids = torch.randint(0, vocab, (lines, prompt))
    pos = torch.arange(prompt).expand(lines, prompt)
    start = time.perf_counter()
    for first in range(0, lines, batch):
        rows = slice(first, first + batch)
        n = ids[rows].shape[0]
        backend.forward(ids[rows], pos[rows], torch.arange(first, first + n), greedy(n))
    return time.perf_counter() - start


def time_decode(backend: CpuBackend, batch: int, steps: int, vocab: int,
                seq_ids: torch.Tensor | None = None) -> float:
    """Median seconds per decode step of ``batch`` rows (on lines ``seq_ids``, else the
    first ``batch``) at context CONTEXT."""
    seq_ids = torch.arange(batch) if seq_ids is None else seq_ids
    times = []
    for step in range(steps + 2):
        ids = torch.randint(0, vocab, (batch, 1))
        pos = torch.full((batch, 1), CONTEXT + step)
        start = time.perf_counter()
        backend.forward(ids, pos, seq_ids, greedy(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def weights_bytes(backend: CpuBackend) -> int:
    """Bytes of the weights the backend holds in memory (each storage once), but the
    embedding table's: mapped from the artifacts, only rows looked up are resident."""
    storages = {}
    for name, w in backend.model.w.items():
        tensors = [w] if isinstance(w, torch.Tensor) else [w.data, w.scale]
        for t in tensors:
            if t is not None and name != "embed":
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(model: str, dtype: str, kernel: str | None, quant: str, args) -> dict:
    """Prefill and decode figures of one kernel variant (None: the backend's choice) and
    weight format (QUANT)."""
    if kernel is not None:
        os.environ["VLLM_NEURONX_CPU_KERNEL"] = kernel
    with tempfile.TemporaryDirectory() as folder:
        overrides = {**QUANT[quant], **({"kv_cache_quant": True} if args.kv_fp8 else {})}
        backend = make_backend(model, dtype, folder, overrides)
        vocab = backend.vocab_size
        result = {"kernel": backend.kernel, "quant": quant, "kv_fp8": args.kv_fp8,
                  "prefill_s": {}, "decode_ms": {}, "decode_tok_s": {}}
        result["weights_mb"] = round(weights_bytes(backend) / 1e6, 1)
        print(f"-- kernel {backend.kernel}, weights {quant} ({result['weights_mb']} MB held; "
              f"the embedding table mapped, not counted), KV "
              f"{str(backend.model.k_cache.dtype).removeprefix('torch.')}", flush=True)
        for batch in args.prefill_batch:
            result["prefill_s"][batch] = round(time_prefill(backend, batch, vocab), 2)
            print(f"prefill {LINES}x{PROMPT}, {batch} per call: {result['prefill_s'][batch]} s",
                  flush=True)
        result["prefill_long_s"] = round(
            time_prefill(backend, 2, vocab, LONG_LINES, LONG_PROMPT), 2)
        print(f"prefill {LONG_LINES}x{LONG_PROMPT}, 2 per call: {result['prefill_long_s']} s",
              flush=True)
        for batch in (1, 8, 32):
            step = time_decode(backend, batch, args.steps, vocab)
            result["decode_ms"][batch] = round(step * 1e3, 1)
            result["decode_tok_s"][batch] = round(batch / step, 1)
            print(f"decode b={batch} @ctx {CONTEXT}: {step * 1e3:.1f} ms/step, "
                  f"{batch / step:.0f} tok/s", flush=True)
            if args.phases and backend.native is not None:
                result.setdefault("phases_ms", {})[batch] = phases = \
                    time_phases(backend, batch, args.steps, vocab)
                print(f"  by phase (ms/step, {sum(phases.values()):.1f} in all): " + ", ".join(
                    f"{name} {ms:.2f}" for name, ms in phases.items() if ms), flush=True)
    return result


def time_phases(backend: CpuBackend, batch: int, steps: int, vocab: int) -> dict[str, float]:
    """Mean milliseconds per decode step in each phase of the native step (decode_step.c:
    from the barrier ending the phase before to the one ending it), over another ``steps``
    steps timed that way."""
    native = backend.native.step
    native.time_phases(True)
    try:
        native.phase_times()  # from zero
        time_decode(backend, batch, steps, vocab)  # steps + 2, the first two untimed there
        return {name: round(ms / (steps + 2), 3) for name, ms in native.phase_times().items()}
    finally:
        native.time_phases(False)


def engine_steps(model: str, dtype: str) -> list[dict]:
    """Step times inside vLLM's engine (worker/step_times.py) at concurrency 1, then 32."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, max_num_seqs=LINES, max_model_len=SEQ_LEN, dtype=dtype, seed=0)
    params = SamplingParams(max_tokens=PROMPT, temperature=0.0, ignore_eos=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    for concurrency in (1, LINES):
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(0, vocab, (PROMPT,)).tolist())
                   for _ in range(concurrency)]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        print(f"engine, {concurrency} at a time: {concurrency * PROMPT / seconds:.1f} output "
              "tok/s", flush=True)
    (steps,) = llm.collective_rpc("step_times")
    for entry in steps:
        if entry["phase"] == "decode" and entry["rows"] in (1, LINES) or \
                entry["phase"] == "prefill":
            print(f"engine {entry['phase']} of {entry['rows']} rows: {entry['steps']} steps, "
                  f"{entry['backend_ms']} ms in the backend, {entry['gap_ms']} ms between "
                  "steps", flush=True)
    return steps


# transformers' config class prefix, and what the family changes in SmolLM2's shape.
FAMILY_SHAPES = {
    "llama": ("Llama", {}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 64}),
    "mixtral": ("Mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2,
                            "intermediate_size": 384}),
}


def random_model(family: str, folder: str) -> str:
    """A random bf16 model of ``family`` in the default model's shape, saved in ``folder``."""
    import transformers

    with open(os.path.join(default_model_path(), "config.json")) as f:
        base = json.load(f)
    prefix, changes = FAMILY_SHAPES[family]
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "max_position_embeddings")
    cfg = getattr(transformers, f"{prefix}Config")(**{**{k: base[k] for k in keep if k in base},
                                                       **changes})
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def machine_pace(when: str) -> dict:
    """roofline.pace with this run's threads, printed: the figures of a run are read
    against the machine's speed before and after it (a VM's moves 2x within minutes)."""
    threads = torch.get_num_threads()
    now = pace(threads)  # sets torch's threads: to the same count
    print(f"machine pace {when}: read {now['read_gbs']:.1f} GB/s, torch bf16 "
          f"{now['bf16_gflops']:.0f} GFLOP/s ({threads} threads)", flush=True)
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill-batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--kernel", default=None,
                        help=f"comma-separated variants to compare: {','.join(kernels.CHOICES)}")
    parser.add_argument("--family", choices=sorted(FAMILY_SHAPES), default=None,
                        help="a random model of this family in SmolLM2's shape")
    parser.add_argument("--quant", default="none",
                        help=f"comma-separated weight formats to compare: {','.join(QUANT)}")
    parser.add_argument("--kv-fp8", action="store_true", help="an fp8 KV cache")
    parser.add_argument("--phases", action="store_true",
                        help="also time each decode batch by phase of the native step")
    parser.add_argument("--engine", action="store_true",
                        help="also time the steps inside vLLM's engine (worker/step_times.py)")
    args = parser.parse_args()
    model = args.model or default_model_path()
    scratch = None
    if args.family:
        scratch = tempfile.TemporaryDirectory()
        model = random_model(args.family, scratch.name)
    flags = kernels.vector_flags()
    result = {
        "model": f"random {args.family}" if args.family else os.path.basename(model),
        "dtype": args.dtype,
        "compute_dtype": str(compute_dtype(getattr(torch, args.dtype), kernels.chosen())),
        "threads": torch.get_num_threads(),
        "cpu": kernels.cpu_model(),
        "isa": flags,
        "runs": [],
    }
    print(f"{result['model']} on {result['cpu']}, {os.cpu_count()} cores, ISA {' '.join(flags)}; "
          f"{args.dtype} computed in {result['compute_dtype']}", flush=True)
    result["pace_before"] = machine_pace("before")
    variants = args.kernel.split(",") if args.kernel else [None]
    for kernel, quant in itertools.product(variants, args.quant.split(",")):
        result["runs"].append(measure(model, args.dtype, kernel, quant, args))
        if args.engine:
            result["runs"][-1]["engine_steps"] = engine_steps(model, args.dtype)
    result["pace_after"] = machine_pace("after")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", "cpu_backend.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
