"""Qwen2, Qwen3, Mixtral and Qwen3-MoE through the NxDI backend against the NxDI
simulator (its model classes compute with our CPU models): LLM.generate's greedy tokens
equal HF's with requests joining and leaving mid-flight, and a family newer than the
installed NxDI is refused at start-up, naming the release it needs."""

from __future__ import annotations

import pytest
from vllm import LLM
from vllm.engine.arg_utils import EngineArgs

from tests.engine_checks import check_greedy_matches_hf, use_nxdi_simulator
from tests.tiny_families import make_tiny


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_family_through_nxdi_matches_hf(sim, tmp_path, monkeypatch, family):
    model = make_tiny(tmp_path / "model", family)
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "compiled"))
    llm = LLM(model=model, device="neuron", max_num_seqs=2, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32")
    try:
        (view,) = llm.collective_rpc("get_model")
        assert view.backend_name == "NxdiBackend"
        forwards = sim.SIM_CALLS["forward"]
        prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 7, [40], [41, 42, 43]]
        check_greedy_matches_hf(llm, model, prompts, [8, 3, 6, 5, 7])
        assert sim.SIM_CALLS["forward"] > forwards  # the simulator computed them
    finally:
        del llm


@pytest.mark.parametrize(("family", "arch", "needs"), [
    ("qwen2", "Qwen2ForCausalLM", "0.4"),
    ("qwen3", "Qwen3ForCausalLM", "0.5"),
    ("qwen3_moe", "Qwen3MoeForCausalLM", "0.5"),
])
def test_a_family_newer_than_the_installed_nxdi_is_refused_at_start_up(tmp_path, monkeypatch,
                                                                       family, arch, needs):
    from vllm_neuronx.backends import nxdi

    model = make_tiny(tmp_path / "model", family)
    monkeypatch.setattr(nxdi, "installed_release", lambda: ("0.3.5591", (0, 3)))
    with pytest.raises(ValueError, match=rf"{arch} needs neuronx-distributed-inference >= "
                                         rf"{needs} .*this host has 0\.3\.5591"):
        EngineArgs(model=model, device="neuron", max_num_seqs=2, max_model_len=64,
                   skip_tokenizer_init=True, dtype="float32").create_engine_config()
    # The release that has it starts.
    monkeypatch.setattr(nxdi, "installed_release", lambda: ("0.10.18399", (0, 10)))
    EngineArgs(model=model, device="neuron", max_num_seqs=2, max_model_len=64,
               skip_tokenizer_init=True, dtype="float32").create_engine_config()
