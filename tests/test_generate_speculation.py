"""Speculative decoding end to end through LLM.generate: vLLM's speculative_config, the
fused step on the CPU backend and on the NxDI backend over its simulator, vLLM's scheduler
and its spec-decode metrics. Greedy tokens are HF transformers' (run in the test) whatever
the draft: the target as its own draft (every proposal accepted, asserted through
LLM.get_metrics) and a random tiny draft (few accepted); stop tokens and max_tokens inside an
accepted run, max_model_len reached mid-run, aborts mid-flight, a row sampled on the host
beside speculating rows, sampled rows whose tokens follow the target's distribution, and
random EAGLE and EAGLE3 heads (NxDI's simulator stands in a proposer for the heads)."""

from __future__ import annotations

import collections
import itertools
import math
import random
import shutil

import pytest
import torch
from vllm import LLM, SamplingParams

from tests.conftest import hf_causal_lm, hf_greedy, make_tiny_llama
from tests.eagle_utils import write_eagle3_head, write_eagle_head
from tests.engine_checks import (
    check_aborts_free_lines,
    check_greedy_matches_hf,
    in_process_engine_env,
    leave_in_process_engine_env,
    use_nxdi_simulator,
)

MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 128
N = 3  # vLLM's num_speculative_tokens: k = 4 tokens at most per step


@pytest.fixture(scope="module", params=["cpu", "nxdi-simulator"])
def backend(request):
    """The engine in this process, on the CPU backend or on NxDI's simulator."""
    if request.param == "cpu":
        mp = pytest.MonkeyPatch()
        in_process_engine_env(mp)
        yield "cpu"
        leave_in_process_engine_env(mp)
    else:
        for _ in use_nxdi_simulator():
            yield "nxdi"


@pytest.fixture(scope="module")
def drafts(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("drafts")
    return {
        "self": str(shutil.copytree(tiny_llama, root / "self")),
        "random": make_tiny_llama(root / "random", seed=7, num_hidden_layers=1),
    }


def make_llm(target: str, draft: str, **kwargs) -> LLM:
    kwargs.setdefault("max_num_seqs", MAX_NUM_SEQS)
    kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
    return LLM(model=target, device="neuron", skip_tokenizer_init=True, dtype="float32",
               disable_log_stats=False, seed=0,
               speculative_config={"model": draft, "num_speculative_tokens": N}, **kwargs)


@pytest.fixture(scope="module")
def self_llm(backend, tiny_llama, drafts, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("NEURON_COMPILED_ARTIFACTS",
                              str(tmp_path_factory.mktemp("self-artifacts")))
    llm = make_llm(tiny_llama, drafts["self"])
    yield llm
    del llm


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def spec_counts(llm) -> dict[str, object]:
    """vLLM's spec-decode counters (Prometheus, summed over the process's engines)."""
    counts: dict[str, object] = collections.defaultdict(int)
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:spec_decode"):
            continue
        if hasattr(metric, "values"):
            previous = counts.get(metric.name) or [0] * len(metric.values)
            counts[metric.name] = [a + b for a, b in zip(previous, metric.values, strict=True)]
        else:
            counts[metric.name] += metric.value
    return counts


def delta(after: dict, before: dict, name: str):
    a, b = after.get(name, 0), before.get(name, 0)
    if isinstance(a, list):
        return [x - y for x, y in zip(a, b or [0] * len(a), strict=True)]
    return a - b


def random_prompts(seed: int, count: int, longest: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def test_target_as_its_own_draft_matches_hf_and_accepts_every_proposal(self_llm, tiny_llama):
    before = spec_counts(self_llm)
    prompts = random_prompts(1, 7)
    max_tokens = [1, 2, 5, 9, 16, 23, 40]  # ends inside and at the edge of accepted runs
    check_greedy_matches_hf(self_llm, tiny_llama, prompts, max_tokens)
    after = spec_counts(self_llm)
    drafts = delta(after, before, "vllm:spec_decode_num_drafts")
    proposed = delta(after, before, "vllm:spec_decode_num_draft_tokens")
    accepted = delta(after, before, "vllm:spec_decode_num_accepted_tokens")
    assert drafts > 0 and proposed == N * drafts
    assert accepted == proposed  # acceptance 1.0
    assert delta(after, before, "vllm:spec_decode_num_accepted_tokens_per_pos") == [drafts] * N


def test_a_stop_token_inside_an_accepted_run_ends_the_request_there(self_llm, tiny_llama):
    prompt = [5, 17, 300, 42]
    (expected,) = hf_greedy(tiny_llama, [prompt], [30])
    # A token first produced mid-run (the prefill yields token 0, each step up to N + 1).
    at = next(j for j in range(2, 30) if j % (N + 1) not in (0, 1)
              and expected[j] not in expected[:j])
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[expected[at]],
                            detokenize=False)
    (out,) = self_llm.generate([{"prompt_token_ids": prompt}], params)
    assert list(out.outputs[0].token_ids) == expected[: at + 1]
    assert out.outputs[0].finish_reason == "stop"


def test_max_model_len_reached_mid_run_finishes_cleanly(self_llm, tiny_llama):
    """The last tokens fit the line only with fewer proposals: vLLM's scheduler caps them."""
    prompt = random_prompts(2, 1, longest=1)[0] * (MAX_MODEL_LEN - 6)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)
    (out,) = self_llm.generate([{"prompt_token_ids": prompt}], params)
    (expected,) = hf_greedy(tiny_llama, [prompt], [6])
    assert list(out.outputs[0].token_ids) == expected
    assert out.outputs[0].finish_reason == "length"


def test_aborts_mid_flight_free_every_line(self_llm):
    check_aborts_free_lines(self_llm, MAX_NUM_SEQS, prefix="spec-abort")


def test_a_row_sampled_on_the_host_beside_speculating_rows(self_llm, tiny_llama, backend):
    """The CPU backend serves it one token per step; NxDI's fused graph returns no logits,
    so there it is refused at the request, naming what to do, and the engine serves on."""
    prompts = random_prompts(3, 3)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False,
                             logprobs=2 if i == 1 else None) for i in range(3)]
    if backend == "nxdi":
        with pytest.raises(ValueError, match="turn speculative decoding off"):
            self_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        params[1] = params[0]
    outs = self_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(tiny_llama, prompts,
                                                                     [12] * 3)
    if backend == "cpu":
        assert len(outs[1].outputs[0].logprobs) == 12


def test_a_random_draft_matches_hf_with_few_proposals_accepted(backend, tiny_llama, drafts,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "compiled"))
    llm = make_llm(tiny_llama, drafts["random"])
    try:
        before = spec_counts(llm)
        prompts = random_prompts(4, 6)
        check_greedy_matches_hf(llm, tiny_llama, prompts, [3, 8, 13, 20, 30, 31])
        after = spec_counts(llm)
        proposed = delta(after, before, "vllm:spec_decode_num_draft_tokens")
        accepted = delta(after, before, "vllm:spec_decode_num_accepted_tokens")
        assert proposed > 0 and accepted < proposed / 2
        if backend == "cpu":
            check_sampled_rows_follow_the_target(llm, tiny_llama)
    finally:
        del llm


def target_probabilities(model, prefix: list[int], top_k: int) -> dict[int, float]:
    """The target's next-token distribution after top_k at temperature 1 (NxDI's rule)."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1].float()
    values, indices = logits.topk(top_k)
    return dict(zip(indices.tolist(), values.softmax(-1).tolist(), strict=True))


def check_sampled_rows_follow_the_target(llm, model_path: str, samples: int = 600) -> None:
    """Sampled rows with a random draft (nearly every proposal rejected and resampled from
    max(0, p - q)): the joint frequency of the first three tokens matches the target's
    p(t1) p(t2|t1) p(t3|t1,t2), a chi-square test at p < 0.001 (fixed seed)."""
    prompt, top_k = [9, 33, 71], 3
    params = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate([{"prompt_token_ids": prompt}] * samples, params)
    seen = collections.Counter(tuple(o.outputs[0].token_ids) for o in outs)
    model = hf_causal_lm(model_path)
    expected = {}
    p1 = target_probabilities(model, prompt, top_k)
    for t1, a in p1.items():
        p2 = target_probabilities(model, prompt + [t1], top_k)
        for t2, b in p2.items():
            p3 = target_probabilities(model, prompt + [t1, t2], top_k)
            for t3, c in p3.items():
                expected[(t1, t2, t3)] = a * b * c * samples
    assert set(seen) <= set(expected), "a token outside the target's top_k was sampled"
    # Cells expected fewer than 5 times are pooled into one.
    big = [cell for cell, e in expected.items() if e >= 5]
    small = [cell for cell in expected if cell not in big]
    observed = [seen[c] for c in big] + [sum(seen[c] for c in small)]
    wanted = [expected[c] for c in big] + [sum(expected[c] for c in small)]
    if wanted[-1] < 1e-9:
        observed, wanted = observed[:-1], wanted[:-1]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True))
    dof = len(wanted) - 1
    # Wilson-Hilferty: the chi-square quantile at 0.999 for dof degrees of freedom.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, f"chi2={chi2:.1f} over {dof} dof (limit {limit:.1f}): {seen}"


def test_every_row_of_a_batch_keeps_its_own_accepted_run(self_llm, tiny_llama):
    """A full batch of lines at different positions, joining and leaving mid-flight."""
    prompts = random_prompts(5, 9, longest=90)
    max_tokens = [n for n, _ in zip(itertools.cycle([4, 11, 27, 6]), prompts)]
    check_greedy_matches_hf(self_llm, tiny_llama, prompts, max_tokens)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_random_eagle_heads_keep_the_targets_greedy_tokens(backend, method, tmp_path,
                                                           monkeypatch):
    """A 7-layer target (EAGLE3 reads vLLM's default layers 2, 3 and 4) and a random head in
    the format both vLLM and NxDI take (the target's lm_head inside, no draft vocabulary)."""
    monkeypatch.setenv("NEURON_COMPILED_ARTIFACTS", str(tmp_path / "compiled"))
    target = make_tiny_llama(tmp_path / "target", seed=3, num_hidden_layers=7)
    if method == "eagle":
        head = write_eagle_head(target, tmp_path / "head", lm_head="target")
    else:
        head = write_eagle3_head(target, tmp_path / "head", d2t=False)
    llm = LLM(model=target, device="neuron", skip_tokenizer_init=True, dtype="float32",
              max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN, disable_log_stats=False,
              speculative_config={"method": method, "model": head, "num_speculative_tokens": N})
    try:
        before = spec_counts(llm)
        check_greedy_matches_hf(llm, target, random_prompts(6, 5), [2, 7, 12, 19, 25])
        assert delta(spec_counts(llm), before, "vllm:spec_decode_num_draft_tokens") > 0
    finally:
        del llm
