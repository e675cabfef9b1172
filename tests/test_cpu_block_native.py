"""decode_step.c over the block KV layout (prefix caching, chunked prefill): the same
logits as llama.py's torch graph of that layout (``block_rows``) and as the native step
over KV lines, through shuffled block tables of several block sizes, and its bounds
checked before native code trusts them."""

from __future__ import annotations

import shutil

import pytest
import torch

import vllm_neuronx.backends.cpu.backend as cpu_backend
from tests.conftest import bf16_kv, cache_close, close_to, make_tiny_llama
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend, kernels
from vllm_neuronx.backends.cpu.llama import BlockKV, LlamaModel
from vllm_neuronx.backends.cpu.native import NativeStep

VARIANT = next((v for v in kernels.VARIANTS if kernels.runs_here(v)), None)
pytestmark = pytest.mark.skipif(VARIANT is None, reason="no native kernel variant runs here")

MAX_LEN = 128
# make_tiny_llama's overrides and the neuron config's of each model: GQA with heads of 16
# (the attention's generic head size), 64 and 128 (its specialised ones; 128 over an fp8
# cache) and a Mistral whose sliding window (10) spans blocks.
MODELS = {
    "d16": ({}, {}),
    "d64": ({"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}, {}),
    "d128-fp8": ({"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1},
                 {"kv_cache_quant": True}),
    "window": ({"mistral": True, "sliding_window": 10}, {}),
}
# Three sequences: a cached prefix, then a suffix in a second call, then decodes; the
# longest passes a chunk of 64 scores (decode_step.c's CHUNK).
PREFIXES, SUFFIXES, DECODES = (21, 6, 40), (5, 9, 30), 4
LINES = (2, 0, 3)  # the sequences' KV lines in the contiguous backend


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The kernel, built once for every model here (a build takes seconds)."""
    folder = tmp_path_factory.mktemp("kernel")
    assert kernels.build(str(folder), VARIANT)
    return str(folder / VARIANT.library)


@pytest.fixture(scope="module")
def backend_of(tmp_path_factory, library):
    """MODELS' backends over KV lines, with bf16 weights packed for the kernel."""
    made = {}

    def get(name: str) -> CpuBackend:
        if name not in made:
            overrides, neuron = MODELS[name]
            folder = tmp_path_factory.mktemp(name)
            path = make_tiny_llama(folder / "model", **overrides)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_backend, "native_bf16", lambda: False)
                mp.setenv("VLLM_NEURONX_CPU_KERNEL", VARIANT.name)
                mp.setattr(kernels, "build",
                           lambda out, variant: bool(shutil.copy(library, out)))
                cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=4,
                                               max_model_len=MAX_LEN, dtype="bfloat16",
                                               overrides=neuron)
                b = CpuBackend(path, cfg)
                b.compile(str(folder))
                b.load(str(folder))
            assert b.native is not None
            made[name] = b
        return made[name]

    return get


def block_model(ref: LlamaModel, blocks: BlockKV) -> LlamaModel:
    """A model of the block layout over ``ref``'s packed weights, with a cache of its own."""
    return LlamaModel(ref.spec, ref.w, num_lines=1, max_len=ref.max_len, dtype=ref.dtype,
                      linear=ref.linear, kv_fp8=ref.kv_fp8, kv_dtype=ref.k_cache.dtype,
                      blocks=blocks)


def shuffled_table(lengths, block_size: int, generator) -> tuple[torch.Tensor, int]:
    """Each sequence's blocks drawn from a shuffle of the non-null ones, padded with the
    null block 0 to a width that covers llama.py's attention span; and how many blocks."""
    need = [-(-n // block_size) for n in lengths]
    width = -(-(-(-max(lengths) // 16) * 16) // block_size) + 1
    num_blocks = sum(need) + 4
    ids = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    table = torch.zeros((len(lengths), width), dtype=torch.int64)
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    return table, num_blocks


def native_rows(native: NativeStep, tokens, starts, lines, block_table=None):
    """Each sequence's new tokens as rows in one ``rows`` call: its last row's logits."""
    ids = torch.cat(tokens)
    positions = torch.cat([torch.arange(p, p + len(t)) for t, p in zip(tokens, starts,
                                                                         strict=True)])
    line = torch.cat([torch.full((len(t),), n) for t, n in zip(tokens, lines, strict=True)])
    last = torch.tensor([len(t) for t in tokens]).cumsum(0) - 1
    logits, _, _ = native.rows(ids, positions, line, last, block_table=block_table)
    return logits


def torch_rows(model: LlamaModel, tokens, starts, table: torch.Tensor) -> torch.Tensor:
    """The same through ``block_rows`` (right-padded, padding not written)."""
    n, t, bs = len(tokens), max(len(t) for t in tokens), model.blocks.block_size
    ids = torch.zeros((n, t), dtype=torch.int64)
    positions = torch.zeros((n, t), dtype=torch.int64)
    slots = torch.full((n, t), -1, dtype=torch.int64)
    for i, (tok, start) in enumerate(zip(tokens, starts, strict=True)):
        k, p = len(tok), torch.arange(start, start + len(tok))
        ids[i, :k], positions[i, :k], positions[i, k:] = tok, p, start + k - 1
        slots[i, :k] = table[i, p // bs] * bs + p % bs
    h = model.block_rows(ids, positions, table, slots)
    lengths = torch.tensor([len(t) for t in tokens])
    return model.logits(h[torch.arange(n), lengths - 1])


def check_caches(native: LlamaModel, reference: LlamaModel, kernel: str) -> None:
    """The K/V the native step wrote where block_rows wrote them (fp8: the same bytes but
    where a value sat within rounding noise of a rounding edge)."""
    for mine, ref in ((native.k_cache, reference.k_cache), (native.v_cache, reference.v_cache)):
        if native.kv_fp8:
            assert (mine.view(torch.uint8) != ref.view(torch.uint8)).float().mean() < 1e-3
        else:
            torch.testing.assert_close(mine, ref, **cache_close(kernel, 1e-5, 1e-5, ref))


@pytest.mark.parametrize("name, block_size", [("d16", 8), ("d16", 16), ("d16", 12),
                                              ("d64", 16), ("d128-fp8", 12), ("window", 8)])
def test_native_block_layout_matches_kv_lines_and_torch(backend_of, name, block_size):
    """A prefix prefilled in one call, the rest of each prompt in a second (prefix
    caching), then greedy decodes, three sequences of different lengths a call, over
    shuffled blocks: the native step gives the logits and tokens of the native step over
    KV lines and (replayed) block_rows' logits and K/V."""
    b = backend_of(name)
    ref = b.model
    generator = torch.Generator().manual_seed(block_size)
    totals = [p + s + DECODES for p, s in zip(PREFIXES, SUFFIXES, strict=True)]
    table, num_blocks = shuffled_table(totals, block_size, generator)
    blocks = BlockKV(num_blocks, block_size)
    native_model, torch_model = block_model(ref, blocks), block_model(ref, blocks)
    native = NativeStep.for_model(native_model, b.matmul)
    assert native is not None and native.step.block_size == block_size
    assert (native.step.num_lines, native.step.num_blocks) == (0, num_blocks)
    native.step.max_rows = 24  # the prefills run as several steps (rows in order)

    calls = []  # (new tokens, their first positions, the native logits) of each call

    def step(tokens, starts):
        got = native_rows(native, tokens, starts, range(3), table)
        over_lines = native_rows(b.native, tokens, starts, LINES)
        # prompts' rows split into steps differently (max_rows) attend by other paths
        # (decode_step.c: a step holding 16 rows of one prompt attends them together)
        torch.testing.assert_close(got, over_lines,
                                   **close_to(b.kernel, 1e-5, 1e-5, kv_bf16=bf16_kv(ref)))
        assert torch.equal(got.argmax(-1), over_lines.argmax(-1))  # greedy: the same tokens
        calls.append((tokens, starts, got))
        return got

    vocab = ref.spec.vocab_size
    prompts = [torch.randint(3, vocab, (p + s,), generator=generator)
               for p, s in zip(PREFIXES, SUFFIXES, strict=True)]
    step([p[:n] for p, n in zip(prompts, PREFIXES, strict=True)], [0, 0, 0])
    logits = step([p[n:] for p, n in zip(prompts, PREFIXES, strict=True)], PREFIXES)
    lengths = [len(p) for p in prompts]
    for _ in range(DECODES):
        logits = step(list(logits.argmax(-1)[:, None]), lengths)
        lengths = [n + 1 for n in lengths]

    for tokens, starts, got in calls:
        torch.testing.assert_close(got, torch_rows(torch_model, tokens, starts, table),
                                   **close_to(b.kernel, 1e-4, 1e-4, ref.kv_fp8, bf16_kv(ref)))
    check_caches(native_model, torch_model, b.kernel)


def test_block_table_is_checked_before_native_code(backend_of):
    """What native code would read or write out of bounds is refused: a table entry past
    the blocks, a position past the table's blocks, a row's sequence past its rows, a
    table of another dtype or none; a step over KV lines takes no table, and the lines'
    prefill and decode refuse the block layout."""
    b = backend_of("d16")
    model = block_model(b.model, BlockKV(num_blocks=9, block_size=8))
    native = NativeStep.for_model(model, b.matmul)
    table = torch.tensor([[3, 1, 4, 0], [5, 2, 6, 8]])
    ids, positions, lines = torch.tensor([7, 8]), torch.tensor([5, 31]), torch.tensor([0, 1])
    native.rows(ids, positions, lines, block_table=table)  # in bounds: runs
    bad = [
        (table.clone().index_fill_(1, torch.tensor([3]), 9), positions, lines, "block ids"),
        (table.clone().index_fill_(1, torch.tensor([0]), -1), positions, lines, "block ids"),
        (table, torch.tensor([5, 32]), lines, "positions in"),  # 4 blocks of 8
        (table[:, :2].contiguous(), torch.tensor([5, 16]), lines, "positions in"),
        (table, positions, torch.tensor([0, 2]), "lines in"),
        (table.int(), positions, lines, "int64"),
        (table.T, positions, lines, "contiguous"),
        (None, positions, lines, "needs a block_table"),
    ]
    for block_table, p, line, message in bad:
        with pytest.raises(ValueError, match=message):
            native.rows(ids, p, line, block_table=block_table)
    with pytest.raises(ValueError, match="KV lines"):
        b.native.rows(ids, positions, lines, block_table=table)
    with pytest.raises(ValueError, match="block KV layout"):
        native.decode(ids, positions, lines)
    with pytest.raises(ValueError, match="block KV layout"):
        native.prefill(ids[None], torch.tensor([2]), torch.tensor([0]))
