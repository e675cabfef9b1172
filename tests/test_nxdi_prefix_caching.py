"""Prefix caching on NxDI's block KV layout, through NxdiBackend and the NxDI simulator
(tests/simulators): the neuron config NxDI receives, greedy tokens equal to HF transformers'
with prefixes read from cached blocks (vLLM's hits, at and past block boundaries), a cached
prefix longer than NxDI's largest prefix bucket computed partly again instead of NxDI's
assert, and what NxDI cannot compile with it refused by name. The simulator computes real
attention through the blocks (a wrong block table gives wrong tokens)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from vllm import LLM, SamplingParams

from tests.conftest import hf_greedy
from tests.engine_checks import use_nxdi_simulator
from vllm_neuronx import block_kv
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.worker.inputs import SequenceRow, decode_inputs, prefill_inputs, with_blocks

BLOCK = 16
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 4
GREEDY = (1, 1.0, 1.0)
SYSTEM = list(range(100, 148))  # three blocks


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def generate(llm, prompts, n):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def prefills(sim, since: int) -> list[dict]:
    return [f for f in list(sim.SIM_FORWARDS)[since:] if f["phase"] == "prefill"]


def make_llm(model, tmp_path_factory, **kw):
    artifacts = tmp_path_factory.mktemp("nxdi-pc-artifacts") / "compiled"
    mp = pytest.MonkeyPatch()
    mp.setenv("NEURON_COMPILED_ARTIFACTS", str(artifacts))
    args = dict(model=model, device="neuron", enable_prefix_caching=True, block_size=BLOCK,
                max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True,
                dtype="float32")
    llm = LLM(**{**args, **kw})
    llm.artifacts = artifacts
    return llm, mp


@pytest.fixture(scope="module")
def llm(sim, tiny_llama, tmp_path_factory):
    llm, mp = make_llm(tiny_llama, tmp_path_factory)
    yield llm
    del llm
    mp.undo()


# -- the engine, end to end ---------------------------------------------------------------------
def test_engine_compiles_nxdis_block_keys(llm):
    with open(os.path.join(llm.artifacts, "neuron_config.json")) as f:
        cfg = json.load(f)["neuron_config"]
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks_override
    assert cfg["is_block_kv_layout"] and cfg["is_prefix_caching"]
    assert cfg["pa_block_size"] == BLOCK and cfg["pa_num_blocks"] == blocks
    assert blocks == MAX_NUM_SEQS * MAX_MODEL_LEN // BLOCK + 1

    def cache(worker):
        model = worker.model_runner.backend.model
        return tuple(model._runtime.k_cache.shape)

    # NxDI's cache: pa_num_blocks blocks and its sink for slot -1
    assert llm.collective_rpc(cache)[0][1:3] == (blocks + 1, BLOCK)


def test_engine_batch_1_and_the_same_prompt_twice(llm, sim, tiny_llama):
    prompt = list(range(5, 45))  # 2.5 blocks
    first, cached = generate(llm, [prompt], 30)  # the decodes cross two block boundaries
    since = len(sim.SIM_FORWARDS)
    second, cached_again = generate(llm, [prompt], 30)
    assert first == second == hf_greedy(tiny_llama, [prompt], [30])
    assert cached == [0] and cached_again == [32]
    (call,) = prefills(sim, since)
    assert call["computed_context_lens"].tolist() == [[32]] and call["buckets"] == [[128, 0]]


def test_engine_shared_system_prompt(llm, sim, tiny_llama):
    prompts = [SYSTEM + [7, 8, 9], SYSTEM + [10], SYSTEM + list(range(200, 220))]
    generate(llm, [SYSTEM + [1, 2]], 2)  # puts the system prompt's blocks in the cache
    since = len(sim.SIM_FORWARDS)
    outputs, cached = generate(llm, prompts, 12)
    assert outputs == hf_greedy(tiny_llama, prompts, [12] * 3)
    assert cached == [48, 48, 48]
    tables = torch.cat([f["block_table"] for f in prefills(sim, since)])
    assert len({tuple(t[:3].tolist()) for t in tables}) == 1  # the same three blocks read


@pytest.mark.parametrize(("length", "hits"), [(32, 16), (33, 32), (34, 32)])
def test_engine_hits_at_a_block_boundary_and_past_it(llm, tiny_llama, length, hits):
    """vLLM computes at least a prompt's last token: a prompt of whole blocks hits all but
    its last block; one token past a boundary hits every block before it."""
    prompt = [300 + length] + list(range(1, length))
    generate(llm, [prompt], 1)
    outputs, cached = generate(llm, [prompt], 20)
    assert outputs == hf_greedy(tiny_llama, [prompt], [20]) and cached == [hits]


def test_engine_prompts_diverging_after_a_shared_block(llm, tiny_llama):
    base = [401] + list(range(1, 40))
    generate(llm, [base], 1)
    prompts = [base[:32] + [9, 9, 9], base[:33] + [7], base[:16] + [5]]
    outputs, cached = generate(llm, prompts, 10)
    assert outputs == hf_greedy(tiny_llama, prompts, [10] * 3)
    assert cached == [32, 32, 16]


def test_engine_one_token_prompts(llm, sim, tiny_llama):
    """Alone, NxDI runs a one-token prompt as token generation (one token wide)."""
    since = len(sim.SIM_FORWARDS)
    alone, _ = generate(llm, [[77]], 5)
    assert list(sim.SIM_FORWARDS)[since]["phase"] == "decode"
    together, _ = generate(llm, [[78], [79, 80, 81]], 5)
    assert alone + together == hf_greedy(tiny_llama, [[77], [78], [79, 80, 81]], [5] * 3)


def test_engine_lora_with_prefix_caching(sim, tiny_llama, tmp_path_factory):
    """vLLM hashes a request's adapter into its blocks: each reuses its own prefix."""
    from vllm.lora.request import LoRARequest

    from tests.lora_utils import make_peft_adapter, peft_greedy

    adapter = make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("pc-lora"), seed=1, r=8)
    llm, mp = make_llm(tiny_llama, tmp_path_factory, enable_lora=True, max_loras=1,
                       max_lora_rank=8)
    try:
        prompt = list(range(5, 45))
        loras = [LoRARequest("a1", 1, adapter), None]
        want = peft_greedy(tiny_llama, adapter, [prompt], 6) + hf_greedy(tiny_llama, [prompt],
                                                                        [6])
        for cached in ([0, 0], [32, 32]):
            outs = llm.generate([{"prompt_token_ids": prompt}] * 2, params(6),
                                lora_request=loras, use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outs] == want
            assert [o.num_cached_tokens for o in outs] == cached
    finally:
        del llm
        mp.undo()


def test_engine_prefix_longer_than_the_prefix_buckets(sim, tiny_llama, tmp_path_factory):
    """NxDI asserts when the cached prefix it would read exceeds its largest prefix bucket:
    the adapter tells it of fewer cached blocks, which it computes again (slot -1)."""
    llm, mp = make_llm(tiny_llama, tmp_path_factory, max_model_len=384, max_num_seqs=2,
                       override_neuron_config={"context_encoding_buckets": [128, 256, 384],
                                               "prefix_buckets": [128]})
    try:
        prompt = [9] + list(range(20, 319))  # 300 tokens
        first, _ = generate(llm, [prompt], 4)
        since = len(sim.SIM_FORWARDS)
        second, cached = generate(llm, [prompt], 4)
        assert first == second == hf_greedy(tiny_llama, [prompt], [4])
        assert cached == [288]
        (call,) = prefills(sim, since)
        # 288 cached, 12 to compute: [128, x] would read 172 cached positions > 128; told of
        # 160 (140 to compute), NxDI picks [256, 128] and reads 44, recomputing 116
        assert call["computed_context_lens"].tolist() == [[160]]
        assert call["buckets"] == [[256, 128]]
        slots = call["slot_mapping"][0]
        assert (slots[:128] == -1).all() and (slots[128:140] >= 0).all()
    finally:
        del llm
        mp.undo()


def test_engine_refuses_what_nxdi_cannot_compile(tiny_llama, monkeypatch):
    monkeypatch.delenv("NEURON_COMPILED_ARTIFACTS", raising=False)  # the llm fixture's folder
    with pytest.raises(Exception, match="token_generation_batches"):
        LLM(model=tiny_llama, device="neuron", enable_prefix_caching=True, block_size=BLOCK,
            max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True,
            override_neuron_config={"token_generation_batches": [2]})


# -- NxdiBackend and the simulator --------------------------------------------------------------
def resolve(*, max_model_len=MAX_MODEL_LEN, block=BLOCK, overrides=None, num_blocks=None):
    layout = block_kv.resolve(overrides or {}, prefix_caching=True, chunked_prefill=None,
                              block_size=block, num_blocks=num_blocks,
                              max_num_seqs=MAX_NUM_SEQS, seq_len=max_model_len)
    return nc.resolve_neuron_config(tp_degree=1, max_num_seqs=MAX_NUM_SEQS,
                                    max_model_len=max_model_len, dtype="float32",
                                    overrides=overrides, block=layout)


def make_backend(model, folder=None, **kw):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    backend = NxdiBackend(str(model), resolve(**kw))
    if folder is not None:
        backend.compile(str(folder))
        backend.load(str(folder))
    return backend


def block_generate(backend, prompts, n, tables, cached=None):
    """Greedy decoding of each prompt on its own line with the blocks ``tables[i]`` (the
    first ``cached[i]`` positions already there), inputs built as the runner builds them."""
    layout = backend.block_layout
    rows = [SequenceRow(str(i), i, list(p), GREEDY, blocks=list(t), computed=c)
            for i, (p, t, c) in enumerate(zip(prompts, tables, cached or [0] * len(prompts),
                                              strict=True))]
    step = with_blocks(prefill_inputs(rows), rows, layout, backend.max_length)
    for _ in range(n):
        out = backend.forward(step.input_ids, step.position_ids, step.seq_ids,
                              step.sampling_params, blocks=step.blocks)
        by_id = {r.req_id: r for r in rows}
        for req_id, token in zip(step.req_ids, out.tokens.tolist(), strict=True):
            by_id[req_id].token_ids.append(token)
        step = with_blocks(decode_inputs(rows), rows, layout, backend.max_length)
    return [r.token_ids[len(p):] for r, p in zip(rows, prompts, strict=True)]


PROMPTS = [list(range(5, 40)), [3, 4] + list(range(60, 80))]
TABLES = [[3, 7, 9, 11, 12], [2, 4, 5]]


def test_backend_greedy_and_a_cached_prefix(sim, tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, tmp_path)
    ref = hf_greedy(tiny_llama, PROMPTS, [16, 16])
    assert block_generate(backend, PROMPTS, 16, TABLES) == ref
    # the first prompt again on another line, its two blocks read from the cache
    again = block_generate(backend, PROMPTS[:1], 16, [TABLES[0][:2] + [20, 21, 22]], [32])
    assert again == ref[:1]


def test_the_block_tkg_kernel_gets_minus_one_padding(sim, tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, tmp_path,
                           overrides={"attn_block_tkg_nki_kernel_enabled": True,
                                      "qkv_kernel_enabled": True})
    since = len(sim.SIM_FORWARDS)
    assert block_generate(backend, PROMPTS, 4, TABLES) == hf_greedy(tiny_llama, PROMPTS, [4, 4])
    decode = [f for f in list(sim.SIM_FORWARDS)[since:] if f["phase"] == "decode"][0]
    # the first decode: 36 positions in 3 blocks and 23 in 2 (a block beyond them is unused)
    assert decode["block_table"].tolist() == [[3, 7, 9] + [-1] * 5, [2, 4] + [-1] * 6]


def test_default_prefix_buckets_are_the_context_buckets(tiny_llama):
    backend = make_backend(tiny_llama, max_model_len=256,
                           overrides={"context_encoding_buckets": [128, 256]})
    assert backend.config.neuron_config.prefix_buckets == [128, 256]
    assert "prefix_buckets" not in backend.neuron_config  # derived, not a new artifacts key


def test_refit_prefix_finds_the_largest_prefix_nxdi_takes():
    from vllm_neuronx.backends.nxdi import PrefixBuckets

    buckets = PrefixBuckets((128, 256, 384), (0, 128), (256, 384))
    assert buckets.context_bucket(12, 288) is None  # NxDI's assert
    assert buckets.fit(300, 288, BLOCK) == 160
    assert buckets.context_bucket(140, 160) == (256, 128)
    assert buckets.fit(100, 64, BLOCK) == 64  # fits as it is
    assert PrefixBuckets((512,), (0, 512), (512,)).context_bucket(4, 296) == (512, 0)  # corner
    with pytest.raises(ValueError, match="fits none"):
        PrefixBuckets((128,), (0, 16), (256,)).fit(200, 160, BLOCK)


@pytest.mark.parametrize(("kw", "match"), [
    ({"overrides": {"token_generation_batches": [2]}}, "token_generation_batches"),
    ({"overrides": {"k_cache_transposed": True}}, "k_cache_transposed"),
    ({"overrides": {"prefix_buckets": [64]}}, "prefix_buckets are read only with "
                                              "context_encoding_buckets"),
    ({"overrides": {"context_encoding_buckets": [128], "prefix_buckets": [24]}},
     r"buckets \[24\] are not whole blocks"),
    ({"overrides": {"context_encoding_buckets": [128], "prefix_buckets": [64, 32]}},
     "ascending"),
    ({"overrides": {"context_encoding_buckets": [64, 128]}}, r"buckets \[64\] are narrower"),
    ({"max_model_len": 64}, r"buckets \[64\] are narrower than 128"),
    ({"max_model_len": 144, "block": 48}, r"pa_block_size=48 \(block_size\) with 3 blocks"),
])
def test_validate_names_what_nxdi_cannot_compile(kw, match):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    with pytest.raises(nc.NeuronConfigError, match=match):
        NxdiBackend.validate(resolve(**kw))


def test_validate_refuses_the_layout_without_prefix_caching():
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = resolve()
    with pytest.raises(nc.NeuronConfigError, match="without is_prefix_caching"):
        NxdiBackend.validate({**cfg, "is_prefix_caching": False})
    base = {k: v for k, v in cfg.items() if k not in block_kv.KEYS}
    with pytest.raises(nc.NeuronConfigError, match="needs is_block_kv_layout"):
        NxdiBackend.validate({**base, "is_prefix_caching": True})


def test_the_simulator_computes_through_the_blocks(sim, tiny_llama, tmp_path):
    """NxDI's preconditions and results on wrong inputs, calling its model directly."""
    backend = make_backend(tiny_llama, tmp_path)
    model = backend.model
    prompt = PROMPTS[0]
    ref = hf_greedy(tiny_llama, [prompt], [2])[0]
    assert block_generate(backend, [prompt], 1, TABLES[:1]) == [ref[:1]]

    def decode(table, slot=0):
        pos, token = len(prompt), ref[0]
        t = torch.zeros(1, MAX_MODEL_LEN // BLOCK, dtype=torch.long)
        t[0, :len(table)] = torch.tensor(table)
        out = model(torch.tensor([[token]]), seq_ids=torch.tensor([0]),
                    position_ids=torch.tensor([[pos]]), slot_mapping=torch.tensor([[slot]]),
                    block_table=t, full_context_lens=torch.tensor([[pos + 1]]),
                    computed_context_lens=torch.tensor([[pos]]),
                    sampling_params=torch.tensor([GREEDY]))
        return int(out.tokens[0])

    # the slot comes from the position and the table (slot_mapping only marks the row real)
    assert decode(TABLES[0], slot=12345) == ref[1]
    assert decode([TABLES[0][0], 30, TABLES[0][2]]) != ref[1]  # a wrong block is read
    with pytest.raises(IndexError, match="pa_num_blocks"):
        decode(TABLES[0][:2] + [backend.block_layout.num_blocks])
    with pytest.raises(TypeError, match="full_context_lens"):
        model(torch.tensor([[1]]), seq_ids=torch.tensor([0]), position_ids=torch.tensor([[3]]),
              sampling_params=torch.tensor([GREEDY]))


def test_a_prefix_past_the_largest_prefix_bucket(sim, tiny_llama, tmp_path):
    """NxDI's bare assert when called as is; through the adapter, HF's tokens."""
    backend = make_backend(tiny_llama, tmp_path, max_model_len=384, overrides={
        "context_encoding_buckets": [128, 384], "prefix_buckets": [128]})
    model = backend.model
    prompt = [11] + list(range(20, 319))  # 300 tokens: 19 blocks
    table = list(range(1, 20))
    ref = hf_greedy(tiny_llama, [prompt], [3])
    assert block_generate(backend, [prompt], 3, [table]) == ref
    with pytest.raises(AssertionError, match="exceeds largest bucket 128"):
        # 288 cached, 12 to compute: [128, x] would read 172 cached positions
        model(torch.tensor([prompt]), seq_ids=torch.tensor([1]),
              position_ids=torch.arange(300)[None],
              slot_mapping=torch.tensor([block_kv.slots(table, 288, 300, BLOCK)]),
              block_table=torch.tensor([table]), full_context_lens=torch.tensor([[300]]),
              computed_context_lens=torch.tensor([[288]]), sampling_params=torch.tensor([GREEDY]))
    since = len(sim.SIM_FORWARDS)
    assert block_generate(backend, [prompt], 3, [table], [288]) == ref
    (call,) = prefills(sim, since)
    # with up to 128 to compute NxDI reads 300 - 128 = 172 cached positions (> 128); with
    # more, its 384 bucket computes everything: told of 160 cached (140 to compute)
    assert call["computed_context_lens"].tolist() == [[160]] and call["buckets"] == [[384, 0]]


def test_a_folder_compiled_for_other_blocks_is_not_loaded(sim, tiny_llama, tmp_path):
    make_backend(tiny_llama, tmp_path)
    other = make_backend(tiny_llama, num_blocks=40)  # vLLM's block ids would reach past it
    with pytest.raises(ValueError, match="block KV layout"):
        other.load(str(tmp_path))
