"""The end-to-end checks on a real Neuron device, through the framework installed there
(NxDI by default). Skipped, with the reason printed, on machines without /dev/neuron*."""

from __future__ import annotations

import random

import pytest
from vllm import LLM

from tests.engine_checks import check_aborts_free_lines, check_greedy_matches_hf

pytestmark = pytest.mark.neuron


@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=1)
    yield llm
    del llm


def test_greedy_matches_hf_on_device(llm, tiny_llama):
    settings = llm.llm_engine.vllm_config.additional_config["neuron_settings"]
    assert settings["device"] == "neuron"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(5)]
    max_tokens = [rng.randint(1, 20) for _ in prompts]
    check_greedy_matches_hf(llm, tiny_llama, prompts, max_tokens)


def test_aborts_free_kv_lines_on_device(llm):
    check_aborts_free_lines(llm, max_num_seqs=2, prefix="hw")
