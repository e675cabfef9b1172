"""The serving benchmark's runs: the workload, child processes and their logs, a
server's start, RSS and stop, ``vllm bench serve`` against it, HF generate, the roofline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serving_report import bench_metrics

HERE = Path(__file__).resolve().parent


SERVED_NAME = "smollm2"


MAX_NUM_SEQS = 32


# Our buckets are powers of two: a 128-token prompt takes the 256 bucket (first fit is
# strictly larger), and 128 + 128 tokens fit 256; 512 leaves room for prompts the
# random dataset makes a token longer.
MAX_MODEL_LEN = 512


MINUTE = 60.0


INSTALL_TIMEOUT_S = 45 * MINUTE


BUILD_TIMEOUT_S = 90 * MINUTE


START_TIMEOUT_S = 15 * MINUTE


RUN_TIMEOUT_S = 45 * MINUTE


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    runs: tuple[tuple[int, int], ...]  # (concurrency, requests)


FULL = Workload(128, 128, ((1, 8), (32, 64)))


QUICK = Workload(128, 16, ((1, 2), (4, 4)))


# Long prompts (--long): 448 tokens in, 32 out, 4 at a time: the prefill's share of a
# request, where a prompt is longer than one native step holds.
LONG = Workload(448, 32, ((4, 16),))


class PeerUnavailable(Exception):
    """A peer could not be installed or started; the run goes on without it."""


def log(message: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_step(argv: list[str], what: str, log_path: Path, timeout: float,
             env: dict | None = None, cwd: Path | None = None) -> None:
    """Run one install step to a log file, with a progress line every minute.

    Raises PeerUnavailable (with the log's last lines) on failure or timeout.
    """
    log(f"{what} (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        next_note = start + MINUTE
        try:
            while proc.poll() is None:
                time.sleep(1)
                now = time.monotonic()
                if now - start > timeout:
                    raise PeerUnavailable(f"{what}: timed out after {timeout / MINUTE:.0f} "
                                          f"min (log: {log_path})")
                if now >= next_note:
                    log(f"  ... {what}: {(now - start) / MINUTE:.0f} min, "
                        f"{last_line(log_path)}")
                    next_note += MINUTE
        finally:
            stop_group(proc)
    if proc.returncode != 0:
        raise PeerUnavailable(f"{what}: exit {proc.returncode}: {last_line(log_path)} "
                              f"(log: {log_path})")
    log(f"  done in {time.monotonic() - start:.0f} s")


def last_line(path: Path, width: int = 120) -> str:
    """The last non-empty line of a log, shortened for a progress line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:width] if lines else ""


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """End a process we started in its own session, and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled 4x a second.

    Summed RSS counts pages shared between the processes (forked engine core) twice:
    an upper bound, applied the same way to every peer.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            self.peak_bytes = max(self.peak_bytes, self.sample())

    def peak_mb(self) -> float:
        return max(self.peak_bytes, self.sample()) / 1e6

    def stop(self) -> None:
        self._stop_event.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """How to start one peer's OpenAI-compatible server."""

    name: str
    argv: list[str]  # "{port}" is replaced by the port
    env: dict = field(default_factory=dict)
    ready_path: str = "/health"
    extra_body: dict | None = None  # sent with every request
    batches: bool = True  # False: serves one request at a time, so one warm-up is enough
    lora_modules: list[str] = field(default_factory=list)  # each request names one at random
    config: dict = field(default_factory=dict)  # recorded in the JSON


@dataclass
class RunningServer:
    port: int
    start_s: float
    sampler: RssSampler


@contextlib.contextmanager
def serve(spec: ServerSpec, log_path: Path) -> Iterator[RunningServer]:
    """Start a server, wait for its health check, and always stop it afterwards."""
    import requests

    port = free_port()
    argv = [arg.replace("{port}", str(port)) for arg in spec.argv]
    log(f"starting {spec.name} on 127.0.0.1:{port} (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **spec.env}, start_new_session=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            while True:
                if proc.poll() is not None:
                    raise PeerUnavailable(f"{spec.name} exited with {proc.returncode} while "
                                          f"starting: {last_line(log_path)}")
                if time.perf_counter() - start > START_TIMEOUT_S:
                    raise PeerUnavailable(f"{spec.name} did not answer within "
                                          f"{START_TIMEOUT_S / MINUTE:.0f} min")
                with contextlib.suppress(requests.RequestException):
                    url = f"http://127.0.0.1:{port}{spec.ready_path}"
                    if requests.get(url, timeout=5).status_code == 200:
                        break
                time.sleep(0.2)
            started = time.perf_counter() - start
            log(f"{spec.name} ready in {started:.1f} s")
            yield RunningServer(port, started, sampler)
        finally:
            sampler.stop()
            stop_group(proc)


def run_bench(server: RunningServer, spec: ServerSpec, workload: Workload, concurrency: int,
              requests: int, model: str, out_dir: Path) -> dict:
    """One ``vllm bench serve`` run against a running server; its metrics."""
    name = f"{spec.name}-c{concurrency}.json"
    argv = [
        str(Path(sys.executable).parent / "vllm"), "bench", "serve",
        "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.port}",
        "--endpoint", "/v1/completions", "--model", SERVED_NAME, "--tokenizer", model,
        "--dataset-name", "random", "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
        "--num-warmups", str(concurrency if spec.batches else 1), "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
        "--disable-tqdm",
    ]
    if spec.extra_body:
        argv += ["--extra-body", json.dumps(spec.extra_body)]
    if spec.lora_modules:
        argv += ["--lora-modules", *spec.lora_modules]
    (out_dir / name).unlink(missing_ok=True)
    run_step(argv, f"vllm bench serve: {spec.name}, concurrency {concurrency}, "
             f"{requests} requests", out_dir / f"{spec.name}-c{concurrency}.log",
             RUN_TIMEOUT_S)
    with open(out_dir / name) as f:
        return bench_metrics(json.load(f))


def bench_server(spec: ServerSpec, workload: Workload, model: str, out_dir: Path) -> list[dict]:
    """Start one server, run every (concurrency, requests) of the workload, stop it."""
    rows = []
    speculates = "speculative_config" in spec.config
    with serve(spec, out_dir / f"{spec.name}-server.log") as server:
        for concurrency, requests in workload.runs:
            before = spec_counters(server.port) if speculates else {}
            metrics = run_bench(server, spec, workload, concurrency, requests, model, out_dir)
            if speculates:
                metrics |= acceptance(before, spec_counters(server.port))
            rows.append({"peer": spec.name, "concurrency": concurrency, "requests": requests,
                         **metrics, "peak_rss_mb": server.sampler.peak_mb(),
                         "start_s": server.start_s})
            warn_if_short(spec.name, metrics, requests, workload.output_len)
            log(f"{spec.name} c={concurrency}: {metrics.get('output_throughput', 0):.1f} "
                f"output tok/s")
    return rows


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")


def spec_counters(port: int) -> dict[str, float]:
    """vLLM's spec-decode counters from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return parse_spec_counters(r.read().decode())


def parse_spec_counters(text: str) -> dict[str, float]:
    """SPEC_COUNTERS from Prometheus text, summed over their labels (engines)."""
    counts = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in counts:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return counts


def acceptance(before: dict, after: dict) -> dict:
    """One run's acceptance rate (accepted / proposed tokens) and mean accepted proposals
    per speculating step, from the counters around it."""
    drafts, proposed, accepted = (after[n] - before[n] for n in SPEC_COUNTERS)
    return {"acceptance": accepted / proposed if proposed else None,
            "accepted_per_step": accepted / drafts if drafts else None}


def warn_if_short(name: str, metrics: dict, requests: int, output_len: int) -> None:
    """Say so when a run did not complete every request at the full output length."""
    expected = requests * output_len
    if metrics.get("completed") != requests or metrics.get("total_output_tokens") != expected:
        log(f"WARNING {name}: {metrics.get('completed')}/{requests} requests completed, "
            f"{metrics.get('total_output_tokens')}/{expected} output tokens")


def bench_hf(workload: Workload, model: str, out_dir: Path) -> list[dict]:
    """HF generate in static batches, in a child process whose RSS we sample like a server's."""
    runs = ",".join(f"{c}x{n}" for c, n in workload.runs)
    argv = [sys.executable, str(HERE / "serving_hf.py"), "--model", model, "--runs", runs,
            "--input-len", str(workload.input_len), "--output-len", str(workload.output_len),
            "--threads", str(len(os.sched_getaffinity(0)))]
    log(f"hf: generate in static batches {runs} (log: {out_dir / 'hf.log'})")
    rows, ready = [], None
    deadline = time.monotonic() + START_TIMEOUT_S + RUN_TIMEOUT_S * len(workload.runs)
    with open(out_dir / "hf.log", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        timer = threading.Timer(deadline - time.monotonic(), stop_group, args=(proc,))
        timer.start()
        try:
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if "ready" in event:
                    ready = event["ready"]
                    log(f"hf ready in {ready:.1f} s")
                elif "run" in event:
                    concurrency, requests = (int(x) for x in event.pop("run").split("x"))
                    rows.append({"peer": "hf", "concurrency": concurrency,
                                 "requests": requests, **event,
                                 "peak_rss_mb": sampler.peak_mb(), "start_s": ready})
                    log(f"hf c={concurrency}: {event['output_throughput']:.1f} output tok/s")
            proc.wait()
        finally:
            timer.cancel()
            sampler.stop()
            stop_group(proc)
    if proc.returncode != 0 or len(rows) < len(workload.runs):
        raise PeerUnavailable(f"hf generate exited with {proc.returncode}: "
                              f"{last_line(out_dir / 'hf.log')}")
    return rows


def run_pace(out_dir: Path, label: str) -> dict | None:
    """roofline.py --pace in a child process (the servers' thread count): the machine's
    read GB/s and bf16 GFLOP/s now, before ``label``; None where it fails."""
    out = out_dir / f"pace-{label}.json"
    try:
        run_step([sys.executable, str(HERE / "roofline.py"), "--pace",
                  "--threads", str(len(os.sched_getaffinity(0))), "--json", str(out)],
                 f"the machine's pace ({label})", out_dir / "pace.log", 5 * MINUTE)
        with open(out) as f:
            return json.load(f)
    except (PeerUnavailable, OSError, ValueError) as e:
        log(f"pace failed: {e}")
        return None


def run_roofline(model: str, workload: Workload, out_dir: Path) -> dict | None:
    """benchmarks/roofline.py in a child process, with the servers' thread count."""
    out = out_dir / "roofline.json"
    concurrency = [str(c) for c, _ in workload.runs]
    try:
        run_step([sys.executable, str(HERE / "roofline.py"), "--model", model,
                  "--threads", str(len(os.sched_getaffinity(0))), "--json", str(out),
                  "--input-len", str(workload.input_len),
                  "--output-len", str(workload.output_len), "--concurrency", *concurrency],
                 "roofline: memory bandwidth and matmul rates", out_dir / "roofline.log",
                 20 * MINUTE)
    except PeerUnavailable as e:
        log(f"roofline failed: {e}")
        return None
    with open(out) as f:
        return json.load(f)
