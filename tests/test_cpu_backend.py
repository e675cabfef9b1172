"""The CPU backend honours NxDI's contract: buckets, KV lines by seq_id, phases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import bf16_kv, cache_close, close_to, hf_greedy
from tests.engine_checks import prefill_args
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import CpuBackend, kernels


@pytest.fixture()
def backend(tiny_llama, tmp_path):
    cfg = nc.resolve_neuron_config(
        tp_degree=1, max_num_seqs=4, max_model_len=128, dtype="float32",
        overrides={"context_encoding_buckets": [16, 64, 128],
                   "token_generation_buckets": [32, 128]},
    )
    b = CpuBackend(tiny_llama, cfg)
    b.compile(str(tmp_path))
    b.load(str(tmp_path))
    return b


def greedy(n):
    return torch.tensor([[1, 1.0, 1.0]] * n)


def spy(backend, name):
    calls = []
    original = getattr(backend.model, name)

    def wrapped(*args):
        calls.append(args)
        return original(*args)

    setattr(backend.model, name, wrapped)
    return calls


def test_buckets_are_chosen_first_fit(backend):
    prefill = spy(backend, "context_encode")
    decode = spy(backend, "token_generate")
    ids = torch.arange(3, 3 + 40)[None]
    backend.forward(ids, torch.arange(40)[None], torch.tensor([2]), greedy(1))
    # 40 tokens -> the 64 bucket; the CPU computes only up to the prompt (rounded to 16)
    assert prefill[-1][0].shape == (1, 48)
    backend.forward(torch.tensor([[7]]), torch.tensor([[40]]), torch.tensor([2]), greedy(1))
    assert decode[-1][3] == 128  # position 40 -> first token bucket > 40
    ids = torch.arange(3, 3 + 16)[None]
    backend.forward(ids, torch.arange(16)[None], torch.tensor([0]), greedy(1))
    assert prefill[-1][0].shape == (1, 16)  # exactly 16 tokens: strictly larger bucket, 64
    backend.forward(torch.tensor([[7]]), torch.tensor([[16]]), torch.tensor([0]), greedy(1))
    assert decode[-1][3] == 32


def test_kv_lines_are_independent_and_match_hf(backend, tiny_llama):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    lines = [3, 0, 1]
    steps = 6
    out = backend.forward(*prefill_args(prompts, lines), greedy(3)).tokens.tolist()
    seqs = [p + [t] for p, t in zip(prompts, out, strict=True)]
    for _ in range(steps - 1):
        order = sorted(range(3), key=lambda i: lines[i])  # decode rows sorted by seq_id
        tokens = backend.forward(
            torch.tensor([[seqs[i][-1]] for i in order]),
            torch.tensor([[len(seqs[i]) - 1] for i in order]),
            torch.tensor([lines[i] for i in order]),
            greedy(3),
        ).tokens.tolist()
        for i, t in zip(order, tokens, strict=True):
            seqs[i].append(t)
    expected = hf_greedy(tiny_llama, prompts, [steps] * 3)
    assert [s[len(p):] for s, p in zip(seqs, prompts, strict=True)] == expected


def test_contract_violations_are_refused(backend):
    backend.forward(torch.tensor([[5, 6]]), torch.tensor([[0, 1]]), torch.tensor([0]), greedy(1))
    backend.forward(torch.tensor([[5, 6]]), torch.tensor([[0, 1]]), torch.tensor([1]), greedy(1))
    with pytest.raises(ValueError, match="sorted ascending"):
        backend.forward(torch.tensor([[1], [2]]), torch.tensor([[2], [2]]),
                        torch.tensor([1, 0]), greedy(2))
    with pytest.raises(ValueError, match="must not be mixed"):
        backend.forward(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.tensor([0]),
                        greedy(1))
    with pytest.raises(ValueError, match="seq_ids must be KV lines"):
        backend.forward(torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([4]), greedy(1))
    with pytest.raises(ValueError, match="top_k"):
        backend.forward(torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([0]),
                        torch.tensor([[999, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        backend.forward(torch.ones((1, 129), dtype=torch.long), torch.arange(129)[None],
                        torch.tensor([0]), greedy(1))


def test_logits_when_on_device_sampling_is_off(tiny_llama, tmp_path):
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=1, max_model_len=64,
                                   dtype="float32", on_device_sampling_disabled=True)
    b = CpuBackend(tiny_llama, cfg)
    b.compile(str(tmp_path))
    b.load(str(tmp_path))
    out = b.forward(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), torch.tensor([0]),
                    greedy(1))
    assert out.tokens is None and out.logits.shape == (1, 512)
    assert out.logits.dtype == torch.float32


def test_bf16_runs_in_fp32_activations_except_torch_on_bf16_units(monkeypatch):
    """A kernel variant multiplies bf16 weights as stored (fp32 activations); the torch
    path computes bf16 only where the CPU has bf16 units."""
    import vllm_neuronx.backends.cpu.backend as cpu

    variant = kernels.VARIANTS[0]
    for units in (False, True):
        monkeypatch.setattr(cpu, "native_bf16", lambda units=units: units)
        assert cpu.compute_dtype(torch.bfloat16, variant) is torch.float32
        assert cpu.compute_dtype(torch.float32, None) is torch.float32
    assert cpu.compute_dtype(torch.bfloat16, None) is torch.bfloat16
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert cpu.compute_dtype(torch.bfloat16, None) is torch.float32


def use_kernel(monkeypatch, name: str):
    """Force a kernel variant (VLLM_NEURONX_CPU_KERNEL); skip where this CPU cannot run it."""
    variant = {v.name: v for v in kernels.VARIANTS}.get(name)
    if variant is not None and not kernels.runs_here(variant):
        pytest.skip(f"this CPU cannot run the {name} kernel (needs {', '.join(variant.needs)})")
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", name)
    return variant


NATIVE = [v.name for v in kernels.VARIANTS]
EVERY_PATH = [*NATIVE, kernels.TORCH]


@pytest.mark.parametrize("name", NATIVE)
def test_bf16_kernel_computes_fp32_matmul_of_bf16_weights(monkeypatch, name):
    variant = use_kernel(monkeypatch, name)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        assert kernels.build(folder, variant)
        matmul = kernels.load(folder, variant)
    torch.manual_seed(0)
    # columns not a multiple of the panel, rows across blocks of 8, odd k
    for m, n, k in [(1, 37, 48), (3, 960, 576), (4, 5, 16), (9, 7, 33), (17, 100, 64),
                    (32, 200, 576), (130, 49, 20), (300, 100, 64)]:
        # 9+ rows: panels widened (AVX2); 16+: AMX tiles (prefetching under 64 rows,
        # panels shared out dynamically from 128); 300: the weight widened for MKL (AVX-512)
        w = torch.randn(n, k).bfloat16()
        x = torch.randn(m, k)
        got = matmul(x, matmul.pack(w))
        torch.testing.assert_close(got, x @ w.float().T, **close_to(name, 1e-5, 1e-4))
    with pytest.raises(ValueError, match="columns"):
        matmul(torch.randn(2, 8), matmul.pack(torch.randn(4, 16).bfloat16()))


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_bf16_on_fp32_units_matches_hf_on_the_same_weights(tiny_llama, tmp_path, monkeypatch,
                                                           kernel):
    """bf16 requested on a CPU without bf16 units: weights stored in bf16 and multiplied
    in fp32 by the native kernel (or, without AVX-512, widened to fp32 for torch's
    matmul). HF transformers computing in fp32 over the same bf16-rounded weights gives
    the same greedy tokens, for 1, 3 and 6 rows at once; with the kernel, decode steps
    run natively whole (decode_step.c)."""
    b = bf16_backend_without_bf16_units(tiny_llama, tmp_path, monkeypatch, kernel)
    assert b.model.dtype is torch.float32
    assert b.kernel == kernel
    assert (b.matmul is not None) == (b.native is not None) == (kernel != kernels.TORCH)
    if b.matmul is not None:  # no fp32 copies of the matmul weights
        from vllm_neuronx.backends.cpu.kernels import PackedWeight

        assert isinstance(b.model.w["layers.0.qkv"], PackedWeight)
    else:
        assert b.model.w["layers.0.qkv"].dtype is torch.float32
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [3] * 20, [40, 41], [7, 8, 9, 10]]
    steps = 5
    expected = hf_greedy(tiny_llama, prompts, [steps] * len(prompts),
                         weights_in=torch.bfloat16)
    for group in (prompts[:1], prompts[:3], prompts):
        assert backend_greedy(b, group, steps) == expected[:len(group)]


def backend_greedy(b, prompts, steps, lines=None):
    """Greedy continuations of ``steps`` tokens, all prompts batched in each call."""
    n = len(prompts)
    lines = list(range(n)) if lines is None else lines
    seqs = [p + [t] for p, t in zip(
        prompts, b.forward(*prefill_args(prompts, lines), greedy(n)).tokens.tolist(),
        strict=True)]
    for _ in range(steps - 1):
        tokens = b.forward(torch.tensor([[s[-1]] for s in seqs]),
                           torch.tensor([[len(s) - 1] for s in seqs]),
                           torch.tensor(lines), greedy(n)).tokens.tolist()
        for s, t in zip(seqs, tokens, strict=True):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


def bf16_backend_without_bf16_units(model, folder, monkeypatch, kernel: str, max_num_seqs=8):
    import vllm_neuronx.backends.cpu.backend as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    use_kernel(monkeypatch, kernel)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=max_num_seqs, max_model_len=128,
                                   dtype="bfloat16")
    b = CpuBackend(model, cfg)
    folder.mkdir(exist_ok=True)
    b.compile(str(folder))
    b.load(str(folder))
    return b


def check_native_decode_matches_torch(b) -> None:
    """One native decode step against llama.py's torch decode from the same KV lines
    (scattered lines, rows at different positions, one past a chunk of 64 scores):
    the same logits and the same K/V written."""
    m = b.model
    assert b.native is not None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 30]
    lines = [1, 4, 7]
    b.forward(*prefill_args(prompts, lines), greedy(3))
    ids, positions = torch.tensor([20, 21, 22]), torch.tensor([5, 2, 90])
    cache = m.k_cache.clone(), m.v_cache.clone()
    native = b.native.decode(ids, positions, torch.tensor(lines))
    native_cache = m.k_cache.clone(), m.v_cache.clone()
    m.k_cache.copy_(cache[0])
    m.v_cache.copy_(cache[1])
    reference = m.token_generate(ids, positions, torch.tensor(lines), 128)
    torch.testing.assert_close(native, reference, **close_to(b.kernel, 1e-4, 1e-4,
                                                             kv_bf16=bf16_kv(m)))
    torch.testing.assert_close(native_cache[0], m.k_cache,
                               **cache_close(b.kernel, 1e-5, 1e-5, m.k_cache))
    torch.testing.assert_close(native_cache[1], m.v_cache,
                               **cache_close(b.kernel, 1e-5, 1e-5, m.v_cache))


@pytest.mark.parametrize("kernel", NATIVE)
@pytest.mark.parametrize("head_dim", [24, 64])
def test_native_decode_step_matches_the_torch_decode(tmp_path, monkeypatch, head_dim, kernel):
    """decode_step.c against llama.py's torch decode on the same weights and cache:
    scattered KV lines, rows at different positions (one past a chunk of 64 scores), a
    head size that is not a multiple of the vector width (24) and one the attention
    specialises (64)."""
    from tests.conftest import make_tiny_llama

    hidden = 4 * head_dim
    model = make_tiny_llama(tmp_path / "model", hidden_size=hidden, num_attention_heads=4,
                            num_key_value_heads=2)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    check_native_decode_matches_torch(b)
    step = b.native.step
    for rows, width in [(step.max_rows + 1, hidden), (2, hidden - 1)]:
        with pytest.raises(ValueError, match="rows"):
            step(torch.zeros(rows, width), torch.zeros(rows, dtype=torch.long),
                 torch.zeros(rows, dtype=torch.long))
    for position, line in [(-1, 0), (128, 0), (3, -1), (3, 8)]:  # 128 positions, 8 lines
        with pytest.raises(ValueError, match="positions in"):
            step(torch.zeros(1, hidden), torch.tensor([position]), torch.tensor([line]))
    for position in (-1, 128):  # the backend says so first, for either decode path
        with pytest.raises(ValueError, match="decode positions"):
            b.forward(torch.tensor([[5]]), torch.tensor([[position]]), torch.tensor([1]),
                      greedy(1))


def test_a_native_step_is_timed_by_phase_only_while_asked(tmp_path, monkeypatch):
    """cpu_backend.py --phases: each phase of a dense model's step takes some time, none
    is counted off, and together they fit in the call."""
    import time

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", hidden_size=256, num_attention_heads=4,
                            num_key_value_heads=2)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, "avx2")
    step = b.native.step
    b.forward(*prefill_args([[5, 6, 7]], [0]), greedy(1))
    step.phase_times()
    b.native.decode(torch.tensor([8]), torch.tensor([3]), torch.tensor([0]))
    assert set(step.phase_times().values()) == {0.0}
    step.time_phases(True)
    try:
        start = time.perf_counter()
        b.native.decode(torch.tensor([9]), torch.tensor([4]), torch.tensor([0]))
        wall_ms = (time.perf_counter() - start) * 1e3
        phases = step.phase_times()
    finally:
        step.time_phases(False)
    assert phases["experts"] == 0.0
    assert all(ms > 0 for name, ms in phases.items() if name != "experts"), phases
    assert sum(phases.values()) <= wall_ms
    assert set(step.phase_times().values()) == {0.0}  # read, then zero


def check_native_prefill(b, kernel: str, prompts, lines) -> tuple:
    """``b``'s native prefill of ``prompts`` on KV ``lines``, from empty caches, against
    llama.py's padded torch prefill: the same last-token logits and K/V at the prompts'
    positions. Returns the padded ids, lengths and lines."""
    m = b.model
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    lines = torch.tensor(lines)
    m.k_cache.zero_()
    m.v_cache.zero_()
    native = b.native.prefill(ids, lengths, lines)
    native_cache = m.k_cache.clone(), m.v_cache.clone()
    m.k_cache.zero_()
    m.v_cache.zero_()
    reference, _ = m.context_encode(ids, lengths, lines)
    torch.testing.assert_close(native, reference,
                               **close_to(kernel, 1e-4, 1e-4, kv_bf16=bf16_kv(m)))
    for line, n in zip(lines.tolist(), lengths.tolist(), strict=True):  # the real positions
        for cache, ref in zip(native_cache, (m.k_cache, m.v_cache), strict=True):
            torch.testing.assert_close(cache[:, line, :, :n], ref[:, line, :, :n],
                                       **cache_close(kernel, 1e-5, 1e-5, ref))
    return ids, lengths, lines


@pytest.mark.parametrize("kernel", NATIVE)
def test_native_prefill_matches_the_torch_prefill(tmp_path, monkeypatch, kernel):
    """A small prefill runs as one native step over the prompts' real tokens, a bigger one
    as several: the same last-token logits and KV lines as llama.py's padded torch prefill."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", hidden_size=256, num_attention_heads=4,
                            num_key_value_heads=2)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    b.native.prefill_rows = b.native.step.max_rows + 1  # native whatever the variant
    check_native_prefill(b, kernel, [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 30], [1, 4, 7])
    with pytest.raises(ValueError, match="out_rows"):
        b.native.step(torch.zeros(2, 256), torch.tensor([0, 1]), torch.tensor([0, 0]),
                      torch.tensor([2]))

    # More tokens in all than one step takes (no sgemm threshold): native steps of 40
    # rows in row order, cut through prompts (5 + 2 + 30 + 3 of the 20, then 17 + 23 of
    # the 50, then its last 27), a prompt longer than a step included: the same logits
    # and KV lines. With a threshold (AVX-512: sgemm from 256 rows) the torch path takes
    # a prefill of more tokens in all than it.
    b.native.step.max_rows, b.native.split_prefills = 40, True
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14] * 10, [15, 16] * 10, [17] * 50]
    ids, lengths, lines = check_native_prefill(b, kernel, prompts, [0, 2, 3, 5, 6])
    b.native.split_prefills, b.native.prefill_rows = False, 40
    assert b.native.prefill(ids, lengths, lines) is None


@pytest.mark.parametrize("kernel", NATIVE)
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [
    (4, 2, 64, None), (6, 2, 64, None), (4, 4, 32, None), (16, 1, 16, None), (6, 2, 64, 7)])
def test_prompt_rows_attend_as_the_torch_prefill(tmp_path, monkeypatch, kernel, heads,
                                                 kv_heads, head_dim, window):
    """Prompts of 16+ tokens attend a block of rows at a time, one (row, query head) to a
    lane (decode_step.c attend_prompts, AVX-512 builds): blocks that a prompt ends inside,
    1 to 5 rows a block, a sliding window shorter than the prompt. The same last-token
    logits and KV lines as llama.py's torch prefill (itself against HF above)."""
    from tests.conftest import make_tiny_llama

    extra = {"mistral": True, "sliding_window": window} if window else {}
    model = make_tiny_llama(tmp_path / "model", hidden_size=heads * head_dim,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, **extra)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    b.native.prefill_rows = b.native.step.max_rows + 1  # one native step, every variant
    prompts = [list(range(5, 45)), [10, 11], list(range(100, 117)), [7, 8, 9] * 8]
    check_native_prefill(b, kernel, prompts, [0, 2, 3, 5])


@pytest.mark.parametrize("kernel", EVERY_PATH)
def test_sliding_window_matches_hf(tmp_path, monkeypatch, kernel):
    """A Mistral whose sliding window (6) is shorter than its prompts and generations:
    prefill and decode both attend only inside the window, as HF transformers does."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", mistral=True, sliding_window=6)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    assert b.spec.sliding_window == 6
    assert (b.native is not None) == (kernel != kernels.TORCH)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [10, 11], [12, 13, 14] * 4]
    steps = 8
    expected = hf_greedy(model, prompts, [steps] * 3, weights_in=torch.bfloat16)
    assert backend_greedy(b, prompts, steps) == expected


def test_a_kernel_that_cannot_load_falls_back_to_widened_weights(tiny_llama, tmp_path,
                                                                 monkeypatch, caplog):
    """A folder on a noexec mount (Docker's /dev/shm, where an unwritable cache compiles
    to) cannot map the kernel: the backend widens the weights and serves."""
    import ctypes

    import vllm_neuronx.backends.cpu.backend as cpu

    if kernels.chosen() is None:
        pytest.skip("no kernel variant runs on this CPU")
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="bfloat16")
    b = CpuBackend(tiny_llama, cfg)
    b.compile(str(tmp_path))
    assert (tmp_path / b.variant.library).exists()

    def refuse(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    b.load(str(tmp_path))
    assert b.matmul is None and b.model.w["layers.0.qkv"].dtype is torch.float32
    assert "cannot load the kernel" in caplog.text
    out = b.forward(*prefill_args([[5, 6, 7]], [0]), greedy(1))
    assert out.tokens.shape == (1,)


def test_a_kernel_built_once_is_copied_into_later_folders(tmp_path, monkeypatch):
    """The second artifacts folder takes a copy of the first build (same sources, flags and
    compiler) instead of compiling again; the copy loads."""
    variant = kernels.chosen()
    if variant is None:
        pytest.skip("no kernel variant runs on this CPU")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # -O1: the copy is what is tested, and gcc takes 9 s over the sources, not 32 (AMX
    # Xeon); the flags are part of the key, so the digest is dropped on both sides.
    monkeypatch.setattr(kernels, "FLAGS", ("-O1", *kernels.FLAGS[1:]))
    kernels.source_digest.cache_clear()
    try:
        assert kernels.build(str(tmp_path), variant)
        kept = list((tmp_path / "cache").rglob(variant.library))
        assert len(kept) == 1

        def no_compiler(*args, **kwargs):
            raise AssertionError("compiled again")

        monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
        again = tmp_path / "again"
        again.mkdir()
        assert kernels.build(str(again), variant)
        assert kernels.load(str(again), variant) is not None
    finally:
        monkeypatch.undo()
        kernels.source_digest.cache_clear()


@pytest.mark.parametrize("cc", ["/bin/false", "/nonexistent/cc"])
def test_a_compiler_that_fails_leaves_no_kernel(tmp_path, monkeypatch, cc):
    variant = kernels.chosen()
    if variant is None:
        pytest.skip("no kernel variant runs on this CPU")
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: cc if name == cc else None)
    assert kernels.build(str(tmp_path), variant) is False
    assert kernels.load(str(tmp_path), variant) is None


@pytest.mark.parametrize("kernel", NATIVE)
def test_a_model_with_biases_decodes_through_torch_and_matches_hf(tmp_path, monkeypatch, kernel):
    """The native step has no biases: a Llama with attention biases keeps the kernel for
    its matmuls and decodes through llama.py's torch path, with HF's tokens."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model", attention_bias=True)
    b = bf16_backend_without_bf16_units(model, tmp_path / "artifacts", monkeypatch, kernel)
    assert b.matmul is not None and b.native is None
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    assert backend_greedy(b, prompts, 5) == hf_greedy(model, prompts, [5, 5],
                                                     weights_in=torch.bfloat16)


def test_the_structs_python_passes_to_native_code_have_the_header_layout(tmp_path):
    """kernels.h declares Layer and Model once; the layout the C compiler gives them
    (layout.c, built here without the AVX-512 flags so it runs on any CPU) is what
    Python's ctypes view must match, and a view that differs is refused by name."""
    import ctypes
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path / "layout.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", str(Path(kernels.HERE) / "layout.c"),
                    "-o", str(lib)], check=True)
    native = ctypes.CDLL(str(lib))
    kernels.check_layout(native)

    class Layer(ctypes.Structure):  # a field missing: every offset after it moves
        _fields_ = [(name, ctypes.c_void_p) for name in ("ln1", "qkv", "o")]

    with pytest.raises(kernels.LayoutMismatch, match="kernels.h's Layer"):
        kernels.check_layout(native, (Layer,))


def test_the_kernel_variant_follows_the_cpu_flags_and_the_variable(monkeypatch):
    """auto takes the best variant the CPU's flags allow; VLLM_NEURONX_CPU_KERNEL forces
    one, and a name that is no variant, or one this CPU cannot run, is refused by name
    (at config time, through the backend's validate)."""
    monkeypatch.delenv("VLLM_NEURONX_CPU_KERNEL", raising=False)

    def cpu(*flags):
        monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(flags))

    avx512 = ("sse4_2", "avx2", "fma", "f16c", "avx512f", "avx512bw")
    cpu(*avx512, "avx512_bf16", "amx_bf16", "amx_tile")  # Sapphire Rapids
    assert kernels.chosen().name == "amx"
    assert kernels.cpu_class().name.startswith("AMX")
    cpu(*avx512, "avx512_bf16")  # Zen 4: the torch path, until its serving is understood
    assert kernels.chosen() is None
    cpu(*avx512)
    assert kernels.chosen().name == "avx512"
    cpu("sse4_2", "avx2", "fma", "f16c")
    assert kernels.chosen().name == "avx2"
    cpu("sse4_2", "avx2", "f16c")  # AVX2 without FMA
    assert kernels.chosen() is None
    cpu("avx2", "fma", "f16c")
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "torch")
    assert kernels.chosen() is None
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "AVX2")
    assert kernels.chosen().name == "avx2"
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "avx512")
    lacks = "lacks avx512bw, avx512f; it runs avx2, torch"
    with pytest.raises(kernels.KernelChoiceError, match=lacks):
        kernels.chosen()
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "amx")
    cpu(*avx512, "avx512_bf16")
    lacks = "lacks amx_bf16, amx_tile; it runs avx512, avx2, torch"
    with pytest.raises(kernels.KernelChoiceError, match=lacks):
        kernels.chosen()
    monkeypatch.setenv("VLLM_NEURONX_CPU_KERNEL", "neon")
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="bfloat16")
    with pytest.raises(nc.NeuronConfigError, match="choose one of amx, avx512, avx2, torch"):
        CpuBackend.validate(cfg)
