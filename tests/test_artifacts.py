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


# -- at scale: the warm check by stat, the full verify, versions in the key ---------------------

@pytest.fixture()
def stored(tmp_path) -> Path:
    """A small artifacts folder with its manifest, as a compile leaves it (requested
    before ``hashes``, so the store's own hashing is not counted)."""
    folder = tmp_path / "stored"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "tp0_sharded_checkpoint.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "model.pt").write_bytes(b"graphs" * 1000)
    artifacts._write_manifest(str(folder), "k", {"batch_size": 2}, "nxdi")
    return folder


def rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def hashes(monkeypatch):
    """The files the cache hashes, in order: shows which checks read contents."""
    hashed: list[str] = []
    sha256 = artifacts._sha256

    def counting(path):
        hashed.append(os.path.basename(path))
        return sha256(path)

    monkeypatch.setattr(artifacts, "_sha256", counting)
    return hashed


def test_manifest_records_size_mtime_and_sha256(stored):
    folder = stored
    entry = json.loads((folder / artifacts.MANIFEST).read_text())["files"]["model.pt"]
    st = (folder / "model.pt").stat()
    assert entry["size"] == st.st_size == 6000 and entry["mtime_ns"] == st.st_mtime_ns
    assert entry["sha256"] == artifacts._sha256(str(folder / "model.pt"))


def test_warm_check_reads_no_contents_so_only_verify_sees_bytes_changed_in_place(
        stored, hashes, capsys):
    """The contract: size and mtime, not contents. A same-size rewrite with its mtime put
    back passes the warm check; ``verify`` is the check that hashes."""
    folder = stored
    model_pt = folder / "model.pt"
    rewrite_keeping_mtime(model_pt, b"GRAPHS" * 1000)
    assert artifacts.read_manifest(str(folder)) is not None
    assert hashes == []  # not one byte of an artifact was read
    assert artifacts.main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{model_pt}: SHA-256 differs from the manifest"
    assert "1 problem(s)" in out[-1] and len(out) == 2


def test_a_size_change_is_refused_even_with_its_mtime_put_back(stored, hashes):
    folder = stored
    rewrite_keeping_mtime(folder / "model.pt", b"graphs" * 999)
    assert artifacts.read_manifest(str(folder)) is None
    assert hashes == []


def test_new_mtimes_are_hashed_once_then_recorded(stored, hashes):
    folder = stored
    manifest = folder / artifacts.MANIFEST
    os.chmod(manifest, 0o644)
    later = time.time_ns() + 10**9
    os.utime(folder / "model.pt", ns=(later, later))  # same bytes, new mtime (touch, cp -r)
    assert artifacts.read_manifest(str(folder)) is not None
    assert hashes == ["model.pt"]  # only the file whose mtime changed
    assert json.loads(manifest.read_text())["files"]["model.pt"]["mtime_ns"] == later
    assert os.stat(manifest).st_mode & 0o777 == 0o644  # the rewrite kept its mode
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["weights", "model.pt", artifacts.MANIFEST])  # no temporary file left
    assert artifacts.read_manifest(str(folder)) is not None
    assert hashes == ["model.pt"]  # the next check is by stat again


def test_new_mtime_and_other_bytes_are_refused(stored, hashes):
    folder = stored
    (folder / "model.pt").write_bytes(b"GRAPHS" * 1000)  # same size
    later = time.time_ns() + 10**9  # as any rewrite after the store (the clock ticks coarsely)
    os.utime(folder / "model.pt", ns=(later, later))
    before = (folder / artifacts.MANIFEST).read_bytes()
    assert artifacts.read_manifest(str(folder)) is None
    assert hashes == ["model.pt"]
    assert (folder / artifacts.MANIFEST).read_bytes() == before  # nothing recorded


def test_an_older_manifest_without_mtimes_is_upgraded_once(stored, hashes):
    folder = stored
    path = folder / artifacts.MANIFEST
    manifest = json.loads(path.read_text())
    for meta in manifest["files"].values():
        del meta["mtime_ns"]
    path.write_text(json.dumps(manifest))
    assert artifacts.read_manifest(str(folder)) is not None
    assert sorted(hashes) == ["model.pt", "tp0_sharded_checkpoint.safetensors"]
    assert artifacts.read_manifest(str(folder)) is not None and len(hashes) == 2


def test_a_manifest_that_cannot_be_rewritten_still_loads_and_hashes_again(
        stored, hashes, monkeypatch):
    folder = stored

    def read_only(folder, manifest):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)

    monkeypatch.setattr(artifacts, "_replace_manifest", read_only)
    later = time.time_ns() + 10**9
    os.utime(folder / "model.pt", ns=(later, later))
    assert artifacts.read_manifest(str(folder)) is not None
    assert artifacts.read_manifest(str(folder)) is not None
    assert hashes == ["model.pt", "model.pt"]


def test_a_stale_manifest_temp_is_neither_an_artifact_nor_a_user_file(stored):
    folder = stored
    (folder / (artifacts.MANIFEST + ".tmp-abc")).write_text("{")  # a killed rewrite
    assert artifacts.read_manifest(str(folder)) is not None
    (folder / "model.pt").write_bytes(b"x")
    artifacts._check_replaceable(str(folder))  # still ours to rebuild: no error


def test_folder_copied_with_cp_r_loads_hashing_once_and_a_corrupt_copy_is_rebuilt(
        model, tmp_path, monkeypatch, hashes, records):
    original = tmp_path / "original"
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(original))
    load_backend(model, settings())
    for name, corrupt in (("copy", False), ("corrupt", True)):
        copy = tmp_path / name
        subprocess.run(["cp", "-r", str(original), str(copy)], check=True)  # no -p: new mtimes
        weights = copy / "weights.safetensors"
        assert weights.stat().st_mtime_ns != (original / "weights.safetensors").stat().st_mtime_ns
        if corrupt:
            data = bytearray(weights.read_bytes())
            data[-10:] = b"\x01" * 10
            weights.write_bytes(bytes(data))
        monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(copy))
        hashes.clear()
        _, result = load_backend(model, settings())
        assert result.compiled == corrupt
        if corrupt:
            assert any(r.getMessage() == f"{weights}: SHA-256 differs from the manifest"
                       for r in records)
        else:
            assert hashes == ["weights.safetensors"]
            hashes.clear()
            assert not load_backend(model, settings())[1].compiled
            assert hashes == []  # fast again


def run_verify(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_neuronx.artifacts", "verify", str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_verify_command_exit_codes_and_messages(stored):
    folder = stored
    ok = run_verify(folder)
    assert ok.returncode == 0, ok.stderr
    [line] = ok.stdout.splitlines()
    assert line.startswith(f"{folder}: 2 files, 22,384 bytes, every SHA-256 matches the manifest")
    shard = folder / "weights" / "tp0_sharded_checkpoint.safetensors"
    rewrite_keeping_mtime(shard, b"\0" * shard.stat().st_size)
    (folder / "model.pt").write_bytes(b"short")
    (folder / "notes.txt").write_text("extra")
    bad = run_verify(folder)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{folder}/notes.txt: not in the manifest",
        f"{folder}/model.pt: 5 bytes, the manifest says 6000",
        f"{shard}: SHA-256 differs from the manifest",
        f"{folder}: 3 problem(s); remove the folder and the next start compiles it again",
    ]


def test_verify_names_a_missing_file_and_a_missing_manifest(stored, capsys):
    folder = stored
    (folder / "model.pt").unlink()
    assert artifacts.main(["verify", str(folder)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"{folder}/model.pt: missing"
    (folder / artifacts.MANIFEST).unlink()
    assert artifacts.main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{folder}/{artifacts.MANIFEST}: no readable manifest (")


def test_package_versions_reads_installed_metadata():
    import importlib.metadata

    versions = artifacts.package_versions(["torch", "vllm-neuronx-no-such-package"])
    assert versions == (f"torch={importlib.metadata.version('torch')},"
                        "vllm-neuronx-no-such-package=absent")


@pytest.mark.parametrize("backend", ["cpu", "nxdi", "tnx"])
def test_a_package_upgrade_changes_every_backends_key(backend, model, monkeypatch):
    from vllm_neuronx.backends import backend_class

    cls = backend_class(backend)
    seen = []

    def versions(release):
        def fake(names):
            seen.append(tuple(names))
            return ",".join(f"{name}={release}" for name in names)
        return fake

    keys = []
    for release in ("1.0", "1.1"):
        monkeypatch.setattr(artifacts, "package_versions", versions(release))
        keys.append(artifacts.artifact_key({"batch_size": 2}, backend, cls.version(), model))
    assert keys[0] != keys[1]
    assert "torch" in seen[0]
    neuron = {"cpu": set(), "tnx": {"neuronx-cc", "torch-neuronx", "transformers-neuronx"},
              "nxdi": {"neuronx-cc", "torch-neuronx", "neuronx-distributed",
                       "neuronx-distributed-inference"}}[backend]
    assert neuron <= set(seen[0])


def test_tnx_key_names_the_installed_packages():
    from vllm_neuronx.backends.tnx import TnxBackend

    version = TnxBackend.version()
    assert version != "tnx-1"
    assert version.startswith("tnx-2 torch=") and "neuronx-cc=" in version
    assert "transformers-neuronx=" in version


def test_a_torch_upgrade_compiles_into_a_new_default_folder(model, monkeypatch):
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)
    _, first = load_backend(model, settings())
    real = artifacts.package_versions
    monkeypatch.setattr(artifacts, "package_versions",
                        lambda names: real(names).replace("torch=", "torch=9.9-"))
    _, upgraded = load_backend(model, settings())
    assert upgraded.compiled and upgraded.folder != first.folder
