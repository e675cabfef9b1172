"""Each model family the CPU backend serves, against HF transformers in the same test:
Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Mixtral (top-2 of 4 experts) and
Qwen3-MoE (dense and expert layers, top-2 not renormalised), tied and untied heads, on
every kernel path this CPU runs (the native decode step included where it covers the
family) and through LLM.generate with requests joining and leaving mid-flight."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_greedy
from tests.engine_checks import check_greedy_matches_hf
from tests.test_cpu_backend import (
    EVERY_PATH,
    backend_greedy,
    bf16_backend_without_bf16_units,
    check_native_decode_matches_torch,
)
from tests.tiny_families import make_tiny
from vllm_neuronx.backends.cpu import kernels
from vllm_neuronx.backends.cpu.llama import LlamaSpec

NEW_FAMILIES = ["qwen2", "qwen3", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("kernel", EVERY_PATH)
@pytest.mark.parametrize(("family", "tie"), [("qwen2", False), ("qwen3", True),
                                             ("mixtral", False), ("qwen3_moe", True)])
def test_family_in_bf16_matches_hf_on_every_path(tmp_path, monkeypatch, family, tie, kernel):
    model = make_tiny(tmp_path / "model", family, tie=tie)
    spec = LlamaSpec.from_folder(model)
    assert spec.attention_bias == (family == "qwen2")
    assert spec.qk_norm == (family in ("qwen3", "qwen3_moe"))
    assert spec.moe_layers == {"mixtral": (0, 1), "qwen3_moe": (1,)}.get(family, ())
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    # The native step covers every family, experts included.
    assert (b.native is not None) == (kernel != kernels.TORCH)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 7, [40]]
    steps = 6
    expected = hf_greedy(model, prompts, [steps] * len(prompts), weights_in=torch.bfloat16)
    assert backend_greedy(b, prompts, steps) == expected


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_native_decode_step_matches_the_torch_decode_logits(tmp_path, monkeypatch, family):
    """decode_step.c's bias, q/k norm and experts against llama.py's: logits and KV
    lines, with rows that share experts and rows that do not."""
    kernel = next((v.name for v in kernels.VARIANTS if kernels.runs_here(v)), None)
    if kernel is None:
        pytest.skip("no native kernel variant runs on this CPU")
    model = make_tiny(tmp_path / "model", family)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    check_native_decode_matches_torch(b)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_through_llm_generate_matches_hf(tmp_path, family):
    from vllm import LLM

    model = make_tiny(tmp_path / "model", family)
    llm = LLM(model=model, device="neuron", max_num_seqs=2, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32")
    try:
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 7, [40], [41, 42, 43]]
        check_greedy_matches_hf(llm, model, prompts, [8, 3, 6, 5, 7])
    finally:
        del llm


def test_a_window_on_some_layers_only_is_refused():
    from vllm_neuronx.backends.cpu.llama import sliding_window

    assert sliding_window({"sliding_window": 4096, "use_sliding_window": False}) is None
    assert sliding_window({"sliding_window": 6, "layer_types": ["sliding_attention"] * 2}) == 6
    assert sliding_window({"sliding_window": 6, "layer_types": ["full_attention"] * 2}) is None
    with pytest.raises(ValueError, match="sliding window on some layers only"):
        sliding_window({"sliding_window": 6, "use_sliding_window": True,
                        "layer_types": ["full_attention", "sliding_attention"]})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prompt_logprobs_match_hf_log_softmax(tmp_path, family):
    """Every prompt position's log-probabilities (prompt_logprobs) against HF's
    log_softmax of the same fp32 model, two prompts in one prefill."""
    from transformers import AutoModelForCausalLM

    from tests.test_cpu_backend import greedy, prefill_args
    from vllm_neuronx import neuron_config as nc
    from vllm_neuronx.backends.cpu.backend import CpuBackend

    model = make_tiny(tmp_path / "model", family)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="float32")
    b = CpuBackend(model, cfg)
    (tmp_path / "artifacts").mkdir()
    b.compile(str(tmp_path / "artifacts"))
    b.load(str(tmp_path / "artifacts"))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    out = b.forward(*prefill_args(prompts), greedy(2), prompt_logits=torch.tensor([True, True]))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for prompt, logits in zip(prompts, out.prompt_logits, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        torch.testing.assert_close(logits.log_softmax(-1), expected, rtol=1e-4, atol=1e-4)


def test_moe_keys_on_the_cpu_backend():
    """Expert parallelism only lays a device out (accepted, no effect); a capacity factor
    would drop tokens on the device that the CPU computes, so it is refused."""
    from vllm_neuronx import neuron_config as nc
    from vllm_neuronx.backends.cpu.backend import CpuBackend

    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                   dtype="float32",
                                   overrides={"moe_tp_degree": 1, "moe_ep_degree": 1})
    CpuBackend.validate(cfg)
    with pytest.raises(nc.NeuronConfigError, match="capacity_factor=2.0: NxDI then drops"):
        CpuBackend.validate({**cfg, "capacity_factor": 2.0})


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_llama3_rope_scaling_on_a_family_matches_hf(tmp_path, monkeypatch, family):
    """Llama 3.x rope scaling (rope_type llama3) is the family's too: prompts past the
    original context, decoded natively, give HF's tokens."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = make_tiny(tmp_path / "model", family, rope_scaling=scaling)
    assert LlamaSpec.from_folder(model).rope_scaling["rope_type"] == "llama3"
    kernel = next((v.name for v in kernels.VARIANTS if kernels.runs_here(v)), kernels.TORCH)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    prompts = [[5 + i % 50 for i in range(40)], [12, 13, 14] * 15]
    expected = hf_greedy(model, prompts, [6, 6], weights_in=torch.bfloat16)
    assert backend_greedy(b, prompts, 6) == expected
