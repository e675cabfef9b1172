"""Tensor parallelism on the CPU backend: each rank holds the shard NxDI would give it
(heads split, replicated or converted to MHA and padded; MLP, experts and LM head cut and
padded), the ranks sum and gather over a real collective (threads here, tests/tp_utils.py),
and the greedy tokens are one rank's and Hugging Face's."""

from __future__ import annotations

import dataclasses
import itertools
import shutil

import pytest
import torch

from tests.conftest import hf_greedy, make_tiny_llama
from tests.engine_checks import prefill_args
from tests.lora_utils import make_peft_adapter, peft_greedy
from tests.tiny_families import make_tiny
from tests.tp_utils import ThreadGroup, on_ranks, tp_backends, tp_forward
from vllm_neuronx import block_kv
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend, kernels
from vllm_neuronx.backends.cpu.llama import LlamaSpec
from vllm_neuronx.backends.cpu.lora import LoraWeights
from vllm_neuronx.backends.cpu.quantize import QuantizedWeight
from vllm_neuronx.backends.cpu.tensor_parallel import (
    CONVERT_TO_MHA,
    PAD,
    REPLICATE_TO_TP_DEGREE,
    SPLIT,
    ShardPlan,
    Span,
    shard_adapter,
    shard_weights,
)
from vllm_neuronx.lora import peft
from vllm_neuronx.speculation import Draft
from vllm_neuronx.worker.inputs import SequenceRow, decode_inputs, prefill_inputs, with_blocks

# 6 query heads on 2 KV heads: TP 2 splits them, TP 3 converts to MHA, TP 4 replicates the
# KV heads and pads the query heads; an intermediate (90) and a vocabulary (510) that TP 4
# pads.
LLAMA = dict(vocab=510, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=90)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 7]
STEPS = 6


def spec(q: int, kv: int, *, intermediate: int = 90, vocab: int = 510, experts: int = 0,
         expert_size: int = 0) -> LlamaSpec:
    return LlamaSpec(vocab_size=vocab, hidden_size=q * 8, intermediate_size=intermediate,
                     num_layers=1, num_heads=q, num_kv_heads=kv, head_dim=8, rms_norm_eps=1e-6,
                     rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False, sliding_window=None,
                     num_experts=experts, expert_size=expert_size)


@pytest.fixture(autouse=True)
def one_thread_per_rank(monkeypatch):
    """Ranks are threads of this process: one torch thread each on a shared machine."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("VLLM_NEURONX_CPU_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def config(tp: int, overrides=None, block=None, max_model_len=128) -> dict:
    return nc.resolve_neuron_config(tp_degree=tp, max_num_seqs=4, max_model_len=max_model_len,
                                    dtype="float32", overrides=overrides, block=block)


def one_answer(outputs):
    """Rank 0's output, after checking that every rank returned the same bits."""
    first = outputs[0]
    for out in outputs[1:]:
        assert torch.equal(out.tokens, first.tokens)
        assert torch.equal(out.logits, first.logits)
    return first


def greedy(forward, prompts, steps, **prefill):
    """Greedy continuations of ``steps`` tokens through ``forward`` (a backend's, or every
    rank's at once), all prompts in each call; and each call's logits. ``prefill``: more
    arguments of the prefill (adapter_ids; decodes take their lines' adapters)."""
    n = len(prompts)
    params = torch.tensor([[1, 1.0, 1.0]] * n)
    out = forward(*prefill_args(prompts), params, **prefill)
    seqs = [p + [t] for p, t in zip(prompts, out.tokens.tolist(), strict=True)]
    logits = [out.logits]
    for _ in range(steps - 1):
        out = forward(torch.tensor([[s[-1]] for s in seqs]),
                      torch.tensor([[len(s) - 1] for s in seqs]), torch.arange(n), params)
        logits.append(out.logits)
        for s, t in zip(seqs, out.tokens.tolist(), strict=True):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)], logits


def tp_greedy(backends, prompts, steps, **prefill):
    return greedy(lambda *a, **kw: one_answer(tp_forward(backends, *a, **kw)), prompts, steps,
                  **prefill)


# -- the plan ---------------------------------------------------------------------------
def test_plans_shard_heads_as_nxdi_does():
    def plans(s, tp):
        return [ShardPlan.of(s, tp, r) for r in range(tp)]

    split = plans(spec(6, 2), 2)
    assert {p.kv_strategy for p in split} == {SPLIT}
    assert [(p.q_heads, p.kv_heads) for p in split] == [((0, 1, 2), (0,)), ((3, 4, 5), (1,))]
    # One KV head per rank, each group's queries padded at its end: | q0 q1 | q2 - | q3 q4 |..
    rep = plans(spec(6, 2), 4)
    assert {p.kv_strategy for p in rep} == {REPLICATE_TO_TP_DEGREE}
    assert [(p.q_heads, p.kv_heads) for p in rep] == [
        ((0, 1), (0,)), ((2, PAD), (0,)), ((3, 4), (1,)), ((5, PAD), (1,))]
    # 3 ranks cannot share 2 KV heads: each query head gets its own copy of its KV head.
    mha = plans(spec(6, 2), 3)
    assert {p.kv_strategy for p in mha} == {CONVERT_TO_MHA}
    assert [(p.q_heads, p.kv_heads) for p in mha] == [
        ((0, 1), (0, 0)), ((2, 3), (0, 1)), ((4, 5), (1, 1))]
    # ... and padded with zero query and KV heads to a multiple of the degree.
    assert [(p.q_heads, p.kv_heads) for p in plans(spec(4, 2), 3)] == [
        ((0, 1), (0, 0)), ((2, 3), (1, 1)), ((PAD, PAD), (PAD, PAD))]
    # MHA replicated past its heads: a real head and a zero head per KV head.
    assert [(p.q_heads, p.kv_heads) for p in plans(spec(2, 2), 4)] == [
        ((0,), (0,)), ((PAD,), (0,)), ((1,), (1,)), ((PAD,), (1,))]
    # The MLP's and the vocabulary's rows: equal shares, the last padded.
    assert [p.mlp for p in rep] == [Span(0, 23, 23), Span(23, 46, 23), Span(46, 69, 23),
                                    Span(69, 90, 23)]
    assert rep[3].mlp.index()[-3:].tolist() == [89, PAD, PAD]
    assert [p.vocab for p in rep][-1] == Span(384, 510, 128)
    moe = ShardPlan.of(spec(4, 2, experts=4, expert_size=10), 3, 2)
    assert moe.expert == Span(8, 10, 4)
    rank_spec = moe.rank_spec(spec(4, 2, experts=4, expert_size=10))
    assert (rank_spec.num_heads, rank_spec.num_kv_heads, rank_spec.intermediate_size,
            rank_spec.expert_size, rank_spec.vocab_size) == (2, 2, 30, 4, 510)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ShardPlan.of(spec(6, 2), 2, 2)


def test_every_query_head_lands_once_beside_its_kv_head():
    """For any heads and degree: each rank has as many heads as the others, a whole number
    of query heads per KV head, each real query head next to its own KV head, and every
    query head on exactly one rank."""
    for kv, group, tp in itertools.product((1, 2, 3, 4, 8), (1, 2, 3, 4), range(1, 10)):
        s = spec(kv * group, kv)
        plans = [ShardPlan.of(s, tp, r) for r in range(tp)]
        assert len({(len(p.q_heads), len(p.kv_heads)) for p in plans}) == 1
        held = []
        for p in plans:
            per_kv, rest = divmod(len(p.q_heads), len(p.kv_heads))
            assert rest == 0
            for j, h in enumerate(p.q_heads):
                if h != PAD:
                    assert p.kv_heads[j // per_kv] == h // group, (kv, group, tp)
                    held.append(h)
        assert sorted(held) == list(range(kv * group)), (kv, group, tp)


def test_shard_weights_cuts_quantized_weights_and_keeps_row_biases_on_rank_0():
    """fp8 values move as bytes with their rows' scales; o's and down's scales (per output
    row) stay whole; zero rows pad; o_bias and down_bias only on rank 0."""
    s = spec(6, 2, intermediate=5)
    torch.manual_seed(0)
    hidden, d = s.hidden_size, s.head_dim

    def fp8(rows, cols):
        w = torch.randn(rows, cols)
        return QuantizedWeight(w.to(torch.float8_e4m3fn), torch.rand(rows) + 0.5)

    full = {"embed": torch.randn(510, hidden), "norm": torch.ones(hidden),
            "layers.0.qkv": fp8(10 * d, hidden), "layers.0.o": fp8(hidden, 6 * d),
            "layers.0.gate_up": torch.randn(10, hidden), "layers.0.down": fp8(hidden, 5),
            "layers.0.o_bias": torch.randn(hidden), "layers.0.down_bias": torch.randn(hidden),
            "lm_head": torch.randn(510, hidden)}
    dense = {n: w.dequantize() if isinstance(w, QuantizedWeight) else w
             for n, w in full.items()}
    for rank in range(4):
        plan = ShardPlan.of(s, 4, rank)
        mine, rank_spec = shard_weights(full, s, plan)
        assert rank_spec.num_heads == 2 and rank_spec.num_kv_heads == 1
        assert mine["embed"] is full["embed"]
        assert ("layers.0.o_bias" in mine) == ("layers.0.down_bias" in mine) == (rank == 0)
        got = {n: w.dequantize() if isinstance(w, QuantizedWeight) else w
               for n, w in mine.items()}
        q_rows = [dense["layers.0.qkv"][h * d:(h + 1) * d] if h != PAD else torch.zeros(d, hidden)
                  for h in plan.q_heads]
        kv = plan.kv_heads[0]
        k_rows = dense["layers.0.qkv"][6 * d + kv * d:6 * d + (kv + 1) * d]
        v_rows = dense["layers.0.qkv"][8 * d + kv * d:8 * d + (kv + 1) * d]
        assert torch.equal(got["layers.0.qkv"], torch.cat([*q_rows, k_rows, v_rows]))
        o_cols = [dense["layers.0.o"][:, h * d:(h + 1) * d] if h != PAD
                  else torch.zeros(hidden, d) for h in plan.q_heads]
        assert torch.equal(got["layers.0.o"], torch.cat(o_cols, dim=1))
        assert torch.equal(mine["layers.0.o"].scale, full["layers.0.o"].scale)
        # intermediate 5 over 4 ranks: 2 rows each, rank 2 has row 4 and a zero row
        span = plan.mlp
        real = span.stop - span.start
        gate_up = got["layers.0.gate_up"]
        assert gate_up.shape == (4, hidden)
        assert torch.equal(gate_up[:real], dense["layers.0.gate_up"][span.start:span.stop])
        assert torch.equal(gate_up[2:2 + real],
                           dense["layers.0.gate_up"][5 + span.start:5 + span.stop])
        assert not gate_up[real:2].any() and not gate_up[2 + real:].any()
        assert torch.equal(got["layers.0.down"][:, :real],
                           dense["layers.0.down"][:, span.start:span.stop])
        assert got["lm_head"].shape == (128, hidden)
    with pytest.raises(ValueError, match="layers.0.mystery"):
        shard_weights({"layers.0.mystery": torch.zeros(1)}, s, ShardPlan.of(s, 2, 0))


# -- ranks against one rank and against HF -----------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tp-llama") / "model", **LLAMA)


@pytest.fixture(scope="module")
def one_rank(llama, tmp_path_factory):
    """TP 1's greedy tokens and logits, and HF's tokens."""
    b = CpuBackend(llama, config(1))
    folder = tmp_path_factory.mktemp("tp1")
    b.compile(str(folder))
    b.load(str(folder))
    tokens, logits = greedy(b.forward, PROMPTS, STEPS)
    assert tokens == hf_greedy(llama, PROMPTS, [STEPS] * len(PROMPTS))
    return tokens, logits


@pytest.mark.parametrize("tp, kv_heads", [(2, 1), (3, 2), (4, 1)])
def test_ranks_give_one_ranks_tokens_and_hf_s(llama, one_rank, tmp_path, tp, kv_heads):
    """Prefill and decodes on TP 2 (heads split), 3 (MHA, MLP and vocabulary padded) and
    4 (KV heads replicated, query heads padded): the tokens of TP 1 and of HF, and logits
    within float rounding of TP 1's."""
    backends = tp_backends(llama, config(tp), str(tmp_path))
    for b in backends:
        assert b.native is None and b.kernel.endswith(f"(tp {tp})")
        assert b.model.k_cache.shape[2] == kv_heads  # [layers, lines, kv heads, len, d]
    tokens, logits = tp_greedy(backends, PROMPTS, STEPS)
    assert tokens == one_rank[0]
    for got, ref in zip(logits, one_rank[1], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, tp, overrides", [
    # biases on q, k, v, o, gate, up and down (o and down added by rank 0 only), a tied
    # head, KV heads replicated
    ("llama", 4, {"attention_bias": True, "mlp_bias": True, "tie": True}),
    ("qwen2", 2, {}),
    # a dense layer and a layer of experts, q/k norms, heads converted to MHA and padded
    ("qwen3_moe", 3, {}),
])
def test_families_on_ranks_match_hf(tmp_path, family, tp, overrides):
    model = make_tiny(tmp_path / "model", family, **overrides)
    backends = tp_backends(model, config(tp), str(tmp_path))
    prompts = PROMPTS[:2]
    tokens, _ = tp_greedy(backends, prompts, 5)
    assert tokens == hf_greedy(model, prompts, [5] * len(prompts))


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory) -> str | None:
    """The packed-weight kernel of this CPU, built once for the module (a build takes
    seconds), or None where no variant runs."""
    variant = kernels.chosen()
    if variant is None:
        return None
    folder = tmp_path_factory.mktemp("kernel")
    assert kernels.build(str(folder), variant)
    return str(folder / variant.library)


@pytest.mark.parametrize("tp, overrides", [
    (2, {"quantized": True, "quantization_type": "per_channel_symmetric",
         "quantization_dtype": "int8"}),
    (4, {"quantized": True, "quantization_type": "per_tensor_symmetric",
         "quantization_dtype": "f8e4m3", "kv_cache_quant": True}),
])
def test_quantized_weights_and_fp8_kv_shard(llama, kernel_library, tmp_path, monkeypatch, tp,
                                            overrides):
    """Quantized weights (multiplied by the packed-weight kernel where one runs) cut with
    their scales, and an fp8 KV cache of the rank's heads: TP 1's tokens, from the same
    compiled artifacts."""
    if kernel_library is not None:
        monkeypatch.setattr(kernels, "build",
                            lambda out, variant: bool(shutil.copy(kernel_library, out)))
    one = CpuBackend(llama, config(1, overrides))
    one.compile(str(tmp_path))
    one.load(str(tmp_path))
    expected, ref_logits = greedy(one.forward, PROMPTS, STEPS)
    backends = tp_backends(llama, config(tp, overrides), str(tmp_path), compile=False)
    assert all((b.matmul is None) == (kernel_library is None) for b in (one, *backends))
    if overrides.get("kv_cache_quant"):
        assert backends[0].model.k_cache.dtype is torch.float8_e4m3fn
    tokens, logits = tp_greedy(backends, PROMPTS, STEPS)
    assert tokens == expected
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=1e-3, atol=1e-3)


def test_block_layout_with_a_cached_prefix(llama, one_rank, tmp_path):
    """Prefix caching's block KV layout on 4 ranks (a cache of each rank's one KV head):
    HF's tokens, and again with the first prompt's first two blocks read from the cache."""
    block, max_len = 8, 128
    layout = block_kv.resolve({}, prefix_caching=True, chunked_prefill=None, block_size=block,
                              num_blocks=None, max_num_seqs=4, seq_len=max_len)
    backends = tp_backends(llama, config(4, block=layout), str(tmp_path))
    assert backends[0].model.k_cache.shape[1:] == (layout.num_blocks, block, 1, 16)
    greedy_row = (1, 1.0, 1.0)

    def generate(prompts, tables, cached):
        rows = [SequenceRow(str(i), i, list(p), greedy_row, blocks=list(t), computed=c)
                for i, (p, t, c) in enumerate(zip(prompts, tables, cached, strict=True))]
        step = with_blocks(prefill_inputs(rows), rows, layout, max_len)
        for _ in range(STEPS):
            outs = tp_forward(backends, step.input_ids, step.position_ids, step.seq_ids,
                              step.sampling_params, blocks=step.blocks)
            assert all(torch.equal(o.tokens, outs[0].tokens) for o in outs)
            by_id = {r.req_id: r for r in rows}
            for req_id, token in zip(step.req_ids, outs[0].tokens.tolist(), strict=True):
                by_id[req_id].token_ids.append(token)
            step = with_blocks(decode_inputs(rows), rows, layout, max_len)
        return [r.token_ids[len(p):] for r, p in zip(rows, prompts, strict=True)]

    prompts = [list(range(5, 25)), [3, 4] + list(range(60, 70))]
    expected = hf_greedy(llama, prompts, [STEPS, STEPS])
    assert generate(prompts, [[3, 7, 9, 11], [2, 4, 5]], [0, 0]) == expected
    # the first prompt again on another line, its first two blocks (16 positions) cached
    assert generate(prompts[:1], [[3, 7, 12, 13]], [16]) == expected[:1]


# -- LoRA adapters on ranks ----------------------------------------------------------------
MAX_RANK = 8


@pytest.fixture(scope="module")
def tp_adapters(llama, tmp_path_factory) -> dict[str, str]:
    """Two PEFT adapters on q, k, v, o, gate, up and down (the second rsLoRA, a lower rank)."""
    root = tmp_path_factory.mktemp("tp-adapters")
    return {"a1": make_peft_adapter(llama, root / "a1", seed=1, r=8, alpha=16),
            "a2": make_peft_adapter(llama, root / "a2", seed=2, r=4, alpha=8, use_rslora=True)}


def test_shard_adapter_cuts_as_the_weights_are_cut(llama, tp_adapters):
    """On 4 ranks (KV heads replicated, query heads and intermediate padded): each rank's
    qkv and gate_up deltas are the whole adapter's at the rank's rows (zeros where padded),
    and the ranks' o and down deltas sum to the whole adapter's."""
    s = LlamaSpec.from_folder(llama)
    dims = CpuBackend(llama, config(1)).dims
    adapter = peft.inspect("a1", tp_adapters["a1"], dims, MAX_RANK)
    loaded = peft.load(adapter)
    whole = LoraWeights.prepare(loaded, adapter, dims, torch.float32)
    torch.manual_seed(0)
    x = {"qkv": torch.randn(3, s.hidden_size), "gate_up": torch.randn(3, s.hidden_size),
         "o": torch.randn(3, s.num_heads * s.head_dim),
         "down": torch.randn(3, s.intermediate_size)}

    def delta(part, inputs):
        return inputs @ part.a.T @ part.bt

    sums = {}  # (layer, kind) -> the ranks' deltas on o or down, summed
    for rank in range(4):
        plan = ShardPlan.of(s, 4, rank)
        rank_spec = plan.rank_spec(s)
        mine = LoraWeights.prepare(shard_adapter(loaded, s, plan), adapter,
                                   dataclasses.replace(dims, heads=rank_spec.num_heads,
                                                       kv_heads=rank_spec.num_kv_heads,
                                                       intermediate=rank_spec.intermediate_size),
                                   torch.float32)
        mlp = plan.mlp.index()
        gate_up = torch.cat([mlp, torch.where(mlp == PAD, PAD, mlp + s.intermediate_size)])
        for (layer, kind), part in mine.parts.items():
            full = whole.parts[layer, kind]
            if kind in ("o", "down"):
                columns = plan.o_columns(s) if kind == "o" else mlp
                shard = torch.zeros(3, len(columns))
                shard[:, columns != PAD] = x[kind][:, columns[columns != PAD]]
                sums[layer, kind] = sums.get((layer, kind), 0) + delta(part, shard)
                continue
            rows = plan.qkv_rows(s) if kind == "qkv" else gate_up
            want = torch.zeros(3, len(rows))
            want[:, rows != PAD] = delta(full, x[kind])[:, rows[rows != PAD]]
            torch.testing.assert_close(delta(part, x[kind]), want)
            assert not part.bt[:, rows == PAD].any()
            # the parts' output columns are the rank's: q | k | v, gate | up
            ends = part.spans[:, 3].tolist()
            assert ends == ([len(plan.q_heads) * 16, (len(plan.q_heads) + 1) * 16,
                             (len(plan.q_heads) + 2) * 16] if kind == "qkv" else [23, 46])
    assert {kind for _, kind in sums} == {"o", "down"}
    for (layer, kind), got in sums.items():
        torch.testing.assert_close(got, delta(whole.parts[layer, kind], x[kind]))


def prepare_on_ranks(backends, paths: dict[str, str]) -> list[dict[str, LoraWeights]]:
    """Every rank's shard of each adapter (the same calls on each, as the leader mirrors
    them): each rank's handles by name."""
    def prepare(b):
        return {name: b.prepare_adapter(peft.inspect(name, path, b.dims, MAX_RANK))
                for name, path in paths.items()}

    return on_ranks(backends, prepare)


@pytest.fixture(scope="module")
def one_rank_lora(llama, tp_adapters, tmp_path_factory):
    """TP 1 with the two adapters: a batch of a1, base and a2 rows; its greedy tokens
    (PEFT's) and logits."""
    b = CpuBackend(llama, config(1))
    folder = tmp_path_factory.mktemp("tp1-lora")
    b.compile(str(folder))
    b.load(str(folder))
    b.init_lora(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    handles = prepare_on_ranks([b], tp_adapters)[0]
    ids = b.adapter_indices([handles["a1"], None, handles["a2"]], ())
    tokens, logits = greedy(b.forward, PROMPTS, STEPS, adapter_ids=ids)
    paths = [tp_adapters["a1"], None, tp_adapters["a2"]]
    assert tokens == [peft_greedy(llama, path, [p], STEPS)[0]
                      for path, p in zip(paths, PROMPTS, strict=True)]
    return tokens, logits


@pytest.mark.parametrize("tp", [2, 4])
def test_adapters_on_ranks_give_one_ranks_tokens(llama, tp_adapters, one_rank_lora, tmp_path,
                                                 tp):
    """A prefill of rows of two adapters and the base model, then decodes, on TP 2 (heads
    split) and TP 4 (KV heads replicated, query heads and intermediate padded): each rank
    holds its shard of each adapter, the same slots on every rank; the tokens of TP 1
    (PEFT's) and logits within float rounding of TP 1's."""
    backends = tp_backends(llama, config(tp), str(tmp_path))
    on_ranks(backends, lambda b: b.init_lora(max_loras=2, max_lora_rank=MAX_RANK,
                                              max_cpu_loras=2))
    handles = prepare_on_ranks(backends, tp_adapters)
    # a1's ranks (8 each for q, k and v) over the rank's 3 or 2 query heads, 1 KV head
    q_heads = len(ShardPlan.of(backends[0].spec, tp, 0).q_heads)
    assert handles[0]["a1"].parts[0, "qkv"].bt.shape == (3 * 8, (q_heads + 2) * 16)
    ids = on_ranks(backends, lambda b: b.adapter_indices(
        [handles[b.ranks.rank]["a1"], None, handles[b.ranks.rank]["a2"]], ()))
    assert all(torch.equal(i, ids[0]) for i in ids)
    tokens, logits = tp_greedy(backends, PROMPTS, STEPS, adapter_ids=ids[0])
    assert tokens == one_rank_lora[0]
    for got, ref in zip(logits, one_rank_lora[1], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# -- what is refused ---------------------------------------------------------------------
def test_ranks_and_speculation_are_checked(llama, tmp_path):
    cfg = config(2)
    b = CpuBackend(llama, cfg)
    b.compile(str(tmp_path))
    with pytest.raises(RuntimeError, match="no ranks to join"):
        b.load(str(tmp_path))
    b.ranks = ThreadGroup(3).ranks()[0]
    with pytest.raises(RuntimeError, match="rank 0 of 3"):
        b.load(str(tmp_path))
    with pytest.raises(ValueError, match="speculation .* tp_degree=2"):
        CpuBackend(llama, cfg, draft=Draft("draft_model", llama, 2))
    # tp_degree 1 ignores ranks
    one = CpuBackend(llama, config(1))
    one.ranks = ThreadGroup(2).ranks()[0]
    (tmp_path / "one").mkdir()
    one.compile(str(tmp_path / "one"))
    one.load(str(tmp_path / "one"))
    assert one.model.collective is None and "(tp" not in one.kernel
