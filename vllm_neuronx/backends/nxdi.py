"""The NxD Inference backend: our protocol on NxDI's application API.

This is the only module that imports ``neuronx_distributed_inference``, and only
inside functions, so vllm-neuronx imports (and the CPU backend runs) where NxDI
is not installed. The flow is NxDI's own:
``Cls.get_neuron_config_cls()(**cfg)`` -> ``Cls.get_config_cls()(neuron_config,
load_config=load_pretrained_config(path))`` -> ``Cls(path, config)`` ->
``compile(folder)`` / ``load(folder)`` -> ``model(input_ids, position_ids=...,
seq_ids=..., sampling_params=...)``.

What the earlier code bases got wrong is handled here: LoRA goes under
``lora_config`` (upstream passed ``lora_serving_config``, which NxDI drops with
a warning), rows are sorted by seq_id before the call and restored after, and
``--quantization neuron_quant`` (a transformers-neuronx option) is refused with
the NxDI keys to use instead.

Quantization is NxDI's own: with ``quantized: true`` the quantized checkpoint is made
with ``save_quantized_state_dict`` before compiling when it is not there yet (as
NxDI's inference_demo does), by default inside the artifacts folder, and fp8 gets
the environment NxDI's fp8 graphs need (quant_config.FP8_ENV).

Speculative decoding is NxDI's fused speculation (``fused_spec_config``): the draft's
config is built from the target's as NxDI's own inference_demo builds it, and a decode
step's accepted tokens are read from ``fused_outputs`` (``read_fused_outputs``, which
states what NxDI returns, release by release).

Multi-LoRA is NxDI's dynamic mode with its base-model dummy (``lora_serving_kwargs``):
an adapter is streamed into NxDI's CPU cache under a name unique to each load
(``prepare_adapter``), a prefill row's index is NxDI's id for that name (0: the dummy,
i.e. the base model), and NxDI swaps adapters into its ``max_loras`` device slots and
binds each to the row's seq_id itself; decode rows use that binding.

Prefix caching is NxDI's own on its block KV layout (``is_block_kv_layout``,
``is_prefix_caching``, ``pa_block_size``, ``pa_num_blocks``: block_kv.py): a call also takes
``slot_mapping``, ``block_table`` and the full and computed context lengths ([n, 1]). NxDI
picks a [prefill, prefix] bucket per prompt and asserts when the cached prefix it would read
exceeds its largest prefix bucket; such a prompt is told of fewer cached blocks instead
(``PrefixBuckets.fit``). What NxDI cannot compile with it is refused at start-up by name.

Multi-node is NxDI's own: one process per node, each calling forward with the same inputs;
``tp_degree`` is the total of ranks, ``local_ranks_size`` this node's share of them and
``start_rank_id`` its first (node * local_ranks_size). The keys go to NxDI's NeuronConfig
as given (NxDI's defaults, the whole world from rank 0, where they are left out), are
checked by name (``RankLayout``), and a node holding part of the ranks needs the runtime's
NEURON_RT_ROOT_COMM_ID=host:port to meet the others.
"""

from __future__ import annotations

import copy
import glob
import importlib
import inspect
import itertools
import json
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vllm_neuronx import block_kv, envs, nxdi_keys, speculation
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.protocol import (
    Batch,
    BlockInputs,
    ForwardOutput,
    NeuronBackend,
    SamplingCapabilities,
    step_adapters,
)
from vllm_neuronx.log import get_logger
from vllm_neuronx.lora.peft import TARGETS, AdapterError, AdapterSpec
from vllm_neuronx.quant_config import FP8_ENV, QuantConfig
from vllm_neuronx.speculation import Draft

logger = get_logger(__name__)

NXDI_PACKAGE = "neuronx_distributed_inference"
NXDI_CONFIG_FILE = "neuron_config.json"  # what NxDI's compile writes next to model.pt

# HF architecture -> (module under neuronx_distributed_inference.models, class).
# Mistral runs on NxDI's Llama implementation, as upstream vLLM did: a separate
# models.mistral exists only in the newest NxDI releases.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama.modeling_llama", "NeuronLlamaForCausalLM"),
    "MistralForCausalLM": ("llama.modeling_llama", "NeuronLlamaForCausalLM"),
    "MixtralForCausalLM": ("mixtral.modeling_mixtral", "NeuronMixtralForCausalLM"),
    "DbrxForCausalLM": ("dbrx.modeling_dbrx", "NeuronDbrxForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2.modeling_qwen2", "NeuronQwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3.modeling_qwen3", "NeuronQwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe.modeling_qwen3_moe", "NeuronQwen3MoeForCausalLM"),
    "MllamaForConditionalGeneration": ("mllama.modeling_mllama", "NeuronMllamaForCausalLM"),
}
MLLAMA = "MllamaForConditionalGeneration"
# The first NxDI release with each family's module, where it is not 0.1 (NxDI's git tags:
# models/qwen2 from v0.4.7422, qwen3 and qwen3_moe from v0.5.9230).
FIRST_RELEASE: dict[str, tuple[int, int]] = {
    "Qwen2ForCausalLM": (0, 4),
    "Qwen3ForCausalLM": (0, 5),
    "Qwen3MoeForCausalLM": (0, 5),
}

# The NxDI docs list trn2 (LNC=2) 1,2,4,8,16,32,64; inf2 1,2,4,8,24; trn1 1,2,8,16,32.
SUPPORTED_TP_DEGREES = (1, 2, 4, 8, 16, 24, 32, 64)
QUANTIZATION_KEYS = ("quantized", "quantized_checkpoints_path", "quantization_type",
                     "quantization_dtype", "modules_to_not_convert", "kv_cache_quant")
# The quantized checkpoint's folder inside the artifacts folder, when the user names none.
QUANTIZED_CHECKPOINT_DIR = "quantized_checkpoint"
# vLLM-side keys this backend consumes (the other VLLM_SIDE_KEYS are transformers-neuronx's).
_LORA_KEYS = frozenset({"lora_modules", "target_modules"})
# Fields of a compiled folder that must equal ours for its graphs to fit our runner.
_COMPILED_SHAPE_KEYS = ("batch_size", "seq_len", "max_context_length", "tp_degree")
# LoraServingConfig keys vLLM's adapters need: dynamic mode streams them in at run time,
# and the base-model dummy makes index 0 the base model (without it, index 0 is the first
# adapter). Both arrived together in NxDI 0.9 (0.7 has dynamic mode alone).
LORA_NEEDS = ("dynamic_multi_lora", "enable_base_model_only")
LORA_RELEASE = "neuronx-distributed-inference >= 0.9 (Neuron SDK 2.29)"
# What each of these LoraServingConfig keys must be, and why (lora_serving_kwargs).
_LORA_FIXED_WHY = {
    "batch_size": "NxDI keeps each seq_id's active adapter in a row of that many, so it is "
                  "max_num_seqs",
    "dynamic_multi_lora": "adapters come and go at run time (LoRARequest, "
                          "/v1/load_lora_adapter)",
    "enable_base_model_only": "without it index 0 is the first adapter, and requests of the "
                              "base model would get that adapter",
    "base_model_quantized": "it follows the neuron config's quantized",
}


# -- fused speculation: NxDI's side of it --------------------------------------------------------
# NxDI's EAGLE draft is its Llama decoder with is_eagle_draft (models/llama/modeling_llama.py
# 894-917, 1155-1166): a head serves Llama-family targets only (Mistral runs on NxDI's Llama).
EAGLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
EAGLE3_RELEASE = "neuronx-distributed-inference >= 0.7 (Neuron SDK 2.27)"  # is_eagle3
DRAFT_CLS_RELEASE = "neuronx-distributed-inference >= 0.7 (Neuron SDK 2.27)"  # draft_model_cls
# fused_outputs[0]'s pad after each row's accepted tokens, from the first NxDI release with it
# (see read_fused_outputs; NxDI 0.1 had no acceptance in the graph at all).
FUSED_PAD_BY_RELEASE = {(0, 2): 0, (0, 8): -1}
SPECULATION_ENABLE_LOGITS = (
    "turn speculative decoding off (drop speculative_config): NxDI's fused speculation "
    "samples and accepts on the device and returns only the accepted tokens, so a request "
    "that needs the logits on the host (penalties, logprobs, seeds, logits processors) "
    "needs a model compiled without it"
)


def read_fused_outputs(fused: Sequence[torch.Tensor], position_ids: torch.Tensor, k: int,
                       prefill: bool) -> torch.Tensor:
    """NxDI's ``fused_outputs`` -> a prefill's tokens [n], or a decode's [n, k] int64: each
    row's tokens (1..k of them) then -1. Rows in the order they were sent.

    What NxDI's fused speculation (``NeuronFusedSpecModel``, models/model_base.py; lines of
    main 4bcdc54, v0.3.5591's where they differ) computes and returns:

    - ``speculation_length`` = k is the most tokens one decode step yields, NOT the number
      of proposals: from a row's token x at position p the draft runs k times (it proposes
      d_1 .. d_k and writes x, d_1 .. d_{k-1} into its KV at p .. p+k-1; d_k is never
      used), the target runs once over [x, d_1 .. d_{k-1}] at p .. p+k-1
      (``_token_gen_forward`` 1812-1929), and ``_tkg_postprocessor`` (2799-2855; v0.3
      1870-1926) accepts the drafts equal to the target's tokens, contiguously, plus one:
      1..k tokens, each the target's own (greedy rows: its argmax; sampled rows: its sample,
      so the output follows the target's distribution). vLLM's num_speculative_tokens is
      k - 1 (``vllm_neuronx.speculation``).
    - ``fused_outputs`` = [tokens [n, k] int32, next input ids [n, 1], next attention mask,
      next position ids [n, 1] int32] + (with output_logits) the draft's and the target's
      logits (2797, 2855; NxDI's hf_adapter.py 544-551). The next position is p + count,
      so a row's count is ``fused_outputs[3] - position_ids``, as NxDI's own generation
      loop reads it (hf_adapter.py 571-573); index 3, not -1, which may be logits.
    - the tokens past each row's count are ``acceptance_padding_token``: 0 in NxDI 0.2-0.7
      (Neuron SDK 2.22-2.27; v0.3.5591 model_base.py:997), -1 from 0.8 (SDK 2.28, commit
      cd3abf3; main model_base.py:1650) (``FUSED_PAD_BY_RELEASE``). 0 is a real token id,
      so the count, never the pad, says where a row's tokens end.
    - context encoding returns the same four: [the target's token, then pad] and the prompt
      lengths (``_cte_postprocessor`` 2756-2797; v0.3 1832-1868), so a prefill's token is
      ``fused_outputs[0][:, 0]``.
    - a decode at position p needs p + k within the largest token bucket (the wrapper adds k
      to the attention mask's width, max(position_ids): model_wrapper.py 831-846, 903-916,
      model_base.py 3485-3503), hence seq_len = max_model_len + k.
    A layout that does not fit (NxDI 0.1 returned the drafts and the target's tokens and
    left acceptance to the caller) fails the checks here rather than yield wrong tokens.
    """
    tokens = fused[0] if isinstance(fused, list | tuple) and fused else None
    n = position_ids.shape[0]
    if not torch.is_tensor(tokens) or tuple(tokens.shape) != (n, k):
        raise RuntimeError(
            f"NxDI's fused_outputs[0] is {None if tokens is None else tuple(tokens.shape)}, "
            f"expected [{n}, {k}] (speculation_length={k}); is the installed NxDI >= 0.2?")
    tokens = tokens.to(torch.long)
    if prefill:
        if bool((tokens[:, 0] < 0).any()):
            raise RuntimeError(f"NxDI's fused context encoding returned {tokens[:, 0].tolist()}")
        return tokens[:, 0].clone()
    if len(fused) < 4 or fused[3].numel() != n:
        raise RuntimeError("NxDI's fused_outputs holds no next position ids [n, 1] at index 3")
    count = fused[3].reshape(n).to(torch.long) - position_ids[:, 0].to(torch.long)
    if int(count.min()) < 1 or int(count.max()) > k:
        raise RuntimeError(
            f"NxDI's fused step yielded {count.tolist()} tokens per row (next position - "
            f"position), outside 1..speculation_length={k}")
    keep = torch.arange(k)[None, :] < count[:, None]
    if bool((tokens[keep] < 0).any()):
        raise RuntimeError(f"NxDI's fused step accepted negative token ids: {tokens.tolist()}")
    return torch.where(keep, tokens, torch.full_like(tokens, -1))


# -- prefix caching: NxDI's side of the block KV layout (block_kv.py) ---------------------------
# Lines of NxDI main 4bcdc54 (models/model_wrapper.py, modules/autobucketing.py, models/config.py,
# modules/kvcache/block_kv_cache_manager.py); 0.8 and 0.9 choose buckets the same way.
# Under prefix caching NxDI's context encoding runs [prefill, prefix] buckets and its token
# generation [1, S] (autobucketing.py 149-264), automatic ones from these sizes up (186-193,
# 251-255).
PREFIX_AUTO_MIN = 512
TOKEN_AUTO_MIN = 256
# NxDI's attention tells a context encoding over a cached prefix from token generation by
# its width: narrower than this is token generation (attention_base.py 1745-1751: "The
# smallest non zero prefix size supported is 128"), and every prefill bucket is compiled
# with every prefix bucket.
PREFIX_MIN_PREFILL = 128
# Keys that turn on NxDI's block TKG attention kernel (config.py 450-467: the two older names
# turn on the first), which takes a decode's block table padded with -1, not 0
# (model_wrapper.py 1139, and vllm-neuron's runner pads it so).
BLOCK_TKG_KERNEL_KEYS = ("attn_block_tkg_nki_kernel_enabled", "attn_tkg_nki_kernel_enabled",
                         "attn_tkg_builtin_kernel_enabled")
# With fewer blocks per sequence than this and the kernel off, NxDI splits each block into the
# smallest power of two >= BLOCK_TILING_BLOCKS / blocks per sequence tiles, assuming they divide
# it (block_kv_cache_manager.py 55-70).
BLOCK_TILING_BLOCKS = 128
PREFIX_CACHING_SERVED = ("prefix caching on NxDI (enable_prefix_caching, is_prefix_caching, "
                         "is_block_kv_layout)")


def block_tkg_kernel(cfg: Mapping[str, Any]) -> bool:
    """NxDI's block TKG attention kernel is on (any of its keys)."""
    return any(cfg.get(k) for k in BLOCK_TKG_KERNEL_KEYS)


def default_prefix_buckets(cfg: Mapping[str, Any]) -> list[int] | None:
    """The prefix_buckets we give NxDI where it needs them and the user gave none: with
    context_encoding_buckets NxDI crosses them with ``[0] + prefix_buckets``
    (autobucketing.py 176-181; a TypeError on None), so the context buckets serve as the
    prefix buckets too. None where NxDI reads no prefix_buckets or the user gave them."""
    if not (cfg.get("is_prefix_caching") and cfg.get("enable_bucketing")) \
            or cfg.get("context_encoding_buckets") is None or cfg.get("prefix_buckets") is not None:
        return None
    return sorted(cfg["context_encoding_buckets"])


@dataclass(frozen=True, slots=True)
class PrefixBuckets:
    """NxDI's buckets under prefix caching, as its autobucketing makes them from a config."""

    prefill: tuple[int, ...]  # context encoding's first axis: the tokens computed
    prefix: tuple[int, ...]  # its second axis, 0 first: the cached positions read
    token: tuple[int, ...]  # token generation's S of [1, S]

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> PrefixBuckets:
        max_ctx = int(cfg["max_context_length"])
        max_len = int(cfg.get("max_length") or cfg["seq_len"])
        if not cfg.get("enable_bucketing"):
            return cls((max_ctx,), (0, max_ctx), (max_len,))
        if cfg.get("context_encoding_buckets") is not None:
            prefill = sorted(cfg["context_encoding_buckets"])
            prefix = list(cfg.get("prefix_buckets") or default_prefix_buckets(cfg) or [])
        else:
            prefill = prefix = nc.generate_buckets(PREFIX_AUTO_MIN, max_ctx)
        token = sorted(cfg.get("token_generation_buckets")
                       or nc.generate_buckets(TOKEN_AUTO_MIN, max_len))
        return cls(tuple(prefill), (0, *prefix), tuple(token))

    def context_bucket(self, queries: int, cached: int) -> tuple[int, int] | None:
        """NxDI's [prefill, prefix] bucket for a context encoding that computes ``queries``
        tokens after ``cached`` ones (model_wrapper.py 991-1045), or None where NxDI fails: a
        ValueError past the largest prefill bucket, an AssertionError past the largest prefix
        bucket. Free prefill slots recompute cached tokens, so the prefix NxDI reads is what
        is left of ``cached``."""
        if 256 < queries + cached <= 512 and 512 in self.prefill:  # its [512, 0] corner case
            return 512, 0
        prefill = next((b for b in self.prefill if queries <= b), None)
        if prefill is None:
            return None
        rest = max(0, cached - (prefill - queries))
        prefix = next((b for b in self.prefix if rest <= b), None)
        return None if prefix is None else (prefill, prefix)

    def fit(self, full: int, computed: int, block_size: int) -> int:
        """The cached positions to tell NxDI of: ``computed``, or fewer whole blocks where the
        prefix NxDI would read exceeds its largest prefix bucket (NxDI asserts there,
        model_wrapper.py 1043); the positions between are computed again."""
        for cached in range(computed, -1, -block_size):
            if self.context_bucket(full - cached, cached) is not None:
                return cached
        raise ValueError(
            f"a prefill of {full} positions ({computed} cached) fits none of NxDI's context "
            f"encoding buckets (prefill {list(self.prefill)}, prefix {list(self.prefix)})")


# -- multi-node: which of NxDI's ranks this process runs -----------------------------------------
# The Neuron runtime's rendezvous when the ranks span processes: NxDI's multi-node examples set
# it on every node (examples/multi_node.md), its launcher defaults it to the first host
# (scripts/nxdi_distributed_launcher.py 38-39).
ROOT_COMM_ENV = "NEURON_RT_ROOT_COMM_ID"
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})")


def _count(cfg: Mapping[str, Any], key: str, default: int, least: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        what = "a positive" if least else "a non-negative"
        raise nc.NeuronConfigError(f"{key}={value!r} must be {what} integer")
    return value


@dataclass(frozen=True, slots=True)
class RankLayout:
    """NxDI's ranks and this process's share of them (one process per node)."""

    world_size: int  # every rank over all nodes: tp_degree (* pp_degree * ep_degree)
    local_ranks_size: int  # this node's ranks
    start_rank_id: int  # this node's first rank

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> RankLayout:
        """The keys of ``cfg`` with NxDI's defaults (models/config.py 382-390: world_size
        tp * pp * ep, start_rank_id 0, local_ranks_size the world), refused by name where
        NxD could not shard or connect the ranks."""
        tp = _count(cfg, "tp_degree", 1, 1)
        parallel = tp * _count(cfg, "pp_degree", 1, 1) * _count(cfg, "ep_degree", 1, 1)
        world = _count(cfg, "world_size", parallel, 1)
        if world != parallel:  # more would be data parallelism inside NxDI
            raise nc.NeuronConfigError(
                f"world_size={world} with tp_degree={tp}: NxDI's ranks are tp_degree * "
                f"pp_degree * ep_degree = {parallel} over all nodes; leave world_size out "
                "(tp_degree is the total, local_ranks_size each node's share)")
        local = _count(cfg, "local_ranks_size", world, 1)
        start = _count(cfg, "start_rank_id", 0, 0)
        left_out = ("" if cfg.get("local_ranks_size") is not None else
                    " (local_ranks_size was left out: NxDI's default is every rank, one node)")
        if world % local:
            raise nc.NeuronConfigError(
                f"local_ranks_size={local} does not divide tp_degree={tp} (world_size "
                f"{world}, the ranks over all nodes): each node runs local_ranks_size ranks, "
                "so some ranks would run on no node")
        if start % local:
            raise nc.NeuronConfigError(
                f"start_rank_id={start} is not a multiple of local_ranks_size={local}: node n "
                f"starts at rank n * local_ranks_size (NxDI's examples/multi_node.md){left_out}")
        if start + local > world:
            raise nc.NeuronConfigError(
                f"start_rank_id={start} with local_ranks_size={local} runs ranks {start}.."
                f"{start + local - 1}, past the last rank {world - 1} of tp_degree={tp}"
                f"{left_out}")
        return cls(world, local, start)

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_ranks_size

    @property
    def node(self) -> int:
        return self.start_rank_id // self.local_ranks_size

    def check_process(self, rank: int, processes: int) -> None:
        """For a launcher: process ``rank`` of ``processes`` (one per node) must be node
        ``rank`` of as many nodes, or the ranks it loads are another node's (or nobody's)."""
        if (self.node, self.nodes) == (rank, processes):
            return
        where = (f"process {rank} of {processes} has start_rank_id={self.start_rank_id} and "
                 f"local_ranks_size={self.local_ranks_size} of tp_degree={self.world_size}, "
                 f"i.e. node {self.node} of {self.nodes}")
        if processes < 1 or self.world_size % processes:
            raise nc.NeuronConfigError(
                f"{where}: tp_degree={self.world_size} is not a multiple of {processes} nodes")
        local = self.world_size // processes
        raise nc.NeuronConfigError(
            f"{where}: set start_rank_id={rank * local} and local_ranks_size={local}")

    def check_root_comm(self) -> str | None:
        """NEURON_RT_ROOT_COMM_ID, which a node holding part of the ranks needs (None on a
        single node, where it is not read)."""
        if self.nodes == 1:
            return None
        value = os.environ.get(ROOT_COMM_ENV, "")
        match = _HOST_PORT.fullmatch(value)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise nc.NeuronConfigError(
                f"{ROOT_COMM_ENV}={value!r}: this node runs ranks {self.start_rank_id}.."
                f"{self.start_rank_id + self.local_ranks_size - 1} of {self.world_size} "
                f"(local_ranks_size < tp_degree), so the Neuron runtime needs "
                f"{ROOT_COMM_ENV}=host:port of node 0, the same on every node")
        return value


def read_hf_config(model_path: str) -> dict[str, Any]:
    with open(os.path.join(model_path, "config.json")) as f:
        return json.load(f)


def installed_release() -> tuple[str, tuple[int, int]] | None:
    """The installed NxDI's version and (major, minor), from its package metadata; None
    where it has none (not installed, or a source checkout)."""
    try:
        version = importlib.metadata.version("neuronx-distributed-inference")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = version.split(".")
    try:
        return version, (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return None


def model_class_path(hf_config: Mapping[str, Any]) -> tuple[str, str, str]:
    """(architecture, module, class) of the first supported architecture in the config."""
    archs = list(hf_config.get("architectures") or [])
    for arch in archs:
        if arch in MODEL_CLASSES:
            module, cls = MODEL_CLASSES[arch]
            return arch, f"{NXDI_PACKAGE}.models.{module}", cls
    raise ValueError(
        f"neuronx-distributed-inference does not serve architectures {archs}; supported: "
        f"{sorted(MODEL_CLASSES)}"
    )


def parse_lora_modules(value: Any) -> dict[str, str]:
    """vLLM's LoRA adapters -> {name: path}: a list of {"name", "path"} objects or
    "name=path" strings (the --lora-modules form), or a {name: path} mapping."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = []
        for entry in value:
            if isinstance(entry, Mapping) and {"name", "path"} <= set(entry):
                items.append((entry["name"], entry["path"]))
            elif isinstance(entry, str) and "=" in entry:
                items.append(tuple(entry.split("=", 1)))
            else:
                raise nc.NeuronConfigError(
                    f"lora_modules entry {entry!r} must be {{'name': ..., 'path': ...}} or "
                    "'name=path'"
                )
    else:
        raise nc.NeuronConfigError(
            f"lora_modules must be a list of {{'name', 'path'}} objects or 'name=path' "
            f"strings, got {type(value).__name__}"
        )
    paths: dict[str, str] = {}
    for name, path in items:
        name, path = str(name).strip(), str(path).strip()
        if not name or not path:
            raise nc.NeuronConfigError(f"lora_modules entry {name!r}={path!r} is incomplete")
        if name in paths:
            raise nc.NeuronConfigError(f"lora_modules names adapter {name!r} twice")
        paths[name] = path
    return paths


def _ckpt_paths_dict(value: Any) -> dict[str, str]:
    """NxDI's lora_ckpt_paths: {id: path} or a list of "id:path" strings."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return dict(str(p).split(":", 1) for p in value)


def lora_serving_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The LoraServingConfig keywords a neuron config asks for; None without LoRA.

    ``cfg["lora_config"]`` holds vLLM's ``max_loras``, ``max_lora_rank`` and
    ``max_cpu_loras`` (put there when vLLM's LoRA is on) and any NxDI key the user
    overrides. The rest follows from the neuron config, so the artifacts key (the neuron
    config) covers it: ``batch_size`` (max_num_seqs), dynamic mode, the base-model dummy,
    ``base_model_quantized``, ``target_modules`` (the legacy override, else every
    projection vLLM adapts), and the legacy ``lora_modules`` as ``lora_ckpt_paths``
    (loaded at start-up; NxDI's CPU cache is widened by their number, so the adapters
    vLLM streams in never push each other out)."""
    given = cfg.get("lora_config")
    legacy = parse_lora_modules(cfg.get("lora_modules"))
    if given is None and not legacy:
        return None
    if given is not None and not isinstance(given, Mapping):
        raise nc.NeuronConfigError(
            f"lora_config must be a JSON object of LoraServingConfig's keys, got "
            f"{type(given).__name__}")
    args = copy.deepcopy(dict(given or {}))
    fixed = {"batch_size": cfg["batch_size"], "dynamic_multi_lora": True,
             "enable_base_model_only": True,
             "base_model_quantized": bool(cfg.get("quantized", False))}
    for key, value in fixed.items():
        if key in args and args[key] != value:
            raise nc.NeuronConfigError(
                f"lora_config.{key}={args[key]!r}: vLLM's adapters on NxDI need {key}="
                f"{value!r} ({_LORA_FIXED_WHY[key]}); remove it from override_neuron_config")
        args[key] = value
    paths = _ckpt_paths_dict(args.get("lora_ckpt_paths"))
    for name, path in legacy.items():
        if paths.get(name, path) != path:
            raise nc.NeuronConfigError(
                f"adapter {name!r} is {paths[name]!r} in lora_config.lora_ckpt_paths and "
                f"{path!r} in lora_modules; name it once")
        paths[name] = path
    if paths:
        args["lora_ckpt_paths"] = paths
    targets = cfg.get("target_modules")
    if targets is not None:
        if "target_modules" in args and list(args["target_modules"]) != list(targets):
            raise nc.NeuronConfigError(
                f"target_modules {list(targets)} and lora_config.target_modules "
                f"{list(args['target_modules'])} differ; give one")
        args["target_modules"] = list(targets)
    args.setdefault("target_modules", list(TARGETS))
    if not isinstance(args["target_modules"], list | tuple) or set(
            args["target_modules"]) - set(TARGETS):
        raise nc.NeuronConfigError(
            f"target_modules {args['target_modules']!r}: vLLM's adapters adapt only "
            f"{list(TARGETS)} (a list of them)")
    static = set(paths) | set(_ckpt_paths_dict(args.get("lora_ckpt_paths_cpu")))
    if static and "max_cpu_loras" in args:
        args["max_cpu_loras"] = int(args["max_cpu_loras"]) + len(static)
    return args


def vllm_lora_config(user: Any, lora_config) -> dict[str, Any]:
    """The neuron config's ``lora_config`` for vLLM's LoRA settings (``enable_lora``):
    ``max_loras``, ``max_lora_rank`` and ``max_cpu_loras`` (vLLM's default: max_loras) over
    the user's override ``lora_config``, whose same keys must agree with vLLM's."""
    ours = {"max_loras": lora_config.max_loras, "max_lora_rank": lora_config.max_lora_rank,
            "max_cpu_loras": lora_config.max_cpu_loras or lora_config.max_loras}
    if user is None:
        return ours
    if not isinstance(user, Mapping):
        raise nc.NeuronConfigError(
            f"lora_config must be a JSON object of LoraServingConfig's keys, got "
            f"{type(user).__name__}")
    for key, value in ours.items():
        if key in user and user[key] != value:
            raise nc.NeuronConfigError(
                f"override_neuron_config lora_config.{key}={user[key]!r} contradicts vLLM's "
                f"{key}={value!r} (--{key.replace('_', '-')}); set it once, through vLLM")
    return {**copy.deepcopy(dict(user)), **ours}


def _lora_asked(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("lora_config") is not None or bool(cfg.get("lora_modules"))


def hf_compat_kwargs(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """InferenceConfig attributes NxDI reads but transformers >= 5 no longer writes at the
    top level: ``rope_theta`` (a required Llama attribute) and ``rope_scaling``, both now
    inside ``rope_parameters``. Passed as kwargs, they override after load_config."""
    rope = hf_config.get("rope_parameters")
    out: dict[str, Any] = {}
    if not isinstance(rope, Mapping):
        return out
    if "rope_theta" not in hf_config and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in hf_config and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def _checkpoint_present(path: str) -> bool:
    """A quantized checkpoint NxDI can read: a file, or a folder with weights in it."""
    if os.path.isfile(path):
        return True
    if os.path.isdir(path):
        return any(glob.glob(os.path.join(path, pattern))
                   for pattern in ("*.safetensors", "*.pt", "*.bin"))
    return False


@dataclass(frozen=True, slots=True)
class NxdiAdapter:
    """An adapter as NxDI's ``add_adapter`` takes it (a LoRARequest's two fields it
    reads). ``lora_name`` is unique to each load, so NxDI's cache, keyed by name, never
    serves the weights of an earlier folder under a reused vLLM name."""

    lora_name: str
    lora_path: str
    name: str  # vLLM's name of the adapter, for messages


class NxdiBackend(NeuronBackend):
    framework = "neuronx-distributed-inference"
    architectures = tuple(MODEL_CLASSES)

    def __init__(self, model_path: str, neuron_config: dict, *, seed: int = 0,
                 draft: Draft | None = None) -> None:
        super().__init__(model_path, neuron_config, seed=seed, draft=draft)
        self.validate(neuron_config)
        self.rank_layout = RankLayout.of(neuron_config)
        if envs.VLLM_NEURONX_WORLD_SIZE:  # one process of a rank group: one node each
            self.rank_layout.check_process(int(envs.VLLM_NEURONX_RANK or 0),
                                           int(envs.VLLM_NEURONX_WORLD_SIZE))
        self.quant = QuantConfig.from_neuron_config(neuron_config)
        self.hf_config = read_hf_config(model_path)
        self.architecture, module, name = model_class_path(self.hf_config)
        self.model_cls = getattr(importlib.import_module(module), name)
        self.draft_hf: dict[str, Any] | None = None
        self.draft_cls = None  # NxDI's application class of a draft of another family
        if draft is not None or self.speculation_length:
            self._check_draft()
        if self.block_layout is not None and self.architecture == MLLAMA:
            raise nc.NeuronConfigError(
                f"{PREFIX_CACHING_SERVED}: not for {MLLAMA}, whose NxDI forward takes no "
                "slot_mapping or block_table; turn enable_prefix_caching off")
        self.config = self._inference_config()
        self._prefix_buckets = (PrefixBuckets.of(self.neuron_config)
                                if self.block_layout is not None else None)
        self._refitted = False  # logged once: a cached prefix computed again (_block_inputs)
        self.model = None  # the NxDI application, once compiled or loaded
        self._max_loras: int | None = None  # vLLM's, from init_lora
        self._loads = itertools.count()  # makes each adapter load's NxDI name unique

    # -- checks before anything is built ------------------------------------------------
    @classmethod
    def check_architectures(cls, architectures: list[str]) -> None:
        """At start-up, not when the worker imports the model: a family newer than the
        installed NxDI is named with the release it needs."""
        found = installed_release()
        arch = next((a for a in architectures if a in MODEL_CLASSES), None)
        need = FIRST_RELEASE.get(arch)
        if found is None or need is None or found[1] >= need:
            return
        raise nc.NeuronConfigError(
            f"{arch} needs neuronx-distributed-inference >= {need[0]}.{need[1]} (the first "
            f"release with its model); this host has {found[0]}: install a newer Neuron SDK")

    @classmethod
    def validate(cls, neuron_config: dict, *, quantization: str | None = None) -> None:
        """Refuse what NxDI cannot compile, naming the key to change."""
        if quantization is not None:
            hint = ("neuron_quant is transformers-neuronx's quantization"
                    if quantization == "neuron_quant" else "NxDI quantizes the weights itself")
            raise nc.NeuronConfigError(
                f"--quantization {quantization} is not supported with "
                f"neuronx-distributed-inference ({hint}); drop it and set the "
                f"override_neuron_config keys {', '.join(QUANTIZATION_KEYS)} instead, e.g. "
                '{"quantized": true, "quantization_type": "per_channel_symmetric", '
                '"quantization_dtype": "int8"} (the quantized checkpoint goes into the '
                "artifacts folder unless quantized_checkpoints_path names a folder or .pt file)"
            )
        QuantConfig.from_neuron_config(neuron_config)
        RankLayout.of(neuron_config)
        tp = neuron_config.get("tp_degree")
        if isinstance(tp, bool) or tp not in SUPPORTED_TP_DEGREES:
            raise nc.NeuronConfigError(
                f"tp_degree={tp!r} is not supported by NxDI; use one of "
                f"{list(SUPPORTED_TP_DEGREES)} (trn2: 1,2,4,8,16,32,64; inf2: 1,2,4,8,24; "
                "trn1: 1,2,8,16,32), set through tensor_parallel_size"
            )
        if neuron_config.get("is_continuous_batching") and neuron_config.get(
            "ctx_batch_size", 1
        ) != 1:
            raise nc.NeuronConfigError(
                f"ctx_batch_size={neuron_config.get('ctx_batch_size')} with "
                "is_continuous_batching: NxDI's context encoding writes one KV line per run, "
                "so ctx_batch_size must be 1"
            )
        parse_lora_modules(neuron_config.get("lora_modules"))
        if _lora_asked(neuron_config):
            cls._validate_lora(neuron_config)
        if speculation.speculation_length(neuron_config):
            cls._validate_speculation(neuron_config)
        if any(neuron_config.get(k) is not None for k in (
                "is_block_kv_layout", "is_prefix_caching", "prefix_buckets")):
            cls._validate_prefix_caching(neuron_config)

    @classmethod
    def _validate_prefix_caching(cls, cfg: dict) -> None:
        """What NxDI's prefix caching cannot compile or run, named (lines of NxDI main;
        ``PrefixBuckets`` says how it picks its buckets)."""
        def refuse(what: str) -> None:
            raise nc.NeuronConfigError(f"{PREFIX_CACHING_SERVED}: {what}")

        if not cfg.get("is_block_kv_layout"):
            if cfg.get("is_prefix_caching"):
                refuse("is_prefix_caching needs is_block_kv_layout: NxDI keeps cached blocks "
                       "only in its block KV cache (model_base.py 170-171); set "
                       "enable_prefix_caching instead of the NxDI keys")
            if cfg.get("prefix_buckets") is not None:
                refuse("prefix_buckets are read only with prefix caching; turn on "
                       "enable_prefix_caching or drop prefix_buckets")
            return
        if not cfg.get("is_prefix_caching"):
            refuse("is_block_kv_layout without is_prefix_caching: NxDI shapes its block KV "
                   "cache for prefix caching or chunked prefill only "
                   "(block_kv_cache_manager.py 37-43), and chunked prefill left NxDI in SDK "
                   "2.28; turn on enable_prefix_caching")
        if speculation.speculation_length(cfg):
            refuse("speculative decoding is not served with it (the fused draft keeps KV "
                   "lines of its own); drop speculative_config or enable_prefix_caching")
        if cfg.get("token_generation_batches") is not None:
            refuse("token_generation_batches (batch bucketing) is refused by NxDI with prefix "
                   "caching and the block KV layout (config.py 654-690, autobucketing.py "
                   "271-276); drop it")
        if cfg.get("k_cache_transposed"):
            refuse("k_cache_transposed: NxDI's block KV cache has no transposed K "
                   "(config.py 532-540 asserts); drop it")
        bs = int(cfg["pa_block_size"])
        given = cfg.get("prefix_buckets")
        if given is not None:
            if not (cfg.get("enable_bucketing") and cfg.get("context_encoding_buckets")):
                refuse("prefix_buckets are read only with context_encoding_buckets (NxDI's "
                       "automatic buckets ignore them, autobucketing.py 170-193); give "
                       "context_encoding_buckets too, or drop prefix_buckets")
            if not isinstance(given, list) or not given or any(
                    not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in given) \
                    or given != sorted(set(given)):
                refuse(f"prefix_buckets must be positive integers in ascending order without "
                       f"repeats (NxDI adds the 0 bucket and picks the first that fits), got "
                       f"{given!r}")
        buckets = PrefixBuckets.of(cfg)
        partial = sorted({b for b in buckets.prefix + buckets.token if b % bs})
        if partial:
            refuse(f"the buckets {partial} are not whole blocks of pa_block_size={bs}: NxDI "
                   "reads a prefix or decode bucket's positions through bucket / block_size "
                   "entries of the block table (model_wrapper.py 1119-1143); give "
                   "prefix_buckets and token_generation_buckets that are multiples of the "
                   "block size (context_encoding_buckets serve as prefix_buckets when none "
                   "are given)")
        narrow = [b for b in buckets.prefill if b < PREFIX_MIN_PREFILL]
        if narrow:
            refuse(f"context encoding buckets {narrow} are narrower than {PREFIX_MIN_PREFILL}: "
                   "NxDI's attention runs a context encoding that narrow over a cached prefix "
                   "as token generation (attention_base.py 1745-1751); give "
                   f"context_encoding_buckets (and max_model_len) of at least "
                   f"{PREFIX_MIN_PREFILL}")
        max_len = int(cfg.get("max_length") or cfg["seq_len"])
        per_sequence = -(-max_len // bs)
        if per_sequence < BLOCK_TILING_BLOCKS and not block_tkg_kernel(cfg):
            tiles = 2 ** math.ceil(math.log2(BLOCK_TILING_BLOCKS / per_sequence))
            if bs % tiles:
                refuse(f"pa_block_size={bs} (block_size) with {per_sequence} blocks per "
                       f"sequence of {max_len} positions: NxDI splits each block into {tiles} "
                       f"tiles, the smallest power of two >= {BLOCK_TILING_BLOCKS} / blocks "
                       "per sequence (block_kv_cache_manager.py 55-70), which must divide "
                       f"it; use a block size that is a multiple of {tiles}, or a longer "
                       "max_model_len")

    @classmethod
    def _validate_speculation(cls, neuron_config: dict) -> None:
        """What NxDI's fused speculation cannot run, named (read_fused_outputs says what it
        does)."""
        def refuse(what: str) -> None:
            raise nc.NeuronConfigError(f"speculative decoding on NxDI: {what}")

        if neuron_config.get("on_device_sampling_config") is None:
            refuse("it needs on-device sampling (NxDI's fused graph samples and accepts on "
                   "the device and asserts on_device_sampling_config): unset "
                   "NEURON_ON_DEVICE_SAMPLING_DISABLED and leave on_device_sampling_config set")
        if neuron_config.get("output_logits"):
            refuse("output_logits is not served with it (NxDI's fused graph appends the "
                   "draft's and the target's logits in a layout that differs between context "
                   "encoding and decode); remove output_logits")
        if _lora_asked(neuron_config):
            refuse("LoRA adapters are not served with it: NxDI's fused graph passes no "
                   "adapter_ids to the target model, so adapters would be ignored; drop "
                   "speculative_config or enable_lora")
        if neuron_config.get("quantized"):
            refuse("quantized weights are not served with it: NxDI loads the fused draft's "
                   "weights from its HF folder with the target's quantization settings (the "
                   "draft config is a copy of the target's), which do not fit; drop quantized "
                   "or speculative_config")
        keys = nc.neuron_config_keys()
        if neuron_config.get("is_eagle3") and "is_eagle3" not in keys.top:
            refuse(f"method eagle3 needs {EAGLE3_RELEASE}: NeuronConfig of {keys.origin} takes "
                   "no is_eagle3; install a newer Neuron SDK or use method eagle")

    @classmethod
    def _validate_lora(cls, neuron_config: dict) -> None:
        """LoRA needs NxDI's dynamic mode and base-model dummy, read from the installed
        NxDI's source (no import); and refuses what NxDI cannot combine with it."""
        keys = nc.neuron_config_keys()
        taken = keys.nested.get("lora_config", frozenset())
        missing = [k for k in LORA_NEEDS if k not in taken]
        if missing:
            raise nc.NeuronConfigError(
                f"LoRA adapters need {LORA_RELEASE}: LoraServingConfig of {keys.origin} has "
                f"no {' or '.join(missing)}; install a newer Neuron SDK")
        if neuron_config.get("save_sharded_checkpoint"):
            raise nc.NeuronConfigError(
                "save_sharded_checkpoint with LoRA: NxDI cannot pre-shard adapters that "
                "stream in at run time (it asserts when none are given at compile); remove "
                "save_sharded_checkpoint")
        if neuron_config.get("fused_qkv"):
            raise nc.NeuronConfigError(
                "fused_qkv with LoRA: NxDI's LoRA modules match q_proj, k_proj and v_proj "
                "by name, which a fused QKV projection does not have; remove fused_qkv")
        lora_serving_kwargs(neuron_config)

    @classmethod
    def sampling_capabilities(cls, neuron_config: dict[str, Any]) -> SamplingCapabilities:
        """NxDI's (protocol default), but never logits with fused speculation."""
        if speculation.speculation_length(neuron_config):
            return SamplingCapabilities(logits=False, prompt_logits=False,
                                        enable_logits=SPECULATION_ENABLE_LOGITS)
        return super().sampling_capabilities(neuron_config)

    def _check_draft(self) -> None:
        """The draft against the neuron config and the target, before anything is built:
        the neuron config's k is the draft's, and NxDI can build the draft."""
        draft, k = self.draft, self.speculation_length
        if draft is None or draft.speculation_length != k:
            raise nc.NeuronConfigError(
                f"the neuron config has speculation_length={k} but the draft is {draft}: "
                "build the neuron config with resolve_neuron_config(draft=...)")
        if self.architecture == MLLAMA:
            raise nc.NeuronConfigError(
                f"speculative decoding is not served for {MLLAMA}: NxDI's Mllama config "
                "asserts speculation_length == 0; drop speculative_config")
        self.draft_hf = read_hf_config(draft.path)
        target_vocab, draft_vocab = self.vocab_size, self.draft_hf.get("vocab_size")
        if draft.is_eagle:
            if self.architecture not in EAGLE_ARCHITECTURES:
                raise nc.NeuronConfigError(
                    f"speculative_config method {draft.method!r} on NxDI: its EAGLE draft is "
                    f"its Llama decoder, for {', '.join(EAGLE_ARCHITECTURES)} targets, not "
                    f"{self.architecture}; use a draft model instead")
            own_vocab = self.draft_hf.get("draft_vocab_size")
            if own_vocab not in (None, target_vocab):
                raise nc.NeuronConfigError(
                    f"the EAGLE head in {draft.path} has its own vocabulary (draft_vocab_size="
                    f"{own_vocab}, mapped by d2t): NxDI's EAGLE draft has no such mapping, its "
                    f"LM head must cover the target's {target_vocab} tokens")
            keys = speculation.checkpoint_keys(draft.path)
            tied = keys and self.draft_hf.get("tie_word_embeddings") and (
                "embed_tokens.weight" in keys)
            if keys is not None and "lm_head.weight" not in keys and not tied:
                raise nc.NeuronConfigError(
                    f"the EAGLE head in {draft.path} has no lm_head.weight: NxDI's EAGLE draft "
                    "loads its LM head from the head's own checkpoint, not from the target's "
                    "(aws-neuron-sdk#1143); save the target's lm_head.weight into the head's "
                    "checkpoint")
        else:
            _, module, name = model_class_path(self.draft_hf)
            cls = getattr(importlib.import_module(module), name)
            if cls is not self.model_cls:
                from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig

                if "draft_model_cls" not in inspect.signature(FusedSpecNeuronConfig).parameters:
                    raise nc.NeuronConfigError(
                        f"a {name} draft for a {self.model_cls.__name__} target needs "
                        f"{DRAFT_CLS_RELEASE} (FusedSpecNeuronConfig's draft_model_cls); "
                        "the installed NxDI builds the draft with the target's class: use a "
                        "draft of the target's family or install a newer Neuron SDK")
                self.draft_cls = cls
        if draft_vocab != target_vocab:
            raise nc.NeuronConfigError(
                f"the draft in {draft.path} has vocab_size {draft_vocab}, the target "
                f"{target_vocab}: fused speculation compares their token ids, so they must "
                "share the tokenizer")

    def _fused_spec_config(self, config):
        """NxDI's FusedSpecNeuronConfig for ``self.draft``, as NxDI's inference_demo builds
        it (main inference_demo.py 500-532; v0.3.5591 383-410): the draft's NeuronConfig is
        a deep copy of the target's with ``modules_to_not_convert`` from
        ``draft_model_modules_to_not_convert``, ``speculation_length=0`` (an EAGLE head
        keeps k: it runs a last time to catch up), ``enable_fused_speculation=False``, and
        for a head ``is_eagle_draft`` (and sequence parallelism off, v0.3.5591:398); the
        draft's HF config is loaded from its folder with load_pretrained_config, as the
        target's; ``worker_cls`` is the target's ``_model_cls``, which builds the draft too
        unless ``draft_model_cls`` (NxDI >= 0.7) names another family's application."""
        from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig
        from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

        draft = self.draft
        neuron_config = copy.deepcopy(config.neuron_config)
        if getattr(neuron_config, "draft_model_modules_to_not_convert", None):
            neuron_config.modules_to_not_convert = (
                neuron_config.draft_model_modules_to_not_convert)
        if not draft.is_eagle:
            neuron_config.speculation_length = 0
        neuron_config.enable_fused_speculation = False
        if draft.is_eagle:
            neuron_config.is_eagle_draft = True
            neuron_config.sequence_parallel_enabled = False
        draft_config = (self.draft_cls or self.model_cls).get_config_cls()(
            neuron_config,
            load_config=load_pretrained_config(draft.path),
            **hf_compat_kwargs(self.draft_hf),
        )
        extra = {} if self.draft_cls is None else {"draft_model_cls": self.draft_cls}
        return FusedSpecNeuronConfig(self.model_cls._model_cls, draft_config=draft_config,
                                     draft_model_path=draft.path, **extra)

    @classmethod
    def stored_config(cls, folder: str) -> dict[str, Any] | None:
        """The neuron config NxDI's compile saved in ``folder`` (neuron_config.json), or
        None. Every keyword NxDI takes is kept (an attribute saved under another name goes
        back under its keyword); the attributes NxDI derives again are not (it would warn
        on each)."""
        try:
            with open(os.path.join(folder, NXDI_CONFIG_FILE)) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        stored = saved.get("neuron_config") if isinstance(saved, dict) else None
        if not isinstance(stored, dict):
            return None
        return nxdi_keys.stored_keywords(stored, nc.neuron_config_keys())[0]

    @classmethod
    def version(cls) -> str:
        """Artifacts of another compiler, runtime or NxDI release are recompiled, not loaded."""
        from vllm_neuronx.artifacts import package_versions

        return "nxdi-2 " + package_versions(
            ("torch", "transformers", "neuronx-cc", "torch-neuronx", "neuronx-distributed",
             "neuronx-distributed-inference")
        )

    # -- NxDI configuration -------------------------------------------------------------------
    def _inference_config(self):
        from neuronx_distributed_inference.models.config import OnDeviceSamplingConfig
        from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

        kwargs = {k: copy.deepcopy(v) for k, v in self.neuron_config.items()
                  if k not in nc.VLLM_SIDE_KEYS}
        ignored = sorted(set(self.neuron_config) & nc.VLLM_SIDE_KEYS - _LORA_KEYS)
        if ignored:
            logger.warning("override_neuron_config keys %s are transformers-neuronx options; "
                           "neuronx-distributed-inference ignores them", ignored)
        ods = kwargs.get("on_device_sampling_config")
        if isinstance(ods, Mapping):
            kwargs["on_device_sampling_config"] = OnDeviceSamplingConfig(**ods)
        if self.quant.weights:
            # NxDI's spelling of the dtype (it tests == "f8e4m3" to add its fp8 compiler
            # flag); a path NxDI asserts at once, made absolute by compile and load.
            kwargs["quantization_dtype"] = self.quant.dtype
            kwargs["quantized_checkpoints_path"] = (self._user_checkpoint_path()
                                                    or QUANTIZED_CHECKPOINT_DIR)
        prefix_buckets = default_prefix_buckets(self.neuron_config)
        if prefix_buckets is not None:
            kwargs["prefix_buckets"] = prefix_buckets
        kwargs.pop("lora_config", None)
        lora = self._lora_config()
        if lora is not None:
            kwargs["lora_config"] = lora
        neuron_config = self.model_cls.get_neuron_config_cls()(**kwargs)
        config = self.model_cls.get_config_cls()(
            neuron_config,
            load_config=load_pretrained_config(self.model_path),
            **hf_compat_kwargs(self.hf_config),
        )
        if self.draft is not None:  # set after construction, as NxDI's inference_demo does
            config.fused_spec_config = self._fused_spec_config(config)
        return config

    def _lora_config(self):
        """The neuron config's LoRA (``lora_serving_kwargs``) as NxDI's
        LoraServingConfig, or None without LoRA. The class itself must take the keys
        LoRA needs (fails closed where its source could not be read)."""
        args = lora_serving_kwargs(self.neuron_config)
        if args is None:
            return None
        from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

        params = inspect.signature(LoraServingConfig).parameters
        missing = [k for k in LORA_NEEDS if k not in params]
        if missing:
            raise nc.NeuronConfigError(
                f"LoRA adapters need {LORA_RELEASE}: the installed NxDI's LoraServingConfig "
                f"takes no {' or '.join(missing)}; install a newer Neuron SDK")
        return LoraServingConfig(**args)

    @property
    def _lora(self):
        """The compiled LoraServingConfig, None without LoRA."""
        return getattr(self.config.neuron_config, "lora_config", None)

    @property
    def vocab_size(self) -> int:
        text = self.hf_config.get("text_config") or {}
        return int(self.hf_config.get("vocab_size") or text["vocab_size"])

    # -- compile / load -------------------------------------------------------------------------
    def compile(self, folder: str) -> None:
        self._set_fp8_env()
        if self.quant.weights:
            self._make_quantized_checkpoint(self._point_at_checkpoint(folder))
        model = self.model_cls(self.model_path, self.config)
        model.compile(folder)
        self.model = model

    def _load(self, folder: str) -> None:
        stored = self.stored_config(folder)
        if stored is not None:
            differ = {k: (stored.get(k), self.neuron_config.get(k)) for k in _COMPILED_SHAPE_KEYS
                      if k in stored and stored.get(k) != self.neuron_config.get(k)}
            theirs, ours = block_kv.of(stored), self.block_layout
            if theirs != ours:  # the KV cache's blocks: vLLM's block ids index them
                differ["block KV layout"] = (theirs, ours)
            # NxD builds the compiled SPMD models for world_size ranks, local_ranks_size of
            # them per process (neuronx-distributed trace/model_builder.py 1064); the node's
            # start_rank_id is given at load (application_base.py 414-415)
            theirs_ranks = RankLayout.of(stored)
            for key in ("world_size", "local_ranks_size"):
                if getattr(theirs_ranks, key) != getattr(self.rank_layout, key):
                    differ[key] = (getattr(theirs_ranks, key), getattr(self.rank_layout, key))
            if differ:
                raise ValueError(
                    f"NxDI artifacts in {folder} were compiled for another shape "
                    f"(key: (compiled, ours)): {differ}"
                )
        self._set_fp8_env()
        if self.quant.weights:
            self._point_at_checkpoint(folder)
        root = self.rank_layout.check_root_comm()
        if self.model is None:  # compiled by an earlier process
            self.model = self.model_cls(self.model_path, self.config)
        if root is not None:
            ranks = self.rank_layout
            logger.info("NxDI: node %d of %d, ranks %d..%d of tp_degree %d (%s=%s)",
                        ranks.node, ranks.nodes, ranks.start_rank_id,
                        ranks.start_rank_id + ranks.local_ranks_size - 1,
                        ranks.world_size, ROOT_COMM_ENV, root)
        # NxDI's load reads start_rank_id and local_ranks_size from the NeuronConfig
        self.model.load(folder)

    # -- quantization ---------------------------------------------------------------------------
    def _user_checkpoint_path(self) -> str | None:
        return self.neuron_config.get("quantized_checkpoints_path") or None

    def _point_at_checkpoint(self, folder: str) -> str:
        """Tell NxDI where the quantized checkpoint is: the user's path, else a folder
        inside ``folder``, the folder compile or load got (compile's is a temporary folder
        renamed after, so load points at the final one again)."""
        path = self._user_checkpoint_path() or os.path.join(folder, QUANTIZED_CHECKPOINT_DIR)
        self.config.neuron_config.quantized_checkpoints_path = path
        return path

    def _make_quantized_checkpoint(self, path: str) -> None:
        """NxDI reads the quantized checkpoint, never the HF one, for a quantized model:
        make it before compiling, once (a checkpoint already there is reused)."""
        if _checkpoint_present(path):
            logger.info("NxDI: using the quantized checkpoint in %s", path)
            return
        if self._user_checkpoint_path() is None:
            os.makedirs(path, exist_ok=True)  # a folder: NxDI writes safetensors into it
        logger.info("NxDI: quantizing the weights (%s %s) into %s", self.quant.dtype,
                    "per channel" if self.quant.per_channel else "per tensor", path)
        self.model_cls.save_quantized_state_dict(self.model_path, self.config)

    def _set_fp8_env(self) -> None:
        """fp8 weights or an fp8 KV cache: NxDI's graphs need FP8_ENV when traced and run
        (its inference_demo sets it); set here, logged when it changes the environment."""
        missing = {k: v for k, v in FP8_ENV.items() if os.environ.get(k) != v}
        if self.quant.needs_fp8_env and missing:
            os.environ.update(missing)
            logger.info("NxDI: set %s for fp8 (quantization_dtype=f8e4m3 or kv_cache_quant), "
                        "as NxDI's inference_demo does",
                        " ".join(f"{k}={v}" for k, v in missing.items()))

    # -- LoRA adapters ------------------------------------------------------------------------
    def init_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> None:
        """Check the compiled LoraServingConfig serves vLLM's settings (precompiled
        artifacts may carry another one)."""
        lora = self._lora
        if lora is None:
            raise RuntimeError(
                "vLLM's LoRA is on but the NxDI model was compiled without lora_config (a "
                "NEURON_COMPILED_ARTIFACTS folder's config wins over vLLM's arguments): "
                "compile it again with enable_lora")
        if self.model is None or not self.loaded:
            raise RuntimeError("init_lora() must run after load()")
        base = int(bool(lora.enable_base_model_only))
        slots = lora.max_loras - base  # the dummy takes a device slot and a host slot,
        host = lora.max_cpu_loras - base - len(lora.lora_ckpt_paths_cpu)  # start-up ones too
        wrong = []
        if not (lora.dynamic_multi_lora and base):
            wrong.append("it lacks dynamic_multi_lora and enable_base_model_only")
        if slots < max_loras:
            wrong.append(f"{slots} device adapter slots < max_loras={max_loras}")
        if lora.max_lora_rank < max_lora_rank:
            wrong.append(f"max_lora_rank {lora.max_lora_rank} < {max_lora_rank}")
        if host < max_cpu_loras:
            wrong.append(f"{host} host adapter slots < max_cpu_loras={max_cpu_loras}")
        if wrong:
            raise ValueError(
                f"the NxDI model was compiled with a LoRA config that cannot serve vLLM's "
                f"({'; '.join(wrong)}): compile again (a NEURON_COMPILED_ARTIFACTS folder's "
                "config wins over vLLM's arguments)")
        self._max_loras = max_loras

    def _lora_manager(self):
        if self._max_loras is None:
            raise RuntimeError("init_lora() must run before adapters are used")
        return self.model.lora_model_manager

    def prepare_adapter(self, spec: AdapterSpec) -> NxdiAdapter:
        """Stream the adapter into NxDI's CPU cache under a name unique to this load."""
        manager = self._lora_manager()
        targets = self._lora.target_modules
        outside = sorted(spec.modules - set(targets)) if not isinstance(targets, str) else []
        if outside:
            raise AdapterError(spec.name, spec.path, (
                f"adapts {outside}, which the NxDI model was compiled without (target_modules "
                f"{sorted(targets)}); NxDI would ignore them"))
        handle = NxdiAdapter(f"{spec.name}#{next(self._loads)}", spec.path, spec.name)
        if not manager.add_adapter(handle):
            raise RuntimeError(f"NxDI did not load LoRA adapter '{spec.name}' ({spec.path})")
        return handle

    def release_adapter(self, handle: NxdiAdapter) -> None:
        manager = self._lora_manager()
        try:
            manager.remove_adapter(manager.convert_adapter_id_to_index(handle.lora_name))
        except KeyError:  # NxDI's CPU cache dropped it already
            pass

    def adapter_indices(self, handles: Sequence[NxdiAdapter | None],
                        live: Collection[NxdiAdapter]) -> torch.Tensor:
        """NxDI's id of each row's adapter (0: its dummy, the base model). Each adapter
        is added again first: a no-op while NxDI's CPU cache holds it, a re-read after it
        was evicted (NxDI cannot bring a streamed adapter back by itself)."""
        manager = self._lora_manager()
        step = step_adapters(handles, live, self._max_loras)
        index = {}
        for handle in step:
            if not manager.add_adapter(handle):
                raise RuntimeError(f"NxDI did not load LoRA adapter '{handle.name}' "
                                   f"({handle.lora_path})")
            index[handle] = manager.convert_adapter_id_to_index(handle.lora_name)
        return torch.tensor([0 if h is None else index[h] for h in handles], dtype=torch.int32)

    # -- run ------------------------------------------------------------------------------------
    def prefill(self, batch: Batch) -> ForwardOutput:
        return self._call(batch)  # NxDI picks its context-encoding graph itself

    def decode(self, batch: Batch) -> ForwardOutput:
        return self._call(batch)

    def _call(self, batch: Batch) -> ForwardOutput:
        """One NxDI call; rows go in sorted by seq_id (NxDI pairs row i with KV line
        seq_ids[i] only in that order) and come back in the caller's order."""
        n = batch.size
        order = torch.argsort(batch.seq_ids, stable=True)
        kwargs: dict[str, Any] = {
            "attention_mask": None,
            "position_ids": batch.position_ids.index_select(0, order),
            "seq_ids": batch.seq_ids.index_select(0, order),
            "sampling_params": batch.sampling_params.index_select(0, order),
        }
        ids = batch.input_ids.index_select(0, order)
        lora = self._lora
        if lora is not None:
            # A prefill's indices (0: the base model); a decode's are a graph input NxDI
            # ignores (each seq_id keeps the adapter its prefill bound).
            adapter_ids = batch.adapter_ids if batch.is_prefill else None
            if adapter_ids is None:
                adapter_ids = torch.zeros(n, dtype=torch.int32)
            kwargs["adapter_ids"] = adapter_ids.to(torch.int32).index_select(0, order)
            if batch.is_prefill and ids.shape[1] == 1 and lora.dynamic_multi_lora:
                # NxDI converts ids to device slots only on a call wider than one token;
                # NxDI's re-padding cuts the pad (token 0 at position 0) off again.
                ids = F.pad(ids, (0, 1))
                kwargs["position_ids"] = F.pad(kwargs["position_ids"], (0, 1))
        if self.architecture == MLLAMA:
            ids = self._mllama_inputs(ids, kwargs, batch.is_prefill)
        if batch.blocks is not None:
            # NxDI encodes a context iff the call is wider than one token (and starts at 0)
            kwargs.update(self._block_inputs(batch.blocks, order, ids.shape[1] > 1))
        output = self.model(ids, **kwargs)
        restore = torch.argsort(order)
        k = self.speculation_length
        if k:
            rows = read_fused_outputs(output.fused_outputs, kwargs["position_ids"], k,
                                      batch.is_prefill).index_select(0, restore)
            if batch.is_prefill:
                return ForwardOutput(tokens=rows)
            return ForwardOutput(tokens=rows[:, 0].clone(), spec_tokens=rows)
        tokens = logits = None
        sampled_on_device = self.config.neuron_config.on_device_sampling_config is not None
        if sampled_on_device:
            # NxDI sets .tokens on every output; .hidden_states holds them only when
            # output_logits is off (it is [] with output_logits on).
            tokens = getattr(output, "tokens", None)
            if not torch.is_tensor(tokens):
                tokens = output.hidden_states
            if tokens.dim() == 2 and tokens.shape[1] == 1:
                tokens = tokens[:, 0]
            if tokens.shape != (n,):
                raise RuntimeError(f"NxDI returned tokens of shape {tuple(tokens.shape)}, "
                                   f"expected [{n}] or [{n}, 1]")
            tokens = tokens.to(torch.long).index_select(0, restore)
        if not sampled_on_device or self.neuron_config.get("output_logits"):
            if not torch.is_tensor(output.logits):
                raise RuntimeError("NxDI returned no logits; compile with output_logits=true "
                                   "or with on-device sampling off")
            # [n, 1, V'] fp32; V' may carry tensor-parallel padding columns past the vocab.
            logits = output.logits[:, -1, : self.vocab_size].to(torch.float32)
            logits = logits.index_select(0, restore)
        return ForwardOutput(tokens=tokens, logits=logits)

    def _block_inputs(self, blocks: BlockInputs, order: torch.Tensor,
                      context: bool) -> dict[str, torch.Tensor]:
        """The block layout's inputs as NxDI's forward takes them (model_base.py 3566-3630):
        ``slot_mapping`` [n, W], ``block_table`` [n, seq_len / block_size] (NxDI pads or cuts
        it to its bucket), ``full_context_lens`` and ``computed_context_lens`` [n, 1], rows in
        ``order``.

        A context encoding whose cached prefix NxDI's prefix buckets cannot hold (it asserts)
        is told of fewer cached blocks (``PrefixBuckets.fit``), and the positions between get
        slot -1, as NxDI gives the cached tokens it recomputes to fill its prefill bucket
        (model_wrapper.py 1125): computed again, never written over blocks other sequences
        share. A token generation's table is padded with -1 past each row's blocks when
        NxDI's block TKG kernel is on (model_wrapper.py 1139; vllm-neuron's runner does the
        same)."""
        bs = self.block_layout.block_size
        slots = blocks.slot_mapping.index_select(0, order).to(torch.long)
        table = blocks.block_table.index_select(0, order).to(torch.long)
        full = blocks.full_context_lens.index_select(0, order).to(torch.long)
        computed = blocks.computed_context_lens.index_select(0, order).to(torch.long)
        if context:
            fitted = [self._prefix_buckets.fit(f, c, bs)
                      for f, c in zip(full.tolist(), computed.tolist(), strict=True)]
            shifts = [c - k for c, k in zip(computed.tolist(), fitted, strict=True)]
            if any(shifts):
                if not self._refitted:
                    self._refitted = True
                    logger.info(
                        "NxDI: cached prefixes longer than its prefix buckets %s hold are "
                        "partly computed again; larger prefix_buckets reuse more of them",
                        list(self._prefix_buckets.prefix[1:]))
                wide = torch.full((slots.shape[0], slots.shape[1] + max(shifts)), -1,
                                  dtype=torch.long)
                for row, shift in enumerate(shifts):
                    wide[row, shift:shift + slots.shape[1]] = slots[row]
                slots, computed = wide, torch.tensor(fitted, dtype=torch.long)
        elif block_tkg_kernel(self.neuron_config):
            owned = torch.arange(table.shape[1])[None, :] < (-(-full // bs))[:, None]
            table = torch.where(owned, table, torch.full_like(table, -1))
        return {"slot_mapping": slots, "block_table": table,
                "full_context_lens": full[:, None], "computed_context_lens": computed[:, None]}

    def _mllama_inputs(self, ids: torch.Tensor, kwargs: dict[str, Any],
                       prefill: bool) -> torch.Tensor:
        """Text-only Mllama: NxDI's empty image tensors, and prompts at least two wide
        (NxDI's Mllama picks context encoding by input width, not by position)."""
        from neuronx_distributed_inference.models.mllama.utils import (
            create_vision_mask,
            get_image_tensors,
        )

        if prefill and ids.shape[1] == 1:
            ids = torch.nn.functional.pad(ids, (0, 1))
            kwargs["position_ids"] = torch.nn.functional.pad(kwargs["position_ids"], (0, 1))
        pixel_values, aspect_ratios, num_chunks, has_image = get_image_tensors(
            self.config, [[] for _ in range(ids.shape[0])], is_for_context_encoding=prefill
        )
        kwargs.update(
            pixel_values=pixel_values,
            aspect_ratios=aspect_ratios,
            num_chunks=num_chunks,
            has_image=has_image,
            vision_mask=create_vision_mask(ids, self.hf_config.get("image_token_index", 128256)),
        )
        return ids
