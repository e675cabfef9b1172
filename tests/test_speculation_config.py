"""vLLM's speculative_config -> fused speculation's neuron config (vllm_neuronx/speculation.py):
k's meaning, the KV line's length, and every setting the fused graph cannot honour refused
by name at start-up."""

from __future__ import annotations

import shutil

import pytest
from vllm.engine.arg_utils import EngineArgs

from tests.conftest import make_tiny_llama
from vllm_neuronx import neuron_config as nc
from vllm_neuronx import speculation
from vllm_neuronx.speculation import Draft


@pytest.fixture(scope="module")
def draft(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), seed=1, num_hidden_layers=1)


def engine_config(model: str, **kwargs):
    kwargs.setdefault("max_model_len", 64)
    return EngineArgs(model=model, max_num_seqs=2, dtype="float32", skip_tokenizer_init=True,
                      **kwargs).create_engine_config()


def settings_of(config) -> dict:
    return config.additional_config["neuron_settings"]


def test_a_draft_model_without_method_is_a_draft_model_and_k_is_n_plus_one(tiny_llama, draft):
    config = engine_config(tiny_llama, device="neuron",
                           speculative_config={"model": draft, "num_speculative_tokens": 3})
    assert config.speculative_config.method == "draft_model"
    cfg = settings_of(config)["neuron_config"]
    # n = 3 proposals per step -> NxDI's speculation_length k = 4 tokens at most per step.
    assert cfg["speculation_length"] == 4 and cfg["enable_fused_speculation"] is True
    assert "enable_eagle_speculation" not in cfg and "is_eagle3" not in cfg
    # A fused step writes k positions whatever it accepts: the KV line holds them.
    assert cfg["seq_len"] == 64 + 4 and config.model_config.max_model_len == 64
    assert nc.token_buckets(cfg)[-1] == 68
    assert settings_of(config)["draft"] == {"method": "draft_model", "path": draft,
                                            "num_speculative_tokens": 3}


def test_eagle_methods_set_nxdis_eagle_keys():
    eagle = speculation.neuron_config_keys(Draft("eagle", "/x", 2))
    assert eagle == {"speculation_length": 3, "enable_fused_speculation": True,
                     "enable_eagle_speculation": True}
    eagle3 = speculation.neuron_config_keys(Draft("eagle3", "/x", 5))
    assert eagle3["is_eagle3"] is True and eagle3["speculation_length"] == 6


@pytest.mark.parametrize(("spec", "match"), [
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
     "method 'ngram' is not served on Neuron"),
    ({"model": "DRAFT", "num_speculative_tokens": 3, "disable_by_batch_size": 4},
     "disable_by_batch_size=4 is not served"),
    ({"model": "DRAFT", "num_speculative_tokens": 2, "speculative_token_tree": "[(0,), (1,)]"},
     "speculative_token_tree is not served"),
    ({"model": "DRAFT", "num_speculative_tokens": 2, "parallel_drafting": True},
     "parallel_drafting=True is not served"),
])
def test_what_the_fused_graph_cannot_do_is_refused_by_name(tiny_llama, draft, spec, match):
    spec = {k: draft if v == "DRAFT" else v for k, v in spec.items()}
    with pytest.raises(ValueError, match=match):
        engine_config(tiny_llama, speculative_config=spec)


def test_overrides_may_repeat_the_keys_but_not_contradict_them(tiny_llama, draft):
    spec = {"model": draft, "num_speculative_tokens": 3}
    same = engine_config(tiny_llama, speculative_config=spec, override_neuron_config={
        "speculation_length": 4, "enable_fused_speculation": True})
    assert settings_of(same)["neuron_config"]["speculation_length"] == 4
    # Passing vLLM's n as NxDI's k (what both earlier plugins did) is named.
    with pytest.raises(ValueError, match="speculation_length=3 contradicts speculative_config"):
        engine_config(tiny_llama, speculative_config=spec,
                      override_neuron_config={"speculation_length": 3})
    with pytest.raises(ValueError, match="enable_eagle_speculation=True contradicts"):
        engine_config(tiny_llama, speculative_config=spec,
                      override_neuron_config={"enable_eagle_speculation": True})


def test_speculation_keys_without_speculative_config_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="'speculation_length' asks for speculative "
                                         "decoding; set speculative_config"):
        engine_config(tiny_llama, override_neuron_config={"enable_fused_speculation": True,
                                                          "speculation_length": 4})


def test_speculation_needs_on_device_sampling(tiny_llama, draft, monkeypatch):
    monkeypatch.setenv("NEURON_ON_DEVICE_SAMPLING_DISABLED", "1")
    with pytest.raises(ValueError, match="speculative decoding accepts the draft's tokens on "
                                         "the device, so it needs on-device sampling"):
        engine_config(tiny_llama, speculative_config={"model": draft,
                                                      "num_speculative_tokens": 2})


def test_speculation_with_lora_is_refused_by_name(tiny_llama, draft):
    with pytest.raises(ValueError, match="speculative decoding with LoRA adapters"):
        engine_config(tiny_llama, enable_lora=True, max_loras=1, max_lora_rank=8,
                      speculative_config={"model": draft, "num_speculative_tokens": 2})


def test_a_draft_that_is_not_a_local_folder_is_named(tiny_llama, tmp_path):
    missing = str(tmp_path / "no-such-draft")
    with pytest.raises(Exception, match="no-such-draft"):
        engine_config(tiny_llama, speculative_config={"model": missing,
                                                      "num_speculative_tokens": 2})


def test_the_artifacts_key_follows_the_draft(tiny_llama, draft, tmp_path):
    from vllm_neuronx.artifacts import artifact_key

    cfg = {"seq_len": 68}
    plain = artifact_key(cfg, "cpu", "1", tiny_llama)
    first = artifact_key(cfg, "cpu", "1", tiny_llama, Draft("draft_model", draft, 3))
    other = shutil.copytree(draft, tmp_path / "draft2")
    (other / "model.safetensors").write_bytes(b"changed")
    second = artifact_key(cfg, "cpu", "1", tiny_llama, Draft("draft_model", str(other), 3))
    assert len({plain, first, second}) == 3


def test_a_draft_folder_without_weights_or_an_eagle_head_without_fc_is_named_at_start_up(
        tiny_llama, draft, tmp_path):
    empty = tmp_path / "config-only"
    empty.mkdir()
    shutil.copy(f"{draft}/config.json", empty / "config.json")
    with pytest.raises(ValueError, match="config-only: no \\*.safetensors weights for the "
                                         "draft model"):
        engine_config(tiny_llama, speculative_config={"model": str(empty),
                                                      "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="no fc.weight, so it is not an EAGLE head"):
        engine_config(tiny_llama, speculative_config={"model": draft, "method": "eagle",
                                                      "num_speculative_tokens": 2})
