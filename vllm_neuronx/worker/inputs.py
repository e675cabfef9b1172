"""Pure builders of the NxDI forward inputs for one step (testable without a model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_neuronx import sampling


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


def decode_inputs(rows: Sequence[SequenceRow]) -> StepInputs:
    """[m, 1] last tokens at position len-1, rows sorted by KV line as NxDI requires."""
    rows = sorted(rows, key=lambda r: r.line)
    return StepInputs(
        req_ids=[r.req_id for r in rows],
        input_ids=torch.tensor([[r.token_ids[-1]] for r in rows], dtype=torch.long),
        position_ids=torch.tensor([[len(r.token_ids) - 1] for r in rows], dtype=torch.long),
        seq_ids=torch.tensor([r.line for r in rows], dtype=torch.long),
        sampling_params=sampling.sampling_tensor([r.sampling_row for r in rows]),
        is_prefill=False,
    )
