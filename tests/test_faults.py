"""The backend fails mid-serving (VLLM_NEURONX_TEST_FAULT): the requests it hits get an
error, the server reports the engine dead and exits non-zero; it never hangs.

One server whose second prefill raises: a streaming request is decoding when a
non-streaming one arrives and its prefill fails, so both are hit by the same fault.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import psutil
import pytest
import requests
import torch

from tests.server_utils import engine_core, frozen, wait_for_log
from vllm_neuronx import faults
from vllm_neuronx.loader import load_backend
from vllm_neuronx.neuron_config import resolve_neuron_config
from vllm_neuronx.platform_config import NeuronSettings

EXIT_BOUND_S = 60


def test_fault_spec_is_checked():
    assert faults.parse("forward:3") == ("forward", 3)
    for bad in ("forward", "forward:0", "sample:1", "decode:x"):
        with pytest.raises(ValueError, match="VLLM_NEURONX_TEST_FAULT"):
            faults.parse(bad)


def test_the_chosen_call_of_its_kind_raises_and_no_other(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("VLLM_NEURONX_TEST_FAULT", "prefill:2")
    cfg = resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64, dtype="float32")
    backend, _ = load_backend(tiny_llama, NeuronSettings("cpu", "cpu", "cpu", cfg))
    greedy = torch.tensor([[1, 1.0, 1.0]])

    def prefill(line):
        return backend.forward(torch.tensor([[5, 6]]), torch.tensor([[0, 1]]),
                               torch.tensor([line]), greedy)

    def decode():
        return backend.forward(torch.tensor([[7]]), torch.tensor([[2]]), torch.tensor([0]), greedy)

    prefill(0)
    decode()
    with pytest.raises(faults.InjectedFault, match="prefill call 2"):
        prefill(1)
    assert prefill(1).tokens is not None and decode().tokens is not None


@pytest.fixture(scope="module")
def model(tiny_chat):
    return tiny_chat


@pytest.fixture(scope="module")
def server(tiny_chat_server):
    # --enable-log-requests: "Added request" says a request has gone to the engine core.
    return tiny_chat_server("--max-num-seqs=2", "--max-model-len=256", "--dtype=float32",
                            "--enable-log-requests",
                            env={"VLLM_NEURONX_TEST_FAULT": "prefill:2"})


def events(lines) -> list[str]:
    """The data lines of a server-sent event stream, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_engine_failure_errors_the_requests_then_the_server_exits_non_zero(server, model):
    engine = engine_core(server.proc)
    processes = psutil.Process(server.proc.pid).children(recursive=True)
    streaming = requests.post(
        server.url + "/v1/completions", stream=True, timeout=60,
        json={"model": model, "prompt": "Once upon a time", "max_tokens": 200,
              "ignore_eos": True, "temperature": 0, "stream": True},
    )
    lines = streaming.iter_lines(decode_unicode=True)
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The engine is held mid-stream until the second request has reached it: its
        # prefill, the second, raises while the stream is decoding, whatever the timing.
        with frozen(engine):
            plain = pool.submit(
                requests.post, server.url + "/v1/completions", timeout=60,
                json={"model": model, "prompt": "Hello", "max_tokens": 4},
            )
            assert wait_for_log(server, "Added request", count=2), server.output()
        rest = events(lines)
        answer = plain.result()

    # Non-streaming: HTTP 500 with a message in vLLM's error shape.
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError" and error["message"]
    # Streaming: tokens until the fault, then an error chunk, then [DONE].
    assert rest[-1] == "[DONE]", rest[-3:]
    chunk = json.loads(rest[-2])
    assert chunk["error"]["code"] == 500 and chunk["error"]["message"]
    assert all("error" not in json.loads(e) for e in rest[:-2])
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in rest[:-2])

    # /health never says healthy again: 503 while it still answers, then the process
    # exits with a non-zero status, engine core included, within the bound.
    deadline = time.monotonic() + EXIT_BOUND_S
    seen = []
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            seen.append(requests.get(server.url + "/health", timeout=2).status_code)
        except requests.RequestException:
            seen.append("no answer")
        time.sleep(0.2)
    assert server.proc.poll() == 1, f"still running or exited 0 after {EXIT_BOUND_S} s: {seen}"
    assert set(seen) <= {503, "no answer"}, seen
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, alive
    log = server.output()
    assert "InjectedFault: injected fault: prefill call 2" in log
    assert "The engine died; the server will exit with status 1" in log
