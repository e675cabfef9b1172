"""200 streaming requests at once, a third cancelled by their clients mid-way.

After upstream's test_request_cancellation, on our platform: a burst far past
max_num_seqs (the queue grows: no bound is set), with about a third of the
clients hanging up at random points, some before their first token. Every
request left alone ends with the greedy text its prompt gets alone, from the
same server; afterwards nothing runs or waits, every KV line is free, and the
next request is served; with synchronous scheduling (the CPU default) and with vLLM's
asynchronous scheduling. A random-weight Llama with SmolLM2's tokenizer keeps it
fast; the burst takes well under a minute on two cores.
"""

from __future__ import annotations

import functools
import json
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server_utils import (
    engine_core,
    first_chunk,
    frozen,
    kv_lines_in_use,
    wait_for_log,
    wait_until,
)

MAX_NUM_SEQS = 8
BURST = 200
DISTINCT_PROMPTS = 10
MAX_TOKENS = 12
LONG = 200  # tokens: a stream still decoding long after its first chunk was read


@pytest.fixture(scope="module")
def servers(tiny_chat_server):
    """A running server (upstream's default: no drain on SIGTERM); a fresh one if the
    last was stopped."""
    return functools.partial(tiny_chat_server, f"--max-num-seqs={MAX_NUM_SEQS}",
                             "--max-model-len=256", "--dtype=float32",
                             env={"VLLM_SERVER_DEV_MODE": "1"})


def body(server, prompt: str, **extra) -> dict:
    return {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, **extra}


def stream(server, prompt: str, cancel_after: int | None) -> str | None:
    """The streamed text, or None when this client hung up after ``cancel_after`` chunks."""
    with requests.post(server.url + "/v1/completions", json=body(server, prompt, stream=True),
                       stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        if cancel_after is not None:
            lines = r.iter_lines()
            for _ in range(cancel_after):  # under load vLLM merges tokens into fewer chunks,
                if next(lines, None) is None:  # so the stream may end before the cancel point
                    break
            return None  # leaving the block closes the connection mid-stream
        text, finish = read_stream(r)
        assert finish == "length"
        return text


def read_stream(r: requests.Response, started=None) -> tuple[str, str | None]:
    """(text, finish_reason); ``started``: what ``first_chunk`` read of it already."""
    lines, text = started if started is not None else (r.iter_lines(), "")
    finish = None
    for line in lines:
        if not line or line == b"data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix(b"data: "))
        assert "choices" in chunk, chunk
        choice = chunk["choices"][0]
        text += choice["text"]
        finish = choice["finish_reason"] or finish
    return text, finish


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_burst_with_cancellations_serves_the_rest_exactly_and_frees_everything(servers,
                                                                              scheduling):
    # async: vLLM's asynchronous scheduling (issue 23), step N+1 staged while N runs
    server = servers() if scheduling == "sync" else servers("--async-scheduling")
    prompts = [f"Request {i}: write about the number {i * 7 + 3}." for i in range(DISTINCT_PROMPTS)]
    alone = [stream(server, p, None) for p in prompts]
    assert all(alone) and len(set(alone)) > 1

    rng = random.Random(7)
    plan = [(prompts[i % DISTINCT_PROMPTS],
             rng.randrange(MAX_TOKENS) if rng.random() < 1 / 3 else None) for i in range(BURST)]
    cancelled = sum(c is not None for _, c in plan)
    assert BURST // 4 < cancelled < BURST // 2

    most_waiting, done = 0.0, threading.Event()

    def watch_queue():
        nonlocal most_waiting
        while not done.is_set():
            most_waiting = max(most_waiting, metric(server, "vllm:num_requests_waiting"))
            time.sleep(0.25)

    finished_before = metric(server, "vllm:request_success_total")
    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    try:
        with ThreadPoolExecutor(BURST) as pool:
            results = list(pool.map(lambda job: stream(server, *job), plan))
    finally:
        done.set()
        watcher.join()

    for (prompt, cancel_after), text in zip(plan, results, strict=True):
        if cancel_after is None:
            assert text == alone[prompts.index(prompt)]
    # Unbounded: the queue grew far past the KV lines, and every request was answered.
    assert most_waiting > MAX_NUM_SEQS
    # Hung-up clients stopped their requests in the engine (upstream counts no aborts here).
    finished = metric(server, "vllm:request_success_total") - finished_before
    assert BURST - cancelled <= finished < BURST

    assert wait_until(lambda: metric(server, "vllm:num_requests_running") == 0
                      and metric(server, "vllm:num_requests_waiting") == 0)
    assert wait_until(lambda: kv_lines_in_use(server) == 0)
    assert stream(server, prompts[0], None) == alone[0]


def test_sigterm_without_drain_ends_running_streams_as_aborted_and_exits_0(servers):
    """Upstream's default --shutdown-timeout 0: nothing drains, but no client is left
    hanging on an open stream (which kept the server from exiting) or handed an error."""
    server = servers()
    engine = engine_core(server.proc)
    body_ = body(server, "Tell a long story.", stream=True, max_tokens=LONG)
    with frozen(engine):  # the three are prefilled together once the engine goes on
        responses = [requests.post(server.url + "/v1/completions", stream=True, timeout=120,
                                   json=body_) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    started = [first_chunk(r) for r in responses]  # each is decoding, far from its end
    with frozen(engine):  # none can finish before the signal is handled
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for_log(server, "Shutting down: ending 3 unfinished request(s) as "
                                    "aborted"), server.output()
    with ThreadPoolExecutor(len(responses)) as pool:
        ends = list(pool.map(read_stream, responses, started))
    # Every stream had tokens and ends with finish_reason "abort", short of max_tokens;
    # what each got is the start of the same greedy text.
    assert [finish for _, finish in ends] == ["abort"] * len(ends), ends
    longest = max((text for text, _ in ends), key=len)
    assert all(text and longest.startswith(text) for text, _ in ends), ends
    assert server.proc.wait(timeout=60) == 0
