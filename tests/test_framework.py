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
