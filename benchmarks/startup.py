"""Server start-up: cold (no compiled artifacts) against warm (artifacts present).

Both starts serve the default model with the same arguments; the artifacts go to a
fresh NEURON_COMPILED_ARTIFACTS folder, so the first start compiles and the second
loads. Time is measured from process launch to the first successful completion.

It also measures the floor no backend can go below: a fresh interpreter importing
vLLM's API server, which every start does before anything of ours runs. Cold minus
warm is what the artifacts save (the compile); so the best warm / cold any backend
could show is floor / (floor + compile), and ours is judged against that.

    .venv/bin/python benchmarks/startup.py [--dtype bfloat16] [--max-model-len 256]

``--artifact-check`` measures instead what a warm start spends checking the
artifacts folder (vllm_neuronx/artifacts.py: a stat per file against the manifest)
on synthetic folders of 0.1, 1 and 10 GB, shaped like NxDI's sharded checkpoint
(one sparse file per rank, made instantly with truncate, removed after), against
the full SHA-256 ``verify``, which a start pays only once after a copy that lost
the mtimes.

    .venv/bin/python benchmarks/startup.py --artifact-check [--sizes-gb 0.1,1,10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
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


def synthetic_artifacts(folder: str, size: int, ranks: int) -> None:
    """An NxDI-shaped artifacts folder of ``size`` bytes in sparse files (all zeros,
    no disk used), with its manifest written as at store time."""
    from vllm_neuronx import artifacts

    os.makedirs(os.path.join(folder, "weights"))
    for rank in range(ranks):
        with open(os.path.join(folder, "weights", f"tp{rank}_sharded_checkpoint.safetensors"),
                  "wb") as f:
            f.truncate(size // ranks)
    with open(os.path.join(folder, "neuron_config.json"), "w") as f:
        json.dump({"neuron_config": {"tp_degree": ranks}}, f)
    artifacts._write_manifest(folder, "benchmark", {"tp_degree": ranks}, "nxdi")


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def artifact_check(sizes_gb: list[float], ranks: int, repeats: int) -> dict:
    """Warm-start check against full verification, over growing folders."""
    from vllm_neuronx import artifacts
    from vllm_neuronx.backends.cpu.kernels import cpu_model

    print(f"artifact check: {cpu_model()}, {os.cpu_count()} cores; {ranks} sparse shards + "
          f"neuron_config.json per folder; median of {repeats} checks")
    rows = []
    root = tempfile.mkdtemp(prefix="vllm-neuronx-artifact-check-")
    try:
        for gb in sizes_gb:
            folder = os.path.join(root, f"{gb}GB")
            store, _ = timed(lambda f=folder, g=gb: synthetic_artifacts(f, int(g * 1e9), ranks))
            warm, manifest = timed(lambda f=folder: artifacts.read_manifest(f), repeats)
            if manifest is None:
                raise SystemExit(f"{folder}: the warm-start check refused an intact folder")
            rows.append({"size_gb": gb, "store_manifest_s": store, "warm_check_s": warm})
            print(f"  {gb:6.1f} GB: warm-start check {warm * 1e3:7.2f} ms   "
                  f"(store-time manifest, hashing it all: {store:6.2f} s)")
        gb, folder = sizes_gb[0], os.path.join(root, f"{sizes_gb[0]}GB")
        full, (problems, _, hashed) = timed(lambda: artifacts.verify_folder(folder))
        if problems:
            raise SystemExit(f"verify found problems in an intact folder: {problems}")
        rate = hashed / full / 1e9
        print(f"  full verify at {gb} GB: {full:.2f} s ({rate:.2f} GB/s; a 140 GB 70B "
              f"checkpoint at this rate: {140 / rate / 60:.1f} min)")
        # A copy that loses the mtimes (cp -r): the next start hashes once, then is fast.
        later = time.time_ns() + 10**9
        for name in artifacts._files(folder):
            os.utime(os.path.join(folder, name), ns=(later, later))
        copied, manifest = timed(lambda: artifacts.read_manifest(folder))
        again, manifest_again = timed(lambda: artifacts.read_manifest(folder), repeats)
        if manifest is None or manifest_again is None:
            raise SystemExit(f"{folder}: the check refused an intact folder with new mtimes")
        print(f"  after a copy without mtimes, at {gb} GB: first check {copied:.2f} s "
              f"(hashes, records the mtimes), then {again * 1e3:.2f} ms")
        return {"cpu": cpu_model(), "ranks": ranks, "rows": rows, "verify_s": full,
                "verify_gb_per_s": rate, "after_copy_first_s": copied,
                "after_copy_next_s": again}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--artifact-check", action="store_true",
                        help="time the warm-start artifact check instead of server starts")
    parser.add_argument("--sizes-gb", default="0.1,1,10")
    parser.add_argument("--ranks", type=int, default=32, help="shards per synthetic folder")
    args = parser.parse_args()
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.artifact_check:
        sizes = [float(s) for s in args.sizes_gb.split(",")]
        figures = artifact_check(sizes, args.ranks, repeats=5)
        os.makedirs(results, exist_ok=True)
        with open(os.path.join(results, "artifact_check.json"), "w") as f:
            json.dump(figures, f)
        return
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
