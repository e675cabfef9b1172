"""The user guide's server command and client, through our platform on the CPU backend.

One SmolLM2 server for the guide's tests (start-ups are the slow part): the guide's flags,
plus an API key, dev mode (for /collective_rpc, which reads the runner's KV line count) and
request logging (which says when a request has reached the engine). Host sampling is
checked against references on a second server, a tiny fp32 Llama whose logits HF
transformers computes in the test: logprobs are HF's log-softmax, and penalties, seeds and
min_p give the tokens their definitions give (tests/conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import json

import openai
import pytest
import requests
import torch
from vllm import LLM, SamplingParams

from tests.conftest import (
    SeededSampling,
    hf_causal_lm,
    hf_decode_with,
    hf_log_softmax,
    penalized,
)
from tests.server_utils import (
    Server,
    api_server_argv,
    engine_core,
    frozen,
    suspend,
    wait_for_log,
    wait_until,
)
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
            "--tensor-parallel-size=2", "--device", "neuron",
            "--override-neuron-config", '{"enable_bucketing":false}', "--api-key", API_KEY,
            "--enable-log-requests",  # "Aborted request": a hang-up reached the engine
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


@pytest.fixture(scope="module")
def smollm2_hf(model):
    """SmolLM2 in HF, on the bf16-rounded weights the server runs, computed in fp32."""
    return hf_causal_lm(model).to(torch.bfloat16).to(torch.float32)


@pytest.mark.parametrize("stream", [False, True])
def test_the_guide_client_chat_with_top_k(client, model, smollm2_hf, stream):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello, my name is Llama "}],
        max_tokens=32, temperature=1.0, top_p=1.0, stream=stream,
        extra_body={"top_k": 50, "return_token_ids": True},
    )
    if stream:
        chunks = [c for c in response if c.choices]
        # Fields of vLLM's beyond OpenAI's, present where set.
        prompt = next(c.prompt_token_ids for c in chunks if getattr(c, "prompt_token_ids", None))
        generated = sum((getattr(c.choices[0], "token_ids", None) or [] for c in chunks), [])
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        prompt, choice = response.prompt_token_ids, response.choices[0]
        generated, text, finish = choice.token_ids, choice.message.content, choice.finish_reason
    assert text.strip()
    assert (finish, len(generated)) == ("length", 32) or (finish == "stop" and generated)
    # Sampled (unseeded: no reference for the draw), each token among the 50 likeliest by
    # HF's logits at its position (a margin for fp32 summation order at rank 50).
    logprobs = hf_log_softmax(smollm2_hf, prompt + generated)
    for i, token in enumerate(generated):
        row = logprobs[len(prompt) - 1 + i]
        assert int((row > row[token] + 1e-3).sum()) < 50, (i, token)


def test_chat_uses_smollm2_chat_template(client, model):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    # SmolLM2's template adds a system turn and the role markers around "Hi".
    expected = AutoTokenizer.from_pretrained(model).apply_chat_template(
        messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(expected) > 10


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
              max_model_len=MAX_MODEL_LEN, tensor_parallel_size=2,
              override_neuron_config={"enable_bucketing": False})
    offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24,
                                                    ignore_eos=True))
    del llm
    assert online.choices[0].text == offline[0].outputs[0].text


def sse_events(response: requests.Response) -> list[dict]:
    """The JSON events of a server-sent event stream, [DONE] checked and dropped."""
    lines = [ln for ln in response.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_streaming_delivers_the_tokens_in_pieces_equal_to_the_whole_answer(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 64, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    whole = requests.post(server.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120).json()
    with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=120,
                       headers=headers, json={**body, "stream": True,
                                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    choices = [e["choices"][0] for e in events if e["choices"]]
    pieces = [c["token_ids"] for c in choices if c.get("token_ids")]
    # Token by token (a few at once at most, when the reader lags), not one piece at the end.
    assert len(pieces) > 1
    assert sum(pieces, []) == whole["choices"][0]["token_ids"]
    assert "".join(c["delta"].get("content") or "" for c in choices) == \
        whole["choices"][0]["message"]["content"]
    assert [c["finish_reason"] for c in choices][-1] == "length"
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 64 == whole["usage"]["completion_tokens"]


def test_concurrency_twice_max_num_seqs_all_complete(client, model, server):
    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=f"Count to {i}:", max_tokens=40,
                                      temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    before = step_counts(requests.get(server.url + "/metrics", timeout=10).text)
    added = server.output().count("Added request")
    with concurrent.futures.ThreadPoolExecutor(2 * MAX_NUM_SEQS) as pool:
        # All of them wait in the engine before it takes a step: twice as many as lines.
        with frozen(engine_core(server.proc)):
            futures = [pool.submit(one, i) for i in range(2 * MAX_NUM_SEQS)]
            assert wait_for_log(server, "Added request", count=added + 2 * MAX_NUM_SEQS)
        results = [f.result() for f in futures]
    assert results == [40] * (2 * MAX_NUM_SEQS)
    wait_for_idle(server)
    steps, one_token = (b - a for a, b in zip(before, step_counts(
        requests.get(server.url + "/metrics", timeout=10).text), strict=True))
    # Decode steps carried several requests at once (continuous batching, no collapse to
    # one request per step): one row per step would take a step per decoded token; here
    # a step carries more than two on average (about 80 steps: two waves of four).
    decoded = 2 * MAX_NUM_SEQS * 39  # each request's first token comes from its prefill
    assert steps < decoded / 2 and one_token < decoded / 2, (steps, one_token)


def step_counts(metrics: str) -> tuple[float, float]:
    """(engine steps, steps of one token) from vllm:iteration_tokens_total."""
    total = one = 0.0
    for line in metrics.splitlines():
        if line.startswith("vllm:iteration_tokens_total_count"):
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("vllm:iteration_tokens_total_bucket") and 'le="1.0"' in line:
            one += float(line.rsplit(" ", 1)[1])
    return total, one


def test_client_disconnect_frees_the_kv_line(server, model):
    body = {"model": model, "prompt": "Write a long essay.", "max_tokens": 100,
            "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    finished = requests_finished(server)
    aborted = server.output().count("Aborted request")
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60,
                       headers=headers) as r:
        chunks = r.iter_lines()
        for _ in range(3):
            next(chunks)
        assert kv_lines_in_use(server) == 1
        engine = engine_core(server.proc)
        suspend(engine)  # held until the server has passed the hang-up on: it cannot finish
    try:
        assert wait_for_log(server, "Aborted request", count=aborted + 1), server.output()
    finally:
        engine.resume()
    wait_for_idle(server)
    # Stopped by the hang-up, not finished: upstream counts no aborted request here.
    assert requests_finished(server) == finished
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": False,
                                                            "max_tokens": 5},
                      headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def requests_finished(server) -> float:
    """vllm:request_success_total: requests that ended by a stop or their length."""
    text = requests.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


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


@pytest.mark.parametrize("tokens", [[1, -5], [9401848928103184384], [1, 10**6]])
def test_detokenize_ids_out_of_vocabulary_are_400(server, model, tokens):
    r = requests.post(server.url + "/detokenize", json={"model": model, "tokens": tokens},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "is out of vocabulary: token ids must be in [0, " in r.json()["error"]["message"]
    r = requests.post(server.url + "/detokenize", json={"model": model, "tokens": [1, 2]},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_null_generates_up_to_the_context(server, model, stream):
    """An explicit "max_tokens": null is the room left in the context (upstream 0.16
    generated it, then failed the response: patches/null_max_tokens.py)."""
    body = {"model": model, "prompt": "word " * 100, "max_tokens": None, "temperature": 0,
            "ignore_eos": True, "stream": stream, "stream_options": {"include_usage": True}
            if stream else None}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        usage = chunks[-1]["usage"]
    else:
        usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN


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


def test_bad_words_over_http(client, model):
    # Greedy says "Paris" here (test_completions); a bad word it cannot say. vLLM 0.16 takes
    # bad_words on chat completions only (its completions request has no such field).
    for bad_words in ([], [" Paris", "Paris"]):
        r = client.chat.completions.create(
            model=model, max_tokens=16, temperature=0, extra_body={"bad_words": bad_words},
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert ("Paris" in r.choices[0].message.content) == (not bad_words), r


# -- host sampling over HTTP against references: a tiny fp32 model, HF's logits ---------------
# Every position's logprobs are HF's log-softmax; penalties, seeds and min_p give the tokens
# their definitions give on HF's logits (tests/conftest.py writes them out).
TOL = 2e-4
TINY_PROMPT = [int(t) for t in torch.randint(3, 49152, (12,),
                                             generator=torch.Generator().manual_seed(5))]


@pytest.fixture(scope="module")
def tiny(tiny_chat_server):
    return tiny_chat_server("--max-num-seqs=4", "--max-model-len=256", "--dtype=float32")


@pytest.fixture(scope="module")
def tiny_hf(tiny_chat):
    return hf_causal_lm(tiny_chat)


def tiny_post(server, path: str, **body) -> dict:
    r = requests.post(server.url + path, timeout=120,
                      json={"model": server.model, "ignore_eos": True, "return_token_ids": True,
                            "return_tokens_as_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token[len("token_id:"):])


def check_top(got: dict[int, float], reference: torch.Tensor, k: int, token: int) -> None:
    """A position's {token: logprob} against HF's log-softmax row: the top k, plus the
    chosen token when it is not among them."""
    values, ids = reference.topk(k)
    assert set(got) == set(ids.tolist()) | {token}
    for t, value in got.items():
        assert value == pytest.approx(float(reference[t]), abs=TOL), t


def test_completion_logprobs_are_hf_log_softmax(tiny, tiny_hf):
    out = tiny_post(tiny, "/v1/completions", prompt=TINY_PROMPT, max_tokens=8, temperature=0,
                    logprobs=5, prompt_logprobs=3)
    choice = out["choices"][0]
    generated = choice["token_ids"]
    reference = hf_log_softmax(tiny_hf, TINY_PROMPT + generated)
    logprobs = choice["logprobs"]
    assert [token_id(t) for t in logprobs["tokens"]] == generated and len(generated) == 8
    for i, token in enumerate(generated):
        row = reference[len(TINY_PROMPT) - 1 + i]
        assert token == int(row.argmax())  # greedy
        assert logprobs["token_logprobs"][i] == pytest.approx(float(row[token]), abs=TOL)
        check_top({token_id(t): v for t, v in logprobs["top_logprobs"][i].items()}, row, 5,
                  token)
    # prompt_logprobs: position j, given the tokens before it.
    prompt_logprobs = choice["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(TINY_PROMPT)
    for j in range(1, len(TINY_PROMPT)):
        got = {int(t): v for t, v in prompt_logprobs[j].items()}
        row, token = reference[j - 1], TINY_PROMPT[j]
        assert got[token]["rank"] == int((row > row[token]).sum()) + 1
        check_top({t: v["logprob"] for t, v in got.items()}, row, 3, token)


def test_chat_logprobs_are_hf_log_softmax(tiny, tiny_hf):
    out = tiny_post(tiny, "/v1/chat/completions", max_tokens=6, temperature=0, logprobs=True,
                    top_logprobs=3, messages=[{"role": "user", "content": "Hi there"}])
    prompt, generated = out["prompt_token_ids"], out["choices"][0]["token_ids"]
    assert out["usage"]["prompt_tokens"] == len(prompt) and len(generated) == 6
    reference = hf_log_softmax(tiny_hf, prompt + generated)
    content = out["choices"][0]["logprobs"]["content"]
    assert [token_id(c["token"]) for c in content] == generated
    for i, (position, token) in enumerate(zip(content, generated, strict=True)):
        row = reference[len(prompt) - 1 + i]
        assert token == int(row.argmax())
        assert position["logprob"] == pytest.approx(float(row[token]), abs=TOL)
        top = {token_id(t["token"]): t["logprob"] for t in position["top_logprobs"]}
        assert len(position["top_logprobs"]) == 3
        check_top(top, row, 3, token)


@pytest.mark.parametrize("penalties", [
    {"repetition_penalty": 1.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4},
])
def test_penalties_give_what_their_definitions_give_on_hf_logits(tiny, tiny_hf, penalties):
    steps = 16
    out = tiny_post(tiny, "/v1/completions", prompt=TINY_PROMPT, max_tokens=steps,
                    temperature=0, **penalties)
    plain = tiny_post(tiny, "/v1/completions", prompt=TINY_PROMPT, max_tokens=steps,
                      temperature=0)
    args = {"repetition": penalties.get("repetition_penalty", 1.0),
            "presence": penalties.get("presence_penalty", 0.0),
            "frequency": penalties.get("frequency_penalty", 0.0)}
    reference = hf_decode_with(tiny_hf, TINY_PROMPT, steps,
                               lambda logits, p, g: penalized(logits, p, g, **args).argmax())
    assert out["choices"][0]["token_ids"] == reference
    assert reference != plain["choices"][0]["token_ids"]  # the penalties changed the output


def test_seed_and_min_p_give_vllms_seeded_draws_on_hf_logits(tiny, tiny_hf):
    steps = 12

    def sampled(**params) -> list[int]:
        return tiny_post(tiny, "/v1/completions", prompt=TINY_PROMPT, max_tokens=steps,
                         temperature=1.0, **params)["choices"][0]["token_ids"]

    def reference(seed: int, min_p: float = 0.0) -> list[int]:
        return hf_decode_with(tiny_hf, TINY_PROMPT, steps, SeededSampling(seed, 1.0, min_p))

    seeded = sampled(seed=11)
    assert seeded == reference(11)
    assert sampled(seed=11) == seeded  # the same seed, the same tokens
    assert sampled(seed=12) == reference(12) != seeded
    # min_p drops the unlikely tokens before the draw: with it the same seed draws
    # otherwise (the reference says so), and as the reference does.
    with_min_p = sampled(seed=11, min_p=0.3)
    assert with_min_p == reference(11, min_p=0.3) != seeded


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
