"""Every sampling parameter honoured or refused: requests that need more than
temperature/top_k/top_p are sampled on the host by upstream vLLM's sampler, in the
same batches as the requests sampled on the device; backends without logits
refuse them up front, naming the parameter and the override that enables it.

One LLM on a tiny random fp32 Llama for the module; references are computed with
Hugging Face transformers on the same weights.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from tests.conftest import (
    SeededSampling,
    hf_causal_lm,
    hf_decode_with,
    hf_greedy,
    hf_log_softmax,
    penalized,
)
from tests.server_utils import wait_until
from vllm_neuronx import neuron_config as nc
from vllm_neuronx import platform_config, sampling
from vllm_neuronx.backends import NeuronBackend, SamplingCapabilities, backend_class
from vllm_neuronx.platform_config import NeuronSettings
from vllm_neuronx.validation import NeuronRequestError, validate_request

MAX_NUM_SEQS = 3
TOL = 2e-4


@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32")
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return hf_causal_lm(tiny_llama)


def params(**kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 12)
    return SamplingParams(ignore_eos=True, detokenize=False, **kwargs)


def generate(llm, prompts, sampling_params) -> list:
    if isinstance(sampling_params, list) and len(prompts) < len(sampling_params):
        prompts = prompts * len(sampling_params)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def random_prompts(seed: int, count: int, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(2, longest))] for _ in range(count)]


def check_position(got: dict, reference: torch.Tensor, token: int, k: int) -> None:
    """One position's {token: Logprob} against HF's log-softmax row."""
    assert got[token].logprob == pytest.approx(float(reference[token]), abs=TOL)
    assert got[token].rank == int((reference > reference[token]).sum()) + 1
    values, ids = reference.topk(k)
    for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
        assert got[token_id].logprob == pytest.approx(value, abs=TOL)
    assert set(got) <= set(ids.tolist()) | {token}


# -- logprobs -----------------------------------------------------------------------------
def test_logprobs_and_prompt_logprobs_equal_hf_log_softmax(llm, hf_model):
    prompt = random_prompts(3, 1, longest=30)[0]
    out = generate(llm, [prompt], params(logprobs=3, prompt_logprobs=4))[0]
    generated = list(out.outputs[0].token_ids)
    reference = hf_log_softmax(hf_model, prompt + generated)
    assert out.prompt_logprobs[0] is None  # the first prompt token has no context
    assert len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        check_position(out.prompt_logprobs[j], reference[j - 1], prompt[j], 4)
    assert len(out.outputs[0].logprobs) == len(generated)
    for i, token in enumerate(generated):
        position = len(prompt) - 1 + i
        check_position(out.outputs[0].logprobs[i], reference[position], token, 3)
        assert token == int(reference[position].argmax())  # greedy
    total = sum(reference[len(prompt) - 1 + i, t] for i, t in enumerate(generated))
    assert out.outputs[0].cumulative_logprob == pytest.approx(float(total), abs=1e-3)


def test_one_token_prompt_has_no_prompt_logprobs_but_generates(llm):
    out = generate(llm, [[7]], params(max_tokens=3, prompt_logprobs=2, logprobs=0))[0]
    assert out.prompt_logprobs == [None]
    assert len(out.outputs[0].token_ids) == 3 and len(out.outputs[0].logprobs) == 3


def test_mixed_batch_is_greedy_equal_to_each_request_alone(llm, tiny_llama):
    prompts = random_prompts(5, 7)
    kinds = [params(), params(logprobs=2), params(prompt_logprobs=1), params(),
             params(logprobs=1, prompt_logprobs=0), params(), params(logprobs=5)]
    together = generate(llm, prompts, kinds)  # 7 requests, 3 lines: they join as lines free up
    alone = [generate(llm, [p], [k])[0] for p, k in zip(prompts, kinds, strict=True)]
    assert tokens(together) == tokens(alone) == hf_greedy(tiny_llama, prompts, [12] * 7)
    for a, b in zip(together, alone, strict=True):
        for x, y in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True):
            assert {t: v.logprob for t, v in x.items()} == pytest.approx(
                {t: v.logprob for t, v in y.items()}, abs=TOL)


# -- penalties ------------------------------------------------------------------------------
def hf_greedy_with(model, prompt: list[int], steps: int, adjust) -> list[int]:
    """Greedy decoding on HF's logits, each step's logits changed by
    ``adjust(logits, prompt + generated, generated)``."""
    return hf_decode_with(model, prompt, steps,
                          lambda logits, p, g: adjust(logits, p + g, g).argmax())


def test_repetition_penalty_matches_hf_logits_processor(llm, hf_model):
    from transformers import RepetitionPenaltyLogitsProcessor

    prompts = random_prompts(11, 2, longest=12)
    processor = RepetitionPenaltyLogitsProcessor(penalty=1.8)

    def penalize(logits, ids, _generated):
        return processor(torch.tensor([ids]), logits[None])[0]

    got = tokens(generate(llm, prompts, params(max_tokens=16, repetition_penalty=1.8)))
    plain = tokens(generate(llm, prompts, params(max_tokens=16)))
    assert got == [hf_greedy_with(hf_model, p, 16, penalize) for p in prompts]
    assert got != plain  # the penalty did change the output


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 0.7), (0.8, 0.4)])
def test_presence_and_frequency_penalties_match_openai_formula(llm, hf_model, presence,
                                                                frequency):
    prompts = random_prompts(13, 2, longest=12)

    def penalize(logits, _ids, generated):  # OpenAI: only generated tokens count
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long),
                                minlength=logits.shape[0]).float()
        return logits - frequency * counts - presence * (counts > 0).float()

    got = tokens(generate(llm, prompts, params(max_tokens=16, presence_penalty=presence,
                                               frequency_penalty=frequency)))
    plain = tokens(generate(llm, prompts, params(max_tokens=16)))
    assert got == [hf_greedy_with(hf_model, p, 16, penalize) for p in prompts]
    assert got != plain


# -- seeds, n ---------------------------------------------------------------------------------
def test_seed_gives_the_same_text_alone_and_in_any_batch(llm, hf_model):
    prompts = random_prompts(17, 6)
    seeded = params(temperature=1.0, seed=1234, max_tokens=16)
    alone = tokens(generate(llm, [prompts[0]], [seeded]))[0]
    others = [params(temperature=0.9), params(), params(temperature=1.0, seed=5),
              params(temperature=1.2, top_k=20, logprobs=1), params(temperature=0.7)]
    first = tokens(generate(llm, prompts, [seeded] + others))[0]
    # Later in the queue: it waits for a line and decodes beside different requests.
    last = tokens(generate(llm, prompts[1:] + prompts[:1], others + [seeded]))[-1]
    assert alone == first == last
    # The tokens vLLM's seeded sampling draws from HF's logits (tests/conftest.py).
    assert alone == hf_decode_with(hf_model, prompts[0], 16, SeededSampling(1234, 1.0))
    other_seed = tokens(generate(llm, [prompts[0]],
                                 [params(temperature=1.0, seed=99, max_tokens=16)]))[0]
    assert other_seed == hf_decode_with(hf_model, prompts[0], 16, SeededSampling(99, 1.0))
    assert other_seed != alone


def test_n_children_each_get_a_kv_line_and_their_own_seed(llm, hf_model):
    prompt = random_prompts(19, 1)[0]
    n = MAX_NUM_SEQS + 2  # more children than KV lines: admitted as lines free up
    out = generate(llm, [prompt], params(n=n, temperature=1.0, seed=42, max_tokens=10))[0]
    children = [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]
    assert len(children) == n and len({tuple(c) for c in children}) == n
    # vLLM fans n out as separate requests; child i samples with seed + i.
    singles = [tokens(generate(llm, [prompt], [params(temperature=1.0, seed=42 + i,
                                                       max_tokens=10)]))[0]
               for i in range(n)]
    assert children == singles
    assert children == [hf_decode_with(hf_model, prompt, 10, SeededSampling(42 + i, 1.0))
                        for i in range(n)]
    unseeded = generate(llm, [prompt], [params(n=n, temperature=1.0, max_tokens=10),
                                        params(n=2, temperature=1.0, max_tokens=10, logprobs=1)])
    assert [len(o.outputs) for o in unseeded] == [n, 2]
    assert all(len(c.token_ids) == 10 for o in unseeded for c in o.outputs)
    assert all(len(c.logprobs) == 10 for c in unseeded[1].outputs)
    # Finished ids reach the runner with the engine's next step: poll, do not race it.
    assert wait_until(lambda: llm.collective_rpc("kv_lines_in_use") == [0], timeout=30)


# -- the other host parameters ----------------------------------------------------------------
def test_allowed_tokens_logit_bias_min_p_and_min_tokens(llm, hf_model):
    prompt = random_prompts(23, 1)[0]
    allowed = tokens(generate(llm, [prompt], params(allowed_token_ids=[40, 41, 42],
                                                    temperature=1.0)))[0]
    assert set(allowed) <= {40, 41, 42}
    # Greedy among the allowed: the likeliest of them by HF's logits, at every step.
    allowed_ids = torch.tensor([40, 41, 42, 300, 301])
    got = tokens(generate(llm, [prompt], params(allowed_token_ids=allowed_ids.tolist())))[0]
    assert got == hf_decode_with(hf_model, prompt, 12,
                                 lambda logits, p, g: allowed_ids[logits[allowed_ids].argmax()])
    assert tokens(generate(llm, [prompt], params(logit_bias={77: 100.0})))[0] == [77] * 12
    greedy = tokens(generate(llm, [prompt], params()))[0]
    # A bias that changes some choices and not others: HF's logits plus the bias, argmax.
    bias = {greedy[0]: -3.0, greedy[3]: -2.0, 100: 2.5}
    biased = tokens(generate(llm, [prompt], params(logit_bias=bias)))[0]

    def add_bias(logits, _prompt, _generated):
        for t, b in bias.items():
            logits[t] += b
        return logits.argmax()

    assert biased == hf_decode_with(hf_model, prompt, 12, add_bias) != greedy
    # min_p keeps only tokens nearly as likely as the best one: sampling becomes greedy.
    assert tokens(generate(llm, [prompt], params(temperature=1.0, min_p=0.999, seed=3)))[0] \
        == greedy
    # A looser min_p: vLLM's seeded draw among the tokens min_p keeps, from HF's logits;
    # the same seed without min_p draws otherwise (the reference says so).
    with_min_p = tokens(generate(llm, [prompt], params(temperature=1.0, min_p=0.2, seed=3)))[0]
    reference = hf_decode_with(hf_model, prompt, 12, SeededSampling(3, 1.0, min_p=0.2))
    assert with_min_p == reference != hf_decode_with(hf_model, prompt, 12, SeededSampling(3))
    stop = 2  # biased up, it would end the output at once
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0, max_tokens=12, min_tokens=5, logit_bias={stop: 100.0},
        stop_token_ids=[stop], detokenize=False))[0].outputs[0]
    assert stop not in out.token_ids[:5]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == stop
    assert out.finish_reason == "stop"


# -- refusals: validation reads the selected backend's capabilities ---------------------------
def settings_with(caps: SamplingCapabilities, *, ods: bool = True) -> NeuronSettings:
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="float32", on_device_sampling_disabled=not ods)
    return NeuronSettings("neuronx-distributed-inference", "nxdi", "neuron", cfg, caps)


@pytest.fixture()
def active(monkeypatch):
    def use(settings: NeuronSettings) -> None:
        monkeypatch.setattr(platform_config, "_CURRENT", settings)

    return use


PROMPT = {"prompt_token_ids": [5, 6, 7]}
HOST_REQUESTS = [
    ("logprobs", dict(logprobs=2)),
    ("prompt_logprobs", dict(prompt_logprobs=1)),
    ("presence_penalty", dict(presence_penalty=0.5)),
    ("frequency_penalty", dict(frequency_penalty=0.5)),
    ("repetition_penalty", dict(repetition_penalty=1.2)),
    ("seed", dict(seed=7, temperature=0.8)),
    ("min_p", dict(min_p=0.1)),
    ("logit_bias", dict(logit_bias={5: 1.0})),
    ("allowed_token_ids", dict(allowed_token_ids=[5, 6])),
    ("bad_words", dict(bad_words=["hello"])),
    ("min_tokens", dict(min_tokens=3)),
    ("structured_outputs", dict(structured_outputs=StructuredOutputsParams(json={}))),
]


def test_every_host_parameter_is_listed_once():
    assert sorted(field for field, _ in HOST_REQUESTS) == sorted(sampling.HOST_PARAMETERS)


@pytest.mark.parametrize("field,kwargs", HOST_REQUESTS)
def test_without_logits_each_host_parameter_is_refused_by_name(active, field, kwargs):
    active(settings_with(NeuronBackend.sampling_capabilities({"on_device_sampling_config": {}})))
    with pytest.raises(NeuronRequestError, match=field) as err:
        validate_request(PROMPT, SamplingParams(**kwargs))
    assert isinstance(err.value, ValueError)  # offline LLM raises it; the server answers 400
    assert err.value.parameter == field
    if field != "prompt_logprobs":
        assert '"output_logits": true' in str(err.value)
        assert "NEURON_ON_DEVICE_SAMPLING_DISABLED=1" in str(err.value)


@pytest.mark.parametrize("field,kwargs", HOST_REQUESTS)
def test_with_logits_only_prompt_logprobs_is_refused(active, field, kwargs):
    active(settings_with(SamplingCapabilities(logits=True, prompt_logits=False)))
    if field == "prompt_logprobs":
        with pytest.raises(NeuronRequestError, match="prompt_logprobs=1 is not supported by "
                                                     "the nxdi backend"):
            validate_request(PROMPT, SamplingParams(**kwargs))
    else:
        validate_request(PROMPT, SamplingParams(**kwargs))


def test_plain_requests_and_greedy_seeds_need_no_logits(active):
    active(settings_with(SamplingCapabilities()))
    validate_request(PROMPT, SamplingParams(temperature=0.7, top_k=50, top_p=0.9))
    validate_request(PROMPT, SamplingParams(temperature=0, seed=3))  # greedy ignores seeds
    with pytest.raises(NeuronRequestError, match="top_k=300 exceeds on-device sampling's"):
        validate_request(PROMPT, SamplingParams(top_k=300))


def test_top_k_above_global_topk_is_served_on_the_host(active):
    active(settings_with(SamplingCapabilities(logits=True)))
    validate_request(PROMPT, SamplingParams(top_k=300, logprobs=1))


def test_capabilities_follow_the_compiled_config():
    ods = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=1, max_model_len=128,
                                   dtype="float32")
    no_ods = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=1, max_model_len=128,
                                      dtype="float32", on_device_sampling_disabled=True)
    with_logits = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=1, max_model_len=128,
                                           dtype="float32", overrides={"output_logits": True})
    nxdi = backend_class("nxdi")
    assert nxdi.sampling_capabilities(ods) == SamplingCapabilities(logits=False)
    assert nxdi.sampling_capabilities(no_ods) == SamplingCapabilities(logits=True)
    assert nxdi.sampling_capabilities(with_logits) == SamplingCapabilities(logits=True)
    cpu = backend_class("cpu")
    for cfg in (ods, no_ods):
        assert cpu.sampling_capabilities(cfg) == SamplingCapabilities(logits=True,
                                                                      prompt_logits=True)


def test_capabilities_travel_with_the_settings_to_the_engine_process(monkeypatch):
    monkeypatch.setattr(platform_config, "_CURRENT", platform_config.current())
    settings = settings_with(SamplingCapabilities(logits=True))
    config = SimpleNamespace(additional_config=None)
    settings.publish(config)
    assert platform_config.current() == settings
    platform_config._CURRENT = None  # as in a fresh engine-core process
    assert NeuronSettings.of(config) == settings
    assert platform_config.current() == settings


def test_a_config_without_settings_is_an_error_not_a_second_resolve():
    with pytest.raises(RuntimeError, match="carries no Neuron settings"):
        NeuronSettings.of(SimpleNamespace(additional_config={}))


def test_the_engine_serves_what_validation_accepts(llm):
    caps = NeuronSettings.of(llm.llm_engine.vllm_config).sampling
    assert caps == SamplingCapabilities(logits=True, prompt_logits=True)


def test_on_device_sampling_off_serves_both_kinds_from_the_logits(tiny_llama, hf_model):
    """NEURON_ON_DEVICE_SAMPLING_DISABLED's config: logits only, no device tokens; plain
    requests follow the device's rules on the host, the others upstream's sampler."""
    off = LLM(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32",
              override_neuron_config={"on_device_sampling_config": None})
    try:
        prompts = random_prompts(29, 4)
        outs = generate(off, prompts, [params(), params(logprobs=1), params(temperature=0.8),
                                       params(repetition_penalty=1.3)])
        got = tokens(outs)
        assert got[:2] == hf_greedy(tiny_llama, prompts[:2], [12, 12])
        reference = hf_log_softmax(hf_model, prompts[1] + got[1])
        for i, token in enumerate(got[1]):
            row = reference[len(prompts[1]) - 1 + i]
            check_position(outs[1].outputs[0].logprobs[i], row, token, 1)
        assert got[3] == hf_decode_with(
            hf_model, prompts[3], 12,
            lambda logits, p, g: penalized(logits, p, g, repetition=1.3).argmax())
        assert all(len(t) == 12 for t in got)
    finally:
        del off
