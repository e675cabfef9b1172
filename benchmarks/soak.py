"""Soak: steady load on one server for minutes; requests served, errors, latency, memory.

A closed loop of 2 x max_num_seqs clients (so a queue always waits) sends
completions, streamed and not, with prompts of several lengths and a fixed
number of output tokens, for ``--minutes``. It reports requests served, errors
(anything but a complete 200), p50/p99 latency, and the resident memory of the
server's whole process tree (API server, engine core, helpers) after a warm-up
and at the end: growth must stay under 5%, else the exit status is 1. Then it
stops the server with SIGTERM and checks it exits 0. Not part of the tests.

    .venv/bin/python benchmarks/soak.py                # 10 minutes, SmolLM2
    .venv/bin/python benchmarks/soak.py --minutes 1    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import requests

from vllm_neuronx.default_model import default_model_path

MAX_RSS_GROWTH = 0.05
WORDS = ("river", "mountain", "engine", "garden", "signal", "harbor", "lantern", "forest",
         "market", "winter", "compass", "letter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def start_server(args, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--host", "127.0.0.1", "--port", str(port), "--device", "neuron",
            "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
            "--dtype", args.dtype, "--shutdown-timeout", "30"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server did not start; see {log.name}")


class Load:
    """Closed-loop clients; each records (latency, ok) per request."""

    def __init__(self, url: str, args) -> None:
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.tokens = 0

    def prompt(self, rng: random.Random) -> str:
        words = rng.randint(3, self.args.max_prompt_words)
        return " ".join(rng.choice(WORDS) for _ in range(words))

    def one(self, session: requests.Session, rng: random.Random) -> None:
        stream = rng.random() < 0.5
        body = {"model": self.args.model, "prompt": self.prompt(rng), "temperature": 0,
                "max_tokens": self.args.max_tokens, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        try:
            r = session.post(self.url + "/v1/completions", json=body, timeout=300, stream=stream)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            if stream:
                chunks = [json.loads(ln.removeprefix(b"data: ")) for ln in r.iter_lines()
                          if ln.startswith(b"data: {")]
                finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
                usage = chunks[-1]["usage"]
            else:
                reply = r.json()
                finish, usage = [reply["choices"][0]["finish_reason"]], reply["usage"]
            tokens = usage["completion_tokens"]
            if tokens != self.args.max_tokens or finish[-1] != "length":
                raise RuntimeError(f"incomplete: {tokens} of {self.args.max_tokens} tokens, "
                                   f"finish_reason {finish[-1]!r}")
        except Exception as e:  # every failure counts; the first few are shown
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            return
        with self.lock:
            self.latencies.append(time.perf_counter() - start)
            self.tokens += tokens

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while not self.stop.is_set():
                self.one(session, rng)

    def run(self, seconds: float, on_tick) -> None:
        threads = [threading.Thread(target=self.client, args=(i,))
                   for i in range(2 * self.args.max_num_seqs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            on_tick()
        self.stop.set()
        for t in threads:
            t.join()


def wait_idle(url: str, timeout: float = 30.0) -> bool:
    """Whether /metrics shows nothing running or waiting once the clients stopped."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = requests.get(url + "/metrics", timeout=30).text
        busy = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))]
        if not any(busy):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-words", type=int, default=60)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="load before the first memory sample (default: 10%% of the run, "
                             "at most 60 s)")
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    seconds = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, seconds / 10)

    with tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log",
                                     delete=False) as log:
        proc, url = start_server(args, log)
        try:
            load = Load(url, args)
            samples: list[tuple[float, int]] = []
            rss_ready = tree_rss(proc.pid)
            begin = time.monotonic()
            load.run(warmup + seconds,
                     lambda: samples.append((time.monotonic() - begin, tree_rss(proc.pid))))
            after_warmup = [rss for t, rss in samples if t >= warmup]
            rss_start, rss_end = after_warmup[0], after_warmup[-1]
            idle = wait_idle(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_status = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_status = "killed after 120 s"

    served, errors = len(load.latencies), len(load.errors)
    growth = rss_end / rss_start - 1
    result = {
        "minutes": args.minutes, "warmup_s": warmup, "concurrency": 2 * args.max_num_seqs,
        "max_num_seqs": args.max_num_seqs, "max_tokens": args.max_tokens, "model": args.model,
        "served": served, "errors": errors, "first_errors": load.errors[:5],
        "requests_per_s": served / (warmup + seconds),
        "tokens_per_s": load.tokens / (warmup + seconds),
        "p50_s": percentile(load.latencies, 0.50), "p99_s": percentile(load.latencies, 0.99),
        "rss_ready_mib": rss_ready / 2**20, "rss_start_mib": rss_start / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "rss_max_mib": max(rss for _, rss in samples) / 2**20, "rss_growth": growth,
        "idle_after": idle, "exit_status": exit_status, "server_log": log.name,
        "rss_samples_mib": [(round(t, 1), round(rss / 2**20, 1)) for t, rss in samples],
    }
    print(f"{args.minutes:g} min (+{warmup:.0f} s warm-up) at concurrency {2 * args.max_num_seqs}"
          f" (max_num_seqs={args.max_num_seqs}), {args.max_tokens} tokens per request")
    print(f"served {served} requests ({result['requests_per_s']:.2f}/s, "
          f"{result['tokens_per_s']:.1f} tokens/s), errors {errors}")
    for line in load.errors[:5]:
        print(f"  error: {line}")
    print(f"latency p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s")
    print(f"RSS (server tree): idle {result['rss_ready_mib']:.0f} MiB, after warm-up "
          f"{result['rss_start_mib']:.0f} MiB, end {result['rss_end_mib']:.0f} MiB, max "
          f"{result['rss_max_mib']:.0f} MiB; growth {100 * growth:+.1f}% "
          f"(limit {100 * MAX_RSS_GROWTH:.0f}%)")
    print(f"idle after the load: {idle}; exit status after SIGTERM: {exit_status}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    passed = errors == 0 and growth < MAX_RSS_GROWTH and idle and exit_status == 0
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
