"""Overload (a bounded queue) and shutdown (SIGTERM while serving and while compiling).

One server with upstream's ``--max-num-queued-reqs`` and ``--shutdown-timeout``
serves the overload tests, then is stopped by the drain test (a new one starts
if a test needs it after). Past the bound a request gets HTTP 503 naming the
bound while the admitted ones finish exactly; on SIGTERM the requests accepted
finish, new ones are refused (HTTP 503, /metrics still open), and the process exits 0
with its artifacts whole. The engine core is held (SIGSTOP) wherever a test needs a
state to last until it has signalled and looked: no test depends on how fast a step is.
A SIGTERM during the first compile, before the server is up, stops it, and the
compile's temp folder goes with it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.server_utils import (
    api_server_argv,
    engine_core,
    first_chunk,
    free_port,
    frozen,
    kv_lines_in_use,
    signal_pending,
    suspend,
    wait_for_log,
    wait_until,
)
from vllm_neuronx.artifacts import MANIFEST, read_manifest
from vllm_neuronx.default_model import default_model_path

MAX_NUM_SEQS = 2
BOUND = 4
LONG = 100  # tokens: long enough to still run while the test acts
PROMPT = "The history of the lighthouse begins"
QUEUE_FULL = (f"The request queue is full: at most {BOUND} requests may be waiting or running "
              f"at once (--max-num-queued-reqs={BOUND})")
SHUTTING_DOWN = "The server is shutting down"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_chat) -> dict:
    base = tmp_path_factory.mktemp("overload")
    return {"model": tiny_chat, "artifacts": str(base / "artifacts" / "tiny")}


@pytest.fixture(scope="module")
def bounded(paths, tiny_chat_server):
    """A running bounded server; a fresh one after the drain test stopped the last."""
    return functools.partial(
        tiny_chat_server, f"--max-num-seqs={MAX_NUM_SEQS}", f"--max-num-queued-reqs={BOUND}",
        "--shutdown-timeout=120", "--max-model-len=128", "--dtype=float32",
        env={"NEURON_COMPILED_ARTIFACTS": paths["artifacts"], "VLLM_SERVER_DEV_MODE": "1"})


def request_body(server, max_tokens: int, **extra) -> dict:
    return {"model": server.model, "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}


def complete(server, max_tokens: int, timeout: float = 300, **extra) -> requests.Response:
    return requests.post(server.url + "/v1/completions",
                         json=request_body(server, max_tokens, **extra), timeout=timeout)


def open_stream(server, max_tokens: int) -> requests.Response:
    """Returns once the server answered the headers: the request is admitted."""
    r = requests.post(server.url + "/v1/completions",
                      json=request_body(server, max_tokens, stream=True), stream=True, timeout=300)
    assert r.status_code == 200, r.text
    return r


def read_stream(r: requests.Response, lines=None, text: str = "") -> tuple:
    """(text, finish_reason) of a stream; ``lines``/``text``: its iterator and what it
    gave already, when the test read its first chunks."""
    finish = None
    with r:
        for line in lines if lines is not None else r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            choice = json.loads(line.removeprefix(b"data: "))["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


def assert_refused(r: requests.Response, message: str) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "Service Unavailable" and error["code"] == 503
    assert error["message"].startswith(message), error["message"]


def test_past_the_bound_503_names_it_while_the_admitted_finish_exactly(bounded):
    server = bounded()
    alone = complete(server, LONG).json()["choices"][0]["text"]
    # The engine takes no step while the extra requests arrive: none of the admitted can
    # finish and free its place first, so every extra one is past the bound.
    with frozen(engine_core(server.proc)):
        admitted = [open_stream(server, LONG) for _ in range(BOUND)]  # 2 to run, 2 to wait
        with ThreadPoolExecutor(2 * BOUND) as pool:
            # A defect that let one in would leave it waiting on the held engine: the
            # timeout turns that into a failure.
            extra = list(pool.map(lambda i: complete(server, LONG, stream=i % 2 == 0,
                                                     timeout=60), range(2 * BOUND)))
    for r in extra:
        assert_refused(r, QUEUE_FULL)
    with ThreadPoolExecutor(BOUND) as pool:
        texts = list(pool.map(read_stream, admitted))
    assert texts == [(alone, "length")] * BOUND
    # The engine stays healthy: all lines free again, and the next request is served.
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert wait_until(lambda: kv_lines_in_use(server) == 0)
    assert complete(server, LONG).json()["choices"][0]["text"] == alone


def test_a_request_whose_n_exceeds_the_bound_is_refused_naming_n(bounded):
    r = complete(bounded(), 4, n=BOUND + 1)
    assert_refused(r, QUEUE_FULL)
    assert f"n={BOUND + 1}" in r.json()["error"]["message"]


def test_sigterm_finishes_the_accepted_requests_and_exits_0(bounded, paths):
    server = bounded()
    alone = complete(server, LONG).json()["choices"][0]["text"]
    engine = engine_core(server.proc)
    processes = psutil.Process(server.proc.pid).children(recursive=True)
    running = open_stream(server, LONG)
    lines, text = first_chunk(running)  # decoding
    # Held from here until the drain has begun: no request can end before the signal.
    with frozen(engine):
        waiting = [open_stream(server, LONG) for _ in range(2)]  # accepted, not started
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for_log(server, "Shutting down: draining 3 HTTP request(s)"), \
            server.output()
    with ThreadPoolExecutor(3) as pool:
        results = [pool.submit(read_stream, running, lines, text),
                   *(pool.submit(read_stream, r) for r in waiting)]
        assert [f.result(timeout=180) for f in results] == [(alone, "length")] * 3
    assert server.proc.wait(timeout=120) == 0
    assert "the drain timed out" not in server.output()
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive
    parent = os.path.dirname(paths["artifacts"])
    assert not glob.glob(os.path.join(parent, ".compiling-*"))
    assert read_manifest(paths["artifacts"]) is not None


def test_while_draining_new_requests_get_503_and_metrics_stays_open(bounded):
    server = bounded()
    engine = engine_core(server.proc)
    stream = None
    try:
        with frozen(engine):  # the request cannot end: the drain lasts while it is held
            stream = open_stream(server, LONG)
            server.proc.send_signal(signal.SIGTERM)
            assert wait_for_log(server, "Shutting down: draining 1 HTTP request(s)"), \
                server.output()
            # uvicorn's own SIGTERM handler would stop accepting connections here: the
            # drain keeps SIGTERM to itself (patches/drain.py), so the door still answers.
            assert requests.get(server.url + "/metrics", timeout=3).status_code == 200
            assert requests.get(server.url + "/health", timeout=3).status_code == 503
            assert_refused(complete(server, 4, timeout=3), SHUTTING_DOWN)
    finally:
        if stream is not None:
            assert read_stream(stream)[1] == "length"
        assert server.proc.wait(timeout=120) == 0


COMPILE_FOREVER = """
import os, signal, sys, time
from vllm_neuronx import artifacts
signal.signal(signal.SIGTERM, lambda *_: print("noted", flush=True))  # as vLLM's engine core does
def compile_fn(folder):
    with open(os.path.join(folder, "weights.safetensors"), "wb") as f:
        f.write(b"partial")
    print("compiling", flush=True)
    while True:
        time.sleep(0.05)
artifacts.load_or_compile(folder=sys.argv[1], key="k", neuron_config={}, backend="cpu",
                          compile_fn=compile_fn, load_fn=lambda folder: None)
"""


def test_sigterm_during_a_compile_removes_its_temp_folder(tmp_path):
    folder = tmp_path / "artifacts"
    proc = subprocess.Popen([sys.executable, "-c", COMPILE_FOREVER, str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "compiling\n"
        assert glob.glob(str(tmp_path / ".compiling-*"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert proc.stdout.read() == "noted\n"  # the handler that was there ran first
    assert "compile interrupted by SIGTERM; removed the partial artifacts" in proc.stderr.read()
    assert not glob.glob(str(tmp_path / ".compiling-*")) and not folder.exists()


def test_sigterm_while_the_server_compiles_stops_it_without_partial_artifacts(tmp_path):
    folder = tmp_path / "artifacts" / "smollm2"
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            api_server_argv(default_model_path(), "--max-num-seqs=2", "--max-model-len=64",
                            "--host", "127.0.0.1", "--port", str(port)),
            env=dict(os.environ, NEURON_COMPILED_ARTIFACTS=str(folder)),
            stdout=log, stderr=subprocess.STDOUT,
        )
    temps = str(folder.parent / ".compiling-*")
    held: list[psutil.Process] = []

    def held_while_compiling() -> bool:
        """Stop the engine core; keep it stopped if it is inside the compile (its temp
        folder has files and no manifest yet), else let it go on."""
        if proc.poll() is not None:
            return True
        engines = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.name().startswith("VLLM::EngineCore")]
        if not engines:
            return False
        suspend(engines[0])
        inside = [t for t in glob.glob(temps)
                  if os.listdir(t) and MANIFEST not in os.listdir(t)]
        if inside:
            held.append(engines[0])
            return True
        engines[0].resume()
        return False

    try:
        assert wait_until(held_while_compiling, 240)
        assert proc.poll() is None and held, log_path.read_text()
        [engine] = held
        processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        # The server passes the signal on to the engine core; it takes it once let go.
        assert wait_until(lambda: signal_pending(engine), 60), log_path.read_text()
        engine.resume()
        assert proc.wait(timeout=120) == 0, log_path.read_text()
    finally:
        for engine in held:
            with contextlib.suppress(psutil.NoSuchProcess):
                engine.resume()
        proc.kill()
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive
    # The compile was stopped inside, and its own cleanup removed the temp folder (a
    # killed engine core would have left it). vLLM's engine-core handler raises
    # SystemExit, which passes through as it is: no "compile interrupted" line then.
    assert not glob.glob(temps) and not folder.exists()
    assert "Start-up stopped by SIGTERM" in log_path.read_text()
