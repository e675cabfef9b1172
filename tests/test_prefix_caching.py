"""Prefix caching on the block KV layout, CPU backend (block_kv.py): greedy tokens equal
HF's with and without cache hits, at batch 1 and 8; hits at block boundaries and one
token past them; eviction and preemption when blocks run short; aborts give every block
back. The engine runs in this process, so the tests read vLLM's block pool itself."""

from __future__ import annotations

import random

import pytest
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs

from tests.conftest import hf_greedy
from tests.engine_checks import check_aborts_free_lines, in_process_engines

BLOCK = 16
MAX_LEN = 256


in_process = pytest.fixture(scope="module")(in_process_engines)


def make_llm(model: str, **kwargs) -> LLM:
    args = dict(model=model, device="neuron", max_num_seqs=8, max_model_len=MAX_LEN,
                skip_tokenizer_init=True, dtype="float32", enable_prefix_caching=True,
                block_size=BLOCK, disable_log_stats=False)
    return LLM(**{**args, **kwargs})


@pytest.fixture(scope="module")
def llm(tiny_llama, in_process):
    llm = make_llm(tiny_llama)
    yield llm
    del llm


def block_pool(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def generate(llm, prompts, max_tokens):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def prompt(rng, n):
    return [rng.randrange(3, 512) for _ in range(n)]


def test_the_block_layout_is_one_block_count_for_vllm_and_the_backend(llm):
    config = llm.llm_engine.vllm_config
    cfg = config.additional_config["neuron_settings"]["neuron_config"]
    blocks = 8 * MAX_LEN // BLOCK + 1  # every sequence can reach max_model_len, + the null
    assert (cfg["is_block_kv_layout"], cfg["is_prefix_caching"]) == (True, True)
    assert cfg["pa_block_size"] == config.cache_config.block_size == BLOCK
    assert cfg["pa_num_blocks"] == config.cache_config.num_gpu_blocks_override == blocks
    assert block_pool(llm).num_gpu_blocks == blocks
    assert config.scheduler_config.enable_chunked_prefill is False


def test_hits_at_batch_1_at_block_boundaries_and_one_past_equal_hf(llm, tiny_llama):
    rng = random.Random(0)
    base = prompt(rng, 70)
    # Each alone, in order: cold; the same prompt (hits all whole blocks but the last token's);
    # a prompt ending at a block boundary (its last block recomputed: vLLM keeps one token);
    # one token past it (every whole block a hit); a different continuation of the prefix.
    prompts = [base, base, base[:48], base[:49], base[:40] + prompt(rng, 30)]
    got, cached = [], []
    for p in prompts:
        tokens, hits = generate(llm, [p], [12])
        got += tokens
        cached += hits
    assert got == hf_greedy(tiny_llama, prompts, [12] * len(prompts))
    assert cached == [0, 64, 32, 48, 32]


def test_shared_system_prompts_at_batch_8_equal_hf(llm, tiny_llama):
    rng = random.Random(1)
    system = prompt(rng, 45)
    prompts = [system + prompt(rng, rng.randint(1, 60)) for _ in range(8)]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    expected = hf_greedy(tiny_llama, prompts, max_tokens)
    got, _ = generate(llm, prompts, max_tokens)
    assert got == expected
    again, cached = generate(llm, prompts, max_tokens)  # now every prompt's blocks are cached
    assert again == expected
    assert all(c >= 32 for c in cached)


def test_hit_counters_count_the_cached_tokens(llm):
    rng = random.Random(2)
    p = prompt(rng, 50)
    before = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix")}
    # One prefill step: the second row hits the blocks the first writes in it (every row's
    # K/V of a layer is written before any row of the step attends).
    tokens, cached = generate(llm, [p, p], [2, 2])
    assert cached == [0, 48] and tokens[0] == tokens[1]
    generate(llm, [p], [2])
    after = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix")}
    assert after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"] == 150
    assert after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"] == 96


def test_aborts_give_every_block_back(llm):
    pool = block_pool(llm)
    free = pool.get_num_free_blocks()
    check_aborts_free_lines(llm, 8)
    assert pool.get_num_free_blocks() == free


def test_eviction_and_preemption_under_memory_pressure_keep_outputs_equal(tiny_llama,
                                                                        in_process):
    # 25 blocks (24 usable, 384 positions) for 8 sequences of up to 150: vLLM evicts cached
    # blocks, then preempts running requests, which prefill again when blocks free up.
    llm = make_llm(tiny_llama, num_gpu_blocks_override=25)
    rng = random.Random(3)
    system = prompt(rng, 33)
    prompts = [system + prompt(rng, rng.randint(20, 80)) for _ in range(10)]
    max_tokens = [rng.randint(40, 70) for _ in prompts]
    got, _ = generate(llm, prompts, max_tokens)
    assert got == hf_greedy(tiny_llama, prompts, max_tokens)
    preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preempted > 0
    assert block_pool(llm).get_num_free_blocks() == 24
    del llm


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_size": 24}, "block_size 24 does not divide max_model_len 256"),
    ({"num_gpu_blocks_override": 8}, "pa_num_blocks=8 .* give at least 9"),
    ({"num_gpu_blocks_override": 40, "override_neuron_config": {"pa_num_blocks": 41}},
     "pa_num_blocks=41 contradicts num_gpu_blocks_override=40"),
    ({"enable_prefix_caching": False, "override_neuron_config": {"is_prefix_caching": True}},
     "is_prefix_caching=True contradicts enable_prefix_caching=False"),
    ({"enable_prefix_caching": False, "override_neuron_config": {"pa_block_size": 32}},
     "'pa_block_size' sizes the block KV layout, which is off"),
])
def test_bad_block_settings_are_refused_by_name(tiny_llama, kwargs, match):
    args = dict(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=MAX_LEN,
                dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=True)
    with pytest.raises(ValueError, match=match):
        EngineArgs(**{**args, **kwargs}).create_engine_config()


def test_the_contiguous_layout_stays_the_default(tiny_llama):
    config = EngineArgs(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=MAX_LEN,
                        dtype="float32", skip_tokenizer_init=True).create_engine_config()
    cfg = config.additional_config["neuron_settings"]["neuron_config"]
    assert "is_block_kv_layout" not in cfg
    assert config.cache_config.block_size == MAX_LEN
    assert config.cache_config.enable_prefix_caching is False


def test_the_native_step_serves_hits_chunks_and_decodes_equal_to_hf(tiny_llama, in_process):
    """bf16 weights on the native step (as on a CPU without bf16 units): prefills over
    cached prefixes, prompt chunks beside decodes, and decodes, all through block tables."""
    import torch

    import vllm_neuronx.backends.cpu.backend as cpu

    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "native_bf16", lambda: False)
    try:
        llm = make_llm(tiny_llama, dtype="bfloat16", enable_chunked_prefill=True,
                       max_num_batched_tokens=48)
        (kernel,) = llm.collective_rpc(lambda self: self.model_runner.backend.kernel)
        assert kernel != "torch"
        rng = random.Random(4)
        system = prompt(rng, 37)
        prompts = [system + prompt(rng, rng.randint(1, 90)) for _ in range(6)]
        max_tokens = [rng.randint(4, 16) for _ in prompts]
        expected = hf_greedy(tiny_llama, prompts, max_tokens, weights_in=torch.bfloat16)
        assert generate(llm, prompts, max_tokens)[0] == expected
        again, cached = generate(llm, prompts, max_tokens)
        assert again == expected and min(cached) >= 32
        del llm
    finally:
        mp.undo()


def test_lora_adapters_with_prefix_caching_equal_peft(tiny_llama, in_process, tmp_path):
    """A shared prefix cached per adapter (vLLM hashes blocks with the adapter): each
    request's tokens equal PEFT's, the base model's rows beside them equal HF's."""
    from vllm.lora.request import LoRARequest

    from tests.lora_utils import make_peft_adapter, peft_greedy

    adapter = make_peft_adapter(tiny_llama, tmp_path / "a1", seed=5)
    llm = make_llm(tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=8)
    rng = random.Random(6)
    system = prompt(rng, 40)
    prompts = [system + prompt(rng, rng.randint(1, 30)) for _ in range(4)]
    loras = [LoRARequest("a1", 1, adapter), None, LoRARequest("a1", 1, adapter), None]
    expected = [peft_greedy(tiny_llama, adapter if lr else None, [p], 8)[0]
                for p, lr in zip(prompts, loras, strict=True)]
    for _ in range(2):  # cold, then every prefix cached
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(8),
                            lora_request=loras, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
    assert min(o.num_cached_tokens for o in outs) >= 32
    del llm


def greedy_params(n: int):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
