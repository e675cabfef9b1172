"""Quantization on the CPU backend, from NxDI's neuron config keys: int8 (per channel,
per tensor) and fp8 weights, modules_to_not_convert, and the fp8 KV cache.

The references are Hugging Face transformers run in the same test on weights the test
quantizes and dequantizes itself, written out below as NxD defines the schemes (not
through our code), and for the fp8 KV cache HF with its cache rounded the same way."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.conftest import hf_causal_lm, hf_kv_cache_in, make_tiny_llama
from tests.test_cpu_backend import EVERY_PATH, backend_greedy, use_kernel
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend, kernels
from vllm_neuronx.backends.cpu import backend as cpu_backend
from vllm_neuronx.backends.cpu.kernels import PackedWeight

PER_CHANNEL = {"quantized": True, "quantization_type": "per_channel_symmetric"}
PER_TENSOR = {"quantized": True, "quantization_type": "per_tensor_symmetric"}
SCHEMES = {
    "int8-channel": {**PER_CHANNEL, "quantization_dtype": "int8"},
    "int8-tensor": {**PER_TENSOR, "quantization_dtype": "int8"},
    "fp8-channel": {**PER_CHANNEL, "quantization_dtype": "f8e4m3"},
    "fp8-tensor": {**PER_TENSOR, "quantization_dtype": "f8e4m3"},
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 7, [40]]


def reference_dequantized(w: torch.Tensor, overrides: dict) -> torch.Tensor:
    """NxD's quantize-then-dequantize of one linear weight, written out."""
    w = w.float()
    per_channel = overrides["quantization_type"] == "per_channel_symmetric"
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    if overrides["quantization_dtype"] == "int8":
        scale = torch.clamp(amax / (127.0 if per_channel else 127.5),
                            min=torch.finfo(torch.float32).eps)
        return torch.clamp(torch.round(w / scale), -128, 127) * scale
    scale = torch.clamp(amax / 240.0, min=1e-5) if per_channel else amax / 240.0
    fp8 = torch.clamp(w / scale, -240, 240).to(torch.float8_e4m3fn)
    return fp8.float() * scale


def hf_quantized(model_path: str, overrides: dict):
    """HF's model in fp32 with its weights in bf16 (the backend's torch_dtype), except
    each linear layer not in modules_to_not_convert: that one dequantized from the
    checkpoint's weight (a tied lm_head gets a weight of its own)."""
    model = hf_causal_lm(model_path)
    skip = overrides.get("modules_to_not_convert") or ()
    converted = {name: reference_dequantized(module.weight.detach(), overrides)
                 for name, module in model.named_modules()
                 if overrides.get("quantized") and isinstance(module, torch.nn.Linear)
                 and not any(s in name for s in skip)}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
        for name, weight in converted.items():
            model.get_submodule(name).weight = torch.nn.Parameter(weight)
    return model


def hf_greedy_of(model, prompts, steps, kv=torch.bfloat16):
    """``kv``: how the backend's KV cache holds K/V (``hf_kv_cache_in``): its torch_dtype,
    or fp8's rounding."""
    outs = []
    with torch.no_grad(), hf_kv_cache_in(kv):
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def quantized_backend(model, folder, monkeypatch, kernel, overrides, dtype="bfloat16"):
    monkeypatch.setattr(cpu_backend, "native_bf16", lambda: False)
    use_kernel(monkeypatch, kernel)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=8, max_model_len=128,
                                   dtype=dtype, overrides=overrides)
    b = CpuBackend(model, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    b.compile(str(folder))
    b.load(str(folder))
    return b


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), tie=True)


@pytest.mark.parametrize("kernel", EVERY_PATH)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_weights_match_hf_on_the_same_quantization(tiny_tied, tmp_path, monkeypatch,
                                                             scheme, kernel):
    """Greedy tokens of 1 to 4 rows at once equal HF's on the weights quantized and
    dequantized the same way; with the kernel the weights stay int8 / fp8 (packed with
    their scales) and decode steps run natively."""
    overrides = SCHEMES[scheme]
    b = quantized_backend(tiny_tied, tmp_path, monkeypatch, kernel, overrides)
    assert b.model.dtype is torch.float32
    qkv = b.model.w["layers.0.qkv"]
    if kernel != kernels.TORCH:
        want = torch.int8 if overrides["quantization_dtype"] == "int8" else torch.float8_e4m3fn
        assert isinstance(qkv, PackedWeight) and qkv.data.dtype is want
        assert qkv.scale is not None and b.native is not None
    expected = hf_greedy_of(hf_quantized(tiny_tied, overrides), PROMPTS, 6)
    for group in (PROMPTS[:1], PROMPTS):
        assert backend_greedy(b, group, 6) == expected[:len(group)]


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_modules_to_not_convert_stay_in_float(tiny_llama, tmp_path, monkeypatch, kernel):
    overrides = {**SCHEMES["int8-channel"], "modules_to_not_convert": ["lm_head", "down_proj"]}
    b = quantized_backend(tiny_llama, tmp_path, monkeypatch, kernel, overrides)
    if kernel != kernels.TORCH:
        assert b.model.w["lm_head"].scale is None and b.model.w["layers.1.down"].scale is None
        assert b.model.w["layers.1.gate_up"].data.dtype is torch.int8
    expected = hf_greedy_of(hf_quantized(tiny_llama, overrides), PROMPTS, 6)
    assert backend_greedy(b, PROMPTS, 6) == expected


def test_a_fused_matmul_is_converted_whole_or_not_at_all(tiny_llama, tmp_path):
    cfg = nc.resolve_neuron_config(
        tp_degree=1, max_num_seqs=2, max_model_len=64, dtype="float32",
        overrides={**SCHEMES["int8-channel"], "modules_to_not_convert": ["q_proj"]})
    with pytest.raises(nc.NeuronConfigError, match="modules_to_not_convert=.*q_proj.*name all "
                                                   "of them or none"):
        CpuBackend(tiny_llama, cfg).compile(str(tmp_path))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"quantized": True, "quantization_type": "blockwise"}, "quantization_type='blockwise'"),
    ({"quantized": True, "quantization_dtype": "int4"}, "quantization_dtype='int4'"),
    ({"quantized": True, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert="),
    ({"quantized": True, "modules_to_not_convert": ["lm_head"]},
     "modules_to_not_convert needs quantization_type 'per_channel_symmetric'"),
    ({"kv_cache_quant": "fp8"}, "kv_cache_quant='fp8' must be true or false"),
])
def test_wrong_quantization_keys_are_named(tiny_llama, overrides, message):
    from vllm import EngineArgs

    with pytest.raises(ValueError, match=message):
        EngineArgs(model=tiny_llama, max_num_seqs=2, max_model_len=64, dtype="float32",
                   skip_tokenizer_init=True,
                   override_neuron_config=overrides).create_engine_config()


def test_artifacts_hold_int8_weights_and_a_warm_start_does_not_quantize_again(
        tiny_tied, tmp_path, monkeypatch):
    kernel = next((v.name for v in kernels.VARIANTS if kernels.runs_here(v)), kernels.TORCH)
    overrides = SCHEMES["int8-channel"]
    quantized_backend(tiny_tied, tmp_path, monkeypatch, kernel, overrides)
    with safe_open(str(tmp_path / cpu_backend.WEIGHTS_FILE), framework="pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes["layers.0.qkv"] is dtypes["lm_head"] is torch.int8  # tied: its own copy
    assert dtypes["layers.0.qkv_scale"] is torch.float32
    assert dtypes["embed"] is torch.bfloat16  # looked up, never multiplied: not converted

    def refuse(*_args):
        raise AssertionError("a warm start quantized again")

    monkeypatch.setattr(cpu_backend, "quantize_parts", refuse)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=8, max_model_len=128,
                                   dtype="bfloat16", overrides=overrides)
    warm = CpuBackend(tiny_tied, cfg)
    warm.load(str(tmp_path))
    expected = hf_greedy_of(hf_quantized(tiny_tied, overrides), PROMPTS[:2], 4)
    assert backend_greedy(warm, PROMPTS[:2], 4) == expected


def fp8_kv_rounded(x: torch.Tensor) -> torch.Tensor:
    """A K/V value as the fp8 cache holds it: clamped to +-448, cast to e4m3fn, widened."""
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_fp8_kv_cache_matches_hf_with_its_cache_rounded_the_same_way(tiny_llama, tmp_path,
                                                                    monkeypatch, kernel):
    b = quantized_backend(tiny_llama, tmp_path / "fp8", monkeypatch, kernel,
                          {"kv_cache_quant": True})
    assert b.model.k_cache.dtype is torch.float8_e4m3fn
    assert (b.native is not None) == (kernel != kernels.TORCH)
    got = backend_greedy(b, PROMPTS, 6)
    # fp32 logits of the first prefill: within a stated tolerance of the fp32 cache's.
    plain = quantized_backend(tiny_llama, tmp_path / "fp32", monkeypatch, kernel, {})
    from tests.engine_checks import prefill_args

    args = prefill_args(PROMPTS, list(range(len(PROMPTS))))
    sampling = torch.tensor([[1, 1.0, 1.0]] * len(PROMPTS))
    fp8_logits = b.forward(*args, sampling).logits
    fp32_logits = plain.forward(*args, sampling).logits
    # e4m3 keeps 3 mantissa bits (relative error up to 1/16 per K/V value): on this
    # model's logits (spread to about +-40) that moves them by well under 1.
    assert float((fp8_logits - fp32_logits).abs().max()) < 1.0
    assert not torch.equal(fp8_logits, fp32_logits)
    assert got == hf_greedy_of(hf_quantized(tiny_llama, {}), PROMPTS, 6,
                               kv=fp8_kv_rounded)


def test_native_fp8_kv_decode_matches_the_torch_decode(tmp_path, monkeypatch):
    """decode_step.c's fp8 cache against llama.py's: the bytes it writes (rounded as
    torch casts) and the logits it computes from them."""
    kernel = next((v.name for v in kernels.VARIANTS if kernels.runs_here(v)), None)
    if kernel is None:
        pytest.skip("no native kernel variant runs on this CPU")
    model = make_tiny_llama(tmp_path / "model", hidden_size=256, num_attention_heads=4,
                            num_key_value_heads=2)
    b = quantized_backend(model, tmp_path / "artifacts", monkeypatch, kernel,
                          {**SCHEMES["fp8-channel"], "kv_cache_quant": True})
    m = b.model
    from tests.engine_checks import prefill_args

    prompts, lines = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 30], [1, 4, 7]
    b.forward(*prefill_args(prompts, lines), torch.tensor([[1, 1.0, 1.0]] * 3))
    ids, positions = torch.tensor([20, 21, 22]), torch.tensor([5, 2, 90])
    cache = m.k_cache.clone(), m.v_cache.clone()
    native = b.native.decode(ids, positions, torch.tensor(lines))
    written = m.k_cache.view(torch.uint8).clone(), m.v_cache.view(torch.uint8).clone()
    m.k_cache.copy_(cache[0])
    m.v_cache.copy_(cache[1])
    reference = m.token_generate(ids, positions, torch.tensor(lines), 128)
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-4)
    # Bytes equal but where the fp32 K/V sat within rounding noise of a rounding edge.
    for mine, torch_bytes in zip(written, (m.k_cache, m.v_cache), strict=True):
        assert (mine != torch_bytes.view(torch.uint8)).float().mean() < 1e-3


def test_kernel_fp8_rounding_is_torchs_cast(tmp_path):
    kernel = next((v for v in kernels.VARIANTS if kernels.runs_here(v)), None)
    if kernel is None:
        pytest.skip("no native kernel variant runs on this CPU")
    assert kernels.build(str(tmp_path), kernel)
    matmul = kernels.load(str(tmp_path), kernel)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * s for s in (1e-4, 3e-3, 1.0, 60.0, 1000.0)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, 464.0, 1e9, -1e9, 2.0 ** -10])])
    from vllm_neuronx.backends.cpu.quantize import fp8_kv

    assert torch.equal(matmul.fp8_from_floats(x).view(torch.uint8), fp8_kv(x).view(torch.uint8))


@pytest.mark.parametrize("kernel", [v.name for v in kernels.VARIANTS])
@pytest.mark.parametrize("scheme", ["int8-channel", "int8-tensor", "fp8-channel"])
def test_kernel_multiplies_quantized_weights_as_their_dequantized_values(monkeypatch, tmp_path,
                                                                        kernel, scheme):
    """The packed matmul over int8 / fp8 values and column scales, against x . W^T over
    the dequantized weight: rows across blocks, columns not a multiple of the panel, row
    counts from 8 (AVX2: each panel widened and scaled once per slab) and past
    ``widen_rows`` (AVX-512: the weight widened and scaled for MKL's sgemm)."""
    from vllm_neuronx.backends.cpu.quantize import quantize
    from vllm_neuronx.quant_config import QuantConfig

    variant = use_kernel(monkeypatch, kernel)
    assert kernels.build(str(tmp_path), variant)
    matmul = kernels.load(str(tmp_path), variant)
    torch.manual_seed(0)
    config = QuantConfig.from_neuron_config(SCHEMES[scheme])
    for m, n, k in [(1, 37, 48), (5, 960, 576), (9, 100, 64), (300, 101, 64)]:
        q = quantize(torch.randn(n, k) * torch.rand(n, 1), config)
        x = torch.randn(m, k)
        torch.testing.assert_close(matmul(x, matmul.pack(q)), x @ q.dequantize().T,
                                   rtol=1e-5, atol=1e-4)
