"""Multi-LoRA through the OpenAI-compatible server on the CPU backend and on the NxDI
simulator: ``--enable-lora --lora-modules``, the adapter chosen by the request's ``model``,
/v1/models listing the adapters, runtime load and unload (VLLM_ALLOW_RUNTIME_LORA_UPDATING),
and bad adapters refused by name (404 for a missing folder, 400 otherwise) while the server
keeps serving.
Tokens are checked against HF transformers with PEFT's unmerged adapter."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from tests.engine_checks import nxdi_simulator_server_env
from tests.lora_utils import make_peft_adapter, peft_greedy
from tests.server_utils import Server, api_server_argv

PROMPT = [1, 504, 3202, 314, 4649, 314]  # token ids, so HF sees exactly what the server does
MAX_RANK = 8


@pytest.fixture(scope="module")
def adapters(tiny_chat, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server-adapters")
    return {
        "a1": make_peft_adapter(tiny_chat, root / "a1", seed=1),
        "a2": make_peft_adapter(tiny_chat, root / "a2", seed=2, r=4,
                                targets=("q_proj", "v_proj", "up_proj")),
        "a3": make_peft_adapter(tiny_chat, root / "a3", seed=3),
        "big": make_peft_adapter(tiny_chat, root / "big", seed=4, r=16),
        "head": make_peft_adapter(tiny_chat, root / "head", seed=5, targets=("q_proj", "lm_head")),
    }


SERVER_ARGS = ("--max-num-seqs=4", "--max-model-len=128", "--dtype=float32", "--enable-lora",
               "--max-loras=2", f"--max-lora-rank={MAX_RANK}")
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


@pytest.fixture(scope="module", params=["cpu", "nxdi-simulator"])
def server(request, tiny_chat_server, adapters, tmp_path_factory):
    """The server on the CPU backend, and on the NxDI backend over its simulator (NxDI's
    LoRA id rules, caches and line bindings; tests/simulators), in a process of its own."""
    env = dict(RUNTIME)
    if request.param == "nxdi-simulator":
        env |= nxdi_simulator_server_env(tmp_path_factory)
    return tiny_chat_server(*SERVER_ARGS, "--lora-modules", f"a1={adapters['a1']}",
                            f"a2={adapters['a2']}", env=env)


def complete(server, model: str, prompt=PROMPT, max_tokens: int = 8) -> requests.Response:
    return requests.post(server.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})


def tokens(server, model: str, prompt=PROMPT, max_tokens: int = 8) -> list[int]:
    r = complete(server, model, prompt, max_tokens)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_models_lists_the_base_model_and_the_adapters(server, adapters):
    r = requests.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    cards = {m["id"]: m for m in r.json()["data"]}
    assert set(cards) >= {server.model, "a1", "a2"}
    assert cards["a1"]["root"] == adapters["a1"] and cards["a1"]["parent"] == server.model


def test_the_request_model_picks_the_adapter(server, tiny_chat, adapters):
    assert tokens(server, "a1") == peft_greedy(tiny_chat, adapters["a1"], [PROMPT], 8)[0]
    assert tokens(server, "a2") == peft_greedy(tiny_chat, adapters["a2"], [PROMPT], 8)[0]
    base = tokens(server, server.model)
    assert base == peft_greedy(tiny_chat, None, [PROMPT], 8)[0]
    assert base != tokens(server, "a1")


def test_concurrent_requests_over_more_adapters_than_slots(server, tiny_chat, adapters):
    """Three adapters and the base model at once with max_loras=2: every answer right."""
    r = requests.post(server.url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "c3", "lora_path": adapters["a3"]})
    assert r.status_code == 200, r.text
    models = ["a1", "a2", "c3", server.model] * 3
    prompts = [[1, 20 + i, 30 + i, 40] for i in range(len(models))]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda m, p: tokens(server, m, p, 6), models, prompts))
    paths = {"a1": adapters["a1"], "a2": adapters["a2"], "c3": adapters["a3"]}
    for name in ["a1", "a2", "c3", server.model]:
        rows = [i for i, m in enumerate(models) if m == name]
        expected = peft_greedy(tiny_chat, paths.get(name), [prompts[i] for i in rows], 6)
        assert [got[i] for i in rows] == expected, name


def test_an_unknown_model_is_404(server):
    r = complete(server, "no-such-adapter")
    assert r.status_code == 404, r.text
    assert "no-such-adapter" in r.json()["error"]["message"]


def test_load_use_and_unload_at_runtime(server, tiny_chat, adapters):
    r = requests.post(server.url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "a3", "lora_path": adapters["a3"]})
    assert r.status_code == 200, r.text
    models = {m["id"] for m in requests.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert "a3" in models
    assert tokens(server, "a3") == peft_greedy(tiny_chat, adapters["a3"], [PROMPT], 8)[0]
    r = requests.post(server.url + "/v1/unload_lora_adapter", timeout=60,
                      json={"lora_name": "a3"})
    assert r.status_code == 200, r.text
    assert complete(server, "a3").status_code == 404


@pytest.mark.parametrize(("name", "status", "problem"), [
    ("missing", 404, "No adapter found"),
    ("big", 400, "rank 16 is greater than max_lora_rank 8"),
    ("head", 400, "targets modules the model lacks"),
])
def test_a_bad_adapter_fails_its_load_only(server, tiny_chat, adapters, tmp_path, name, status,
                                           problem):
    path = str(tmp_path / "nothing-here") if name == "missing" else adapters[name]
    r = requests.post(server.url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": name, "lora_path": path})
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert f"LoRA adapter '{name}'" in message and problem in message, message
    assert complete(server, name).status_code == 404  # not registered
    # The server serves on, adapters and base model alike.
    assert tokens(server, "a1") == peft_greedy(tiny_chat, adapters["a1"], [PROMPT], 8)[0]
    assert server.proc.poll() is None


def test_a_bad_lora_module_stops_the_start_up_naming_it(tiny_chat, adapters):
    with pytest.raises(RuntimeError, match=r"LoRA adapter 'big' \(.*\): .*rank 16 is greater "
                                           "than max_lora_rank 8"):
        server = Server(api_server_argv(tiny_chat, *SERVER_ARGS, "--lora-modules",
                                        f"big={adapters['big']}"))
        server.stop()
