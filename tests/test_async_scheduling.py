"""vLLM's asynchronous scheduling on the Neuron platform (issue 23): step N+1 scheduled
while step N runs on the runner's device thread. Greedy tokens against HF run in the same
test; continuous batching, aborts, stops, host-sampled rows beside device-sampled ones,
n > 1 and structured output keep their exact results, and every KV line comes back."""

from __future__ import annotations

import gc
import random
import threading
import types
import weakref

import pytest
from vllm import LLM, EngineArgs, SamplingParams

from tests.engine_checks import (
    check_aborts_free_lines,
    check_greedy_matches_hf,
    check_host_rows_beside_device_rows,
    check_n_children,
    check_stop_strings,
    check_stop_tokens,
    check_structured_output,
    in_process_engines,
    lines_in_use,
)
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.platform_config import ASKED_KEY, async_scheduling

MAX_NUM_SEQS = 4


# -- when it is on (pure) ----------------------------------------------------------------
def settings(device="cpu", draft=None, neuron_config=None):
    return types.SimpleNamespace(device=device, draft=draft,
                                 block_layout=None if neuron_config is None else "blocks")


def asked(value):
    return types.SimpleNamespace(additional_config={ASKED_KEY: {"async_scheduling": value}})


def test_on_by_default_on_a_neuron_device_and_where_the_user_asks():
    # vLLM's own default (on) does not count as asked: the device decides.
    assert async_scheduling(settings("neuron"), asked(None)) is True
    assert async_scheduling(settings("cpu"), asked(None)) is False
    for device in ("neuron", "cpu"):
        assert async_scheduling(settings(device), asked(True)) is True
        assert async_scheduling(settings(device), asked(False)) is False


def test_speculation_and_the_block_layout_keep_it_off_and_refuse_it_by_name():
    assert async_scheduling(settings("neuron", draft="draft"), asked(None)) is False
    with pytest.raises(nc.NeuronConfigError, match="fused speculation"):
        async_scheduling(settings("cpu", draft="draft"), asked(True))
    with pytest.raises(nc.NeuronConfigError, match="block KV layout"):
        async_scheduling(settings("cpu", neuron_config={}), asked(True))


def test_the_flags_reach_the_scheduler(tiny_llama):
    for flag, cls in ((True, "NeuronAsyncScheduler"), (False, "NeuronScheduler"),
                      (None, "NeuronScheduler")):  # off unless asked
        cfg = EngineArgs(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=128,
                         skip_tokenizer_init=True, async_scheduling=flag
                         ).create_engine_config()
        assert cfg.scheduler_config.async_scheduling is bool(flag)
        assert cfg.scheduler_config.scheduler_cls.endswith(cls)


# -- the CPU backend with it on --------------------------------------------------------------
in_process = pytest.fixture(scope="module", autouse=True)(in_process_engines)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32", async_scheduling=True)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_greedy_equals_hf_with_continuous_batching(llm, tiny_llama):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 120))] for _ in range(9)]
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    check_greedy_matches_hf(llm, tiny_llama, prompts, max_tokens)
    assert lines_in_use(llm) == 0


def test_aborts_free_every_line(llm):
    check_aborts_free_lines(llm, MAX_NUM_SEQS, prefix="async-abort")


def test_stop_tokens_end_each_request_where_greedy_says(llm, tiny_llama):
    check_stop_tokens(llm, tiny_llama)


def test_host_sampled_rows_beside_device_sampled_ones(llm, tiny_llama):
    check_host_rows_beside_device_rows(llm, tiny_llama)


def test_no_step_is_freed_between_two_device_calls(llm, monkeypatch):
    """The device thread never holds a step's last reference: freeing a step's tensors
    there would put that host time between two device calls (worker/device_thread.py)."""
    from vllm_neuronx.worker import model_runner

    freed_on, queue = [], model_runner.NeuronModelRunner._queue

    def watched(self, step, grammar_output):
        weakref.finalize(step.input_ids,
                         lambda: freed_on.append(threading.current_thread().name))
        return queue(self, step, grammar_output)

    monkeypatch.setattr(model_runner.NeuronModelRunner, "_queue", watched)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": [1, 2, 3 + i]} for i in range(MAX_NUM_SEQS)], params)
    gc.collect()
    assert len(freed_on) > 20 and "NeuronDevice" not in freed_on


def test_n_children_each_get_a_line(llm):
    check_n_children(llm)


def test_structured_output_and_stop_strings(tiny_chat):
    llm = LLM(model=tiny_chat, device="neuron", max_num_seqs=2, max_model_len=256,
              dtype="float32", async_scheduling=True)
    try:
        check_structured_output(llm)
        check_stop_strings(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
