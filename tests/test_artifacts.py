"""The compiled-artifact cache: every rule of NEURON_COMPILED_ARTIFACTS, on the CPU backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_neuronx import artifacts
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.loader import load_backend
from vllm_neuronx.platform_config import NeuronSettings

ROOT = Path(__file__).resolve().parents[1]


def settings(batch: int = 2, max_len: int = 64) -> NeuronSettings:
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=batch, max_model_len=max_len,
                                   dtype="float32")
    return NeuronSettings("cpu", "cpu", "cpu", cfg)


@pytest.fixture()
def model(tmp_path, tiny_llama):
    """A private copy of the tiny model, so default artifact folders start empty."""
    dest = tmp_path / "model"
    dest.mkdir()
    for name in os.listdir(tiny_llama):
        src = Path(tiny_llama, name)
        if src.is_file():
            (dest / name).write_bytes(src.read_bytes())
    return str(dest)


@pytest.fixture()
def explicit(tmp_path, monkeypatch):
    folder = tmp_path / "artifacts"
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(folder))
    return folder


def test_default_folder_is_under_the_model_and_reused(model, monkeypatch):
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)
    _, first = load_backend(model, settings())
    _, second = load_backend(model, settings())
    assert first.compiled and not second.compiled
    assert first.folder == second.folder
    assert Path(first.folder).parent == Path(model, artifacts.DEFAULT_SUBDIR)
    _, other = load_backend(model, settings(batch=3))
    assert other.compiled and other.folder != first.folder  # the key covers the config


def test_explicit_folder_compiles_once_then_loads(model, explicit):
    _, first = load_backend(model, settings())
    _, second = load_backend(model, settings())
    assert first.compiled and not second.compiled and first.folder == str(explicit)
    manifest = json.loads((explicit / artifacts.MANIFEST).read_text())
    assert manifest["neuron_config"]["batch_size"] == 2
    assert set(manifest["files"]) == {"weights.safetensors"}


def test_precompiled_config_wins_and_the_difference_is_reported(model, explicit):
    load_backend(model, settings(batch=2))
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model, max_num_seqs=4, max_model_len=64, dtype="float32",
                        skip_tokenizer_init=True).create_engine_config()
    assert config.scheduler_config.max_num_seqs == 2  # vLLM follows the artifacts
    assert config.additional_config["neuron_settings"]["neuron_config"]["batch_size"] == 2
    config.scheduler_config.max_num_seqs = 4
    resolved, warnings = NeuronSettings.resolve(config)
    assert resolved.neuron_config["batch_size"] == 2
    assert any("config wins over vLLM's arguments" in w and "batch_size: 4 -> 2" in w
               for w in warnings), warnings
    _, result = load_backend(model, resolved)
    assert not result.compiled


def test_corrupt_file_is_detected_by_checksum_and_rebuilt(model, explicit):
    load_backend(model, settings())
    weights = explicit / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\x00" * 10  # same size, other bytes
    weights.write_bytes(bytes(data))
    backend, result = load_backend(model, settings())
    assert result.compiled
    assert artifacts.read_manifest(str(explicit)) is not None


def test_truncated_or_partial_folder_is_rebuilt(model, explicit):
    load_backend(model, settings())
    weights = explicit / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert load_backend(model, settings())[1].compiled
    (explicit / artifacts.MANIFEST).unlink()  # a folder left without its manifest
    assert load_backend(model, settings())[1].compiled


def test_failed_load_recompiles_with_the_current_config(model, explicit):
    load_backend(model, settings())
    (explicit / "weights.safetensors").write_bytes(b"not a safetensors file")
    artifacts._write_manifest(str(explicit), "k", settings().neuron_config, "cpu")  # intact
    backend, result = load_backend(model, settings())
    assert result.compiled and backend.model is not None


def test_a_folder_of_other_files_is_never_replaced(model, explicit):
    explicit.mkdir()
    (explicit / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="refusing to replace it"):
        load_backend(model, settings())
    assert (explicit / "notes.txt").read_text() == "mine"


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_artifacts import settings
    from vllm_neuronx.backends.cpu import CpuBackend
    from vllm_neuronx.loader import load_backend
    if sys.argv[2] == "hang":
        original = CpuBackend.compile
        def slow(self, folder):
            original(self, folder)
            print("compiling", flush=True)
            time.sleep(120)
        CpuBackend.compile = slow
    _, result = load_backend(sys.argv[1], settings())
    print("compiled" if result.compiled else "loaded", flush=True)
""")


def run_script(model, mode, **kw):
    code = SCRIPT.format(root=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, model, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, **kw)


def test_two_processes_starting_together_compile_once(model, explicit):
    procs = [run_script(model, "normal") for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert sorted(o[-1] for o in outs) == ["compiled", "loaded"], outs


def test_killed_compile_leaves_nothing_loadable(model, explicit):
    proc = run_script(model, "hang")
    deadline = time.monotonic() + 120
    line = ""
    while "compiling" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not explicit.exists()  # the rename never happened
    temps = [p for p in explicit.parent.iterdir() if p.name.startswith(".compiling-")]
    assert temps
    backend, result = load_backend(model, settings())
    assert result.compiled and backend.model is not None
    assert not [p for p in explicit.parent.iterdir() if p.name.startswith(".compiling-")]
