"""PEFT adapter folders: the scaling read from them, and every refusal naming the adapter,
its path and the problem (vllm_neuronx/lora/peft.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.lora_utils import make_peft_adapter
from vllm_neuronx.lora import peft

# The tiny Llama of tests/conftest.py: hidden 64, 4 heads and 2 KV heads of 16,
# intermediate 128, 2 layers.
DIMS = peft.ModelDims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2)
KEY = "base_model.model.model.layers.{layer}.{section}.{proj}.lora_{ab}.weight"
SECTION = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_tensors(layer: int, proj: str, r: int = 8, shape=None) -> dict[str, torch.Tensor]:
    fan_in, fan_out = shape or DIMS.shape(proj)
    key = KEY.format(layer=layer, section=SECTION[proj], proj=proj, ab="{}")
    return {key.format("A"): torch.randn(r, fan_in), key.format("B"): torch.randn(fan_out, r)}


def write_adapter(folder, config=None, tensors=None, *, file="adapter_model.safetensors"):
    """A PEFT folder written by hand: r 8, alpha 16, q_proj and down_proj of layer 0."""
    os.makedirs(folder, exist_ok=True)
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
           "bias": "none", "peft_type": "LORA", "use_rslora": False, "rank_pattern": {},
           "alpha_pattern": {}, "use_dora": False, "modules_to_save": None}
    cfg.update(config or {})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not ...}, f)
    if tensors is None:
        tensors = {**module_tensors(0, "q_proj"), **module_tensors(0, "down_proj")}
    if file.endswith(".safetensors"):
        save_file(tensors, os.path.join(folder, file))
    else:
        torch.save(tensors, os.path.join(folder, file))
    return str(folder)


def refused(path, problem: str, *, name="bad", dims=DIMS, max_lora_rank=16, **kwargs):
    prefix = re.escape(f"LoRA adapter '{name}' ({path}): ")
    with pytest.raises(peft.AdapterError, match=prefix + ".*" + problem):
        peft.inspect(name, str(path), dims, max_lora_rank, **kwargs)


def test_scaling_of_peft_adapters_plain_and_rslora(tiny_llama, tmp_path):
    plain = make_peft_adapter(tiny_llama, tmp_path / "plain", r=8, alpha=16)
    rs = make_peft_adapter(tiny_llama, tmp_path / "rs", r=4, alpha=8, use_rslora=True,
                           targets=("q_proj", "v_proj"))
    spec = peft.inspect("plain", plain, DIMS, 16)
    assert spec.scaling == 16 / 8 and spec.max_rank == 8
    assert spec.modules == set(peft.TARGETS)
    assert dict(spec.ranks) == {(i, p): 8 for i in range(2) for p in peft.TARGETS}
    spec = peft.inspect("rs", rs, DIMS, 16)
    assert spec.scaling == pytest.approx(8 / math.sqrt(4))
    assert spec.modules == {"q_proj", "v_proj"} and spec.name == "rs" and spec.path == rs
    loaded = peft.load(spec)
    assert set(loaded) == {(i, p) for i in range(2) for p in ("q_proj", "v_proj")}
    a, b = loaded[1, "v_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4) and a.dtype == b.dtype == torch.float32
    assert b.abs().sum() > 0  # init_lora_weights=False: B is random


def test_model_dims_from_an_hf_config(tiny_llama):
    from transformers import AutoConfig

    assert peft.ModelDims.from_hf(AutoConfig.from_pretrained(tiny_llama)) == DIMS
    moe = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "num_hidden_layers": 4, "num_experts": 8,
           "decoder_sparse_step": 1, "mlp_only_layers": [0], "head_dim": 32}
    dims = peft.ModelDims.from_hf(moe)
    assert dims.moe_layers == {1, 2, 3} and dims.head_dim == 32
    assert dims.shape("q_proj") == (64, 128) and dims.shape("o_proj") == (128, 64)
    with pytest.raises(ValueError, match="intermediate_size"):
        peft.ModelDims.from_hf({"hidden_size": 8, "num_attention_heads": 1,
                                "num_hidden_layers": 1})


def test_a_missing_folder_or_config_is_no_adapter_found(tmp_path):
    refused(tmp_path / "nowhere", f"No adapter found for {re.escape(str(tmp_path))}/nowhere")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "No adapter found for")


@pytest.mark.parametrize("config,problem", [
    ({"lora_alpha": ...}, r"Missing required configuration fields: \{'lora_alpha'\}"),
    ({"target_modules": ...}, "Missing required configuration fields"),
    ({"r": 32}, "LoRA rank 32 is greater than max_lora_rank 16"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": "8"}, "r must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha must be a number"),
    ({"bias": "all"}, "Adapter bias is not supported"),
    ({"use_dora": True}, "use_dora=True not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern=\{'q_proj': 4\} not supported"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not a LoRA adapter"),
])
def test_config_refusals_name_the_problem(tmp_path, config, problem):
    refused(write_adapter(tmp_path / "a", config), problem)


def test_malformed_config_and_missing_weights(tmp_path):
    folder = write_adapter(tmp_path / "a")
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write("{not json")
    refused(folder, "malformed adapter_config.json")
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write("[1, 2]")
    refused(folder, "malformed adapter_config.json: not a JSON object")
    folder = write_adapter(tmp_path / "b")
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    refused(folder, r"no adapter weights \(adapter_model.safetensors or adapter_model.bin\)")
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    refused(folder, "unreadable adapter_model.safetensors")
    refused(write_adapter(tmp_path / "c", tensors={}), "holds no LoRA weights")


@pytest.mark.parametrize("tensors,problem", [
    (lambda: {"base_model.model.lm_head.lora_A.weight": torch.randn(8, 64),
              "base_model.model.lm_head.lora_B.weight": torch.randn(512, 8)},
     r"targets modules the model lacks \(or the backend cannot adapt\): \['lm_head'\]"),
    (lambda: {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(8, 512),
              "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(64, 8)},
     r"\['model.embed_tokens'\]"),
    (lambda: module_tensors(2, "q_proj"), r"\['model.layers.2.self_attn.q_proj'\]"),
    (lambda: {"base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_A.weight":
              torch.randn(8, 64)}, r"\['model.layers.0.mlp.experts.0.gate_proj'\]"),
    (lambda: {"base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight":
              torch.randn(8, 64)}, r"\['model.layers.0.self_attn.gate_proj'\]"),
    (lambda: {k: v for k, v in module_tensors(1, "k_proj").items() if "lora_A" in k},
     "k_proj of layer 1: lora_A without its lora_B"),
    (lambda: {k: v for k, v in module_tensors(1, "k_proj").items() if "lora_B" in k},
     "k_proj of layer 1: lora_B without its lora_A"),
    (lambda: module_tensors(0, "q_proj", shape=(32, 64)),
     r"q_proj of layer 0: lora_A is \[8, 32\], the model needs \[8, 64\]"),
    (lambda: module_tensors(1, "down_proj", shape=(128, 32)),
     r"down_proj of layer 1: lora_B is \[32, 8\], the model needs \[64, 8\]"),
    (lambda: module_tensors(0, "v_proj", r=4),
     r"v_proj of layer 0: lora_A is \[4, 64\], the model needs \[8, 64\] \(r=8\)"),
    (lambda: {k: v.to(torch.int8) for k, v in module_tensors(0, "o_proj").items()},
     "o_proj of layer 0: lora_A holds I8, not floating point"),
])
def test_tensor_refusals_name_the_module_and_the_problem(tmp_path, tensors, problem):
    refused(write_adapter(tmp_path / "a", tensors=tensors()), problem)


def test_refusals_that_depend_on_the_model_or_the_backend(tmp_path):
    folder = write_adapter(tmp_path / "a", tensors={**module_tensors(0, "q_proj"),
                                                    **module_tensors(1, "up_proj")})
    moe = dataclasses.replace(DIMS, moe_layers=frozenset({1}))
    refused(folder, r"\['model.layers.1.mlp.up_proj'\]", dims=moe)
    refused(folder, r"\['model.layers.1.mlp.up_proj'\]; adaptable: \['q_proj'\]",
            targets=("q_proj",))
    refused(folder, "LoRA rank 8 is greater than max_lora_rank 4", max_lora_rank=4)
    assert peft.inspect("ok", folder, DIMS, 8).ranks == (((0, "q_proj"), 8), ((1, "up_proj"), 8))


def test_inspect_reads_the_header_only_and_is_cached_by_mtime(tmp_path, monkeypatch):
    folder = write_adapter(tmp_path / "a")
    real = peft.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(peft, "safe_open", HeaderOnly)
    spec = peft.inspect("a", folder, DIMS, 16)
    assert spec.scaling == 2.0
    monkeypatch.setattr(peft, "safe_open", lambda *a, **k: pytest.fail("not cached"))
    assert peft.inspect("a", folder, DIMS, 16) is spec
    monkeypatch.setattr(peft, "safe_open", real)
    write_adapter(folder, {"lora_alpha": 32})
    config = os.path.join(folder, "adapter_config.json")
    st = os.stat(config)
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks
    assert peft.inspect("a", folder, DIMS, 16).scaling == 4.0


def test_bin_adapters_and_load_checks_the_folder_did_not_change(tmp_path):
    tensors = {**module_tensors(0, "q_proj"), **module_tensors(1, "gate_proj")}
    folder = write_adapter(tmp_path / "a", tensors=tensors, file="adapter_model.bin")
    spec = peft.inspect("bin", folder, DIMS, 16)
    loaded = peft.load(spec)
    key = KEY.format(layer=1, section="mlp", proj="gate_proj", ab="{}")
    assert torch.equal(loaded[1, "gate_proj"][0], tensors[key.format("A")])
    assert torch.equal(loaded[1, "gate_proj"][1], tensors[key.format("B")])
    torch.save(module_tensors(0, "q_proj", r=4), os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(peft.AdapterError, match="q_proj of layer 0 changed after the adapter "
                                                "was checked"):
        peft.load(spec)
