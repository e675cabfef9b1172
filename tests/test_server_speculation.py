"""Speculative decoding through the OpenAI-compatible server (``--speculative-config``), on
the CPU backend and on the NxDI backend over its simulator: greedy completions equal HF
transformers', streamed or not, concurrent; a stop string inside an accepted run cuts the
text there; sampled requests with top_k in the body are served; a structured-output request
(sampled on the host, one token a step) is served beside speculating ones on the CPU and
refused with HTTP 400 on NxDI; and /metrics carries vLLM's spec-decode counters (the target
as its own draft: every proposal accepted)."""

from __future__ import annotations

import concurrent.futures
import json
import shutil

import pytest
import requests

from tests.conftest import hf_greedy
from tests.engine_checks import nxdi_simulator_server_env

PROMPT = [1, 504, 3202, 314, 4649, 314]
N = 3


@pytest.fixture(scope="module", params=["cpu", "nxdi-simulator"])
def server(request, tiny_chat, tiny_chat_server, tmp_path_factory):
    draft = shutil.copytree(tiny_chat, tmp_path_factory.mktemp("draft") / "self")
    env = {}
    if request.param == "nxdi-simulator":
        env |= nxdi_simulator_server_env(tmp_path_factory)
    spec = json.dumps({"model": str(draft), "num_speculative_tokens": N})
    running = tiny_chat_server("--max-num-seqs=4", "--max-model-len=128", "--dtype=float32",
                               "--speculative-config", spec, env=env)
    running.backend = request.param
    return running


def complete(server, prompt=PROMPT, **body) -> requests.Response:
    body = {"model": server.model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True} | body
    return requests.post(server.url + "/v1/completions", json=body, timeout=120,
                         stream=bool(body.get("stream")))


def counters(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_per_pos" not in line:
            name = line.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_greedy_completions_equal_hf_and_every_proposal_is_accepted(server, tiny_chat):
    before = counters(server)
    prompts = [PROMPT, [1, 20, 30, 40], [1, 7] * 9]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(server, p, max_tokens=13), prompts))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    got = [r.json()["choices"][0]["token_ids"] for r in answers]
    assert got == hf_greedy(tiny_chat, prompts, [13] * 3)
    after = counters(server)
    proposed = (after["vllm:spec_decode_num_draft_tokens_total"]
                - before.get("vllm:spec_decode_num_draft_tokens_total", 0))
    accepted = (after["vllm:spec_decode_num_accepted_tokens_total"]
                - before.get("vllm:spec_decode_num_accepted_tokens_total", 0))
    assert proposed > 0 and accepted == proposed


def test_streaming_gives_the_same_text(server):
    whole = complete(server).json()["choices"][0]["text"]
    r = complete(server, stream=True)
    assert r.status_code == 200
    parts = []
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            parts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(parts) == whole


def test_a_stop_string_inside_an_accepted_run_cuts_the_text_there(server):
    text = complete(server, max_tokens=30).json()["choices"][0]["text"]
    middle = len(text) // 2
    stop = text[middle:middle + 4]
    r = complete(server, max_tokens=30, stop=[stop])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_sampled_chat_with_top_k_in_the_body_is_served(server):
    r = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": server.model, "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 10, "temperature": 0.8, "top_k": 5, "top_p": 0.9})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_structured_output_beside_speculating_requests(server, tiny_chat):
    """The JSON-schema request is sampled on the host from the first position's logits;
    the greedy requests beside it still speculate and keep HF's tokens."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}},
              "required": ["n"], "additionalProperties": False}
    structured = {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "n", "schema": schema}}}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        plain = [pool.submit(complete, server, [1, 30 + i, 40], max_tokens=10) for i in range(2)]
        r = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": server.model, "messages": [{"role": "user", "content": "A number?"}],
            "max_tokens": 24, "temperature": 0, **structured})
        got = [f.result().json()["choices"][0]["token_ids"] for f in plain]
    assert got == hf_greedy(tiny_chat, [[1, 30, 40], [1, 31, 40]], [10, 10])
    if server.backend == "nxdi-simulator":  # NxDI's fused graph returns no logits
        assert r.status_code == 400 and "turn speculative decoding off" in r.text, r.text
        return
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content)["n"], int), content
