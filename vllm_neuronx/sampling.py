"""On-device sampling: the ``[B, 3]`` tensor vLLM sends, and what the device does with it.

Rows are ``(top_k, top_p, temperature)``. The rules match what the Neuron code
bases converged on, without their bugs: the rows are built from the batch's own
rows in row order, and the user's ``SamplingParams`` are never mutated.

A request that needs more than those three (``host_parameters``) is sampled on
the host from the logits instead, by upstream vLLM's sampler
(``vllm_neuronx.worker.host_sampler``); request validation refuses it where the
backend returns no logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# vLLM treats temperatures below this as greedy.
GREEDY_EPS = 1e-5
# The row of a greedy request (and of a request sampled on the host: the device's
# token for it is not used, and argmax is the device's cheapest path).
GREEDY_ROW = (1, 1.0, 1.0)

# SamplingParams fields only the host sampler honours -> the value meaning "off".
HOST_PARAMETERS: dict[str, Any] = {
    "logprobs": None,
    "prompt_logprobs": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "min_p": 0.0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "min_tokens": 0,
    "structured_outputs": None,
}


def is_off(value: Any, off: Any) -> bool:
    if off is None:
        return value is None or value == [] or value == {}
    return value == off


def host_parameters(params: Any) -> list[tuple[str, Any]]:
    """(field, value) of every parameter of ``params`` on-device sampling cannot apply.

    A seed on a greedy request changes nothing, so it does not count.
    """
    found = []
    for field, off in HOST_PARAMETERS.items():
        value = getattr(params, field, off)
        if is_off(value, off):
            continue
        if field == "seed" and params.temperature < GREEDY_EPS:
            continue
        found.append((field, value))
    return found


def sampling_row(
    temperature: float, top_k: int | None, top_p: float, global_topk: int
) -> tuple[int, float, float]:
    """One request's row: temperature 0 -> greedy (top_k=1); top_k off (-1/0) -> global_topk."""
    if temperature < GREEDY_EPS:
        return GREEDY_ROW
    if top_k is None or top_k < 1:
        top_k = global_topk
    return min(int(top_k), global_topk), float(top_p), float(temperature)


def sampling_tensor(rows: Sequence[tuple[int, float, float]]) -> torch.Tensor:
    """The ``[B, 3]`` float tensor, one row per input row, in row order."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 3)


def validate_sampling_tensor(params: torch.Tensor, global_topk: int, batch: int) -> None:
    """What NxDI checks before sampling on the device."""
    if params.dim() != 2 or params.shape != (batch, 3):
        raise ValueError(f"sampling_params must have shape [{batch}, 3], got {list(params.shape)}")
    top_k, top_p, temperature = params.unbind(-1)
    if not torch.all(top_k == top_k.round()):
        raise ValueError("sampling_params top_k must be integral")
    if not torch.all((top_k == -1) | ((top_k >= 1) & (top_k <= global_topk))):
        raise ValueError(f"sampling_params top_k must be -1 or in [1, {global_topk}]")
    if not torch.all((top_p > 0) & (top_p <= 1)):
        raise ValueError("sampling_params top_p must be in (0, 1]")
    if not torch.all(temperature > 0):
        raise ValueError("sampling_params temperature must be > 0")


def _candidates(
    logits: torch.Tensor, params: torch.Tensor, global_topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates (its global top-k, best first) and their unnormalised
    weights after the row's top_k, temperature and top_p, as NxDI's Sampler makes them."""
    top_k = params[:, 0]
    k = min(global_topk, logits.shape[-1])
    values, indices = logits.float().topk(k, dim=-1)  # sorted, descending
    ranks = torch.arange(k, device=logits.device)
    row_k = torch.where(top_k < 1, torch.full_like(top_k, k), top_k)
    values = values.masked_fill(ranks[None, :] >= row_k[:, None], float("-inf"))
    values = values / params[:, 2:3]
    probs = values.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1) - probs  # mass strictly before each candidate
    probs = probs.masked_fill(cumulative >= params[:, 1:2], 0.0)
    return probs, indices


def probabilities(
    logits: torch.Tensor, params: torch.Tensor, global_topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution ``sample`` draws each row's token from: (probs [B, K], token ids
    [B, K]) over the row's K = min(global_topk, V) candidates, probs summing to 1 (zero
    for candidates its top_k / top_p drop). Speculation's rejection sampling compares
    the target's and the draft's."""
    probs, indices = _candidates(logits, params, global_topk)
    return probs / probs.sum(dim=-1, keepdim=True), indices


def sample(
    logits: torch.Tensor,
    params: torch.Tensor,
    global_topk: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` [B, V] as NxDI's Sampler does.

    Global top-k candidates, then each row's top_k as a rank mask, temperature,
    top-p over the cumulative softmax (the best candidate always kept), then a
    multinomial draw. Rows with top_k == 1 are an exact argmax.
    """
    top_k = params[:, 0]
    if bool(torch.all(top_k == 1)):
        return argmax(logits)
    probs, indices = _candidates(logits, params, global_topk)
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    picked = indices.gather(-1, choice[:, None]).squeeze(-1)
    greedy = top_k == 1
    if bool(greedy.any()):
        picked = torch.where(greedy, argmax(logits), picked)
    return picked


ARGMAX_TILE = 1024


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of [B, V], the first of equal maxima as torch's: each
    tile's maximum, the first tile holding the row's, then the first index in it. torch's
    argmax runs one thread at about 0.7 GB/s (2.3 ms for [32, 49152], AMX Xeon) where
    ``amax`` streams; this takes 0.4 ms there (0.05 against 0.13 at one row)."""
    n, v = logits.shape
    tiles = -(-v // ARGMAX_TILE)
    if tiles * ARGMAX_TILE != v:
        logits = torch.nn.functional.pad(logits, (0, tiles * ARGMAX_TILE - v),
                                         value=float("-inf"))
    tiled = logits.reshape(n, tiles, ARGMAX_TILE)
    best = tiled.amax(-1).argmax(-1)
    return best * ARGMAX_TILE + tiled[torch.arange(n), best].argmax(-1)
