"""On-device sampling rules: the [B,3] tensor and what the sampler does with it."""

from __future__ import annotations

import copy

import pytest
import torch
from vllm import SamplingParams

from vllm_neuronx import sampling
from vllm_neuronx.worker.inputs import SequenceRow, decode_inputs, prefill_inputs


def row(params: SamplingParams, global_topk: int = 256):
    return sampling.sampling_row(params.temperature, params.top_k, params.top_p, global_topk)


def test_temperature_zero_is_greedy():
    assert row(SamplingParams(temperature=0.0, top_k=50, top_p=0.5)) == (1, 1.0, 1.0)


@pytest.mark.parametrize("top_k", [-1, 0, None])
def test_top_k_off_becomes_global_topk(top_k):
    params = SamplingParams(temperature=0.7, top_p=0.9)
    params.top_k = top_k
    assert row(params, global_topk=64) == (64, 0.9, 0.7)


def test_top_k_kept_within_global_topk():
    assert row(SamplingParams(temperature=1.0, top_k=50)) == (50, 1.0, 1.0)


def test_user_sampling_params_are_never_mutated():
    params = SamplingParams(temperature=0.0, top_k=-1, top_p=0.3)
    before = copy.deepcopy(params)
    row(params)
    assert (params.temperature, params.top_k, params.top_p) == (
        before.temperature, before.top_k, before.top_p)


def test_tensor_rows_follow_batch_row_order():
    rows = [
        SequenceRow("a", 2, [1, 2, 3], (1, 1.0, 1.0)),
        SequenceRow("b", 0, [4, 5], (50, 0.9, 0.7)),
        SequenceRow("c", 1, [6], (256, 0.5, 1.3)),
    ]
    pre = prefill_inputs(rows)
    assert pre.req_ids == ["a", "b", "c"]
    assert torch.allclose(
        pre.sampling_params, torch.tensor([[1, 1.0, 1.0], [50, 0.9, 0.7], [256, 0.5, 1.3]]))
    assert pre.input_ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 0, 0]]
    assert pre.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 0]]
    dec = decode_inputs(rows)  # decode rows are sorted by KV line, params follow them
    assert dec.req_ids == ["b", "c", "a"]
    assert dec.seq_ids.tolist() == [0, 1, 2]
    assert dec.input_ids.tolist() == [[5], [6], [3]]
    assert dec.position_ids.tolist() == [[1], [0], [2]]
    assert dec.sampling_params[:, 0].tolist() == [50, 256, 1]


def test_validation_matches_nxdi_preconditions():
    ok = torch.tensor([[1, 1.0, 1.0], [-1, 0.5, 0.7]])
    sampling.validate_sampling_tensor(ok, 256, 2)
    for bad, msg in [
        (torch.tensor([[300, 1.0, 1.0]]), "top_k"),
        (torch.tensor([[1.5, 1.0, 1.0]]), "integral"),
        (torch.tensor([[1, 0.0, 1.0]]), "top_p"),
        (torch.tensor([[1, 1.0, 0.0]]), "temperature"),
        (torch.tensor([[1, 1.0]]), "shape"),
    ]:
        with pytest.raises(ValueError, match=msg):
            sampling.validate_sampling_tensor(bad, 256, 1)


def test_sampler_greedy_rows_are_argmax_and_others_stay_in_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = torch.tensor([[1, 1.0, 1.0], [5, 1.0, 1.0], [256, 1e-6, 1.0], [3, 1.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        tokens = sampling.sample(logits, params, 256, gen)
        assert tokens[0] == logits[0].argmax()
        assert tokens[1] in logits[1].topk(5).indices
        assert tokens[2] == logits[2].argmax()  # tiny top_p keeps only the best candidate
        assert tokens[3] in logits[3].topk(3).indices


def test_sampler_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    params = torch.tensor([[3, 1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(
        torch.stack([sampling.sample(logits, params, 256, gen) for _ in range(4000)]).flatten(),
        minlength=3,
    )
    assert (counts / 4000).tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


def expected_distribution(probs: list[float], top_k: int, top_p: float,
                          temperature: float) -> list[float]:
    """NxDI's sampling from its definition, on a distribution sorted best first: keep the
    top_k likeliest, reweight by the temperature (p ** (1 / T), normalized), keep each
    candidate whose mass before it is under top_p (the best always), normalize."""
    kept = [p ** (1 / temperature) if i < top_k else 0.0 for i, p in enumerate(probs)]
    kept = [p / sum(kept) for p in kept]
    before = [sum(kept[:i]) for i in range(len(kept))]
    kept = [p if i == 0 or b < top_p else 0.0 for i, (p, b) in enumerate(zip(kept, before,
                                                                          strict=True))]
    return [p / sum(kept) for p in kept]


@pytest.mark.parametrize("top_k,top_p,temperature", [
    (4, 1.0, 1.0),    # top_k alone
    (6, 0.7, 1.0),    # top_p alone: the first three hold 0.8, the first two 0.65
    (6, 1.0, 2.0),    # temperature alone: flatter
    (3, 0.9, 0.5),    # all three: sharper, then cut
])
def test_sampler_draws_from_the_distribution_its_rules_define(top_k, top_p, temperature):
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    draws = 20000
    logits = torch.log(torch.tensor([probs])).expand(draws, -1)
    params = torch.tensor([[top_k, top_p, temperature]]).expand(draws, -1)
    tokens = sampling.sample(logits, params, 256, torch.Generator().manual_seed(0))
    frequencies = (torch.bincount(tokens, minlength=len(probs)) / draws).tolist()
    expected = expected_distribution(probs, top_k, top_p, temperature)
    assert frequencies == pytest.approx(expected, abs=0.015)
    # What the rules drop is never drawn.
    assert [f == 0 for f in frequencies] == [e == 0 for e in expected]


def test_argmax_is_torchs_first_maximum_at_any_vocab():
    gen = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 49152), (3, 1000), (4, 1024), (2, 2049), (5, 151936)):
        logits = torch.randn(rows, vocab, generator=gen)
        top = logits.max() + 1
        logits[0, [vocab - 1, 7, vocab // 2]] = top  # ties: the first index wins
        logits[-1, :] = 0.0  # a row all equal: index 0
        assert torch.equal(sampling.argmax(logits), logits.argmax(dim=-1)), (rows, vocab)
        half = logits.to(torch.bfloat16)
        assert torch.equal(sampling.argmax(half), half.argmax(dim=-1)), (rows, vocab)
