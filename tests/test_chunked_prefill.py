"""Chunked prefill on the CPU backend (block_kv.py): long prompts prefill a chunk of
max_num_batched_tokens at a time, sharing steps with the running requests' decodes, and
give HF's greedy tokens, with prefix caching on and off; aborts mid-prompt give every
block back; what it cannot serve is refused by name."""

from __future__ import annotations

import random

import pytest
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs

from tests.conftest import hf_greedy
from tests.engine_checks import in_process_engines

BUDGET = 40  # tokens per step: prompts of up to 200 take several steps


in_process = pytest.fixture(scope="module")(in_process_engines)


def make_llm(model: str, **kwargs) -> LLM:
    args = dict(model=model, device="neuron", max_num_seqs=4, max_model_len=256,
                skip_tokenizer_init=True, dtype="float32", enable_chunked_prefill=True,
                max_num_batched_tokens=BUDGET, block_size=16)
    return LLM(**{**args, **kwargs})


@pytest.fixture(scope="module")
def llm(tiny_llama, in_process):
    llm = make_llm(tiny_llama, enable_prefix_caching=True)
    yield llm
    del llm


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def prompts_and_lengths(seed: int, count: int):
    rng = random.Random(seed)
    system = [rng.randrange(3, 512) for _ in range(35)]
    prompts = [system + [rng.randrange(3, 512) for _ in range(rng.randint(1, 160))]
               for _ in range(count)]
    return prompts, [rng.randint(1, 20) for _ in prompts]


def test_chunked_long_prompts_equal_hf_with_prefix_caching(llm, tiny_llama):
    prompts, max_tokens = prompts_and_lengths(0, 9)
    prompts.append(prompts[0])  # a whole prompt cached
    max_tokens.append(5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [greedy(n) for n in max_tokens], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == \
        hf_greedy(tiny_llama, prompts, max_tokens)
    assert outs[-1].num_cached_tokens > 0
    config = llm.llm_engine.vllm_config
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == BUDGET
    (steps,) = llm.collective_rpc("step_times")
    assert {e["phase"] for e in steps} == {"mixed"}


def test_chunks_share_steps_with_running_decodes(llm):
    """A running request gains a token at every step while a long prompt prefills in
    chunks beside it (without chunked prefill it would wait for the whole prompt)."""
    engine = llm.llm_engine
    engine.add_request("short", {"prompt_token_ids": [5, 6, 7]}, greedy(30))
    engine.step()  # its prefill (and first token)
    engine.add_request("long", {"prompt_token_ids": list(range(3, 203))}, greedy(3))
    produced = []
    for _ in range(5):  # 200 prompt tokens: 39 a step beside the decode
        outs = {o.request_id: o for o in engine.step()}
        produced.append(len(outs["short"].outputs[0].token_ids) if "short" in outs else 0)
    # One more token at each step (outputs are cumulative).
    assert produced == list(range(produced[0], produced[0] + 5)) and produced[0] >= 2
    engine.abort_request(["short", "long"])
    while engine.has_unfinished_requests():
        engine.step()


def test_chunked_equals_unchunked_without_prefix_caching(tiny_llama, in_process):
    prompts, max_tokens = prompts_and_lengths(1, 6)
    llm = make_llm(tiny_llama, enable_prefix_caching=False)
    cfg = llm.llm_engine.vllm_config.additional_config["neuron_settings"]["neuron_config"]
    assert cfg["is_block_kv_layout"] and not cfg["is_prefix_caching"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [greedy(n) for n in max_tokens], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == \
        hf_greedy(tiny_llama, prompts, max_tokens)
    del llm


def test_abort_mid_prompt_gives_every_block_back(llm):
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    engine.add_request("mid", {"prompt_token_ids": list(range(10, 210))}, greedy(10))
    engine.add_request("other", {"prompt_token_ids": [9, 8, 7]}, greedy(10))
    engine.step()
    engine.step()  # "mid" is two chunks in
    engine.abort_request(["mid"])
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["other"]
    engine.step()
    assert pool.get_num_free_blocks() == free
    assert llm.collective_rpc("kv_lines_in_use") == [0]


def test_host_sampled_rows_share_chunked_steps(llm):
    prompts, _ = prompts_and_lengths(2, 3)
    params = [greedy(6), SamplingParams(temperature=0, max_tokens=6, logprobs=2,
                                        ignore_eos=True, detokenize=False), greedy(6)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": prompts[1]}], greedy(6), use_tqdm=False)
    assert outs[1].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert len(outs[1].outputs[0].logprobs) == 6


def test_prompt_logprobs_are_refused_by_name(llm):
    params = SamplingParams(max_tokens=2, prompt_logprobs=1, detokenize=False)
    with pytest.raises(ValueError, match="prompt_logprobs=1 is not served with chunked prefill"):
        llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], greedy(2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_lora_with_chunked_prefill_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="chunked prefill with LoRA adapters"):
        EngineArgs(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=256,
                   dtype="float32", skip_tokenizer_init=True, enable_chunked_prefill=True,
                   enable_lora=True, max_loras=1, max_lora_rank=8).create_engine_config()
