"""What no backend serves yet is refused by name (vllm_neuronx/unserved.py), at start-up
for config keys and vLLM features, at the request for multimodal input; the engine
keeps serving what it can."""

from __future__ import annotations

import types

import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs

from vllm_neuronx import neuron_config as nc
from vllm_neuronx import platform_config, unserved, validation
from vllm_neuronx.platform_config import NeuronSettings

CASES = [(key, backend) for key, entry in sorted(unserved.UNSERVED_KEYS.items())
         for backend in sorted(entry.backends)]


@pytest.mark.parametrize(("key", "backend"), CASES)
def test_every_unserved_key_is_refused_by_name_with_its_issue(key, backend):
    entry = unserved.UNSERVED_KEYS[key]
    with pytest.raises(nc.NeuronConfigError) as e:
        unserved.check_neuron_config({key: True}, backend)
    assert repr(key) in str(e.value) and entry.what in str(e.value)
    if entry.issue:
        assert f"issue {entry.issue}" in str(e.value)


def test_keys_off_or_served_elsewhere_pass():
    # The default config carries quantized=False: asking for nothing is not refused.
    defaults = nc.default_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                        dtype="float32")
    for backend in unserved.ALL_BACKENDS:
        unserved.check_neuron_config(defaults, backend)
    # NxDI quantizes from its own config keys.
    unserved.check_neuron_config({"quantized": True, "quantization_dtype": "int8"}, "nxdi")
    # What NxDI saves in every compiled config sizes features, it does not ask for them.
    unserved.check_neuron_config({"spec_batch_size": 4, "pa_num_blocks": 4, "pa_block_size": 512,
                                  "speculation_length": 0, "is_prefix_caching": False}, "nxdi")


def engine_config(model: str, **kwargs):
    return EngineArgs(model=model, max_num_seqs=2, max_model_len=64, dtype="float32",
                      skip_tokenizer_init=True, **kwargs).create_engine_config()


def test_activation_quantization_on_the_cpu_backend_fails_at_start_up_not_silently(tiny_llama):
    overrides = {"quantized": True, "quantization_dtype": "int8",
                 "activation_quantization_type": "dynamic",
                 "quantized_mlp_kernel_enabled": True}
    with pytest.raises(ValueError, match="'quantized_mlp_kernel_enabled'.*activation "
                                         "quantization.*also refused: "
                                         "activation_quantization_type"):
        engine_config(tiny_llama, device="neuron", override_neuron_config=overrides)


def test_speculation_is_served_on_cpu_and_nxdi_and_refused_on_tnx(tiny_llama):
    spec_only = types.SimpleNamespace(lora_config=None, speculative_config=object())
    unserved.check_vllm_features(spec_only, "cpu")
    unserved.check_vllm_features(spec_only, "nxdi")
    with pytest.raises(nc.NeuronConfigError, match="speculative_config: speculative decoding "
                                                   "is not served by the tnx backend"):
        unserved.check_vllm_features(spec_only, "tnx")


def test_lora_is_served_on_cpu_and_nxdi_and_refused_on_tnx(tiny_llama):
    config = engine_config(tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=8)
    assert config.lora_config.max_loras == 2
    lora_only = types.SimpleNamespace(lora_config=config.lora_config, speculative_config=None)
    for backend in ("cpu", "nxdi"):
        unserved.check_vllm_features(lora_only, backend)
    with pytest.raises(nc.NeuronConfigError,
                       match="enable_lora: LoRA adapters is not served by the tnx backend"):
        unserved.check_vllm_features(lora_only, "tnx")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fully_sharded_loras": True}, "fully_sharded_loras: .*would change nothing"),
    ({"lora_dtype": "bfloat16"}, r"lora_dtype=bfloat16: .*the model's dtype \(float32\); "
                                 "use lora_dtype='auto'"),
    ({"enable_tower_connector_lora": True}, "enable_tower_connector_lora: adapters apply to "
                                            "the language model"),
])
def test_lora_settings_no_backend_honours_fail_at_start_up_by_name(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine_config(tiny_llama, enable_lora=True, **kwargs)


def test_lora_dtype_equal_to_the_model_dtype_passes(tiny_llama):
    config = engine_config(tiny_llama, enable_lora=True, lora_dtype="auto")
    assert config.lora_config is not None


@pytest.mark.parametrize(("cache_dtype", "match"), [
    ("fp8", r"kv_cache_dtype='fp8': .*model's dtype \(float32\); use 'auto' for an fp8 "
            r'cache .*"kv_cache_quant": true'),
    ("bfloat16", r"kv_cache_dtype='bfloat16': .*model's dtype \(float32\); use 'auto' \["),
])
def test_a_kv_cache_dtype_no_backend_keeps_fails_at_start_up_by_name(tiny_llama, cache_dtype,
                                                                      match):
    with pytest.raises(ValueError, match=match):
        engine_config(tiny_llama, device="neuron", kv_cache_dtype=cache_dtype)


def test_the_models_own_kv_cache_dtype_passes(tiny_llama):
    for cache_dtype in ("auto", "float32"):
        unserved.check_kv_cache_dtype(cache_dtype, "float32")
    config = engine_config(tiny_llama, device="neuron", kv_cache_dtype="auto")
    assert config.cache_config.cache_dtype == "auto"


def test_default_mm_loras_is_refused_by_name():
    """(vLLM refuses it first for a text model; a multimodal one would reach our check.)"""
    from vllm.config.lora import LoRAConfig

    from vllm_neuronx.lora.config import check_lora_config

    lora = LoRAConfig(default_mm_loras={"image": "/tmp/a"})
    with pytest.raises(nc.NeuronConfigError, match="default_mm_loras: multimodal input is not "
                                                   "served"):
        check_lora_config(lora, "float32", "nxdi")
    check_lora_config(LoRAConfig(), "float32", "nxdi")


def test_multimodal_input_is_refused_at_the_request(monkeypatch):
    cfg = nc.default_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                   dtype="float32")
    monkeypatch.setattr(platform_config, "_CURRENT", NeuronSettings("cpu", "cpu", "cpu", cfg))
    params = SamplingParams(temperature=0.0, max_tokens=4)
    image = {"type": "multimodal", "prompt_token_ids": [1, 2, 3],
             "mm_kwargs": {"image": [object()]}}
    with pytest.raises(validation.NeuronRequestError, match="multimodal input.*carries image"):
        validation.validate_request(image, params)
    validation.validate_request({"prompt_token_ids": [1, 2, 3]}, params)  # text passes


def test_nxdi_lora_keys_need_vllms_lora_and_vllms_settings_reach_the_neuron_config():
    from vllm.config.lora import LoRAConfig

    with pytest.raises(nc.NeuronConfigError, match="override_neuron_config key 'lora_modules' "
                                                   "asks for LoRA adapters, but vLLM's LoRA is "
                                                   r"off: set enable_lora=True"):
        platform_config._lora_into_neuron_config({}, {"lora_modules": ["a=/x"]}, None, "nxdi")
    cfg = {"lora_config": {"eviction_policy": "lru"}}
    platform_config._lora_into_neuron_config(
        cfg, cfg, LoRAConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=3), "nxdi")
    assert cfg["lora_config"] == {"eviction_policy": "lru", "max_loras": 2, "max_lora_rank": 8,
                                  "max_cpu_loras": 3}
    cpu = {}
    platform_config._lora_into_neuron_config(cpu, {}, LoRAConfig(), "cpu")
    assert cpu == {}  # the CPU backend takes them from vLLM's config (init_lora)
