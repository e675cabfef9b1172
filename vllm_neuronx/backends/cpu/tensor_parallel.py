"""Tensor parallelism for the CPU backend: which part of each weight a rank holds, cut as
NxDI cuts it, and the collective the ranks sum and gather their partial results over.

Each of ``world`` ranks holds:

- attention: a slice of the query heads and their KV heads (column-parallel q, k and v,
  row-parallel o). The KV heads follow NxDI's GQA choices (modules/attention/gqa.py):
  split when the degree divides them; replicated to one per rank when the degree is a
  multiple of them (REPLICATE_TO_TP_DEGREE), the query heads then padded with zero heads
  at the end of each KV head's group so that each rank's queries sit beside their KV head;
  otherwise every query head gets its own copy of its KV head and both are padded with
  zero heads at the end (CONVERT_TO_MHA). A zero query head over a zero (or any) KV head
  attends to something, but the o projection's zero columns drop it.
- the MLP (and each expert's): a slice of the intermediate rows of gate and up
  (column-parallel) and the same columns of down (row-parallel), the intermediate padded
  with zeros to a multiple of the degree. The router is replicated: every rank routes
  every token the same way.
- the LM head: a slice of the vocabulary rows, padded to a multiple of the degree; the
  ranks' logits are gathered, then trimmed to the vocabulary.
- the embedding and the norms whole.

Row-parallel outputs (o, down) are partial sums that llama.py all-reduces, once after
attention and once after the MLP, where NxDI's RowParallelLinear reduces; their biases
live on rank 0 only, so that the sum adds them once. A LoRA adapter is cut the same way
(``shard_adapter``): its delta on o and down is a partial sum the same all-reduces
complete.

Everything here is pure (no processes): the collective is whatever the caller hands in
(gloo across processes in serving, threads in the tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vllm_neuronx.backends.cpu.llama import LlamaSpec, round_up
from vllm_neuronx.backends.cpu.quantize import QuantizedWeight


class Collective(Protocol):
    """The ranks' communication, as the model needs it."""

    rank: int  # this process's tensor-parallel rank, 0..world-1
    world: int  # tp_degree

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the ranks (any float dtype; may work in place)."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over the ranks along the last dimension, in rank order."""
        ...


PAD = -1  # a zero head (or row) that only pads a shard to its size

# NxDI's names of its two ways to shard KV heads the degree does not divide, and ours for
# the plain split.
SPLIT = "split"
REPLICATE_TO_TP_DEGREE = "replicate-to-tp-degree"
CONVERT_TO_MHA = "convert-to-mha"


@dataclass(frozen=True, slots=True)
class Span:
    """Rows ``start..stop-1`` of a dimension, then zero rows up to ``size`` in all."""

    start: int
    stop: int
    size: int

    @classmethod
    def of(cls, total: int, world: int, rank: int) -> Span:
        """Rank ``rank``'s equal share of ``total`` rows padded to a multiple of ``world``."""
        size = round_up(total, world) // world
        start = min(rank * size, total)
        return cls(start, min(start + size, total), size)

    def index(self) -> torch.Tensor:
        return torch.cat([torch.arange(self.start, self.stop),
                          torch.full((self.size - (self.stop - self.start),), PAD)])


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What one rank of ``world`` holds of a model (see the module's docstring)."""

    world: int
    rank: int
    kv_strategy: str  # SPLIT, REPLICATE_TO_TP_DEGREE or CONVERT_TO_MHA
    q_heads: tuple[int, ...]  # the model's query head of each of the rank's, or PAD
    kv_heads: tuple[int, ...]  # the model's KV head of each of the rank's, or PAD
    mlp: Span  # the dense MLP's intermediate rows
    expert: Span  # each expert's intermediate rows (empty without experts)
    vocab: Span  # the LM head's rows

    @classmethod
    def of(cls, spec: LlamaSpec, world: int, rank: int) -> ShardPlan:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}: need 0 <= rank < world")
        q, kv = spec.num_heads, spec.num_kv_heads
        if kv < 1 or q % kv:
            raise ValueError(f"{q} query heads cannot be grouped on {kv} KV heads")
        group, padded = q // kv, round_up(q, world)
        if kv % world == 0:  # then the degree divides the query heads too
            strategy, queries, keys = SPLIT, list(range(q)), list(range(kv))
        elif world % kv == 0:
            strategy = REPLICATE_TO_TP_DEGREE
            per_group = padded // kv  # each group's queries, then its zero heads
            queries = [g * group + j if j < group else PAD
                       for g in range(kv) for j in range(per_group)]
            keys = [h for h in range(kv) for _ in range(world // kv)]
        else:
            strategy = CONVERT_TO_MHA
            queries = list(range(q)) + [PAD] * (padded - q)
            keys = [h // group for h in range(q)] + [PAD] * (padded - q)
        nq, nkv = len(queries) // world, len(keys) // world
        return cls(
            world=world, rank=rank, kv_strategy=strategy,
            q_heads=tuple(queries[rank * nq:(rank + 1) * nq]),
            kv_heads=tuple(keys[rank * nkv:(rank + 1) * nkv]),
            mlp=Span.of(spec.intermediate_size, world, rank),
            expert=Span.of(spec.expert_size, world, rank),
            vocab=Span.of(spec.vocab_size, world, rank),
        )

    def rank_spec(self, spec: LlamaSpec) -> LlamaSpec:
        """The shape of the rank's model: its heads and intermediate sizes; the whole
        vocabulary (the embedding is whole; the LM head is gathered to it) and an LM head
        of its own (a tied head's rows are a slice of the table, not the table)."""
        return dataclasses.replace(
            spec, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
            intermediate_size=self.mlp.size,
            expert_size=self.expert.size if spec.num_experts else 0,
            tie_word_embeddings=False)

    def qkv_rows(self, spec: LlamaSpec) -> torch.Tensor:
        """The rows of the fused [q; k; v] weight (and bias) the rank holds, PAD for zeros."""
        q, kv = self.q_rows(spec), self.kv_rows(spec)
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return torch.cat([q, _shift(kv, q_size), _shift(kv, q_size + kv_size)])

    def q_rows(self, spec: LlamaSpec) -> torch.Tensor:
        """The rows of q (alone) the rank holds, PAD for zeros; o's columns are the same."""
        return _head_rows(self.q_heads, spec.head_dim)

    def kv_rows(self, spec: LlamaSpec) -> torch.Tensor:
        """The rows of k (or of v, alone) the rank holds, PAD for zeros."""
        return _head_rows(self.kv_heads, spec.head_dim)

    def o_columns(self, spec: LlamaSpec) -> torch.Tensor:
        return self.q_rows(spec)


def _head_rows(heads: tuple[int, ...], d: int) -> torch.Tensor:
    return torch.tensor([h * d + i if h != PAD else PAD for h in heads for i in range(d)],
                        dtype=torch.long)


def _shift(index: torch.Tensor, offset: int) -> torch.Tensor:
    """``index`` moved down ``offset`` rows, PAD kept."""
    return torch.where(index == PAD, PAD, index + offset)


# Weights every rank holds whole, by their last name part.
_REPLICATED = frozenset({"embed", "norm", "ln1", "ln2", "q_norm", "k_norm", "router"})
# Row-parallel biases: added once, by rank 0.
_RANK0_BIASES = frozenset({"o_bias", "down_bias"})
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _take(t: torch.Tensor, index: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) of ``t`` in ``index`` order, ``fill`` where PAD;
    contiguous. fp8 moves as bytes (torch's CPU indexing takes no float8)."""
    raw = t.view(torch.uint8) if t.dtype in _FP8 else t
    keep = index != PAD
    if bool(keep.all()):
        out = raw.index_select(dim, index)
    else:
        shape = list(raw.shape)
        shape[dim] = len(index)
        out = raw.new_full(shape, fill if raw is t else 0)
        out.index_copy_(dim, keep.nonzero().flatten(), raw.index_select(dim, index[keep]))
    return out.view(t.dtype) if raw is not t else out


def _rows(w: Any, index: torch.Tensor) -> Any:
    """A weight's (or bias's) output rows; a quantized weight keeps each row's scale."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(_take(w.values, index, 0), _take(w.scale, index, 0, fill=1.0))
    return _take(w, index, 0)


def _columns(w: Any, index: torch.Tensor) -> Any:
    """A weight's input columns; a quantized weight's scales (per output row) stay."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(_take(w.values, index, 1), w.scale)
    return _take(w, index, 1)


def shard_weights(weights: dict[str, Any], spec: LlamaSpec, plan: ShardPlan
                  ) -> tuple[dict[str, Any], LlamaSpec]:
    """Our converted weights (``LlamaModel.convert_hf_weights``'s names; tensors or
    ``QuantizedWeight``) -> the rank's weights and the rank's spec. The LM head is always
    the rank's own slice (a tied one is cut from the embedding, which stays whole)."""
    qkv, o = plan.qkv_rows(spec), plan.o_columns(spec)
    spans = {False: plan.mlp, True: plan.expert}
    out: dict[str, Any] = {}
    for name, w in weights.items():
        leaf = name.rsplit(".", 1)[-1]
        span = spans[".experts." in name]
        if leaf in _REPLICATED:
            out[name] = w
        elif leaf in _RANK0_BIASES:
            if plan.rank == 0:
                out[name] = w
        elif leaf in ("qkv", "qkv_bias"):
            out[name] = _rows(w, qkv)
        elif leaf == "o":
            out[name] = _columns(w, o)
        elif leaf in ("gate_up", "gate_up_bias"):  # [gate; up]: the same rows of each
            rows = span.index()
            size = spec.expert_size if ".experts." in name else spec.intermediate_size
            out[name] = _rows(w, torch.cat([rows, _shift(rows, size)]))
        elif leaf == "down":
            out[name] = _columns(w, span.index())
        elif leaf == "lm_head":
            out[name] = _rows(w, plan.vocab.index())
        else:
            raise ValueError(f"weight {name!r}: no tensor-parallel sharding known for it")
    return out, plan.rank_spec(spec)


def shard_adapter(loaded: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                  spec: LlamaSpec, plan: ShardPlan
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA adapter's (A [r, in], B [out, r]) per HF projection (``lora.peft.load``'s)
    -> the rank's, cut as its weights are: B's rows of a column-parallel projection (the
    rank's q heads, its KV heads, its slice of gate and of up), A's columns of a
    row-parallel one (o's q-head columns, down's intermediate ones), zeros where the
    weights are padded. The rank's delta on o or down is then a partial sum (``x_r·A_rᵀ``
    sums to ``x·Aᵀ`` over the ranks), completed by the all-reduce that completes the
    weights'. ``lora.LoraWeights.prepare`` then fuses them to the rank's shapes."""
    q, kv, mlp = plan.q_rows(spec), plan.kv_rows(spec), plan.mlp.index()
    output_rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": mlp, "up_proj": mlp}
    input_columns = {"o_proj": q, "down_proj": mlp}
    out = {}
    for (layer, proj), (a, b) in loaded.items():
        if proj in output_rows:
            out[layer, proj] = (a, _take(b, output_rows[proj], 0))
        elif proj in input_columns:
            out[layer, proj] = (_take(a, input_columns[proj], 1), b)
        else:
            raise ValueError(f"LoRA on {proj!r}: no tensor-parallel sharding known for it")
    return out
