"""Schema fuzzing of the server (schemathesis, from the server's own /openapi.json).

Chat, completions, tokenize and detokenize get over 300 generated requests in three
shapes: as the schema allows, violating the schema, and "focused" (the served model,
the required field and a random subset of the other generated fields, so that more
requests get past the first check and reach the engine). A 4xx is fine; a 5xx, or a
5xx error event inside a 200 stream, is a bug; afterwards the engine still serves.
Generation is kept short (a tiny random model, max_model_len 48, n at most 4) so the
whole run takes a minute or two on two cores.
"""

from __future__ import annotations

import collections
import json
import random

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# Operation -> (examples, the body field it cannot do without).
OPERATIONS = {
    "/v1/chat/completions": (90, "messages"),
    "/v1/completions": (90, "prompt"),
    "/tokenize": (70, "prompt"),
    "/detokenize": (70, "tokens"),
}
MIN_EXAMPLES = 300


@pytest.fixture(scope="module")
def model(tiny_chat):
    return tiny_chat


@pytest.fixture(scope="module")
def server(tiny_chat_server):
    # n and best_of stay small: every request is short
    return tiny_chat_server("--max-num-seqs=4", "--max-model-len=48", "--dtype=float32",
                            env={"VLLM_MAX_N_SEQUENCES": "4"})


def cases(operation, model: str, required: str):
    positive = operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)
    negative = operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)

    def focus(case, rng: random.Random):
        if isinstance(case.body, dict):
            keep = {k: v for k, v in case.body.items() if k == required or rng.random() < 0.3}
            case.body = {**keep, "model": model}
        return case

    focused = st.tuples(positive, st.randoms(use_true_random=False)).map(lambda t: focus(*t))
    return st.one_of(positive, negative, focused)


def server_error(response) -> str | None:
    """A 5xx status, or a 5xx error event in a streamed 200, described; else None."""
    if response.status_code >= 500:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    content_type = response.headers.get("content-type") or [""]  # schemathesis: lists
    if content_type[0].startswith("text/event-stream"):
        for line in response.text.splitlines():
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                error = json.loads(data).get("error")
                if isinstance(error, dict) and int(error.get("code") or 0) >= 500:
                    return f"stream error event: {data[:300]}"
    return None


def test_fuzzing_finds_no_server_error_and_the_engine_still_serves(server, model):
    raw = requests.get(server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    sent = collections.Counter()
    statuses = collections.Counter()
    failures = []
    for path, (examples, required) in OPERATIONS.items():
        operation = schema[path]["POST"]

        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(operation, model, required))
        def send(case):
            response = case.call(base_url=server.url, timeout=120)
            sent[case.operation.path] += 1
            statuses[response.status_code // 100 * 100] += 1
            if problem := server_error(response):
                body = json.dumps(case.body, default=str)[:1000]
                failures.append(f"POST {case.operation.path} {body} -> {problem}")

        send()

    assert failures == [], "\n".join(failures)
    assert sum(sent.values()) >= MIN_EXAMPLES, sent
    assert statuses[200] and statuses[400], statuses  # both served and refused requests
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    r = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
