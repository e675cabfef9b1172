"""Compiled-artifact cache shared by every backend (NEURON_COMPILED_ARTIFACTS).

- Variable set and artifacts there: load them, no recompile; their config wins
  over vLLM's arguments (the platform adopts it and logs what differs).
- Variable set but nothing loadable there: compile with the current config, store there.
- Variable unset: ``<model dir>/neuron-compiled-artifacts/<key>`` (or the user cache
  when the model folder is read-only), reused by the next start. The earlier code
  bases deleted this folder before every start; we keep it.
The key covers all that changes the compiled result, including the versions of the
packages that produce it (each backend's ``version()``, through ``package_versions``).
Writes go to a temporary folder, then a rename; a file lock makes concurrent starts
compile once; a folder that does not match its manifest (partial, truncated,
replaced) is rebuilt, never loaded.

Integrity at scale: the manifest records each file's size, mtime (ns) and SHA-256
when the folder is stored. A warm start checks presence, size and mtime only: a
stat per file, well under a second for a 140 GB sharded 70B checkpoint, which it
would take minutes to hash. Whatever rewrites, truncates or replaces a file changes
its size or mtime, so such a file is never loaded; a change that keeps both (bit
rot, a deliberate ``os.utime``, a same-size rewrite within the filesystem's
timestamp granularity of the store) is beyond this check, and
``python -m vllm_neuronx.artifacts verify <folder>`` hashes every file (exit 0 when
all match, 1 naming each bad file).
A folder copied without its mtimes (``cp -r``, an archive extracted elsewhere) has
new mtimes but the same sizes: the start hashes those files once, and rebuilds the
folder if any differs; when all match it records their new mtimes in the manifest
(a temporary file, then a rename), so later starts are fast again. Where the
manifest cannot be rewritten (a read-only cache) every start hashes those files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from vllm_neuronx import envs
from vllm_neuronx.interrupt import CompileInterrupted, stop_on_termination
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

MANIFEST = "vllm-neuronx-manifest.json"
_MANIFEST_TMP = MANIFEST + ".tmp-"
DEFAULT_SUBDIR = "neuron-compiled-artifacts"
_TMP_PREFIX = ".compiling-"
COMPILE_ENV = ("NEURON_CONTEXT_LENGTH_BUCKETS", "NEURON_TOKEN_GEN_BUCKETS", "NEURON_QUANT_DTYPE")


def model_identity(model_path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the model's files: a new checkpoint is a new key."""
    rows = []
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            st = os.stat(path)
            rows.append((name, st.st_size, st.st_mtime_ns))
    return rows


def package_versions(names: Iterable[str]) -> str:
    """``name=version,...`` of installed distributions ("absent" when not installed),
    for the backends' keys: a new compiler, runtime or converter must not load the old
    one's artifacts. A package importable without metadata (a source checkout, a
    test simulator) gives its ``__version__``."""
    versions = []
    for name in names:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            module = name.replace("-", "_")
            if importlib.util.find_spec(module) is None:
                version = "absent"
            else:
                version = str(getattr(importlib.import_module(module), "__version__", "unknown"))
        versions.append(f"{name}={version}")
    return ",".join(versions)


def artifact_key(neuron_config: dict, backend: str, backend_version: str, model_path: str,
                 draft=None) -> str:
    """``draft``: fused speculation's ``speculation.Draft`` (compiled into the graph)."""
    payload = json.dumps(
        {
            "neuron_config": neuron_config,
            "backend": backend,
            "backend_version": backend_version,  # with its packages' versions
            "model": model_identity(model_path),
            **({"draft": [draft.method, model_identity(draft.path)]} if draft else {}),
            # transformers-neuronx reads these at compile time
            "env": {name: os.environ.get(name) for name in COMPILE_ENV},
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _writable(folder: str) -> bool:
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    return os.access(probe, os.W_OK)


def artifacts_folder(model_path: str, key: str) -> str:
    """Where this configuration's artifacts live."""
    explicit = envs.NEURON_COMPILED_ARTIFACTS
    if explicit:
        return os.path.abspath(explicit)
    folder = os.path.join(model_path, DEFAULT_SUBDIR, key)
    if _writable(folder):
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm-neuronx", "compiled", key)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_manifest(name: str) -> bool:
    """The manifest, or a temporary file of its rewrite (never an artifact)."""
    return name == MANIFEST or name.startswith(_MANIFEST_TMP)


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not _is_manifest(rel):
                out.append(rel)
    return sorted(out)


def _file_entry(path: str) -> dict[str, Any]:
    """What the manifest records of a file; the stat comes first, so a write during
    the hash leaves a newer mtime than recorded, and the next check hashes again."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def read_manifest(folder: str, *, verify: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete, intact folder, or None (missing, partial, corrupt).

    ``verify=False``: presence and sizes only (enough to read the stored config).
    Otherwise the warm-start check of the module docstring: presence, size and mtime,
    and a SHA-256 of only those files whose mtime changed.
    """
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if sorted(files) != _files(folder):
            return None
        moved = {}
        for name, meta in files.items():
            st = os.stat(os.path.join(folder, name))
            if st.st_size != meta["size"]:
                return None
            if verify and st.st_mtime_ns != meta.get("mtime_ns"):
                moved[name] = st.st_mtime_ns
        if moved and not _rehash(folder, manifest, moved):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rehash(folder: str, manifest: dict[str, Any], moved: dict[str, int]) -> bool:
    """Hash the files whose mtime changed (a copied folder); when all match, record the
    new mtimes (stat'ed before hashing) so the next start checks by stat again."""
    files = manifest["files"]
    size = sum(files[name]["size"] for name in moved)
    logger.info(
        "%d of %d files in %s have other mtimes than when stored (a copied folder?); "
        "checking their SHA-256 (%.1f GB) once",
        len(moved), len(files), folder, size / 1e9,
    )
    start = time.perf_counter()
    for name in sorted(moved):
        if _sha256(os.path.join(folder, name)) != files[name]["sha256"]:
            logger.warning("%s: SHA-256 differs from the manifest", os.path.join(folder, name))
            return False
    for name, mtime in moved.items():
        files[name]["mtime_ns"] = mtime
    try:
        _replace_manifest(folder, manifest)
        logger.info("Intact (%.1f s); recorded the new mtimes in the manifest",
                    time.perf_counter() - start)
    except OSError as e:
        logger.info("Intact (%.1f s); could not record the new mtimes (%s), so the next "
                    "start hashes them again", time.perf_counter() - start, e)
    return True


def _replace_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Rewrite the manifest atomically: readers see the old one or the new one, whole."""
    path = os.path.join(folder, MANIFEST)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    fd, tmp = tempfile.mkstemp(prefix=_MANIFEST_TMP, dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide it from a shared cache's users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_folder(folder: str) -> tuple[list[str], int, int]:
    """The full check: every file's SHA-256 against the manifest, whatever its mtime.
    Returns (problems, one per bad file, each naming it; files checked; bytes hashed)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        expected = {name: (meta["size"], meta["sha256"]) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{os.path.join(folder, MANIFEST)}: no readable manifest ({e})"], 0, 0
    problems = []
    present = set(_files(folder))
    hashed = 0
    for name in sorted(present - set(expected)):
        problems.append(f"{os.path.join(folder, name)}: not in the manifest")
    for name, (size, digest) in sorted(expected.items()):
        path = os.path.join(folder, name)
        if name not in present:
            problems.append(f"{path}: missing")
            continue
        actual = os.path.getsize(path)
        if actual != size:
            problems.append(f"{path}: {actual} bytes, the manifest says {size}")
            continue
        if _sha256(path) != digest:
            problems.append(f"{path}: SHA-256 differs from the manifest")
        hashed += actual
    return problems, len(expected), hashed


def _write_manifest(folder: str, key: str, neuron_config: dict, backend: str) -> None:
    files = {name: _file_entry(os.path.join(folder, name)) for name in _files(folder)}
    manifest = {
        "key": key,
        "backend": backend,
        "neuron_config": neuron_config,
        "files": files,
        "created": time.time(),
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def precompiled_config(
    backend: str, stored_config: Callable[[str], dict | None]
) -> tuple[str, dict] | None:
    """With NEURON_COMPILED_ARTIFACTS set: (folder, config) of ``backend``'s artifacts there.

    Ours carry a manifest; a backend may also recognise its own tool's artifacts
    (``stored_config``, e.g. NxDI's neuron_config.json).
    """
    folder = envs.NEURON_COMPILED_ARTIFACTS
    if not folder or not os.path.isdir(folder):
        return None
    folder = os.path.abspath(folder)
    manifest = read_manifest(folder, verify=False)
    if manifest is not None:
        return (folder, manifest["neuron_config"]) if manifest["backend"] == backend else None
    if os.path.exists(os.path.join(folder, MANIFEST)):
        return None  # ours but broken: recompile
    config = stored_config(folder)
    return (folder, config) if config is not None else None


def config_differences(ours: dict, theirs: dict) -> dict[str, tuple[Any, Any]]:
    """Keys of ours whose values differ in theirs: key -> (ours, theirs). Keys only
    theirs has (fields NxDI derives, like n_active_tokens) are not differences."""
    return {k: (ours[k], theirs.get(k)) for k in sorted(ours) if ours[k] != theirs.get(k)}


def _remove_stale_temps(parent: str) -> None:
    """Temp folders of compiles that died (their pid is gone) are removed under the lock."""
    for name in os.listdir(parent):
        if not name.startswith(_TMP_PREFIX):
            continue
        pid = name[len(_TMP_PREFIX) :].split("-", 1)[0]
        alive = pid.isdigit() and _pid_alive(int(pid))
        if not alive:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _lock(path: str):
    """The file lock, removed while still held once done, so nothing is left beside
    the artifacts folder; a process waiting on the removed file takes a fresh one
    (filelock checks that the file it locked still exists)."""
    with FileLock(path):
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@dataclass(slots=True)
class CacheResult:
    folder: str
    compiled: bool  # False when existing artifacts were loaded
    seconds: float
    stored: bool = True  # False when the cache could not be written (vllm_neuronx/unstored.py)


def load_or_compile(
    *,
    folder: str,
    key: str,
    neuron_config: dict,
    backend: str,
    compile_fn: Callable[[str], None],
    load_fn: Callable[[str], None],
    foreign: bool = False,
) -> CacheResult:
    """Load ``folder`` if intact, else compile into a temp folder, rename, load.

    ``foreign``: the folder holds another tool's artifacts (no manifest of ours); try them.
    """
    start = time.perf_counter()
    folder = folder.rstrip(os.sep)
    parent = os.path.dirname(folder) or "."
    os.makedirs(parent, exist_ok=True)
    with _lock(folder + ".lock"):
        _remove_stale_temps(parent)
        if foreign or read_manifest(folder) is not None:
            try:
                load_fn(folder)
                seconds = time.perf_counter() - start
                logger.info("Loaded compiled artifacts from %s in %.1f s", folder, seconds)
                return CacheResult(folder, False, seconds)
            except Exception as e:  # unreadable content: rebuild below
                logger.warning("Artifacts in %s failed to load (%s); recompiling", folder, e)
        elif os.path.exists(folder):
            _check_replaceable(folder)
            logger.warning("Artifacts in %s are incomplete or corrupt; recompiling", folder)
        tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=parent)
        try:
            logger.info("Compiling for %s into %s", backend, folder)
            with stop_on_termination():
                compile_fn(tmp)
                _write_manifest(tmp, key, neuron_config, backend)
            _follow_umask(tmp)
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CompileInterrupted):
                logger.warning("%s; removed the partial artifacts (%s)", e, tmp)
            raise
        load_fn(folder)
        seconds = time.perf_counter() - start
        logger.info("Compiled and stored artifacts in %s in %.1f s", folder, seconds)
        return CacheResult(folder, True, seconds)


# What our backends and NxDI / transformers-neuronx write into an artifact folder.
ARTIFACT_NAMES = frozenset(
    {MANIFEST, "weights.safetensors", "model.pt", "neuron_config.json", "weights", "graphs",
     "quantized_checkpoint"}
)


def _check_replaceable(folder: str) -> None:
    """Only artifact folders are ever replaced: never a user's folder of other files."""
    if not os.path.isdir(folder):
        return
    entries = set(os.listdir(folder))
    ours = os.path.basename(os.path.dirname(folder)) == DEFAULT_SUBDIR
    graphs = {e for e in entries if e.endswith((".neff", ".pt"))}  # compiled graphs
    manifests = {e for e in entries if _is_manifest(e)}
    if ours or entries - graphs - manifests <= ARTIFACT_NAMES:
        return
    raise RuntimeError(
        f"{folder} holds files that are not compiled artifacts; refusing to replace it. "
        "Point NEURON_COMPILED_ARTIFACTS at an empty or artifact folder."
    )


def _follow_umask(folder: str) -> None:
    """Give the artifacts the modes the user's umask asks for, as any file they create:
    mkdtemp makes a 0700 folder and writers that go through a temporary file
    (safetensors) leave 0600 files, which other users of a shared cache cannot read."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_neuronx.artifacts verify <folder>``: the full SHA-256 check."""
    parser = argparse.ArgumentParser(prog="python -m vllm_neuronx.artifacts",
                                     description="Check a compiled-artifacts folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="hash every file and compare with the manifest")
    check.add_argument("folder")
    args = parser.parse_args(argv)
    folder = os.path.abspath(args.folder)
    start = time.perf_counter()
    problems, count, size = verify_folder(folder)
    seconds = time.perf_counter() - start
    for problem in problems:
        print(problem)
    if problems:
        print(f"{folder}: {len(problems)} problem(s); remove the folder and the next start "
              "compiles it again")
        return 1
    print(f"{folder}: {count} files, {size:,} bytes, every SHA-256 matches the manifest "
          f"({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
