"""What no backend serves yet is refused by name (vllm_neuronx/unserved.py), at start-up
for config keys and vLLM features, at the request for multimodal input; the engine
keeps serving what it can."""

from __future__ import annotations

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


@pytest.mark.parametrize(("kwargs", "setting", "issue"), [
    ({"enable_lora": True}, "enable_lora", 19),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                             "prompt_lookup_max": 3}}, "speculative_config", 20),
])
def test_vllm_features_no_backend_serves_fail_at_start_up(tiny_llama, kwargs, setting, issue):
    with pytest.raises(ValueError, match=f"{setting}: .* not served by the cpu backend yet "
                                         rf"\(planned: issue {issue}\)"):
        engine_config(tiny_llama, **kwargs)


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
