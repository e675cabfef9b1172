"""Overload (a bounded queue) and shutdown (SIGTERM while serving and while compiling).

One server with upstream's ``--max-num-queued-reqs`` and ``--shutdown-timeout``
serves the overload tests, then is stopped by the drain test (a new one starts
if a test needs it after). Past the bound a request gets HTTP 503 naming the
bound while the admitted ones finish exactly; on SIGTERM the requests running
finish, new ones are refused, and the process exits 0 with its artifacts whole.
A SIGTERM during the first compile, before the server is up, stops it, and the
compile's temp folder goes with it.
"""

from __future__ import annotations

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

from tests.server_utils import api_server_argv, free_port, kv_lines_in_use, wait_until
from vllm_neuronx.artifacts import read_manifest
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


def complete(server, max_tokens: int, **extra) -> requests.Response:
    return requests.post(server.url + "/v1/completions",
                         json=request_body(server, max_tokens, **extra), timeout=300)


def open_stream(server, max_tokens: int) -> requests.Response:
    """Returns once the server answered the headers: the request is admitted."""
    r = requests.post(server.url + "/v1/completions",
                      json=request_body(server, max_tokens, stream=True), stream=True, timeout=300)
    assert r.status_code == 200, r.text
    return r


def read_stream(r: requests.Response) -> tuple:
    text, finish = "", None
    with r:
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            choice = json.loads(line.removeprefix(b"data: "))["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


def read_body_text(r: requests.Response) -> str:
    """The text of a completed answer, streamed (already read) or not."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        return "".join(c["choices"][0]["text"] for c in chunks)
    return r.json()["choices"][0]["text"]


def assert_refused(r: requests.Response, message: str) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "Service Unavailable" and error["code"] == 503
    assert error["message"].startswith(message), error["message"]


def test_past_the_bound_503_names_it_while_the_admitted_finish_exactly(bounded):
    server = bounded()
    alone = complete(server, LONG).json()["choices"][0]["text"]
    admitted = [open_stream(server, LONG) for _ in range(BOUND)]  # 2 running, 2 waiting
    with ThreadPoolExecutor(2 * BOUND) as pool:
        # Sent at once, long before the admitted finish; any let in as lines free up is
        # served like the rest.
        extra = list(pool.map(lambda i: complete(server, LONG, stream=i % 2 == 0),
                              range(2 * BOUND)))
        texts = list(pool.map(read_stream, admitted))
    refused = [r for r in extra if r.status_code != 200]
    assert refused
    for r in refused:
        assert_refused(r, QUEUE_FULL)
    for r in extra:
        if r.status_code == 200:
            assert read_body_text(r) == alone
    assert texts == [(alone, "length")] * BOUND
    # The engine stays healthy: all lines free again, and the next request is served.
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert wait_until(lambda: kv_lines_in_use(server) == 0)
    assert complete(server, LONG).json()["choices"][0]["text"] == alone


def test_a_request_whose_n_exceeds_the_bound_is_refused_naming_n(bounded):
    r = complete(bounded(), 4, n=BOUND + 1)
    assert_refused(r, QUEUE_FULL)
    assert f"n={BOUND + 1}" in r.json()["error"]["message"]


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(bounded, paths):
    server = bounded()
    alone = complete(server, LONG).json()["choices"][0]["text"]
    streams = [open_stream(server, LONG) for _ in range(3)]  # admitted: two run, one waits
    processes = psutil.Process(server.proc.pid).children(recursive=True)
    # At once: some may not have reached the engine yet, all were accepted and are served.
    server.proc.send_signal(signal.SIGTERM)
    with ThreadPoolExecutor(len(streams)) as pool:
        results = [pool.submit(read_stream, r) for r in streams]

        def refused() -> bool:
            try:
                return requests.get(server.url + "/health", timeout=5).status_code == 503
            except requests.ConnectionError:
                return True

        assert wait_until(refused, 30)
        try:
            assert_refused(complete(server, 4), SHUTTING_DOWN)
        except requests.ConnectionError:
            pass  # already closed: refused as well
        assert [f.result(timeout=180) for f in results] == [(alone, "length")] * 3
    assert server.proc.wait(timeout=120) == 0
    assert "Shutting down: draining 3 HTTP request(s)" in server.output()
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive
    parent = os.path.dirname(paths["artifacts"])
    assert not glob.glob(os.path.join(parent, ".compiling-*"))
    assert read_manifest(paths["artifacts"]) is not None


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
    try:
        temps = str(folder.parent / ".compiling-*")
        assert wait_until(lambda: glob.glob(temps) or proc.poll() is not None, 240)
        assert proc.poll() is None, log_path.read_text()
        processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()
    finally:
        proc.kill()
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive
    assert not glob.glob(temps)
    assert not folder.exists() or read_manifest(str(folder)) is not None
    assert "Start-up stopped by SIGTERM" in log_path.read_text()
