"""The real SmolLM2-135M-Instruct in fp32: greedy tokens equal HF transformers'."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from tests.conftest import hf_greedy
from vllm_neuronx.default_model import default_model_path

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "The president of the United States is",
    "The future of AI is",
    "def fibonacci(n):",
    "List three colors: red,",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
MAX_TOKENS = [12, 20, 16, 24, 20, 8, 12, 24]


@pytest.fixture(scope="module")
def model_path() -> str:
    return default_model_path()


def greedy(model_path: str, dtype: str) -> tuple[list[list[int]], list, list[list[int]]]:
    """(prompt token ids, vLLM outputs, generated token ids) of PROMPTS through our LLM."""
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    llm = LLM(model=model_path, device="neuron", max_num_seqs=4, max_model_len=128, dtype=dtype)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return prompts, outputs, [list(o.outputs[0].token_ids) for o in outputs]


def test_smollm2_fp32_greedy_matches_hf(model_path):
    prompts, outputs, got = greedy(model_path, "float32")
    assert got == hf_greedy(model_path, prompts, MAX_TOKENS)
    assert "Paris" in outputs[0].outputs[0].text


def test_smollm2_bf16_greedy_matches_hf_on_bf16_weights(model_path):
    """bf16 wherever a kernel variant runs: the weights are rounded to bf16 and multiplied
    with fp32 sums by the native kernel (AMX on bf16 halves of each input, or fp32 FMAs).
    HF computing in fp32 over the same bf16 weights agrees."""
    import torch

    from vllm_neuronx.backends.cpu import kernels

    if kernels.chosen() is None:
        pytest.skip(f"no kernel variant runs on this CPU ({kernels.cpu_model()}: "
                    f"{kernels.cpu_class().name if kernels.cpu_class() else 'no AVX2'}): "
                    "bf16 runs through torch's bf16 matmuls, other roundings")
    prompts, _, got = greedy(model_path, "bfloat16")
    assert got == hf_greedy(model_path, prompts, MAX_TOKENS, weights_in=torch.bfloat16)
