"""LoRA on the CPU backend's fused layout: one adapter's weights, and a step's adapters.

The model multiplies q, k and v as one matmul (``qkv``, rows q|k|v) and gate and up as
another (``gate_up``). An adapter is laid out the same way, so one ``x·Aᵀ·Bᵀ`` per fused
matmul adds exactly PEFT's deltas: A stacks the parts' A rows ``[Rq+Rk+Rv, in]``, B is
block-diagonal ``[q+kv+kv, Rq+Rk+Rv]`` (the rows of a part the adapter lacks are zero),
and the scaling is folded into B. B is kept transposed (``Bᵀ [R, out]``), the layout the
native step reads (kernels.h's ``Lora``), with the block each part occupies (``spans``).
A step groups its batch rows by adapter and adds each group's delta with two small
matmuls, whatever the number of rows; the native step (decode_step.c) does the same
arithmetic from each row's adapter slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_neuronx.backends.protocol import step_adapters
from vllm_neuronx.lora.peft import AdapterSpec, ModelDims

#: Our fused matmuls and the HF projections stacked in each, in row order.
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


@dataclass(frozen=True, slots=True, eq=False)
class FusedDelta:
    """One adapter's delta on one fused matmul: ``out += x·Aᵀ·Bᵀ``."""

    a: torch.Tensor  # [R, in], contiguous
    bt: torch.Tensor  # Bᵀ [R, out], contiguous, the scaling folded in; zero outside spans
    # int32 [parts, 4]: for each part the adapter adapts (q, k, v; gate, up), its ranks
    # [r0, r1) and its output columns [c0, c1), in order.
    spans: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def b(self) -> torch.Tensor:
        """B [out, R] (a view)."""
        return self.bt.T


@dataclass(slots=True, eq=False)
class LoraWeights:
    """One adapter in the fused layout: (layer, fused kind) -> its ``FusedDelta``, in the
    backend's compute dtype. A kind it does not adapt is absent (no work)."""

    spec: AdapterSpec
    parts: dict[tuple[int, str], FusedDelta]

    @classmethod
    def prepare(cls, loaded: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                spec: AdapterSpec, dims: ModelDims, dtype: torch.dtype) -> LoraWeights:
        """From ``lora.peft.load``'s fp32 (A, B) per HF projection."""
        parts = {}
        layers = sorted({layer for layer, _ in loaded})
        for layer in layers:
            for kind, projs in FUSED.items():
                present = [p for p in projs if (layer, p) in loaded]
                if not present:
                    continue
                a = torch.cat([loaded[layer, p][0] for p in present])
                bt = torch.zeros(a.shape[0], sum(dims.shape(p)[1] for p in projs))
                spans = []
                row = rank = 0
                for p in projs:
                    out = dims.shape(p)[1]
                    if p in present:
                        part = loaded[layer, p][1]
                        r = part.shape[1]
                        bt[rank:rank + r, row:row + out] = (part * spec.scaling).T
                        spans.append((rank, rank + r, row, row + out))
                        rank += r
                    row += out
                parts[layer, kind] = FusedDelta(a.to(dtype).contiguous(),
                                                bt.to(dtype).contiguous(),
                                                torch.tensor(spans, dtype=torch.int32))
        return cls(spec, parts)


@dataclass(slots=True)
class LoraStep:
    """One step's adapters: each with the batch rows that use it (None: every row).
    Rows index dimension 0 of the activations ([rows, tokens, features]), so prefill and
    decode share one code path. ``slots``: each row's adapter slot (int32, 0: the base
    model), what the native step takes, where the step came from slots."""

    groups: list[tuple[LoraWeights, torch.Tensor | None]]
    slots: torch.Tensor | None = None

    @classmethod
    def from_slots(cls, indices: torch.Tensor, slots: list[LoraWeights | None]) -> LoraStep | None:
        """Rows' slot indices (0: the base model) -> the step's groups, or None when no row
        uses an adapter."""
        groups = []
        used = indices.unique().tolist()
        for index in used:
            if index == 0:
                continue
            rows = None if len(used) == 1 else (indices == index).nonzero().flatten()
            groups.append((slots[index], rows))
        return cls(groups, indices.to(torch.int32)) if groups else None

    def apply(self, layer: int, kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += x·Aᵀ·Bᵀ`` for each group's rows, in place (``out`` is the fused
        matmul's fresh output)."""
        for weights, rows in self.groups:
            part = weights.parts.get((layer, kind))
            if part is None:
                continue
            if rows is None:
                out += F.linear(x, part.a) @ part.bt
            else:
                out.index_add_(0, rows, F.linear(x.index_select(0, rows), part.a) @ part.bt)


class AdapterSlots:
    """``max_loras`` adapter slots, like a device's, and the adapter each KV line is bound
    to. ``indices`` gives a prefill's adapters slots (a free one, else the least recently
    used one no running request needs); ``bind`` binds each prefill row's line to its
    slot, base rows to none (so a reused line carries no adapter); ``bound`` gives a
    decode step its lines' adapters, checking that no slot changed hands under a line.
    ``on_change(slot, weights)`` hears each slot that takes an adapter or loses one
    (None), before the step that uses it (the native step's descriptors follow)."""

    def __init__(self, max_loras: int, num_lines: int,
                 on_change: Callable[[int, LoraWeights | None], None] | None = None) -> None:
        self.max_loras = max_loras
        self.on_change = on_change
        self.slots: list[LoraWeights | None] = [None] * (max_loras + 1)  # 0: the base model
        self.where: dict[LoraWeights, int] = {}
        self.used = [0] * (max_loras + 1)  # the step a slot was last asked for (LRU)
        self.clock = 0
        # Each time a slot changes hands its generation grows; a line remembers the one it
        # was bound to, so a decode of a line whose adapter lost its slot is caught.
        self.generation = torch.zeros(max_loras + 1, dtype=torch.long)
        self.line_slot = torch.zeros(num_lines, dtype=torch.long)
        self.line_generation = torch.zeros(num_lines, dtype=torch.long)

    def indices(self, handles, live) -> torch.Tensor:
        """Rows' handles (None: base) -> int32 [n] slot indices, 0 for base rows."""
        step = step_adapters(handles, live, self.max_loras)
        wanted = set(step) | {h for h in live if h is not None}
        self.clock += 1
        for handle in step:
            slot = self.where.get(handle)
            if slot is None:
                slot = self._take({self.where[h] for h in wanted if h in self.where})
                self.release(self.slots[slot])
                if self.on_change is not None:
                    self.on_change(slot, handle)
                self.slots[slot], self.where[handle] = handle, slot
                self.generation[slot] += 1
            self.used[slot] = self.clock
        return torch.tensor([0 if h is None else self.where[h] for h in handles],
                            dtype=torch.int32)

    def _take(self, pinned: set[int]) -> int:
        free = [s for s in range(1, self.max_loras + 1) if self.slots[s] is None]
        if free:
            return free[0]
        unpinned = [s for s in range(1, self.max_loras + 1) if s not in pinned]
        return min(unpinned, key=self.used.__getitem__)  # the count check leaves one

    def release(self, handle: LoraWeights | None) -> None:
        """Drop an adapter from its slot, if it has one (the host pool dropped it)."""
        slot = self.where.pop(handle, None) if handle is not None else None
        if slot is not None:
            self.slots[slot] = None
            self.generation[slot] += 1
            if self.on_change is not None:
                self.on_change(slot, None)

    def bind(self, seq_ids: torch.Tensor, adapter_ids: torch.Tensor | None) -> LoraStep | None:
        """A prefill: each row's line bound to its slot's adapter (None: every row base)."""
        if adapter_ids is None:
            index = torch.zeros(seq_ids.shape[0], dtype=torch.long)
        else:
            index = adapter_ids.long()
            top = int(index.max())
            if top > self.max_loras:
                raise ValueError(f"adapter_ids must be in [0, {self.max_loras}] "
                                 f"(max_loras={self.max_loras}), got {top}")
            empty = [int(s) for s in index.unique() if s and self.slots[s] is None]
            if empty:
                raise ValueError(f"adapter_ids {empty} name slots that hold no adapter "
                                 "(adapter_indices gives a prefill's adapters their slots)")
        self.line_slot[seq_ids] = index
        self.line_generation[seq_ids] = self.generation[index]
        return LoraStep.from_slots(index, self.slots)

    def bound(self, seq_ids: torch.Tensor) -> LoraStep | None:
        """A decode: each row's adapter is its line's, bound at the line's prefill."""
        index = self.line_slot[seq_ids]
        moved = self.line_generation[seq_ids] != self.generation[index]
        if bool(moved.any()):
            raise RuntimeError(
                f"KV lines {seq_ids[moved].tolist()}: the adapter bound at their prefill "
                "lost its slot (a running request's adapter must be in adapter_indices' "
                "live set): a scheduling bug")
        return LoraStep.from_slots(index, self.slots)
