"""Server start-up: cold (no compiled artifacts) against warm (artifacts present).

Both starts serve the default model with the same arguments; the artifacts go to a
fresh NEURON_COMPILED_ARTIFACTS folder, so the first start compiles and the second
loads. Time is measured from process launch to the first successful completion.

It also measures the floor no backend can go below: a fresh interpreter importing
vLLM's API server, which every start does before anything of ours runs. Cold minus
warm is what the artifacts save (the compile); so the best warm / cold any backend
could show is floor / (floor + compile), and ours is judged against that.

    .venv/bin/python benchmarks/startup.py [--dtype bfloat16] [--max-model-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import requests

from vllm_neuronx.default_model import default_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_and_serve(model: str, args, env: dict) -> float:
    """Seconds from launch to the first completed request."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--device", "neuron",
            "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
            "--dtype", args.dtype]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=5, json={
                    "model": model, "prompt": "Hello", "max_tokens": 1})
                if r.status_code == 200:
                    return time.perf_counter() - start
            except requests.RequestException:
                pass
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def import_floor(runs: int = 2) -> float:
    """Fastest of ``runs`` fresh interpreters importing vLLM's API server module."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import vllm.entrypoints.openai.api_server"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=256)
    args = parser.parse_args()
    model = default_model_path()
    with tempfile.TemporaryDirectory() as artifacts:
        env = dict(os.environ, NEURON_COMPILED_ARTIFACTS=os.path.join(artifacts, "a"))
        cold = start_and_serve(model, args, env)
        warm = start_and_serve(model, args, env)
    floor = import_floor()
    best = floor / (floor + max(cold - warm, 0.0))
    print(f"cold start (compile + store): {cold:6.1f} s")
    print(f"warm start (load artifacts):  {warm:6.1f} s")
    print(f"warm / cold:                  {warm / cold:6.2f}")
    print(f"floor (import vLLM's server): {floor:6.1f} s")
    print(f"best reachable warm / cold:   {best:6.2f}  (floor / (floor + cold - warm))")
    print(f"ours against that:            {warm / cold / best:6.2f}x")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "startup.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"cold_s": cold, "warm_s": warm, "ratio": warm / cold, "import_floor_s": floor,
                   "best_reachable_ratio": best, **vars(args)}, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
