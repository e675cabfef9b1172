"""Host overhead per decode step: vLLM's scheduler + our runner, around a backend whose
"device" takes a fixed time.

On Neuron a decode step of an 8B model takes about 10 ms on the device; whatever the
host adds per step (scheduling, input building, output handling) comes on top of it,
unless it runs while the device does (asynchronous scheduling, issue 23). This times the
decode steps at batch 1, 8 and 32 with a backend defined here (never shipped) that returns
token 5 for every row after sleeping ``--device-ms`` (a sleep releases the GIL, as a device
call does), with synchronous and asynchronous scheduling in one run, and reports the step
period and the exposed host time: period minus the device time (what the decode calls'
sleeps took, as a sleep overshoots).

    .venv/bin/python benchmarks/host_overhead.py [--steps 200] [--device-ms 0 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process

import torch  # noqa: E402

from vllm_neuronx.backends import ForwardOutput, NeuronBackend  # noqa: E402
from vllm_neuronx.backends.protocol import Batch  # noqa: E402


class NullBackend(NeuronBackend):
    """Honours the contract (every call is checked, as on a device) and returns token 5 for
    every row after ``device_s`` seconds."""

    framework = "null"
    device_s = 0.0
    # What the decode calls' sleeps took (a sleep overshoots by 0.1-0.2 ms: device time,
    # not the host's).
    slept_s = 0.0
    decodes = 0

    @property
    def vocab_size(self) -> int:
        return 512

    def compile(self, folder: str) -> None:
        open(os.path.join(folder, "weights.safetensors"), "wb").close()

    def _load(self, folder: str) -> None:
        self._tokens = torch.full((self.num_lines,), 5, dtype=torch.long)

    def _step(self, batch: Batch) -> ForwardOutput:
        if self.device_s:
            time.sleep(self.device_s)
        return ForwardOutput(tokens=self._tokens[: batch.size])

    prefill = _step

    def decode(self, batch: Batch) -> ForwardOutput:
        start = time.perf_counter()
        out = self._step(batch)
        NullBackend.slept_s += time.perf_counter() - start
        NullBackend.decodes += 1
        return out


def tiny_model(folder: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def measure(model: str, batch: int, steps: int, device_ms: float, async_: bool) -> dict:
    """One run of ``batch`` requests decoding ``steps`` tokens each. The runner's own step
    times give, per decode step, the backend's time and the gap the device thread waited
    for the host before it (worker/step_times.py): the host time exposed is the period
    (backend + gap) less the device's."""
    from vllm import LLM, SamplingParams

    NullBackend.slept_s, NullBackend.decodes = 0.0, 0
    llm = LLM(model=model, device="neuron", max_num_seqs=batch, max_model_len=steps + 64,
              skip_tokenizer_init=True, dtype="float32", async_scheduling=async_)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}] * batch, params, use_tqdm=False)
    (times,) = llm.collective_rpc("step_times")
    llm.llm_engine.engine_core.shutdown()
    decode = next(t for t in times if t["phase"] == "decode" and t["rows"] == batch)
    period_us = (decode["backend_ms"] + decode["gap_ms"]) * 1000
    device_us = NullBackend.slept_s / max(1, NullBackend.decodes) * 1e6
    return {"scheduling": "async" if async_ else "sync", "batch": batch,
            "device_ms": device_ms, "steps": decode["steps"], "period_us": period_us,
            "backend_us": decode["backend_ms"] * 1000, "gap_us": decode["gap_ms"] * 1000,
            "device_us": device_us, "exposed_host_us": period_us - device_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device-ms", type=float, nargs="+", default=[0.0, 5.0],
                        help="the fixed device time of every step (0: the host alone)")
    parser.add_argument("--scheduling", nargs="+", default=["sync", "async"],
                        choices=["sync", "async"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "host_overhead.json"))
    args = parser.parse_args()

    import vllm_neuronx.backends as backends

    backends._BACKENDS["cpu"] = f"{__name__}:NullBackend"  # this benchmark only
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(tmp)
        for device_ms in args.device_ms:
            NullBackend.device_s = device_ms / 1000
            for batch in args.batches:  # sync and async side by side, in one run
                rows += [measure(model, batch, args.steps, device_ms, mode == "async")
                         for mode in args.scheduling]
    from serving_report import machine_info

    machine = machine_info()
    print(f"host: {machine['cpu']}, {machine['cores']} cores, ISA {' '.join(machine['isa'])}")
    print(f"{'device ms':>9}  {'batch':>5}  {'scheduling':>10}  {'period µs':>9}  "
          f"{'backend µs':>10}  {'device µs':>9}  {'gap µs':>7}  {'exposed host µs':>15}")
    for r in rows:
        print(f"{r['device_ms']:>9g}  {r['batch']:>5}  {r['scheduling']:>10}  "
              f"{r['period_us']:>9.0f}  {r['backend_us']:>10.0f}  {r['device_us']:>9.0f}  "
              f"{r['gap_us']:>7.0f}  {r['exposed_host_us']:>15.0f}")
    out = args.out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
