"""LoRA on the CPU backend, at the backend's contract (no vLLM): each row's adapter is
bound to its KV line at prefill, and greedy tokens equal HF transformers with PEFT's
unmerged adapter, row by row, in batches that mix adapters and the base model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import bf16_kv, cache_close, close_to
from tests.engine_checks import prefill_args
from tests.lora_utils import make_peft_adapter, peft_greedy
from tests.test_cpu_backend import EVERY_PATH, NATIVE, bf16_backend_without_bf16_units, greedy
from tests.tiny_families import make_tiny
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend
from vllm_neuronx.backends.cpu.lora import FusedDelta, LoraWeights
from vllm_neuronx.backends.cpu.native import NativeStep
from vllm_neuronx.backends.protocol import NeuronBackend
from vllm_neuronx.lora import peft
from vllm_neuronx.lora.peft import TARGETS

MAX_RANK = 16


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Two full adapters (the second rsLoRA, another rank), and two partial ones."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": make_peft_adapter(tiny_llama, root / "a1", seed=1, r=8, alpha=16),
        "a2": make_peft_adapter(tiny_llama, root / "a2", seed=2, r=4, alpha=8,
                                use_rslora=True),
        "qv": make_peft_adapter(tiny_llama, root / "qv", seed=3, targets=("q_proj", "v_proj")),
        "up": make_peft_adapter(tiny_llama, root / "up", seed=4, targets=("up_proj",)),
        "qvup": make_peft_adapter(tiny_llama, root / "qvup", seed=6, r=MAX_RANK, alpha=8,
                                  targets=("q_proj", "v_proj", "up_proj")),
    }


def fp32_backend(model: str, folder, max_num_seqs: int = 4, max_loras: int = 2) -> CpuBackend:
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=max_num_seqs, max_model_len=128,
                                   dtype="float32")
    b = CpuBackend(model, cfg)
    folder.mkdir(exist_ok=True)
    b.compile(str(folder))
    b.load(str(folder))
    b.init_lora(max_loras=max_loras, max_lora_rank=MAX_RANK, max_cpu_loras=max_loras + 2)
    return b


def prepare(b: CpuBackend, name: str, path: str) -> LoraWeights:
    spec = peft.inspect(name, path, b.dims, MAX_RANK)
    return b.prepare_adapter(spec)


def lora_greedy(b, prompts, lines, handles, steps, live=()):
    """Greedy continuations: one prefill with each row's adapter (None: base), then
    decode steps (rows sorted by KV line, no adapter_ids: the lines carry them)."""
    n = len(prompts)
    ids = b.adapter_indices(handles, live)
    assert ids.dtype == torch.int32 and ids.shape == (n,)
    first = b.forward(*prefill_args(prompts, lines), greedy(n), adapter_ids=ids).tokens
    seqs = [p + [t] for p, t in zip(prompts, first.tolist(), strict=True)]
    order = sorted(range(n), key=lambda i: lines[i])
    for _ in range(steps - 1):
        tokens = b.forward(torch.tensor([[seqs[i][-1]] for i in order]),
                           torch.tensor([[len(seqs[i]) - 1] for i in order]),
                           torch.tensor([lines[i] for i in order]), greedy(n)).tokens.tolist()
        for i, t in zip(order, tokens, strict=True):
            seqs[i].append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


def references(model, paths, prompts, steps, weights_in=None):
    """HF + PEFT tokens for each row (path None: the base model), one model per adapter."""
    out = [None] * len(prompts)
    for path in dict.fromkeys(paths):
        rows = [i for i, p in enumerate(paths) if p == path]
        got = peft_greedy(model, path, [prompts[i] for i in rows], steps, weights_in=weights_in)
        for i, tokens in zip(rows, got, strict=True):
            out[i] = tokens
    return out


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [3] * 20, [40, 41, 42]]
STEPS = 6


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_a_batch_mixing_two_adapters_and_the_base_model_matches_hf_peft(
        tiny_llama, adapters, tmp_path, monkeypatch, kernel):
    """bf16 weights computed in fp32 (each kernel variant, and torch): rows of a1, a2
    (rsLoRA, rank 4) and the base model in one prefill, scattered lines, then decode
    steps that take each row's adapter from its line."""
    b = bf16_backend_without_bf16_units(tiny_llama, tmp_path, monkeypatch, kernel)
    b.init_lora(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    h1, h2 = prepare(b, "a1", adapters["a1"]), prepare(b, "a2", adapters["a2"])
    assert b.adapters.max_loras == 2 and h1.parts[0, "qkv"].a.dtype is torch.float32
    handles = [h1, h2, None, h1, None]
    paths = [None if h is None else h.spec.path for h in handles]
    lines = [6, 0, 3, 1, 7]
    got = lora_greedy(b, PROMPTS, lines, handles, STEPS)
    expected = references(tiny_llama, paths, PROMPTS, STEPS, weights_in=torch.bfloat16)
    assert got == expected
    base = references(tiny_llama, [None] * 5, PROMPTS, STEPS, weights_in=torch.bfloat16)
    assert all(got[i] != base[i] for i in (0, 1, 3))  # the adapters change the tokens


@pytest.mark.parametrize("kernel", NATIVE)
def test_steps_with_and_without_adapter_rows_run_natively(tiny_llama, adapters, tmp_path,
                                                          monkeypatch, kernel):
    """LoRA on: a step whose rows all run the base model takes the native step with no
    slots (nothing extra to do); a step with an adapter row takes it with each row's
    slot, prefill and decode, and never the torch path."""
    b = bf16_backend_without_bf16_units(tiny_llama, tmp_path, monkeypatch, kernel)
    b.init_lora(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    h1 = prepare(b, "a1", adapters["a1"])
    calls = []
    for phase in ("prefill", "decode"):  # a slotted class: patched on the class
        native = getattr(NativeStep, phase)
        monkeypatch.setattr(NativeStep, phase, lambda self, *args, _phase=phase, _f=native: (
            calls.append((_phase, None if args[3] is None else args[3].tolist()))
            or _f(self, *args)))
    for name in ("token_generate", "context_encode"):
        torch_step = getattr(b.model, name)
        setattr(b.model, name, lambda *args, _f=torch_step: calls.append("torch") or _f(*args))
    lora_greedy(b, [[5, 6, 7]], [2], [None], 2)
    assert calls == [("prefill", None), ("decode", None)]
    calls.clear()
    lora_greedy(b, [[5, 6, 7], [8, 9]], [1, 3], [h1, None], 2)
    assert calls == [("prefill", [1, 0]), ("decode", [1, 0])]


def lora_batch(b, adapters):
    """A prefill's worth of rows mixing a1, qvup (q, v and up only, rank 16) and the base
    model on scattered lines, bound as the backend binds them: the padded prompts, their
    lengths and lines, and the step's LoraStep."""
    h1, h2 = prepare(b, "a1", adapters["a1"]), prepare(b, "qvup", adapters["qvup"])
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 30, [3] * 20, [40, 41, 42]]
    handles = [h1, h2, None, h2, h1]
    lines = torch.tensor([6, 0, 3, 1, 7])
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros((len(prompts), 96), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    lora = b.adapters.bind(lines, b.adapter_indices(handles, ()))
    assert lora.slots.tolist() == [1, 2, 0, 2, 1]
    return ids, lengths, lines, lora


@pytest.mark.parametrize("kernel", NATIVE)
def test_native_lora_matches_the_torch_path(tiny_llama, adapters, tmp_path, monkeypatch,
                                            kernel):
    """decode_step.c with adapter rows against llama.py's torch path (lora.py's math), on
    the same bf16 weights, adapters and cache: a prefill and then a decode step mixing a
    full adapter, one of q, v and up only (the fused k and gate columns untouched) and
    base rows give the same logits and K/V; base rows get exactly the logits of a step
    without adapters."""
    b = bf16_backend_without_bf16_units(tiny_llama, tmp_path, monkeypatch, kernel)
    b.init_lora(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=2)
    m, native = b.model, b.native
    ids, lengths, lines, lora = lora_batch(b, adapters)
    native.prefill_rows = native.step.max_rows + 1  # native whatever the variant
    got = native.prefill(ids, lengths, lines, lora.slots)
    cache = m.k_cache.clone(), m.v_cache.clone()
    m.k_cache.zero_()
    m.v_cache.zero_()
    reference, _ = m.context_encode(ids, lengths, lines, (), lora)
    torch.testing.assert_close(got, reference,
                               **close_to(kernel, 1e-4, 1e-4, kv_bf16=bf16_kv(m)))
    for line, n in zip(lines.tolist(), lengths.tolist(), strict=True):
        for ours, ref in zip(cache, (m.k_cache, m.v_cache), strict=True):
            torch.testing.assert_close(ours[:, line, :, :n], ref[:, line, :, :n],
                                       **cache_close(kernel, 1e-5, 1e-5, ref))
    base = native.prefill(ids, lengths, lines)
    assert torch.equal(got[2], base[2]) and not torch.allclose(got[[0, 1, 3, 4]],
                                                               base[[0, 1, 3, 4]])
    # a decode step: rows in line order, each with its line's adapter
    order = lines.argsort()
    seq_ids, positions = lines[order], lengths[order]
    tokens = torch.tensor([20, 21, 22, 23, 24])
    step = b.adapters.bound(seq_ids)
    assert step.slots.tolist() == lora.slots[order].tolist()
    m.k_cache.copy_(cache[0])
    m.v_cache.copy_(cache[1])
    got = native.decode(tokens, positions, seq_ids, step.slots)
    after = m.k_cache.clone(), m.v_cache.clone()
    m.k_cache.copy_(cache[0])
    m.v_cache.copy_(cache[1])
    reference = m.token_generate(tokens, positions, seq_ids, 128, step)
    torch.testing.assert_close(got, reference,
                               **close_to(kernel, 1e-4, 1e-4, kv_bf16=bf16_kv(m)))
    torch.testing.assert_close(after[0], m.k_cache,
                               **cache_close(kernel, 1e-5, 1e-5, m.k_cache))
    torch.testing.assert_close(after[1], m.v_cache,
                               **cache_close(kernel, 1e-5, 1e-5, m.v_cache))
    base_rows = (step.slots == 0).nonzero().flatten()
    m.k_cache.copy_(cache[0])
    m.v_cache.copy_(cache[1])
    base = native.decode(tokens, positions, seq_ids)
    assert torch.equal(got[base_rows], base[base_rows])


@pytest.mark.parametrize("kernel", NATIVE)
def test_native_lora_descriptors_follow_the_slots(tiny_llama, adapters, tmp_path, monkeypatch,
                                                  kernel):
    """Each slot's descriptors point at the adapter AdapterSlots gave it (only the kinds
    it adapts), are emptied when it leaves, and take the next one; bad slots and bad
    tensors are refused before native code sees them."""
    b = bf16_backend_without_bf16_units(tiny_llama, tmp_path, monkeypatch, kernel)
    b.init_lora(max_loras=2, max_lora_rank=MAX_RANK, max_cpu_loras=3)
    step = b.native.step
    assert step.lora_slots == 3 and step._model.lora_rank == 3 * MAX_RANK
    tables = step._lora
    h1, qv, up = (prepare(b, n, adapters[n]) for n in ("a1", "qv", "up"))
    assert b.adapter_indices([h1, qv], ()).tolist() == [1, 2]
    delta = qv.parts[0, "qkv"]
    assert tables["qkv"][0][2].a == delta.a.data_ptr() and tables["qkv"][0][2].rank == 16
    assert tables["qkv"][0][2].parts == 2 and delta.spans.tolist() == [[0, 8, 0, 64],
                                                                        [8, 16, 96, 128]]
    assert tables["gate_up"][1][2].rank == 0 and tables["o"][1][1].rank == 8
    assert all(tables[k][i][0].rank == 0 for k in tables for i in range(2))  # slot 0: base
    b.release_adapter(qv)
    assert all(tables[k][i][2].rank == 0 and not tables[k][i][2].a for k in tables
               for i in range(2))
    assert b.adapter_indices([up], [h1]).tolist() == [2]
    assert tables["gate_up"][0][2].bt == up.parts[0, "gate_up"].bt.data_ptr()
    assert tables["qkv"][0][2].rank == 0
    with pytest.raises(ValueError, match="slot 3"):
        step.set_slot(3, h1)
    bad = prepare(b, "a1", adapters["a1"])
    a, bt, spans = (getattr(bad.parts[0, "o"], f) for f in ("a", "bt", "spans"))
    past_columns = torch.tensor([[0, 8, 0, 65]], dtype=torch.int32)
    for parts in [(a.double(), bt, spans), (a[:, :-1], bt, spans),  # fp64; not [r, 64]
                  (a.repeat(7, 1), bt.repeat(7, 1), spans),  # rank 56 > 3 x 16
                  (a, bt, past_columns)]:
        bad.parts[0, "o"] = FusedDelta(*parts)
        with pytest.raises(ValueError, match="layer 0 o: the native step needs"):
            step.set_slot(1, bad)
    assert tables["o"][0][1].a == h1.parts[0, "o"].a.data_ptr()  # untouched by the refusals
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="slots must be"):
        step(x, torch.tensor([0]), torch.tensor([0]), None, torch.tensor([3]))


def test_adapters_of_some_modules_only(tiny_llama, adapters, tmp_path):
    """q and v only (qkv's k rows untouched), and up only (gate_up's gate rows
    untouched), beside a full adapter and the base model."""
    b = fp32_backend(tiny_llama, tmp_path, max_loras=3)
    handles = [prepare(b, "qv", adapters["qv"]), prepare(b, "up", adapters["up"]),
               prepare(b, "a1", adapters["a1"]), None]
    qv, up = handles[0], handles[1]
    assert set(qv.parts) == {(0, "qkv"), (1, "qkv")}
    assert set(up.parts) == {(0, "gate_up"), (1, "gate_up")}
    b_qkv = qv.parts[0, "qkv"].b
    q, kv = 64, 32  # the tiny model: 4 heads and 2 KV heads of 16
    assert b_qkv.shape == (q + 2 * kv, 16) and not b_qkv[q:q + kv].any()
    assert qv.parts[0, "qkv"].spans.tolist() == [[0, 8, 0, q], [8, 16, q + kv, q + 2 * kv]]
    b_up = up.parts[0, "gate_up"].b
    assert b_up.shape == (2 * 128, 8) and not b_up[:128].any() and b_up[128:].any()
    assert up.parts[0, "gate_up"].spans.tolist() == [[0, 8, 128, 256]]
    prompts = PROMPTS[:4]
    paths = [adapters["qv"], adapters["up"], adapters["a1"], None]
    got = lora_greedy(b, prompts, [0, 1, 2, 3], handles, STEPS)
    assert got == references(tiny_llama, paths, prompts, STEPS)


# Family -> the adapter's targets: Qwen2's q/k/v biases and Qwen3's q/k norms come
# around the delta; MoE layers' experts take none (Qwen3-MoE's layer 0 is dense).
FAMILY_TARGETS = {
    "qwen2": TARGETS,
    "qwen3": TARGETS,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3_moe": r".*self_attn\.[qkvo]_proj|.*layers\.0\.mlp\.(gate|up|down)_proj",
}


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_families_with_adapters_match_hf_peft(tmp_path, family):
    model = make_tiny(tmp_path / "model", family)
    adapter = make_peft_adapter(model, tmp_path / "a1", seed=5, targets=FAMILY_TARGETS[family])
    b = fp32_backend(model, tmp_path / "artifacts")
    h1 = prepare(b, "a1", adapter)
    if family == "qwen3_moe":
        assert {kind for _, kind in h1.parts} == {"qkv", "o", "gate_up", "down"}
        assert {layer for layer, kind in h1.parts if kind == "down"} == {0}
    prompts = PROMPTS[:3]
    got = lora_greedy(b, prompts, [1, 0, 2], [h1, None, h1], STEPS)
    assert got == references(model, [adapter, None, adapter], prompts, STEPS)


def test_a_line_reused_after_an_adapter_carries_no_adapter(tiny_llama, adapters, tmp_path):
    """An a1 request on line 0, then a base request on the same line: base tokens, with
    the runner's indices (0) and with no adapter_ids at all."""
    b = fp32_backend(tiny_llama, tmp_path)
    h1 = prepare(b, "a1", adapters["a1"])
    prompt = [[5, 6, 7, 8, 9]]
    with_adapter = lora_greedy(b, prompt, [0], [h1], STEPS)
    assert with_adapter == peft_greedy(tiny_llama, adapters["a1"], prompt, STEPS)
    base = peft_greedy(tiny_llama, None, prompt, STEPS)
    assert base != with_adapter
    assert lora_greedy(b, prompt, [0], [None], STEPS) == base
    lora_greedy(b, prompt, [0], [h1], 2)
    first = b.forward(*prefill_args(prompt, [0]), greedy(1)).tokens.tolist()  # no ids
    decoded = b.forward(torch.tensor([[first[0]]]), torch.tensor([[5]]), torch.tensor([0]),
                        greedy(1)).tokens.tolist()
    assert first + decoded == base[0][:2]


def test_adapter_slots_are_bounded_and_least_recently_used(tiny_llama, adapters, tmp_path):
    """max_loras=2: three adapters in one prefill, or two running plus a new one, is a
    scheduling bug (RuntimeError); a new adapter takes the slot of the least recently
    used one no running request needs; a line whose adapter lost its slot refuses to
    decode; a released adapter frees its slot."""
    b = fp32_backend(tiny_llama, tmp_path)
    h1, h2, h3 = (prepare(b, n, adapters[n]) for n in ("a1", "a2", "qv"))
    with pytest.raises(RuntimeError, match="more than max_loras=2"):
        b.adapter_indices([h1, h2, h3], ())
    assert b.adapter_indices([h1, None, h1], ()).tolist() == [1, 0, 1]
    assert b.adapter_indices([h2], [h1]).tolist() == [2]
    with pytest.raises(RuntimeError, match="more than max_loras=2"):
        b.adapter_indices([h3], [h1, h2])
    # a1 runs on line 0 and a2 on line 1; a2's request ends, qv takes a2's slot
    prompts = [[5, 6, 7], [8, 9]]
    lora_greedy(b, prompts, [0, 1], [h1, h2], 1)
    assert b.adapter_indices([h3], [h1]).tolist() == [2]
    b.forward(*prefill_args([[10, 11]], [2]), greedy(1), adapter_ids=torch.tensor([2]))
    with pytest.raises(RuntimeError, match=r"KV lines \[1\].*lost its slot"):
        b.forward(torch.tensor([[1], [2]]), torch.tensor([[3], [2]]), torch.tensor([0, 1]),
                  greedy(2))
    b.forward(torch.tensor([[1], [2]]), torch.tensor([[3], [2]]), torch.tensor([0, 2]),
              greedy(2))  # a1 kept its slot, qv has a2's
    b.release_adapter(h1)
    assert b.adapter_indices([h2], [h3]).tolist() == [1]  # a1's slot, now free


def test_adapter_ids_are_checked(tiny_llama, adapters, tmp_path):
    b = fp32_backend(tiny_llama, tmp_path)
    h1 = prepare(b, "a1", adapters["a1"])
    b.adapter_indices([h1], ())
    args = prefill_args([[5, 6, 7]], [0])
    b.forward(*args, greedy(1), adapter_ids=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="a decode row's adapter is the one its KV line was "
                                         "bound to at prefill"):
        b.forward(torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([0]), greedy(1),
                  adapter_ids=torch.tensor([1]))
    for bad, match in [(torch.tensor([1, 1]), r"must be \[1\] integers"),
                       (torch.tensor([1.0]), r"must be \[1\] integers"),
                       (torch.tensor([-1]), ">= 0"),
                       (torch.tensor([3]), r"in \[0, 2\]"),
                       (torch.tensor([2]), "hold no adapter")]:
        with pytest.raises(ValueError, match=match):
            b.forward(*args, greedy(1), adapter_ids=bad)
    plain = CpuBackend(tiny_llama, b.neuron_config)
    plain.load(str(tmp_path))
    with pytest.raises(ValueError, match="without LoRA"):
        plain.forward(*args, greedy(1), adapter_ids=torch.tensor([0]))
    with pytest.raises(RuntimeError, match="init_lora"):
        plain.adapter_indices([None], ())


def test_a_backend_without_lora_says_so():
    class Bare(NeuronBackend):
        framework = "bare"
        compile = _load = prefill = decode = vocab_size = None

    bare = Bare("/nowhere", {})
    for call in (lambda: bare.init_lora(1, 8, 1), lambda: bare.prepare_adapter(None),
                 lambda: bare.release_adapter(None), lambda: bare.adapter_indices([], ())):
        with pytest.raises(NotImplementedError, match="the bare backend serves no LoRA"):
            call()


def test_smollm2_batch_mixing_two_adapters_and_the_base_model_matches_hf_peft(tmp_path):
    """The default model in fp32: a1, a2 and base rows in one batch."""
    from transformers import AutoTokenizer

    from vllm_neuronx.default_model import default_model_path

    model = default_model_path()
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "Hello, my name is",
                                              "def fibonacci(n):", "Water boils at")]
    a1 = make_peft_adapter(model, tmp_path / "a1", seed=1, b_scale=0.1)
    a2 = make_peft_adapter(model, tmp_path / "a2", seed=2, r=16, alpha=16, b_scale=0.1,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    b = fp32_backend(model, tmp_path / "artifacts")
    h1, h2 = prepare(b, "a1", a1), prepare(b, "a2", a2)
    handles = [h1, h2, None, h1]
    paths = [a1, a2, None, a1]
    steps = 8
    got = lora_greedy(b, prompts, [2, 0, 1, 3], handles, steps)
    expected = references(model, paths, prompts, steps)
    assert got == expected
    assert got[0] != references(model, [None], prompts[:1], steps)[0]

