"""The real upstream V1 scheduler with our subclass, driven by a real engine:
under saturation it never preempts, never mixes prefill and decode, keeps at most
max_num_seqs running, drains the queue; aborted requests give their KV line back."""

from __future__ import annotations

import random

import pytest
from vllm import LLM, SamplingParams

from tests.engine_checks import (
    check_aborts_free_lines,
    in_process_engine_env,
    leave_in_process_engine_env,
    lines_in_use,
)

MAX_NUM_SEQS = 2


@pytest.fixture(scope="module")
def inproc_llm(tiny_llama):
    mp = pytest.MonkeyPatch()
    in_process_engine_env(mp)  # so the test can watch the scheduler
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32")
    yield llm
    del llm
    leave_in_process_engine_env(mp)


def test_saturation_never_preempts_and_the_queue_drains(inproc_llm):
    scheduler = inproc_llm.llm_engine.engine_core.engine_core.scheduler
    assert type(scheduler).__name__ == "NeuronScheduler"
    steps = []
    original = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        steps.append((out, len(scheduler.running)))
        return out

    scheduler.schedule = recording_schedule
    try:
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randint(1, 60))]}
                   for _ in range(12)]
        params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True,
                                 detokenize=False) for _ in prompts]
        outputs = inproc_llm.generate(prompts, params)
    finally:
        scheduler.schedule = original
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    prefill_steps = 0
    for out, running in steps:
        assert not out.preempted_req_ids
        assert not (out.scheduled_new_reqs and out.scheduled_cached_reqs.req_ids), "mixed step"
        assert running <= MAX_NUM_SEQS
        assert len(out.scheduled_new_reqs) <= MAX_NUM_SEQS
        prefill_steps += bool(out.scheduled_new_reqs)
    assert prefill_steps >= len(prompts) // MAX_NUM_SEQS
    assert not scheduler.waiting and not scheduler.running
    assert lines_in_use(inproc_llm) == 0


def test_aborted_requests_free_their_kv_lines(inproc_llm):
    check_aborts_free_lines(inproc_llm, MAX_NUM_SEQS)
