"""The patch table against the installed vLLM: every target resolves, and a target that is
missing or changed, or another vLLM release, is an error naming the patch and the version."""

from __future__ import annotations

import dataclasses
import importlib
import types

import pytest

from vllm_neuronx import patches
from vllm_neuronx.patches import PATCHED, Patch, PatchError, resolve
from vllm_neuronx.patches.table import PATCHES


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"{p.name}:{p.target}")
def test_every_target_resolves_in_the_installed_vllm(patch: Patch):
    owner, name, target = resolve(patch)
    assert callable(target)
    for field in ("upstream", "why", "until"):
        assert getattr(patch, field).strip(), f"{patch.name} has no '{field}'"


@pytest.mark.parametrize("patch", [p for p in PATCHES if p.wrap is not None],
                         ids=lambda p: f"{p.name}:{p.target}")
def test_every_wrapping_patch_is_applied_once_its_module_is_imported(patch: Patch):
    importlib.import_module(patch.module)
    patches.apply_all()
    _, _, target = resolve(patch)
    assert patch.name in getattr(target, PATCHED, frozenset()), patch.target


def test_a_missing_target_names_the_patch_and_the_version():
    gone = dataclasses.replace(PATCHES[0], name="engine-args",
                               attribute="EngineArgs.no_such_method")
    with pytest.raises(PatchError, match=r"patch 'engine-args': upstream "
                       r"vllm\.engine\.arg_utils\.EngineArgs\.no_such_method is missing "
                       r"in vLLM 0\.16\.0"):
        resolve(gone)


def test_a_changed_signature_is_an_error():
    [death] = [p for p in PATCHES if p.attribute == "terminate_if_errored"]
    changed = types.ModuleType(death.module)
    changed.terminate_if_errored = lambda uvicorn_server, client: None
    with pytest.raises(PatchError, match=r"'engine-death'.*has no parameter server, "
                       r"engine: its signature changed"):
        resolve(death, changed)


def test_upstream_taking_over_an_added_parameter_is_an_error():
    [init] = [p for p in PATCHES if p.attribute == "EngineArgs.__init__"]
    clashing = types.ModuleType("vllm.engine.arg_utils")

    class EngineArgs:
        def __init__(self, additional_config, tensor_parallel_size, max_num_seqs, device):
            pass

    clashing.EngineArgs = EngineArgs
    with pytest.raises(PatchError, match="now has the parameter device"):
        resolve(init, clashing)


def test_another_vllm_release_is_refused_at_start_up(monkeypatch):
    monkeypatch.setattr(patches, "installed_vllm", lambda: "0.17.0")
    with pytest.raises(PatchError, match=r"written against vLLM 0\.16\.0, but vLLM 0\.17\.0 "
                       r"is installed.*Moving to a new vLLM"):
        patches.apply_all()


def test_every_patch_has_its_row_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip() for line in readme.splitlines()
            if line.startswith("| ") and line.count("|") >= 4}
    missing = sorted({p.name for p in PATCHES} - rows)
    assert not missing, f"README.md's patch table lacks {missing}"
