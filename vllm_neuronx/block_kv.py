"""The KV layout: one contiguous line per sequence (the default), or blocks (pure functions).

The contiguous layout is the seed's: each sequence owns a line of max_model_len positions,
vLLM sees one block per sequence and never preempts. The block layout serves prefix
caching and chunked prefill: vLLM's own KV cache manager (block hashing, reference counts,
LRU eviction, preemption when blocks run out) hands out blocks of ``pa_block_size``
positions, and the device's cache holds exactly those blocks. ``pa_num_blocks`` is
vLLM's ``num_gpu_blocks``, one number derived once, here: vLLM's block 0 is its null block
(never a sequence's; padded block-table entries name it), so sequences own at most
``pa_num_blocks - 1``. The CPU backend's cache is ``[pa_num_blocks, pa_block_size,
kv_heads, head_dim]`` per layer; NxDI's holds one more row past them, where it writes the
slots marked -1. vllm-neuron 0.2 asked users to keep ``num_gpu_blocks_override`` and
``pa_num_blocks`` in step, added one to the first and not the second, and reads went out
of bounds when they disagreed; here they cannot.

What selects it: ``enable_prefix_caching`` (--enable-prefix-caching), ``enable_chunked_prefill``
(--enable-chunked-prefill), or NxDI's keys (``is_prefix_caching``, ``is_block_kv_layout``,
``chunked_prefill_config``). vLLM turns both features on by default; on Neuron they stay off
unless asked (``patches.engine_args``), so a plain start keeps the seed's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_neuronx import neuron_config as nc

# NxDI's recommended pa_block_size.
DEFAULT_BLOCK_SIZE = 32
# The neuron-config keys this module owns: set from vLLM's settings, and checked against
# them when the user overrides them.
KEYS = ("is_block_kv_layout", "is_prefix_caching", "pa_num_blocks", "pa_block_size",
        "chunked_prefill_config")


class BlockLayoutError(ValueError):
    """Block-layout settings that cannot run; the message names the setting."""


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """The block KV layout as compiled: what vLLM's KV manager and the backend share."""

    block_size: int  # pa_block_size: positions per block
    num_blocks: int  # pa_num_blocks = vLLM's num_gpu_blocks: its null block 0 included
    prefix_caching: bool
    chunked_prefill: bool


def resolve(overrides: Mapping[str, Any], *, prefix_caching: bool | None,
            chunked_prefill: bool | None, block_size: int | None, num_blocks: int | None,
            max_num_seqs: int, seq_len: int) -> BlockLayout | None:
    """vLLM's settings and the user's NxDI keys -> the block layout, or None (contiguous).

    ``prefix_caching`` / ``chunked_prefill``: vLLM's flags (None: not given); ``block_size``
    and ``num_blocks``: vLLM's block_size and num_gpu_blocks_override when the user gave
    them (None otherwise). The NxDI keys may say the same again; saying otherwise is an
    error naming both."""
    keyed_prefix = overrides.get("is_prefix_caching")
    keyed_chunked = nc.asks_for(overrides.get("chunked_prefill_config"))
    _agree("is_prefix_caching", keyed_prefix, "enable_prefix_caching", prefix_caching)
    if keyed_chunked and chunked_prefill is False:
        raise BlockLayoutError(
            "override_neuron_config asks for chunked prefill (chunked_prefill_config) but "
            "enable_chunked_prefill is off; turn it on (--enable-chunked-prefill) or drop "
            "the key")
    prefix = bool(prefix_caching) or nc.asks_for(keyed_prefix)
    chunked = bool(chunked_prefill) or keyed_chunked
    keyed_layout = overrides.get("is_block_kv_layout")
    if keyed_layout is False and (prefix or chunked):
        raise BlockLayoutError(
            "is_block_kv_layout=false contradicts prefix caching / chunked prefill, which "
            "run on the block KV layout; drop is_block_kv_layout")
    if not (prefix or chunked or nc.asks_for(keyed_layout)):
        for key in ("pa_num_blocks", "pa_block_size"):
            if overrides.get(key) is not None:
                raise BlockLayoutError(
                    f"override_neuron_config key {key!r} sizes the block KV layout, which is "
                    "off; turn on enable_prefix_caching (--enable-prefix-caching) or "
                    "enable_chunked_prefill, or drop the key")
        return None
    size = _agreed_int("pa_block_size", overrides.get("pa_block_size"), "block_size",
                       block_size) or DEFAULT_BLOCK_SIZE
    if seq_len % size:
        raise BlockLayoutError(
            f"block_size {size} does not divide max_model_len {seq_len}: NxDI compiles a "
            "block table of max_model_len / block_size entries per sequence; pick a block "
            "size that divides it")
    blocks = _agreed_int("pa_num_blocks", overrides.get("pa_num_blocks"),
                         "num_gpu_blocks_override", num_blocks)
    per_sequence = seq_len // size
    if blocks is None:  # every running sequence can reach max_model_len: no preemption
        blocks = max_num_seqs * per_sequence + 1
    if blocks < per_sequence + 1:
        raise BlockLayoutError(
            f"pa_num_blocks={blocks} (num_gpu_blocks_override) blocks of {size}, vLLM's null "
            f"block among them, hold less than one sequence of {seq_len} positions; give at "
            f"least {per_sequence + 1} (the default, {max_num_seqs * per_sequence + 1}, lets "
            "every sequence reach max_model_len)")
    return BlockLayout(size, blocks, prefix, chunked)


def _agree(key: str, keyed: Any, setting: str, value: bool | None) -> None:
    if keyed is not None and value is not None and bool(keyed) != bool(value):
        raise BlockLayoutError(
            f"override_neuron_config {key}={keyed!r} contradicts {setting}={value!r}; "
            f"set {setting} only")


def _agreed_int(key: str, keyed: Any, setting: str, value: int | None) -> int | None:
    """The one size the user gave, through the NxDI key or vLLM's setting (both: equal)."""
    if keyed is not None and (not isinstance(keyed, int) or isinstance(keyed, bool)
                              or keyed < 1):
        raise BlockLayoutError(f"{key} must be a positive integer, got {keyed!r}")
    if keyed is not None and value is not None and keyed != value:
        raise BlockLayoutError(
            f"override_neuron_config {key}={keyed} contradicts {setting}={value}; they are "
            "one number: set one of them")
    return keyed if keyed is not None else value


def neuron_config_keys(layout: BlockLayout | None, max_num_seqs: int) -> dict[str, Any]:
    """The NxDI keys of ``layout`` (as NxDI's own vLLM integration sets them)."""
    if layout is None:
        return {}
    keys: dict[str, Any] = {
        "is_block_kv_layout": True,
        "is_prefix_caching": layout.prefix_caching,
        "pa_block_size": layout.block_size,
        "pa_num_blocks": layout.num_blocks,
    }
    if layout.chunked_prefill:
        keys["chunked_prefill_config"] = {"max_num_seqs": max_num_seqs}
    return keys


def of(cfg: Mapping[str, Any]) -> BlockLayout | None:
    """The block layout a neuron config was compiled with, or None (contiguous lines)."""
    if not cfg.get("is_block_kv_layout"):
        return None
    return BlockLayout(int(cfg["pa_block_size"]), int(cfg["pa_num_blocks"]),
                       bool(cfg.get("is_prefix_caching")),
                       nc.asks_for(cfg.get("chunked_prefill_config")))


def slots(blocks: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """The cache slots (block * block_size + offset) of positions start..stop-1."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]
