"""The user guide's server command and client, through our platform on the CPU backend.

One server for the module (start-ups are the slow part): the guide's flags, plus an
API key and dev mode (for /collective_rpc, which reads the runner's KV line count).
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest
import requests
from vllm import LLM, SamplingParams

from tests.server_utils import Server, api_server_argv, wait_until
from tests.server_utils import kv_lines_in_use as _kv_lines_in_use
from vllm_neuronx.default_model import default_model_path

API_KEY = "test-key"
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def server():
    server = Server(
        api_server_argv(
            default_model_path(),
            f"--max-num-seqs={MAX_NUM_SEQS}", f"--max-model-len={MAX_MODEL_LEN}",
            "--tensor-parallel-size=8", "--device", "neuron",
            "--override-neuron-config", '{"enable_bucketing":false}', "--api-key", API_KEY,
        ),
        env={"VLLM_NEURON_FRAMEWORK": "neuronx-distributed-inference",
             "VLLM_SERVER_DEV_MODE": "1"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def kv_lines_in_use(server) -> int:
    return _kv_lines_in_use(server, API_KEY)


def wait_for_idle(server, timeout=30.0) -> None:
    assert wait_until(lambda: kv_lines_in_use(server) == 0, timeout)


def test_startup_logs_one_line_with_framework_device_buckets_and_lines(server):
    lines = [ln for ln in server.output().splitlines() if "Neuron ready:" in ln]
    assert len(lines) == 1
    for part in ("framework=neuronx-distributed-inference", "device=cpu", "context buckets=[128]",
                 "token buckets=[128]", f"KV lines={MAX_NUM_SEQS} x {MAX_MODEL_LEN}"):
        assert part in lines[0]
    assert server.output().count("no Neuron device found") == 1


def test_models_list(client, model):
    assert model == default_model_path()


@pytest.mark.parametrize("stream", [False, True])
def test_the_guide_client_chat_with_top_k(client, model, stream):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello, my name is Llama "}],
        max_tokens=32, temperature=1.0, top_p=1.0, stream=stream, extra_body={"top_k": 50},
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
    else:
        text = response.choices[0].message.content
    assert text.strip()


def test_chat_uses_smollm2_chat_template(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
    )
    # SmolLM2's template adds a system turn and the role markers around "Hi".
    assert r.usage.prompt_tokens > 10


@pytest.mark.parametrize("stream", [False, True])
def test_completions(client, model, stream):
    response = client.completions.create(model=model, prompt="The capital of France is",
                                         max_tokens=8, temperature=0, stream=stream)
    text = "".join(c.choices[0].text for c in response) if stream else response.choices[0].text
    assert "Paris" in text


def test_greedy_equals_offline_llm(client, model):
    prompt = "Once upon a time, in a small village,"
    online = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    llm = LLM(model=model, device="neuron", max_num_seqs=MAX_NUM_SEQS,
              max_model_len=MAX_MODEL_LEN, tensor_parallel_size=8,
              override_neuron_config={"enable_bucketing": False})
    offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24,
                                                    ignore_eos=True))
    del llm
    assert online.choices[0].text == offline[0].outputs[0].text


def test_streaming_delivers_tokens_as_they_are_generated(client, model):
    start = time.monotonic()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    arrivals, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(arrivals) >= 32
    # The first token arrives long before the last: streamed, not sent at the end.
    assert arrivals[0] < arrivals[-1] / 2
    assert len({round(t, 3) for t in arrivals}) > len(arrivals) // 2
    assert usage is not None and usage.completion_tokens == 64


def test_concurrency_twice_max_num_seqs_all_complete(client, model, server):
    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=40,
                                      temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(2 * MAX_NUM_SEQS) as pool:
        results = list(pool.map(one, range(2 * MAX_NUM_SEQS)))
    assert results == [40] * (2 * MAX_NUM_SEQS)
    wait_for_idle(server)
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    # Decode steps carried several requests at once (continuous batching, no collapse
    # to one request per step): the per-step token histogram has entries above 1.
    assert "vllm:num_requests_running" in metrics
    assert batched_steps(metrics) > 0


def batched_steps(metrics: str) -> float:
    """Steps that scheduled more than one token (vllm:iteration_tokens_total buckets)."""
    total = one = 0.0
    for line in metrics.splitlines():
        if line.startswith("vllm:iteration_tokens_total_count"):
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("vllm:iteration_tokens_total_bucket") and 'le="1.0"' in line:
            one += float(line.rsplit(" ", 1)[1])
    return total - one


def test_client_disconnect_frees_the_kv_line(server, model):
    body = {"model": model, "prompt": "Write a long essay.", "max_tokens": 100,
            "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        chunks = r.iter_lines()
        for _ in range(3):
            next(chunks)
        assert kv_lines_in_use(server) == 1
    wait_for_idle(server)
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": False,
                                                            "max_tokens": 5},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


BAD_REQUESTS = [
    ({"prompt": "word " * 200}, 400, "the model's context length is only 128 tokens"),
    ({"prompt": "hi", "max_tokens": 500}, 400, "cannot be greater than max_model_len"),
    ({"prompt": "word " * 100, "max_tokens": 60}, 400, "requested 60 output tokens. However, "
     "the model's context length is only 128 tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens must be at least 1"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature must be non-negative"),
    ({"prompt": "hi", "top_k": 300}, 400, "top_k=300 exceeds on-device sampling's global_topk"),
    ({"prompt": ""}, 400, "non-empty"),
    ({"prompt": [1, 2, 10**6]}, 400, "out of vocabulary"),
    ({"prompt": [1, -5, 3]}, 400, "token id -5 is out of vocabulary"),
    ({"prompt": "hi", "model": "no-such-model"}, 404, "does not exist"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_upstream_shape(server, model, body, status, message):
    r = requests.post(server.url + "/v1/completions", json={"model": model, **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and message in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("body", ["null", "true", "3", "[1]"])
def test_a_json_body_that_is_not_an_object_is_400(server, path, body):
    r = requests.post(server.url + path, data=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == f"The request body must be a JSON object, got '{body}'"


def test_malformed_json_is_400(server):
    r = requests.post(server.url + "/v1/chat/completions", data="{not json",
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert "JSON" in json.dumps(r.json())


def test_engine_survives_bad_input(client, model):
    r = client.completions.create(model=model, prompt="2 + 2 =", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_health_metrics_and_api_key(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert "vllm:" in requests.get(server.url + "/metrics", timeout=10).text
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert requests.get(server.url + "/v1/models", headers=bad, timeout=10).status_code == 401


@pytest.mark.parametrize("stream", [False, True])
def test_the_guide_client_script_runs(server, stream):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples/online_serving/neuron_client.py"
    argv = [sys.executable, str(script), "--base-url", server.url + "/v1", "--api-key", API_KEY]
    proc = subprocess.run(argv + (["--stream"] if stream else []), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# -- sampling on the host: every parameter honoured (the CPU backend returns logits) ----------
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_response_format_json_schema_is_enforced(client, model):
    import jsonschema

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person called Ann."}],
        max_tokens=48, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_chat_logprobs_are_real(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for position in content:
        top = [t.logprob for t in position.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert position.logprob == pytest.approx(top[0])  # greedy took the most likely
        assert top[0] < 0 and sum(2.718281828 ** v for v in top) <= 1.0 + 1e-4


def test_penalties_seed_and_bad_words_over_http(client, model):
    def complete(**extra):
        r = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=8, **extra)
        assert r.usage.completion_tokens > 0
        return r.choices[0].text

    # Greedy says "Paris" here (test_completions); a bad word it cannot say. vLLM 0.16 takes
    # bad_words on chat completions only (its completions request has no such field).
    for bad_words in ([], [" Paris", "Paris"]):
        r = client.chat.completions.create(
            model=model, max_tokens=16, temperature=0, extra_body={"bad_words": bad_words},
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert ("Paris" in r.choices[0].message.content) == (not bad_words), r
    complete(temperature=1.0, seed=11, presence_penalty=0.5, frequency_penalty=0.3,
             extra_body={"repetition_penalty": 1.1, "min_p": 0.05, "min_tokens": 2})


# -- best_of (completions): best_of candidates sampled, the n likeliest returned -------------
SAMPLED = {"prompt": "My favourite animal is", "max_tokens": 10, "temperature": 1.0, "seed": 1234}
CANDIDATES = MAX_NUM_SEQS + 1  # more children than KV lines: admitted as lines free up


def complete(server, model, path="/v1/completions", **body) -> requests.Response:
    return requests.post(server.url + path, json={"model": model, **body}, timeout=120,
                         headers={"Authorization": f"Bearer {API_KEY}"})


def score(choice) -> float:
    """Cumulative logprob: the sum of the sampled tokens' logprobs."""
    return sum(choice["logprobs"]["token_logprobs"])


@pytest.fixture(scope="module")
def candidates(server, model) -> dict:
    """What plain n=CANDIDATES gives (same seed): the candidates best_of chooses from."""
    r = complete(server, model, n=CANDIDATES, logprobs=2, **SAMPLED)
    assert r.status_code == 200, r.text
    assert len({c["text"] for c in r.json()["choices"]}) > 1  # best_of has a real choice
    return r.json()


def test_best_of_returns_the_likeliest_candidate_and_bills_all(server, model, candidates):
    r = complete(server, model, best_of=CANDIDATES, **SAMPLED)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["text"] == max(candidates["choices"], key=score)["text"]
    assert choice["index"] == 0 and choice.get("logprobs") is None  # not asked for
    assert r.json()["usage"] == candidates["usage"]  # every candidate's tokens counted
    wait_for_idle(server)


def test_best_of_returns_n_best_first_with_the_users_logprobs(server, model, candidates):
    r = complete(server, model, n=2, best_of=CANDIDATES, logprobs=2, **SAMPLED)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    ranked = sorted(candidates["choices"], key=score, reverse=True)[:2]
    assert [c["text"] for c in choices] == [c["text"] for c in ranked]
    assert [c["index"] for c in choices] == [0, 1]
    assert score(choices[0]) >= score(choices[1])
    for got, want in zip(choices, ranked, strict=True):
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(
            want["logprobs"]["token_logprobs"], abs=1e-4)
        assert all(len(top) <= 3 for top in got["logprobs"]["top_logprobs"])  # k + 1


def test_greedy_best_of_is_plain_greedy(server, model):
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    plain = complete(server, model, **body).json()
    best = complete(server, model, best_of=2, **body).json()
    assert best["choices"][0]["text"] == plain["choices"][0]["text"]
    # Greedy candidates would all be equal: one is generated, and counted.
    assert best["usage"] == plain["usage"]


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 1, "temperature": 1.0},
     "best_of=1 must be greater than or equal to n=2"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "cannot be streamed"),
    ("/v1/completions", {"prompt": "hi", "best_of": "3"}, "best_of must be an integer"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "use_beam_search": True},
     "cannot be combined with use_beam_search"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "best_of": 3},
     "not supported by chat completions"),
])
def test_best_of_refusals_are_400_in_upstream_shape(server, model, path, body, message):
    r = complete(server, model, path, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "best_of" and error["code"] == 400
    assert error["type"] == "BadRequestError" and message in error["message"]
