"""Framework choice: VLLM_NEURON_FRAMEWORK, the device, and what is installed."""

from __future__ import annotations

import pytest

from vllm_neuronx.framework import CPU, NXDI, TNX, choose


def pick(requested, device=False, nxdi=False, tnx=False, forced=None):
    return choose(requested, device_present=device, nxdi_installed=nxdi, tnx_installed=tnx,
                  forced_backend=forced)


@pytest.mark.parametrize("requested", [NXDI, TNX, None])
def test_without_a_device_every_choice_runs_on_cpu_with_one_warning(requested):
    choice = pick(requested)
    assert choice.backend == "cpu"
    assert "no Neuron device" in choice.warning


def test_cpu_chosen_explicitly_has_no_warning():
    assert pick(CPU) == pick(CPU, device=True)
    assert pick(CPU).warning is None and pick(CPU).backend == "cpu"


def test_default_is_nxdi_when_installed_else_tnx():
    assert pick(None, device=True, nxdi=True, tnx=True).backend == "nxdi"
    assert pick(None, device=True, tnx=True).backend == "tnx"


def test_on_a_neuron_host_a_missing_framework_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="neuronx_distributed_inference is not installed"):
        pick(NXDI, device=True, tnx=True)
    with pytest.raises(RuntimeError, match="transformers_neuronx is not installed"):
        pick(TNX, device=True, nxdi=True)


def test_unknown_framework_is_named():
    with pytest.raises(ValueError, match="'tensorflow' is not a framework"):
        pick("tensorflow")


def test_forced_backend_routes_through_a_simulator_without_a_device():
    assert pick(NXDI, forced="nxdi").backend == "nxdi"


# -- transformers-neuronx: AWS ended its support, start-up says so -------------------------------

@pytest.mark.parametrize(
    "choice",
    [
        pick(TNX, device=True, tnx=True),  # on a Neuron host
        pick(TNX),  # without a device: on the CPU backend, and still told
        pick(None, device=True, tnx=True),  # the default where only TNx is installed
        pick(NXDI, forced="tnx"),  # the tests' route through the TNx simulator
    ],
)
def test_choosing_tnx_carries_its_end_of_support(choice):
    assert "2025-09-16" in choice.deprecation and "SDK 2.26" in choice.deprecation
    assert "VLLM_NEURON_FRAMEWORK=neuronx-distributed-inference" in choice.deprecation


@pytest.mark.parametrize("choice", [pick(NXDI), pick(NXDI, device=True, nxdi=True), pick(CPU)])
def test_other_frameworks_carry_no_deprecation(choice):
    assert choice.deprecation is None


@pytest.fixture()
def framework_log(monkeypatch):
    """Records of the framework's logger. vLLM configures logging at its import, which
    drops the handlers of loggers under "vllm": import it first."""
    import logging

    import vllm.logger  # noqa: F401

    from vllm_neuronx import framework

    caught: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = caught.append
    framework.logger.addHandler(handler)
    for var in ("VLLM_NEURON_FRAMEWORK", "VLLM_NEURONX_FORCE_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    yield caught
    framework.logger.removeHandler(handler)


@pytest.mark.parametrize("requested, lines", [(TNX, 1), (NXDI, 0), (CPU, 0)])
def test_choose_from_env_logs_the_deprecation_once(framework_log, monkeypatch, requested, lines):
    from vllm_neuronx.framework import choose_from_env

    monkeypatch.setenv("VLLM_NEURON_FRAMEWORK", requested)
    choose_from_env()
    deprecations = [r for r in framework_log if "deprecated" in r.getMessage()]
    assert len(deprecations) == lines
    if lines:
        assert "2025-09-16" in deprecations[0].getMessage()


@pytest.mark.slow
def test_an_engine_on_tnx_logs_the_deprecation_once_at_start_up(framework_log, tiny_llama):
    """End to end through the TNx simulator: one line per engine start, not per step."""
    from vllm import LLM, SamplingParams

    from tests.engine_checks import use_simulator

    sim = use_simulator("transformers_neuronx", "tnx", VLLM_NEURON_FRAMEWORK=TNX)
    next(sim)
    try:
        llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=2, max_model_len=128,
                  skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2)
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                          detokenize=False))
        assert len(out[0].outputs[0].token_ids) == 4
        del llm
    finally:
        sim.close()
    deprecations = [r for r in framework_log if "transformers-neuronx is deprecated" in
                    r.getMessage()]
    assert len(deprecations) == 1
