"""The end-to-end checks on a real Neuron device, through the framework installed there
(NxDI by default). Skipped, with the reason printed, on machines without /dev/neuron*."""

from __future__ import annotations

import random

import pytest
from vllm import LLM, SamplingParams

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


def test_lora_mixed_batch_on_device(tiny_llama, tmp_path_factory):
    """Dynamic multi-LoRA with NxDI's base-model dummy on real NxDI (issue 19): two
    adapters and base rows in one batch, and a one-token prompt on an adapter."""
    from vllm.lora.request import LoRARequest

    from tests.lora_utils import make_peft_adapter, peft_greedy

    root = tmp_path_factory.mktemp("hw-adapters")
    a1 = make_peft_adapter(tiny_llama, root / "a1", seed=1)
    a2 = make_peft_adapter(tiny_llama, root / "a2", seed=2,
                           targets=("q_proj", "v_proj", "up_proj"))
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=4, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_loras=2,
              max_lora_rank=8)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16]]
    paths = [a1, None, a2, None]
    loras = [LoRARequest("a1", 1, a1), None, LoRARequest("a2", 2, a2), None]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    assert [list(o.outputs[0].token_ids) for o in outs] == [
        peft_greedy(tiny_llama, a, [p], 6)[0] for a, p in zip(paths, prompts, strict=True)]
    one = llm.generate([{"prompt_token_ids": [40]}], params, lora_request=loras[0])
    assert list(one[0].outputs[0].token_ids) == peft_greedy(tiny_llama, a1, [[40]], 6)[0]
