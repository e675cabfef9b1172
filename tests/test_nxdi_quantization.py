"""Quantization on the NxDI backend, through the NxDI simulator (tests/simulators): the
quantized checkpoint is made with NxDI's save_quantized_state_dict before compiling (by
default inside the artifacts folder) and reused after, fp8 gets XLA_HANDLE_SPECIAL_SCALAR,
bad keys are errors naming the key, and each quantization key changes the artifacts key.
The simulator quantizes as NxD does and computes with the dequantized weights, so the
checkpoint and the tokens are checked against a quantization done here, with torch's own
quantize_per_channel (what NxD calls)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from vllm import LLM, SamplingParams

from tests.conftest import hf_causal_lm, hf_decode_with
from tests.engine_checks import prefill_args, use_nxdi_simulator
from vllm_neuronx import artifacts
from vllm_neuronx import neuron_config as nc

INT8_PER_CHANNEL = {"quantized": True, "quantization_type": "per_channel_symmetric",
                    "quantization_dtype": "int8"}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture
def fp8_env_unset(monkeypatch):
    """XLA_HANDLE_SPECIAL_SCALAR not "1" (and restored after whatever the backend sets)."""
    monkeypatch.setenv("XLA_HANDLE_SPECIAL_SCALAR", "0")


def resolve(overrides=None, **kw):
    return nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                    dtype="float32", overrides=overrides, **kw)


def make_backend(model_path, overrides, **kw):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    return NxdiBackend(str(model_path), resolve(overrides, **kw))


def start(model_path, folder, overrides, **kw):
    """One start as the loader makes it: load ``folder`` if stored, else compile into a
    temporary folder, rename it to ``folder`` and load."""
    backend = make_backend(model_path, overrides, **kw)
    artifacts.load_or_compile(folder=str(folder), key="k", neuron_config=backend.neuron_config,
                              backend="nxdi", compile_fn=backend.compile,
                              load_fn=backend.load)
    return backend


def nxd_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NxD's per-channel int8 (PerChannelAbsMaxObserver, then torch's quantize_per_channel):
    (int8 weight, float32 scale [rows, 1])."""
    eps = torch.finfo(torch.float32).eps
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=eps)
    zero = torch.zeros_like(scale, dtype=torch.long)
    q = torch.quantize_per_channel(w.float(), scale.double(), zero, 0, torch.qint8)
    return q.int_repr(), scale[:, None]


def hf_int8_per_channel(model_path: str, skip=("lm_head",)):
    """The HF model with every linear weight but ``skip`` quantized and dequantized."""
    model = hf_causal_lm(model_path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
                q, scale = nxd_int8_per_channel(module.weight)
                module.weight.copy_(q.float() * scale)
    return model


def greedy_tokens(model, prompts, steps):
    return [hf_decode_with(model, p, steps, lambda logits, *_: logits.argmax()) for p in prompts]


# -- the checks before anything is built ----------------------------------------------------
@pytest.mark.parametrize(("override", "key"), [
    ({"quantization_type": "per_row_symmetric"}, "quantization_type"),
    ({"quantization_dtype": "int4"}, "quantization_dtype"),
    ({"quantization_dtype": "f8e5m2"}, "quantization_dtype"),
    ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ({"kv_cache_quant": "yes"}, "kv_cache_quant"),
])
def test_bad_quantization_keys_are_errors_naming_the_key(override, key):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    with pytest.raises(nc.NeuronConfigError, match=rf"^{key}="):
        NxdiBackend.validate(resolve({"quantized": True, **override}))


def test_quantized_needs_no_path_and_quantization_flag_is_still_refused():
    from vllm_neuronx.backends.nxdi import NxdiBackend

    NxdiBackend.validate(resolve({"quantized": True}))  # the path defaults to the artifacts
    with pytest.raises(nc.NeuronConfigError, match="neuron_quant is transformers-neuronx"):
        NxdiBackend.validate(resolve(), quantization="neuron_quant")


def test_each_quantization_key_changes_the_artifacts_key(tiny_llama):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    variants = [{}, {"quantized": True}, INT8_PER_CHANNEL,
                {"quantized": True, "quantization_dtype": "f8e4m3"},
                {**INT8_PER_CHANNEL, "modules_to_not_convert": ["lm_head"]},
                {**INT8_PER_CHANNEL, "quantized_checkpoints_path": "/tmp/q"},
                {"kv_cache_quant": True}]
    keys = {artifacts.artifact_key(resolve(v), "nxdi", NxdiBackend.version(), tiny_llama)
            for v in variants}
    assert len(keys) == len(variants)
    folders = {artifacts.artifacts_folder(tiny_llama, key) for key in keys}
    assert len(folders) == len(variants)


# -- the quantized checkpoint -------------------------------------------------------------------
def test_default_checkpoint_is_made_in_the_artifacts_folder_once(sim, tiny_llama, tmp_path):
    folder = tmp_path / "compiled"
    saves, compiles = sim.SIM_CALLS["save_quantized_state_dict"], sim.SIM_CALLS["compile"]
    backend = start(tiny_llama, folder, {"quantized": True})
    checkpoint = folder / "quantized_checkpoint"
    assert (checkpoint / "model.safetensors").is_file()
    # NxDI reads it from the final folder, not from the temporary one compile wrote into
    assert backend.config.neuron_config.quantized_checkpoints_path == str(checkpoint)
    assert "quantized_checkpoint/model.safetensors" in artifacts.read_manifest(str(folder))["files"]
    assert sim.SIM_CALLS["save_quantized_state_dict"] == saves + 1
    again = start(tiny_llama, folder, {"quantized": True})  # the next start loads it
    assert sim.SIM_CALLS["save_quantized_state_dict"] == saves + 1
    assert sim.SIM_CALLS["compile"] == compiles + 1
    ids, pos, _ = prefill_args([PROMPTS[0]])
    assert again.forward(ids, pos, torch.tensor([0]), torch.tensor([[1, 1.0, 1.0]])).tokens \
        .tolist() == backend.forward(ids, pos, torch.tensor([0]),
                                     torch.tensor([[1, 1.0, 1.0]])).tokens.tolist()


@pytest.mark.parametrize("name", ["quantized.pt", "quantized-folder"])
def test_a_given_checkpoint_path_is_made_once_then_reused(sim, tiny_llama, tmp_path, name):
    checkpoint = tmp_path / name
    if not name.endswith(".pt"):
        checkpoint.mkdir()
    overrides = {"quantized": True, "quantized_checkpoints_path": str(checkpoint)}
    before = sim.SIM_CALLS["save_quantized_state_dict"]
    start(tiny_llama, tmp_path / "a", overrides)
    assert sim.SIM_CALLS["save_quantized_state_dict"] == before + 1
    assert checkpoint.is_file() or (checkpoint / "model.safetensors").is_file()
    assert not (tmp_path / "a" / "quantized_checkpoint").exists()
    start(tiny_llama, tmp_path / "b", overrides)  # another compile: the checkpoint is there
    assert sim.SIM_CALLS["save_quantized_state_dict"] == before + 1


def test_the_simulator_refuses_a_compile_before_the_quantized_checkpoint(tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, {"quantized": True,
                                        "quantized_checkpoints_path": str(tmp_path / "q.pt")})
    model = backend.model_cls(backend.model_path, backend.config)
    with pytest.raises(FileNotFoundError, match="Quantized checkpoint file not found"):
        model.compile(str(tmp_path / "compiled"))
    neuron_config_cls = backend.model_cls.get_neuron_config_cls()
    with pytest.raises(AssertionError, match="quantized_checkpoints_path is required"):
        neuron_config_cls(quantized=True)
    with pytest.raises(AssertionError, match="not a valid QuantizedDtype"):
        neuron_config_cls(quantized=True, quantized_checkpoints_path="q", quantization_dtype="i4")


def test_per_channel_int8_checkpoint_is_nxd_quantization(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    overrides = {**INT8_PER_CHANNEL, "modules_to_not_convert": ["lm_head"],
                 "on_device_sampling_config": None}
    backend = start(tiny_llama, tmp_path / "compiled", overrides)
    saved = load_file(str(tmp_path / "compiled" / "quantized_checkpoint" / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    for name in ("layers.0.mlp.down_proj", "layers.1.self_attn.q_proj"):
        weight, scale = nxd_int8_per_channel(hf[f"model.{name}.weight"])
        assert saved[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(saved[f"{name}.weight"], weight)
        assert saved[f"{name}.scale"].dtype == torch.float32
        assert torch.equal(saved[f"{name}.scale"], scale)
    # modules_to_not_convert and the embeddings stay float, under NxDI's names
    assert torch.equal(saved["lm_head.weight"], hf["lm_head.weight"])
    assert "lm_head.scale" not in saved and saved["embed_tokens.weight"].dtype == torch.float32
    # the simulator computes with those weights: the quantized model's logits
    ids, pos, _ = prefill_args([PROMPTS[2]])
    logits = backend.forward(ids, pos, torch.tensor([0]), torch.tensor([[1, 1.0, 1.0]])).logits
    with torch.no_grad():
        quantized = hf_int8_per_channel(tiny_llama)(torch.tensor([PROMPTS[2]])).logits[0, -1]
        plain = hf_causal_lm(tiny_llama)(torch.tensor([PROMPTS[2]])).logits[0, -1]
    torch.testing.assert_close(logits[0], quantized, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[0], plain, atol=1e-3)


def test_per_tensor_int8_checkpoint_quantizes_every_linear_layer(tiny_llama, tmp_path):
    """NxD's per-tensor writer (MinMaxObserver: amax / 127.5) takes no
    modules_to_not_convert, so asking for both is refused by name."""
    with pytest.raises(nc.NeuronConfigError, match="modules_to_not_convert needs "
                                                   "quantization_type 'per_channel_symmetric'"):
        start(tiny_llama, tmp_path / "refused",
              {"quantized": True, "modules_to_not_convert": ["lm_head"]})
    start(tiny_llama, tmp_path / "compiled", {"quantized": True})
    saved = load_file(str(tmp_path / "compiled" / "quantized_checkpoint" / "model.safetensors"))
    hf = load_file(os.path.join(tiny_llama, "model.safetensors"))
    for hf_name, name in (("model.layers.0.self_attn.o_proj", "layers.0.self_attn.o_proj"),
                          ("lm_head", "lm_head")):
        w = hf[f"{hf_name}.weight"]
        scale = w.abs().max() / 127.5
        q = torch.quantize_per_tensor(w, float(scale), 0, torch.qint8).int_repr()
        assert torch.equal(saved[f"{name}.weight"], q)
        assert saved[f"{name}.scale"].shape == (1,)
        torch.testing.assert_close(saved[f"{name}.scale"], scale.reshape(1))


def test_fp8_sets_xla_handle_special_scalar(sim, tiny_llama, tmp_path, fp8_env_unset):
    overrides = {"quantized": True, "quantization_type": "per_channel_symmetric",
                 "quantization_dtype": "f8e4m3"}
    backend = make_backend(tiny_llama, overrides)
    assert os.environ["XLA_HANDLE_SPECIAL_SCALAR"] == "0"  # nothing set before compiling
    backend.compile(str(tmp_path / "compiled"))
    assert os.environ["XLA_HANDLE_SPECIAL_SCALAR"] == "1"
    backend.load(str(tmp_path / "compiled"))
    saved = load_file(str(tmp_path / "compiled" / "quantized_checkpoint" / "model.safetensors"))
    weight = saved["layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.float8_e4m3fn and weight.float().abs().max() <= 240
    # without the variable the simulator refuses to compile fp8, as a stand-in for the
    # wrong results a device gives
    os.environ["XLA_HANDLE_SPECIAL_SCALAR"] = "0"
    model = backend.model_cls(backend.model_path, backend.config)
    with pytest.raises(RuntimeError, match="XLA_HANDLE_SPECIAL_SCALAR=1"):
        model.compile(str(tmp_path / "other"))


def test_kv_cache_quant_alone_sets_the_fp8_environment(tiny_llama, tmp_path, fp8_env_unset):
    make_backend(tiny_llama, {"kv_cache_quant": True}).compile(str(tmp_path))
    assert os.environ["XLA_HANDLE_SPECIAL_SCALAR"] == "1"


def test_int8_needs_no_fp8_environment(tiny_llama, tmp_path, fp8_env_unset):
    start(tiny_llama, tmp_path / "compiled", INT8_PER_CHANNEL)
    assert os.environ["XLA_HANDLE_SPECIAL_SCALAR"] == "0"


# -- the engine, end to end -----------------------------------------------------------------------
def test_llm_with_int8_per_channel_gives_the_quantized_models_tokens(sim, tiny_llama, tmp_path,
                                                                      monkeypatch):
    folder = tmp_path / "compiled"
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(folder))
    saves = sim.SIM_CALLS["save_quantized_state_dict"]
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32",
              override_neuron_config={**INT8_PER_CHANNEL, "modules_to_not_convert": ["lm_head"]})
    try:
        assert sim.SIM_CALLS["save_quantized_state_dict"] == saves + 1
        assert (folder / "quantized_checkpoint" / "model.safetensors").is_file()
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == greedy_tokens(hf_int8_per_channel(tiny_llama), PROMPTS, 8)
    finally:
        del llm
