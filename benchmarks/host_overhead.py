"""Host overhead per decode step: vLLM's scheduler + our runner, with a backend that does no work.

On Neuron a decode step of an 8B model takes about 10 ms on the device; whatever the
host adds per step (scheduling, input building, output handling) comes on top of it.
This measures that cost with a null backend (defined here, never shipped), at batch
1, 8 and 32, by timing the engine core's step (schedule -> execute -> sample -> update).

    .venv/bin/python benchmarks/host_overhead.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process

import torch  # noqa: E402

from vllm_neuronx.backends import ForwardOutput, NeuronBackend  # noqa: E402


class NullBackend(NeuronBackend):
    """Honours the contract's shapes and returns token 5 for every row, instantly."""

    framework = "null"

    @property
    def vocab_size(self) -> int:
        return 512

    def compile(self, folder: str) -> None:
        open(os.path.join(folder, "weights.safetensors"), "wb").close()

    def load(self, folder: str) -> None:
        self._tokens = torch.full((self.num_lines,), 5, dtype=torch.long)

    def forward(self, input_ids, position_ids, seq_ids, sampling_params) -> ForwardOutput:
        return ForwardOutput(tokens=self._tokens[: input_ids.shape[0]])


def tiny_model(folder: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def measure(model: str, batch: int, steps: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, device="neuron", max_num_seqs=batch, max_model_len=steps + 64,
              skip_tokenizer_init=True, dtype="float32")
    core = llm.llm_engine.engine_core.engine_core
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    for i in range(batch):
        llm.llm_engine.add_request(f"r{i}", {"prompt_token_ids": [1, 2, 3, 4]}, params)
    while len(core.scheduler.running) < batch:  # prefill steps
        core.step()
    times, cpu = [], []
    for _ in range(steps - 2):
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        core.step()
        times.append((time.perf_counter_ns() - t) / 1000)
        cpu.append((time.thread_time_ns() - c) / 1000)
    del llm
    return {"batch": batch, "median_us": statistics.median(times),
            "p90_us": sorted(times)[int(len(times) * 0.9)],
            "median_cpu_us": statistics.median(cpu), "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    import vllm_neuronx.backends as backends

    backends._BACKENDS["cpu"] = f"{__name__}:NullBackend"  # this benchmark only
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(tmp)
        rows = [measure(model, b, args.steps) for b in args.batches]
    # CPU time tells the host's cost even when other processes share the cores.
    print(f"{'batch':>5}  {'median µs/step':>14}  {'p90 µs/step':>11}  {'cpu µs/step':>11}  "
          f"{'µs/step/seq':>11}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['median_us']:>14.0f}  {r['p90_us']:>11.0f}  "
              f"{r['median_cpu_us']:>11.0f}  {r['median_us'] / r['batch']:>11.1f}")
    out = os.path.join(os.path.dirname(__file__), "results", "host_overhead.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
