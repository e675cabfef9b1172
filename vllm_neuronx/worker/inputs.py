"""Pure builders of the NxDI forward inputs for one step (testable without a model)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from vllm_neuronx import block_kv, sampling
from vllm_neuronx.backends.protocol import BlockInputs


@dataclass(slots=True)
class SequenceRow:
    """One running sequence as the device sees it."""

    req_id: str
    line: int
    token_ids: list[int]  # prompt + generated so far
    sampling_row: tuple[int, float, float]
    # The backend's handle on its LoRA adapter (lora.pool), None for the base model: kept
    # from admission, as the KV line is (the line is bound to it at the prefill).
    adapter: object | None = None
    # The block KV layout (block_kv.py): vLLM's blocks of the sequence, in order, and the
    # leading positions its cache held when the row was last admitted (prefix hits).
    blocks: list[int] | None = None
    computed: int = 0


@dataclass(slots=True)
class StepInputs:
    req_ids: list[str]  # row order; outputs come back in this order
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    sampling_params: torch.Tensor
    is_prefill: bool
    # [n] each prefill row's adapter index (backend.adapter_indices), with LoRA on only.
    adapter_ids: torch.Tensor | None = None
    # Fused speculation's decode steps: the most tokens each row may keep (1 + the drafts
    # vLLM scheduled for it), in row order.
    keep: list[int] | None = None
    blocks: BlockInputs | None = None  # the block KV layout's inputs (with_blocks)
    # A chunked-prefill step (chunked_inputs): each row's tokens one after another in
    # input_ids [1, T]; ``sampled`` says which rows end their prompt (or decode) in it and
    # so yield a token.
    chunked: bool = False
    sampled: list[bool] | None = None


def prefill_inputs(rows: Sequence[SequenceRow]) -> StepInputs:
    """[n, L] right-padded prompts, positions 0..len-1 padded with 0, their lines."""
    width = max(len(r.token_ids) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.token_ids)
        input_ids[i, :n] = torch.tensor(r.token_ids, dtype=torch.long)
        position_ids[i, :n] = torch.arange(n)
    return StepInputs(
        req_ids=[r.req_id for r in rows],
        input_ids=input_ids,
        position_ids=position_ids,
        seq_ids=torch.tensor([r.line for r in rows], dtype=torch.long),
        sampling_params=sampling.sampling_tensor([r.sampling_row for r in rows]),
        is_prefill=True,
    )


def decode_inputs(rows: Sequence[SequenceRow], ahead: Collection[str] = ()) -> StepInputs:
    """[m, 1] last tokens at position len-1, rows sorted by KV line as NxDI requires.

    ``ahead``: rows whose last token the step before is still computing (asynchronous
    scheduling): their position is len, their input 0 until the runner fills it in."""
    rows = sorted(rows, key=lambda r: r.line)
    late = [r.req_id in ahead for r in rows]
    last = [0 if a else r.token_ids[-1] for r, a in zip(rows, late, strict=True)]
    return StepInputs(
        req_ids=[r.req_id for r in rows],
        input_ids=torch.tensor(last, dtype=torch.long)[:, None],
        position_ids=torch.tensor([len(r.token_ids) - (not a)
                                   for r, a in zip(rows, late, strict=True)],
                                  dtype=torch.long)[:, None],
        seq_ids=torch.tensor([r.line for r in rows], dtype=torch.long),
        sampling_params=sampling.sampling_tensor([r.sampling_row for r in rows]),
        is_prefill=False,
    )


def with_blocks(step: StepInputs, rows: Sequence[SequenceRow],
                layout: block_kv.BlockLayout, seq_len: int) -> StepInputs:
    """``step`` (whose rows are ``rows``, in its order) with the block layout's inputs, as
    NxDI's vLLM integration builds them: a prefill row's slots from its first uncached
    position on, then -1; a decode row's slot of its position; block tables padded with
    the null block 0 to seq_len / block_size entries."""
    bs, width = layout.block_size, seq_len // layout.block_size
    full = [len(r.token_ids) for r in rows]
    computed = [r.computed if step.is_prefill else n - 1 for r, n in zip(rows, full,
                                                                        strict=True)]
    slots = [block_kv.slots(r.blocks, c, n, bs) for r, c, n in zip(rows, computed, full,
                                                                  strict=True)]
    most = max(len(s) for s in slots)
    # One tensor from padded lists: a decode step builds these for every row.
    slot_mapping = torch.tensor([s + [-1] * (most - len(s)) for s in slots], dtype=torch.long)
    table = torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in rows],
                         dtype=torch.long)
    step.blocks = BlockInputs(slot_mapping, table, torch.tensor(full, dtype=torch.long),
                              torch.tensor(computed, dtype=torch.long))
    return step


def chunked_inputs(rows: Sequence[SequenceRow], counts: Sequence[int],
                   computed: Sequence[int], layout: block_kv.BlockLayout,
                   seq_len: int) -> StepInputs:
    """A chunked-prefill step as vLLM scheduled it: ``counts[i]`` tokens of row i from
    position ``computed[i]`` on (a prompt's chunk, or a decode's one token), all rows'
    tokens one after another in [1, T], as NxDI's chunked prefill took them."""
    bs, width = layout.block_size, seq_len // layout.block_size
    tokens, positions, slots = [], [], []
    for r, n, c in zip(rows, counts, computed, strict=True):
        tokens += r.token_ids[c:c + n]
        positions += range(c, c + n)
        slots += block_kv.slots(r.blocks, c, c + n, bs)
    table = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        table[i, :len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.long)
    full = [c + n for n, c in zip(counts, computed, strict=True)]
    return StepInputs(
        req_ids=[r.req_id for r in rows],
        input_ids=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        seq_ids=torch.tensor([r.line for r in rows], dtype=torch.long),
        sampling_params=sampling.sampling_tensor([r.sampling_row for r in rows]),
        is_prefill=False,
        blocks=BlockInputs(torch.tensor([slots], dtype=torch.long), table,
                           torch.tensor(full, dtype=torch.long),
                           torch.tensor(computed, dtype=torch.long)),
        chunked=True,
        sampled=[f == len(r.token_ids) for r, f in zip(rows, full, strict=True)],
    )
