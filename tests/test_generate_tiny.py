"""LLM.generate on a tiny random Llama: greedy tokens equal HF's, with requests
joining and leaving mid-flight (max_num_seqs < prompts, varied lengths)."""

from __future__ import annotations

import random

import pytest
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from tests.engine_checks import check_greedy_matches_hf

MAX_NUM_SEQS = 3


@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = LLM(
        model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
        skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2,
    )
    yield llm
    del llm


def test_greedy_matches_hf_with_continuous_batching(llm, tiny_llama):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 150))] for _ in range(8)]
    max_tokens = [rng.randint(1, 40) for _ in prompts]
    check_greedy_matches_hf(llm, tiny_llama, prompts, max_tokens)
    # The runner timed every step it ran, by phase and batch size (step_times.py).
    (steps,) = llm.collective_rpc("step_times")
    decoded = sum(e["steps"] * e["rows"] for e in steps if e["phase"] == "decode")
    assert decoded == sum(max_tokens) - len(prompts)  # each prefill samples the first token
    assert all(e["backend_ms"] > 0 and e["rows"] <= MAX_NUM_SEQS for e in steps)


def test_prompt_filling_the_context_is_refused_with_a_clear_error(llm):
    params = SamplingParams(temperature=0, max_tokens=4, detokenize=False)
    with pytest.raises((ValueError, VLLMValidationError),
                       match="the model's context length is only 256 tokens"):
        llm.generate([{"prompt_token_ids": [5] * 300}], params)
    # The engine still serves the next request.
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)
    assert len(out[0].outputs[0].token_ids) == 4


def test_tensor_parallel_becomes_tp_degree_not_vllm_workers(llm):
    settings = llm.llm_engine.vllm_config.additional_config["neuron_settings"]
    assert settings["neuron_config"]["tp_degree"] == 2
    assert llm.llm_engine.vllm_config.parallel_config.world_size == 1
