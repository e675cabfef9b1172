"""Prefix caching through the OpenAI-compatible server (``--enable-prefix-caching``), on
the CPU backend with chunked prefill as well and on the NxDI backend over its simulator:
completions sharing a prefix equal HF's, concurrent and again with the prefix cached;
/metrics counts the cache's queries and hits; on the CPU a prompt longer than the chunk
budget is served whole and equal; prompt_logprobs get HTTP 400 naming why."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from tests.conftest import hf_greedy
from tests.engine_checks import nxdi_simulator_server_env

SHARED = [1] + [20 + i for i in range(40)]


@pytest.fixture(scope="module", params=["cpu", "nxdi-simulator"])
def server(request, tiny_chat, tiny_chat_server, tmp_path_factory):
    flags = ["--max-num-seqs=4", "--max-model-len=256", "--dtype=float32",
             "--enable-prefix-caching", "--block-size=16"]
    env = {}
    if request.param == "nxdi-simulator":
        env |= nxdi_simulator_server_env(tmp_path_factory)
    else:
        flags += ["--enable-chunked-prefill", "--max-num-batched-tokens=48"]
    running = tiny_chat_server(*flags, env=env)
    running.backend = request.param
    return running


def complete(server, prompt, **body) -> requests.Response:
    body = {"model": server.model, "prompt": prompt, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True} | body
    return requests.post(server.url + "/v1/completions", json=body, timeout=120)


def prefix_counters(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_"):
            name = line.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def completions(server, prompts):
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(server, p), prompts))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    return [r.json()["choices"][0]["token_ids"] for r in answers]


def test_shared_prefixes_equal_hf_and_count_as_hits(server, tiny_chat):
    prompts = [SHARED + [300 + i, 7, 8 + i] for i in range(3)]
    expected = hf_greedy(tiny_chat, prompts, [10] * 3)
    before = prefix_counters(server)
    assert completions(server, prompts) == expected
    middle = prefix_counters(server)
    assert completions(server, prompts) == expected  # now cached: 2 blocks of 16 each
    after = prefix_counters(server)
    queries = "vllm:prefix_cache_queries_total"
    hits = "vllm:prefix_cache_hits_total"
    assert middle[queries] - before.get(queries, 0) == 3 * 44
    assert after[queries] - middle[queries] == 3 * 44
    assert after[hits] - middle[hits] == 3 * 32


def test_a_prompt_longer_than_the_chunk_budget_is_served_whole(server, tiny_chat):
    prompt = [1] + [(7 * i) % 400 + 30 for i in range(150)]
    assert completions(server, [prompt]) == hf_greedy(tiny_chat, [prompt], [10])


def test_prompt_logprobs_get_400_naming_why(server):
    r = complete(server, [1, 2, 3], prompt_logprobs=1)
    assert r.status_code == 400
    why = {"cpu": "not served with chunked prefill",  # the CPU scores prompts, unchunked
           "nxdi-simulator": "needs the logits on the host"}
    assert why[server.backend] in r.json()["error"]["message"]
