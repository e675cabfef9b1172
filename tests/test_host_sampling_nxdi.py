"""The NxDI backend (against the NxDI simulator of tests/simulators) and host sampling:
compiled with ``output_logits`` it returns tokens and logits, and requests that need the
host are served from those logits; with on-device sampling alone they are refused up
front, naming the parameter and the override. prompt_logprobs is refused either way
(NxDI's context encoding returns the last position's logits only)."""

from __future__ import annotations

import pytest
from vllm import LLM, SamplingParams

from tests.conftest import (
    SeededSampling,
    hf_causal_lm,
    hf_decode_with,
    hf_greedy,
    hf_log_softmax,
    penalized,
)
from tests.engine_checks import use_simulator


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_simulator("neuronx_distributed_inference", "nxdi")


def make_llm(monkeypatch, model: str, artifacts, **overrides) -> LLM:
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(artifacts))
    return LLM(model=model, device="neuron", max_num_seqs=2, max_model_len=128,
               skip_tokenizer_init=True, dtype="float32", override_neuron_config=overrides)


def params(**kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0)
    return SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False, **kwargs)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]


def test_on_device_sampling_only_refuses_host_parameters_by_name(tiny_llama, tmp_path,
                                                                 monkeypatch):
    llm = make_llm(monkeypatch, tiny_llama, tmp_path / "ods")
    try:
        for kwargs, field in [(dict(logprobs=1), "logprobs"),
                              (dict(repetition_penalty=1.2), "repetition_penalty"),
                              (dict(seed=3, temperature=0.5), "seed")]:
            with pytest.raises(ValueError, match=rf"{field}=.*output_logits"):
                llm.generate([{"prompt_token_ids": PROMPTS[0]}], params(**kwargs))
        # The server's best_of ranks candidates by logprobs: refused by its own name.
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.exceptions import VLLMValidationError

        request = CompletionRequest(prompt="hi", best_of=3, temperature=1.0)
        with pytest.raises(VLLMValidationError, match=r"best_of=3 .*output_logits"):
            request.to_sampling_params(8, None)
        # Plain requests still run, on the device.
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params())
        assert [list(out[0].outputs[0].token_ids)] == hf_greedy(tiny_llama, PROMPTS[:1], [8])
    finally:
        del llm


def test_output_logits_serves_host_parameters_from_nxdi_logits(tiny_llama, tmp_path,
                                                               monkeypatch):
    llm = make_llm(monkeypatch, tiny_llama, tmp_path / "logits", output_logits=True)
    try:
        kinds = [params(), params(logprobs=2), params(repetition_penalty=1.8),
                 params(temperature=1.0, seed=7)]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], kinds)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got[:2] == hf_greedy(tiny_llama, PROMPTS[:2], [8] * 2)
        hf = hf_causal_lm(tiny_llama)
        reference = hf_log_softmax(hf, PROMPTS[1] + got[1])
        for i, token in enumerate(got[1]):
            row = reference[len(PROMPTS[1]) - 1 + i]
            top = outs[1].outputs[0].logprobs[i]
            assert top[token].logprob == pytest.approx(float(row[token]), abs=2e-4)
            assert {t: v.logprob for t, v in top.items()} == pytest.approx(
                dict(zip(row.topk(2).indices.tolist(), row.topk(2).values.tolist(),
                         strict=True)), abs=2e-4)  # greedy: the token is the top one
        # The penalty and the seed as their definitions give them on HF's logits.
        assert got[2] == hf_decode_with(
            hf, PROMPTS[0], 8,
            lambda logits, p, g: penalized(logits, p, g, repetition=1.8).argmax())
        assert got[2] != got[0]  # greedy repeats itself here; the penalty changed that
        assert got[3] == hf_decode_with(hf, PROMPTS[2], 8, SeededSampling(7, 1.0))
        with pytest.raises(ValueError, match="prompt_logprobs=1 is not supported by the nxdi"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], params(prompt_logprobs=1))
    finally:
        del llm
