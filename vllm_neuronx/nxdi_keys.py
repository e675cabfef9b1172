"""The keys NxDI's configuration classes take, read from NxDI's own source.

NxDI's ``NeuronConfig(**kwargs)`` pops each field by name and only logs a warning
for the rest, so a misspelled or renamed key vanishes. No signature lists the
fields: they are the string literals the class reads from its ``kwargs``. This
module reads them with ``ast`` (NxDI is never imported), for two uses:

* ``scripts/nxdi_keys.py`` runs it over each NxDI release's source and commits the
  result as ``nxdi_keys_table.py``: the keys when NxDI is not installed (the CPU
  backend, or before a Neuron host has its packages);
* on a host with NxDI installed, the installed release's own source is read, so
  the check follows the release that will receive the keys.

It also holds which keys only matter to a Neuron device (the CPU backend accepts
them and says once that they do nothing there).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

NXDI_PACKAGE = "neuronx_distributed_inference"
NXD_PACKAGE = "neuronx_distributed"

# Source files (relative to the package folder) that define the classes below.
NXDI_FILES = ("models/config.py", "modules/lora_serving/config.py")
# NxD core: MoENeuronConfig hands its kwargs to RouterConfig.from_kwargs, defined here.
NXD_FILES = ("modules/moe/moe_configs.py",)

# The classes whose keys make up the top level of override_neuron_config: the
# model picks one of them (MoE models MoENeuronConfig, image models the vision one).
TOP_LEVEL_CLASSES = ("NeuronConfig", "MoENeuronConfig", "MultimodalVisionNeuronConfig")
# Keys whose value NxDI turns into another config object with ``Cls(**value)``.
NESTED_CLASSES = {
    "on_device_sampling_config": "OnDeviceSamplingConfig",
    "chunked_prefill_config": "ChunkedPrefillConfig",
    "hybrid_sharding_config": "HybridShardingConfig",
    "lora_config": "LoraServingConfig",
}
TABLE_CLASSES = TOP_LEVEL_CLASSES + tuple(NESTED_CLASSES.values())

_READERS = frozenset({"pop", "get", "setdefault"})


# -- reading the source -------------------------------------------------------------------------
def _kwargs_names(fn: ast.FunctionDef) -> set[str]:
    """The names under which ``fn`` holds the caller's keyword dict: its ``**`` parameter,
    and a plain parameter named ``kwargs`` (NxDI passes the dict to helpers that way)."""
    names = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
             if a.arg == "kwargs"}
    if fn.args.kwarg is not None:
        names.add(fn.args.kwarg.arg)
    return names


def _str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _read_key(node: ast.AST, kw: set[str]) -> str | None:
    """The key ``node`` reads from the keyword dict: ``kw.pop("k", ...)``, ``kw.get("k")``,
    ``kw["k"]`` or ``"k" in kw``."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in _READERS and isinstance(node.func.value, ast.Name)
            and node.func.value.id in kw and node.args):
        return _str(node.args[0])
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
            and node.value.id in kw):
        return _str(node.slice)
    if (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], ast.In | ast.NotIn)
            and isinstance(node.comparators[0], ast.Name) and node.comparators[0].id in kw):
        return _str(node.left)
    return None


def _passes_kwargs(call: ast.Call, kw: set[str]) -> bool:
    """Whether ``call`` hands the keyword dict on (``**kwargs`` or ``kwargs`` itself)."""
    return any(isinstance(a, ast.Name) and a.id in kw for a in call.args) or any(
        k.arg is None and isinstance(k.value, ast.Name) and k.value.id in kw
        for k in call.keywords
    )


def _callee(call: ast.Call) -> tuple[str, str] | None:
    """(class or "super"/"self", method) of a call that may take the keyword dict."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id, "__init__"
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value
    if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
            and owner.func.id == "super"):
        return "super", func.attr
    if isinstance(owner, ast.Name):
        return owner.id, func.attr
    return None


@dataclass(frozen=True)
class _Class:
    name: str
    bases: tuple[str, ...]
    methods: dict[str, ast.FunctionDef]


def _classes(sources: Iterable[str]) -> dict[str, _Class]:
    """Every top-level class of ``sources`` by name (the first definition wins)."""
    found: dict[str, _Class] = {}
    for source in sources:
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and node.name not in found:
                bases = tuple(b.id for b in node.bases if isinstance(b, ast.Name))
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                found[node.name] = _Class(node.name, bases, methods)
    return found


class _Reader:
    """Follows a keyword dict from a constructor through the methods it is handed to."""

    def __init__(self, classes: dict[str, _Class]) -> None:
        self.classes = classes

    def method(self, cls: str, name: str) -> tuple[str, ast.FunctionDef] | None:
        """(defining class, function) of ``cls.name``, looked up through known bases."""
        seen: set[str] = set()
        todo = [cls]
        while todo:
            current = todo.pop(0)
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            found = self.classes[current].methods.get(name)
            if found is not None:
                return current, found
            todo.extend(self.classes[current].bases)
        return None

    def keys(self, cls: str, name: str, seen: frozenset = frozenset()) -> set[str]:
        found = self.method(cls, name)
        if found is None or (found[0], name) in seen:
            return set()
        owner, fn = found
        seen = seen | {(owner, name)}
        kw = _kwargs_names(fn)
        keys: set[str] = set()
        if name == "__init__":  # named parameters are keys too (MoE's capacity_factor)
            params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            keys |= {a.arg for a in params[1:] if a.arg != "kwargs"}
        for node in ast.walk(fn):
            key = _read_key(node, kw)
            if key is not None:
                keys.add(key)
            if isinstance(node, ast.Call) and _passes_kwargs(node, kw):
                callee = _callee(node)
                if callee is None:
                    continue
                target, method = callee
                if target == "super":
                    for base in self.classes[owner].bases:
                        keys |= self.keys(base, method, seen)
                elif target in ("self", "cls"):
                    keys |= self.keys(cls, method, seen)
                else:
                    keys |= self.keys(target, method, seen)
        return keys

    def renamed(self, cls: str) -> dict[str, str]:
        """Attributes a constructor stores under another name than its key, as
        {attribute: key}; "not key" when it stores the negation
        (``self.normalize_top_k_affinities = not kwargs.pop("disable_...")``)."""
        found = self.method(cls, "__init__")
        if found is None:
            return {}
        fn = found[1]
        kw = _kwargs_names(fn)
        out: dict[str, str] = {}
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            target = node.targets[0]
            if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                continue
            value, negated = node.value, False
            if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not):
                value, negated = value.operand, True
            key = _read_key(value, kw)
            if key is not None and (key != target.attr or negated):
                out[target.attr] = f"not {key}" if negated else key
        return out


def read_keys(nxdi_sources: Iterable[str], nxd_sources: Iterable[str] = ()) -> dict:
    """NxDI (and NxD core) source texts -> {class: sorted keys} for TABLE_CLASSES, plus
    "renamed": {attribute: key} of the top-level classes. A class the sources lack
    is left out. MoENeuronConfig lists only the keys NeuronConfig lacks."""
    reader = _Reader(_classes(list(nxdi_sources) + list(nxd_sources)))
    out: dict[str, Any] = {}
    for cls in TABLE_CLASSES:
        if cls in reader.classes:
            out[cls] = set(reader.keys(cls, "__init__"))
    for cls in TOP_LEVEL_CLASSES[1:]:
        if cls in out and "NeuronConfig" in out:
            out[cls] -= out["NeuronConfig"]
    renamed: dict[str, str] = {}
    for cls in TOP_LEVEL_CLASSES:
        if cls in reader.classes:
            renamed.update(reader.renamed(cls))
    result: dict[str, Any] = {cls: tuple(sorted(keys)) for cls, keys in out.items()}
    result["renamed"] = dict(sorted(renamed.items()))
    return result


# -- the key sets the check uses ---------------------------------------------------------------
@dataclass(frozen=True)
class KeySet:
    """The keys one NxDI (or a union of releases) takes; ``origin`` says which."""

    origin: str
    top: frozenset[str]
    nested: Mapping[str, frozenset[str]]
    renamed: Mapping[str, str]


def key_set(origin: str, keys: Mapping[str, Any]) -> KeySet:
    top = frozenset().union(*(keys.get(cls, ()) for cls in TOP_LEVEL_CLASSES))
    nested = {k: frozenset(keys[cls]) for k, cls in NESTED_CLASSES.items() if cls in keys}
    return KeySet(origin, top, nested, dict(keys.get("renamed", {})))


def union(sets: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several releases' tables -> one table that takes every key any of them takes."""
    merged: dict[str, Any] = {"renamed": {}}
    for keys in sets:
        for cls, names in keys.items():
            if cls == "renamed":
                merged["renamed"].update(names)
            else:
                merged[cls] = tuple(sorted(set(merged.get(cls, ())) | set(names)))
    return merged


@functools.cache
def supported() -> KeySet:
    """The union of the NxDI releases we support, from the committed table."""
    from vllm_neuronx import nxdi_keys_table as table

    keys = union(table.RELEASES[r]["keys"] for r in table.SUPPORTED)
    names = " and ".join(filter(None, (", ".join(table.SUPPORTED[:-1]), table.SUPPORTED[-1])))
    return key_set(f"NxDI {names}, as committed in nxdi_keys_table.py", keys)


def _package_dir(package: str) -> str | None:
    """The folder of an importable package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _read_files(root: str | None, files: Iterable[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for rel in files if root else ():
        path = os.path.join(root, rel)
        try:
            out.append((path, os.stat(path).st_mtime))
        except OSError:
            continue
    return tuple(out)


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.cache
def _parse_installed(root: str, nxdi: tuple, nxd: tuple) -> KeySet | None:
    """Cached per file set and modification time: the check runs several times a start."""
    try:
        keys = read_keys([_text(p) for p, _ in nxdi], [_text(p) for p, _ in nxd])
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    if not keys.get("NeuronConfig"):
        return None
    return key_set(f"the installed NxDI {_version(root)}", keys)


def _version(root: str) -> str:
    """``__version__`` as the package's source assigns it (NxDI: _version.py)."""
    for name in ("_version.py", "__init__.py"):
        try:
            tree = ast.parse(_text(os.path.join(root, name)))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if (isinstance(node, ast.Assign) and _str(node.value) is not None
                    and any(isinstance(t, ast.Name) and t.id == "__version__"
                            for t in node.targets)):
                return node.value.value
    return "(version unknown)"


@functools.cache
def _warn_unreadable(root: str) -> None:
    logger.warning(
        "neuronx-distributed-inference at %s has no readable models/config.py; override keys "
        "are checked against the committed table of supported releases instead", root)


def installed() -> KeySet | None:
    """The keys of the NxDI this process would import, read from its source files
    (no import), or None when NxDI is absent or its source cannot be read."""
    root = _package_dir(NXDI_PACKAGE)
    if root is None:
        return None
    nxdi = _read_files(root, NXDI_FILES)
    keys = None
    if nxdi:
        nxd = _read_files(_package_dir(NXD_PACKAGE), NXD_FILES)
        keys = _parse_installed(root, nxdi, nxd)
    if keys is None:
        _warn_unreadable(root)
    return keys


def current() -> KeySet:
    """The installed NxDI's keys where it can be read, else the supported releases'."""
    return installed() or supported()


def releases_taking(key: str) -> list[str]:
    """The releases in the committed table whose top level takes ``key``."""
    from vllm_neuronx import nxdi_keys_table as table

    return [label for label, release in table.RELEASES.items()
            if key in key_set(label, release["keys"]).top]


# -- stored configs -----------------------------------------------------------------------------
def stored_keywords(stored: Mapping[str, Any], keys: KeySet) -> tuple[dict, dict]:
    """A neuron config NxDI saved (every attribute) -> (the keys that rebuild it, the
    attributes NxDI derives again). An attribute stored under another name than its key
    goes back under the key, so ``normalize_top_k_affinities: false`` stays a setting."""
    kwargs: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    for name, value in stored.items():
        if name in keys.top:
            kwargs[name] = value
            continue
        key = keys.renamed.get(name)
        if key is None:
            derived[name] = value
        elif key.startswith("not "):
            kwargs.setdefault(key[4:], not value)
        else:
            kwargs.setdefault(key, value)
    return kwargs, derived


# -- keys only a Neuron device uses ------------------------------------------------------------
# Kernel choices, compiler and collective-communication settings, core grouping and
# sharding: they change how a device runs the same computation, not its result.
DEVICE_ONLY_PATTERNS = ("*kernel*", "*nki*", "cc_*", "*_cc", "*_cc_*", "*_degree")
DEVICE_ONLY_KEYS = frozenset(
    """
    logical_nc_config logical_neuron_cores layer_boundary_markers scratchpad_page_size
    enable_spill_reload_dge dma_order_config weights_to_skip_layout_optimization target
    enable_output_completion_notifications sequence_parallel_enabled
    weight_gather_seq_len_threshold flash_decoding_enabled k_cache_transposed
    disable_kv_cache_tiling vocab_parallel save_sharded_checkpoint skip_sharding
    start_rank_id local_ranks_size world_size fused_qkv lm_head_pad
    lm_head_pad_alignment_size padded_hidden_size padded_intermediate_size
    enable_cte_modular_flow enable_ve_data_parallel attn_cls skip_warmup
    blockwise_matmul_config hybrid_sharding_config transpose_shared_experts_weights
    shared_experts_sequence_parallel_enabled
    """.split()
)
# Matched by a pattern but not device-only: vLLM sets tp_degree itself, and the
# quantizing kernels change the numbers (the CPU backend refuses them: unserved.py).
NOT_DEVICE_ONLY = frozenset(
    {"tp_degree", "quantized_mlp_kernel_enabled", "rmsnorm_quantize_kernel_enabled"}
)


def is_device_only(key: str) -> bool:
    if key in NOT_DEVICE_ONLY:
        return False
    return key in DEVICE_ONLY_KEYS or any(fnmatch.fnmatchcase(key, p)
                                          for p in DEVICE_ONLY_PATTERNS)


def device_only(keys: Iterable[str]) -> list[str]:
    """The keys of ``keys`` that only a Neuron device uses, sorted."""
    return sorted(k for k in keys if is_device_only(k))
