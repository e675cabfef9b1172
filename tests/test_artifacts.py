"""The compiled-artifact cache: every rule of NEURON_COMPILED_ARTIFACTS, on the CPU backend."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vllm_neuronx import artifacts, unstored
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


# -- faults: a cache that cannot be written, corrupt files, modes, where files go ----------------

@pytest.fixture()
def records():
    """Log records of our loggers (vllm.neuronx.*), whatever vLLM did to logging."""
    caught: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = caught.append
    logger = logging.getLogger("vllm.neuronx")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield caught
    logger.removeHandler(handler)
    logger.setLevel(level)


def errors(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


def first_logits(backend) -> torch.Tensor:
    """The next-token logits of a fixed prompt: what the model computes, to compare loads."""
    out = backend.forward(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], torch.tensor([0]),
                          torch.tensor([[1, 1.0, 1.0]]))
    return out.logits[0]


def scratch_left() -> list[str]:
    return [os.path.join(parent, name) for parent in unstored.scratch_parents()
            for name in os.listdir(parent) if name.startswith(unstored.SCRATCH_PREFIX)]


def test_disk_full_while_storing_serves_from_memory_and_logs_one_error(
        model, explicit, monkeypatch, records):
    from vllm_neuronx.backends.cpu import CpuBackend

    reference = first_logits(load_backend(model, settings())[0])
    shutil.rmtree(explicit)
    before = scratch_left()
    compile_ = CpuBackend.compile

    def fills_the_disk(self, folder):
        compile_(self, folder)
        if folder.startswith(str(explicit.parent)):  # the cache's disk, not the scratch
            weights = Path(folder, "weights.safetensors")
            weights.write_bytes(weights.read_bytes()[:4096])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(weights))

    monkeypatch.setattr(CpuBackend, "compile", fills_the_disk)
    backend, result = load_backend(model, settings())
    assert result.compiled and not result.stored
    assert torch.equal(first_logits(backend), reference)  # served from memory
    [error] = errors(records)
    assert str(explicit) in error and "No space left on device" in error
    # Nothing half-written stays in the cache, nor in the scratch space.
    assert not explicit.exists() and sorted(os.listdir(explicit.parent)) == ["model"]
    assert scratch_left() == before
    monkeypatch.undo()
    assert load_backend(model, settings())[1].stored  # room again: stored as usual


@pytest.mark.skipif(not os.path.isdir("/sys/fs"), reason="needs Linux sysfs")
def test_cache_without_write_permission_serves_from_memory(model, monkeypatch, records):
    # sysfs refuses new files even to root: a real EACCES/EPERM, not a mock.
    folder = "/sys/fs/vllm-neuronx-artifacts"
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", folder)
    backend, result = load_backend(model, settings())
    assert result.compiled and not result.stored and backend.model is not None
    [error] = errors(records)
    assert folder in error and ("Permission denied" in error or "not permitted" in error)


def test_read_only_cache_with_artifacts_is_loaded_without_a_lock(model, explicit, monkeypatch,
                                                                  records):
    load_backend(model, settings())

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(artifacts, "FileLock", read_only)
    backend, result = load_backend(model, settings())
    assert not result.compiled and result.stored and backend.model is not None
    assert errors(records) == []


def test_a_real_write_failure_is_recognised_as_a_storage_error(tmp_path):
    """safetensors reports a failed write as its own error type with the OS message."""
    from safetensors.torch import save_file

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(Exception) as info:
            save_file({"w": torch.zeros(4096)}, str(tmp_path / "w.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert not isinstance(info.value, OSError)
    assert unstored.storage_error(info.value) == os.strerror(errno.EFBIG)
    assert unstored.storage_error(ValueError("bad config")) is None


def test_truncated_weights_are_rebuilt_and_compute_the_same(model, explicit, records):
    reference = first_logits(load_backend(model, settings())[0])
    weights = explicit / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    backend, result = load_backend(model, settings())
    assert result.compiled and result.stored
    assert any("incomplete or corrupt; recompiling" in r.getMessage() for r in records)
    assert torch.equal(first_logits(backend), reference)
    assert artifacts.read_manifest(str(explicit)) is not None


def test_artifact_folders_follow_the_umask_and_no_lock_is_left(model, monkeypatch, tmp_path):
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)
    old = os.umask(0o027)
    try:
        _, default = load_backend(model, settings())
        monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "deep" / "er" / "art"))
        _, explicit_result = load_backend(model, settings())
    finally:
        os.umask(old)
    for folder, top in ((default.folder, Path(model, artifacts.DEFAULT_SUBDIR)),
                        (explicit_result.folder, tmp_path / "deep")):
        for root, _dirs, files in os.walk(top):
            assert os.stat(root).st_mode & 0o777 == 0o750, root
            for name in files:
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o640, name
            assert not [f for f in files if f.endswith(".lock")], root
        assert artifacts.read_manifest(folder) is not None


def test_compile_and_load_write_nothing_outside_the_cache_folder(model, tmp_path, monkeypatch):
    import tempfile

    places = {name: tmp_path / name for name in ("home", "tmp", "cwd", "xdg")}
    for path in places.values():
        path.mkdir()
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(places["xdg"]))
    monkeypatch.setenv("TMPDIR", str(places["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(places["cwd"])
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)

    def tree() -> set[str]:
        return {os.path.relpath(os.path.join(root, name), tmp_path)
                for root, dirs, files in os.walk(tmp_path) for name in dirs + files}

    before = tree()
    for env in (None, str(tmp_path / "explicit")):
        if env:
            monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", env)
        _, result = load_backend(model, settings())
        assert result.compiled
    new = tree() - before
    inside = [p for p in new if p.startswith((os.path.join("model", artifacts.DEFAULT_SUBDIR),
                                             "explicit"))]
    assert sorted(set(new) - set(inside)) == []


@pytest.mark.skipif(not os.path.isdir("/sys/fs"), reason="needs Linux sysfs")
def test_llm_generates_when_the_cache_cannot_be_written(model, monkeypatch, capfd):
    """End to end, no injection: the engine core meets a real EACCES and still serves."""
    import logging
    import sys

    from vllm import LLM, SamplingParams

    # vLLM's log handler holds the stdout of its first configuration (an earlier test's
    # capture); the engine core forked here must write where capfd reads.
    for handler in logging.getLogger("vllm").handlers:
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stdout)
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", "/sys/fs/vllm-neuronx-artifacts")
    llm = LLM(model=model, device="neuron", max_num_seqs=2, max_model_len=64,
              skip_tokenizer_init=True, dtype="float32")
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                      detokenize=False))
    del llm
    assert len(out[0].outputs[0].token_ids) == 4
    log = capfd.readouterr()
    lines = [ln for ln in (log.out + log.err).splitlines()
             if "Could not store compiled artifacts in /sys/fs/vllm-neuronx-artifacts" in ln]
    assert len(lines) == 1, lines
