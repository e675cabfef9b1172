"""A PEFT LoRA adapter folder: what it adapts, checked against the base model, and its tensors.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (older ones
``adapter_model.bin``) with ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}
.lora_{A|B}.weight`` tensors, A ``[r, in]`` and B ``[out, r]``. PEFT's unmerged forward adds
``x·Aᵀ·Bᵀ·scaling`` to the projection, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA). ``inspect`` reads the JSON and the safetensors header only (no tensor data), so
the front end can check an adapter on every request; ``load`` reads the tensors once a
worker takes the adapter. Nothing here downloads: a path is a local folder.

Every refusal is an ``AdapterError`` that names the adapter, its path and the problem; a
missing folder says "No adapter found", the words vLLM's server turns into HTTP 404.
"""

from __future__ import annotations

import json
import os
import re
import types
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

#: The projections an adapter may adapt (the attention's and the dense MLP's).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SECTION = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
            "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT settings whose non-default (non-empty) values change the math or the modules in
# ways we do not serve: per-module rank/alpha, biases, quantization-aware LoRA, LoRA on
# parameters or token embeddings, activated LoRA, replicated layers, Conv1D weights, DoRA.
_REFUSED = ("rank_pattern", "alpha_pattern", "lora_bias", "use_qalora", "target_parameters",
            "trainable_token_indices", "alora_invocation_tokens", "layer_replication",
            "fan_in_fan_out", "use_dora")
_FLOATS = {"F64", "F32", "F16", "BF16"}
_CACHE_SIZE = 64


class AdapterError(ValueError):
    """An adapter this model cannot serve, named with its path and the reason."""

    def __init__(self, name: str, path: str, problem: str) -> None:
        super().__init__(f"LoRA adapter '{name}' ({path}): {problem}")
        self.name, self.path, self.problem = name, path, problem


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The base model's projection sizes, all an adapter's shapes are checked against."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    moe_layers: frozenset[int] = frozenset()  # layers whose MLP is experts (no dense MLP)

    @classmethod
    def from_hf(cls, hf_config) -> ModelDims:
        """From an HF config (a transformers config object or its dict)."""
        def get(key, default=None):
            if isinstance(hf_config, dict):
                return hf_config.get(key, default)
            return getattr(hf_config, key, default)

        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                               "intermediate_size") if get(k) is None]
        if missing:
            raise ValueError(f"LoRA adapters need a model config with {missing}; "
                             f"{get('architectures')} has none")
        heads, layers = get("num_attention_heads"), get("num_hidden_layers")
        # The mixture-of-experts families we serve: Mixtral (every layer), Qwen3-MoE
        # (every decoder_sparse_step-th layer not in mlp_only_layers), as LlamaSpec reads them.
        experts = get("num_local_experts") or get("num_experts") or 0
        step, dense = get("decoder_sparse_step") or 1, set(get("mlp_only_layers") or ())
        moe = frozenset(i for i in range(layers)
                        if experts and i not in dense and (i + 1) % step == 0)
        return cls(hidden=get("hidden_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   intermediate=get("intermediate_size"), layers=layers, moe_layers=moe)

    def shape(self, proj: str) -> tuple[int, int]:
        """(in, out) of one projection."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[proj]


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A checked adapter: where it is, its scaling and the rank of each module it adapts."""

    name: str
    path: str
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    ranks: tuple[tuple[tuple[int, str], int], ...]  # ((layer, proj), rank), sorted

    @property
    def modules(self) -> frozenset[str]:
        """The projections it adapts in some layer."""
        return frozenset(proj for (_, proj), _ in self.ranks)

    @property
    def max_rank(self) -> int:
        return max(rank for _, rank in self.ranks)


def _problem(name: str, path: str):
    def fail(problem: str) -> AdapterError:
        return AdapterError(name, path, problem)
    return fail


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _weights_file(path: str) -> str | None:
    for file in WEIGHT_FILES:
        full = os.path.join(path, file)
        if os.path.isfile(full):
            return full
    return None


def _headers(file: str) -> Iterator[tuple[str, list[int], str]]:
    """(key, shape, dtype) of each tensor, without reading tensor data (the safetensors
    header; a .bin is memory-mapped where torch can)."""
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                yield key, list(part.get_shape()), part.get_dtype()
        return
    for key, tensor in _read_bin(file).items():
        ok = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        yield key, list(tensor.shape) if ok else [], "F32" if ok else "other"


def _read_bin(file: str) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-zip format cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _module(key: str) -> tuple[int, str, bool] | str:
    """(layer, proj, is_lora_a) of a tensor key, or the module name it adapts (refused)."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    try:
        module, is_a = parse_fine_tuned_lora_name(key)
    except ValueError:
        return key
    found = _MODULE.fullmatch(module)
    if found is None or _SECTION.get(found[3]) != found[2]:
        return module
    return int(found[1]), found[3], is_a


def _check_config(cfg: dict, max_lora_rank: int, fail) -> float:
    """The adapter_config.json checks; returns the scaling."""
    from vllm.lora.peft_helper import PEFTHelper

    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise fail(f"peft_type {peft_type!r} is not a LoRA adapter (LORA)")
    r = cfg.get("r", 1)  # missing: PEFTHelper names every missing field below
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise fail(f"r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise fail(f"lora_alpha must be a number, got {alpha!r}")
    refused = [f"{k}={cfg[k]!r}" for k in _REFUSED if cfg.get(k)]
    if refused:
        raise fail(f"{', '.join(refused)} not supported")
    try:
        helper = PEFTHelper.from_dict(cfg)
        helper.validate_legal(types.SimpleNamespace(max_lora_rank=max_lora_rank))
    except (ValueError, TypeError) as e:
        raise fail(str(e)) from None
    return float(helper.vllm_lora_scaling_factor)


def _inspect(name: str, path: str, dims: ModelDims, max_lora_rank: int,
             targets: Collection[str]) -> AdapterSpec:
    fail = _problem(name, path)
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path) or not os.path.isfile(config):
        raise fail(f"No adapter found for {path} (no folder with an {CONFIG_FILE})")
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise fail(f"malformed {CONFIG_FILE}: {e}") from None
    if not isinstance(cfg, dict):
        raise fail(f"malformed {CONFIG_FILE}: not a JSON object")
    scaling = _check_config(cfg, max_lora_rank, fail)
    r = cfg["r"]
    file = _weights_file(path)
    if file is None:
        raise fail(f"no adapter weights ({' or '.join(WEIGHT_FILES)})")
    shapes: dict[tuple[int, str], dict[bool, list[int]]] = {}
    unexpected: set[str] = set()
    try:
        for key, shape, dtype in _headers(file):
            where = _module(key)
            if isinstance(where, str):
                unexpected.add(where)
                continue
            layer, proj, is_a = where
            if layer >= dims.layers or proj not in targets or (
                    _SECTION[proj] == "mlp" and layer in dims.moe_layers):
                unexpected.add(f"model.layers.{layer}.{_SECTION[proj]}.{proj}")
                continue
            if dtype not in _FLOATS:
                raise fail(f"{proj} of layer {layer}: lora_{'A' if is_a else 'B'} holds "
                           f"{dtype}, not floating point")
            shapes.setdefault((layer, proj), {})[is_a] = shape
    except AdapterError:
        raise
    except Exception as e:  # a truncated or foreign file: whatever the reader raised
        raise fail(f"unreadable {os.path.basename(file)}: {e}") from None
    if unexpected:
        listed = sorted(unexpected)
        more = f" and {len(listed) - 8} more" if len(listed) > 8 else ""
        raise fail(f"targets modules the model lacks (or the backend cannot adapt): "
                   f"{listed[:8]}{more}; adaptable: {list(targets)} of the "
                   f"{dims.layers} layers' attention and dense MLP")
    if not shapes:
        raise fail(f"{os.path.basename(file)} holds no LoRA weights")
    ranks = []
    for (layer, proj), pair in sorted(shapes.items()):
        where = f"{proj} of layer {layer}"
        if set(pair) != {True, False}:
            raise fail(f"{where}: lora_{'A' if True in pair else 'B'} without its "
                       f"lora_{'B' if True in pair else 'A'}")
        fan_in, fan_out = dims.shape(proj)
        a, b = pair[True], pair[False]
        if len(a) != 2 or a[1] != fan_in or a[0] != r:
            raise fail(f"{where}: lora_A is {a}, the model needs [{r}, {fan_in}] (r={r})")
        if len(b) != 2 or b[0] != fan_out or b[1] != r:
            raise fail(f"{where}: lora_B is {b}, the model needs [{fan_out}, {r}] (r={r})")
        ranks.append(((layer, proj), r))
    return AdapterSpec(name=name, path=path, scaling=scaling, ranks=tuple(ranks))


_cache: OrderedDict[tuple, AdapterSpec] = OrderedDict()


def inspect(name: str, path: str, dims: ModelDims, max_lora_rank: int, *,
            targets: Collection[str] = TARGETS) -> AdapterSpec:
    """The adapter at ``path`` checked against the model (JSON and tensor shapes, no tensor
    data), or an AdapterError. ``targets``: the projections the backend can adapt (NxDI:
    those compiled). Cached by the files' mtime and size, so a request re-checks an
    adapter in microseconds and a rewritten folder is checked again."""
    path = os.path.expanduser(os.fspath(path))
    real = os.path.realpath(path)
    key = (name, path, real, dims, max_lora_rank, tuple(targets),
           _stat(os.path.join(real, CONFIG_FILE)),
           *(_stat(os.path.join(real, f)) for f in WEIGHT_FILES))
    spec = _cache.get(key)
    if spec is None:
        spec = _inspect(name, path, dims, max_lora_rank, tuple(targets))
        _cache[key] = spec
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return spec


def load(spec: AdapterSpec) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, proj) -> (A [r, in], B [out, r]) in fp32, unscaled, for a checked adapter."""
    fail = _problem(spec.name, spec.path)
    file = _weights_file(spec.path)
    if file is None:
        raise fail("no adapter weights any more (the folder changed after it was checked)")
    pairs: dict[tuple[int, str], dict[bool, torch.Tensor]] = {}
    try:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        else:
            tensors = _read_bin(file)
    except Exception as e:
        raise fail(f"unreadable {os.path.basename(file)}: {e}") from None
    for key, tensor in tensors.items():
        where = _module(key)
        if not isinstance(where, str):
            layer, proj, is_a = where
            pairs.setdefault((layer, proj), {})[is_a] = tensor
    wanted = dict(spec.ranks)
    out = {}
    for module, rank in wanted.items():
        pair = pairs.get(module, {})
        a, b = pair.get(True), pair.get(False)
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise fail(f"{module[1]} of layer {module[0]} changed after the adapter was "
                       "checked; load it again")
        out[module] = (a.float().contiguous(), b.float().contiguous())
    if set(pairs) - set(wanted):
        raise fail("adapts other modules than when it was checked; load it again")
    return out
