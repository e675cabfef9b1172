"""Asynchronous scheduling through the NxDI adapter, over its simulator: the device thread
calls NxDI's forward as the engine's thread would, every call checked as on a device."""

from __future__ import annotations

import random

import pytest
from vllm import LLM

from tests.engine_checks import (
    check_aborts_free_lines,
    check_greedy_matches_hf,
    check_host_rows_beside_device_rows,
    check_n_children,
    check_stop_strings,
    check_stop_tokens,
    check_structured_output,
    in_process_engine_env,
    leave_in_process_engine_env,
    lines_in_use,
    use_nxdi_simulator,
)

MAX_NUM_SEQS = 4


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture(scope="module")
def llm(sim, tiny_llama, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    in_process_engine_env(mp, NEURON_COMPILED_ARTIFACTS=str(
        tmp_path_factory.mktemp("nxdi-async") / "compiled"))
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32", async_scheduling=True,
              # the logits too, for rows sampled on the host (logprobs, seeds)
              override_neuron_config={"output_logits": True})
    assert llm.llm_engine.vllm_config.scheduler_config.scheduler_cls.endswith(
        "NeuronAsyncScheduler")
    yield llm
    del llm
    leave_in_process_engine_env(mp)


def test_greedy_equals_hf_with_continuous_batching(llm, tiny_llama):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 100))] for _ in range(7)]
    check_greedy_matches_hf(llm, tiny_llama, prompts, [rng.randint(1, 25) for _ in prompts])
    assert lines_in_use(llm) == 0


def test_aborts_free_every_line(llm):
    check_aborts_free_lines(llm, MAX_NUM_SEQS, prefix="nxdi-async-abort")


def test_stop_tokens_end_each_request_where_greedy_says(llm, tiny_llama):
    check_stop_tokens(llm, tiny_llama)


def test_host_sampled_rows_beside_device_sampled_ones(llm, tiny_llama):
    check_host_rows_beside_device_rows(llm, tiny_llama)


def test_n_children_each_get_a_line(llm):
    check_n_children(llm)


def test_structured_output_and_stop_strings(llm, tiny_chat):
    chat = LLM(model=tiny_chat, device="neuron", max_num_seqs=2, max_model_len=256,
               dtype="float32", async_scheduling=True,
               override_neuron_config={"output_logits": True})
    try:
        check_structured_output(chat)
        check_stop_strings(chat)
    finally:
        chat.llm_engine.engine_core.shutdown()
