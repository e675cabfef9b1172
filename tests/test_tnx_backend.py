"""The transformers-neuronx backend against a strict TNx simulator (tests/simulators).

End to end through LLM.generate (greedy tokens equal HF's, continuous batching,
aborts) and directly: buckets from the env, neuron_quant, per-line sampling
pushed to the device, warm loads of saved graphs, and a simulator that refuses
what real TNx would mis-execute.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tests.conftest import hf_greedy, make_tiny_llama
from tests.engine_checks import (
    check_aborts_free_lines,
    check_greedy_matches_hf,
    prefill_args,
    use_simulator,
)
from vllm_neuronx import neuron_config as nc

MAX_NUM_SEQS = 3


@pytest.fixture(scope="module", autouse=True)
def tnx_env():
    mp = pytest.MonkeyPatch()
    for var in ("NEURON_CONTEXT_LENGTH_BUCKETS", "NEURON_TOKEN_GEN_BUCKETS", "NEURON_QUANT_DTYPE",
                "NEURON_COMPILED_ARTIFACTS", "NEURON_ON_DEVICE_SAMPLING_DISABLED"):
        mp.delenv(var, raising=False)
    yield from use_simulator("transformers_neuronx", "tnx",
                             VLLM_NEURON_FRAMEWORK="transformers-neuronx")
    mp.undo()


@pytest.fixture()
def sim(tnx_env):
    return tnx_env


def make_backend(model, tmp_path, *, max_num_seqs=4, max_model_len=128, ods=True, overrides=None,
                 quantization=None, compile_it=True):
    from vllm_neuronx.backends.tnx import TnxBackend

    cfg = nc.resolve_neuron_config(
        tp_degree=2, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype="float32",
        overrides=overrides, on_device_sampling_disabled=not ods,
    )
    backend = TnxBackend(model, cfg, quantization=quantization)
    if compile_it:
        backend.compile(str(tmp_path))
        backend.load(str(tmp_path))
    return backend


def greedy(n):
    return torch.tensor([[1, 1.0, 1.0]] * n)


# -- end to end through vLLM ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tnx_env, tiny_llama):
    from vllm import LLM

    tnx_env.reset_counters()
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2)
    yield llm
    del llm


def test_generate_greedy_matches_hf_with_continuous_batching(llm, tiny_llama, sim):

    rng = random.Random(3)
    lengths = [1, 37, 5, 120, 2, 64, 1, 17]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    before = dict(sim.SIM_CALLS)
    check_greedy_matches_hf(llm, tiny_llama, prompts, max_tokens)
    # (c) it ran on TNx's API: one context-encoding run per prompt, decode steps, and the
    # per-line greedy settings pushed to the device.
    assert sim.SIM_CALLS["context"] - before["context"] == len(prompts)
    assert sim.SIM_CALLS["decode"] - before["decode"] >= max(max_tokens) - 1
    assert sim.SIM_CALLS["update_generation_config"] > before["update_generation_config"]


def test_the_engine_was_built_through_transformers_neuronx(llm, sim):
    settings = llm.llm_engine.vllm_config.additional_config["neuron_settings"]
    assert (settings["framework"], settings["backend"]) == ("transformers-neuronx", "tnx")
    # The LLM's start compiled once and saved TNx's graphs (the llm fixture reset the
    # counters; later tests only add to them).
    assert sim.SIM_CALLS["from_pretrained"] >= 1
    assert sim.SIM_CALLS["compile"] >= 1 and sim.SIM_CALLS["save"] >= 1
    assert sim.SIM_CALLS["to_neuron"] >= 1 and sim.SIM_CALLS["forward"] >= 1


def test_aborted_requests_free_their_kv_lines(llm):
    check_aborts_free_lines(llm, MAX_NUM_SEQS, "tnx-abort")


def test_sampled_requests_push_their_settings_to_their_kv_lines(llm, sim):
    from vllm import SamplingParams

    before = sim.SIM_CALLS["update_generation_config"]
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=6, ignore_eos=True,
                             detokenize=False),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)]
    out = llm.generate([{"prompt_token_ids": [9, 8, 7]}, {"prompt_token_ids": [4, 5]}], params)
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    assert sim.SIM_CALLS["update_generation_config"] > before


def test_requests_needing_logits_are_refused_with_the_tnx_hint(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(temperature=0, max_tokens=2, logprobs=1, detokenize=False)
    with pytest.raises((ValueError, VLLMValidationError),
                       match="NEURON_ON_DEVICE_SAMPLING_DISABLED"):
        llm.generate([{"prompt_token_ids": [5, 6]}], params)


# -- direct unit tests ---------------------------------------------------------------------
def test_model_class_and_arguments_follow_tnx(tiny_llama, tmp_path, sim):
    backend = make_backend(tiny_llama, tmp_path, overrides={
        "context_encoding_buckets": [16, 64], "token_generation_buckets": [32, 128]})
    model = backend.model
    assert type(model).__name__ == "LlamaForSampling"
    assert type(model).__module__ == "transformers_neuronx.llama.model"
    assert (model.context_buckets, model.token_buckets) == ([16, 64], [32, 128])
    assert (model.batch_size, model.tp_degree, model.amp) == (4, 2, "f32")
    cfg = model.neuron_config
    assert cfg.continuous_batching.batch_size_for_shared_caches == 4
    assert (cfg.attention_layout, cfg.collectives_layout, cfg.fuse_qkv) == ("BSH", "BSH", True)
    assert cfg.quant is None and cfg.weight_tiling is False
    gen = cfg.on_device_generation
    assert (gen.per_batch_line, gen.dynamic, gen.global_top_k) == (True, True, 256)
    assert gen.top_k == [256] * 4


def test_bucket_env_vars_are_honoured(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_CONTEXT_LENGTH_BUCKETS", "8, 32,64")
    monkeypatch.setenv("NEURON_TOKEN_GEN_BUCKETS", "64,128")
    backend = make_backend(tiny_llama, tmp_path)
    assert backend.context_buckets == [8, 32, 64] == backend.model.context_buckets
    assert backend.token_buckets == [64, 128] == backend.model.token_buckets
    # a prompt longer than the largest context bucket is refused, naming the variable
    ids, pos, lines = prefill_args([list(range(3, 3 + 70))], [0])
    with pytest.raises(ValueError, match="NEURON_CONTEXT_LENGTH_BUCKETS"):
        backend.forward(ids, pos, lines, greedy(1))


@pytest.mark.parametrize(("var", "value", "match"), [
    ("NEURON_CONTEXT_LENGTH_BUCKETS", "64,abc", "NEURON_CONTEXT_LENGTH_BUCKETS='64,abc'"),
    ("NEURON_CONTEXT_LENGTH_BUCKETS", "64,32", "ascending"),
    ("NEURON_TOKEN_GEN_BUCKETS", "0,128", "NEURON_TOKEN_GEN_BUCKETS.*positive"),
    ("NEURON_TOKEN_GEN_BUCKETS", "32,64", "NEURON_TOKEN_GEN_BUCKETS.*max_model_len=128"),
    ("NEURON_CONTEXT_LENGTH_BUCKETS", "64,256", "NEURON_CONTEXT_LENGTH_BUCKETS.*n_positions"),
])
def test_invalid_bucket_env_values_are_named(monkeypatch, var, value, match):
    from vllm_neuronx.backends.tnx import TnxBackend

    monkeypatch.setenv(var, value)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="float32")
    with pytest.raises(nc.NeuronConfigError, match=match):
        TnxBackend.validate(cfg)


@pytest.mark.parametrize("dtype", ["s8", "f8e4m3fn"])
def test_neuron_quant_builds_tnx_quantization(tiny_llama, tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("NEURON_QUANT_DTYPE", dtype)
    backend = make_backend(tiny_llama, tmp_path, quantization="neuron_quant")
    cfg = backend.model.neuron_config
    quant = cfg.quant
    assert (quant.quant_dtype, quant.dequant_dtype, quant.quantize_method) == (
        dtype, "f32", "vector_dynamic")
    assert cfg.weight_tiling is True
    out = backend.forward(*prefill_args([[5, 6, 7]], [1]), greedy(1))
    assert out.tokens.shape == (1,) and 0 <= int(out.tokens[0]) < backend.vocab_size


def test_quantization_is_checked_at_config_time(monkeypatch):
    from vllm_neuronx.backends.tnx import TnxBackend

    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="bfloat16")
    TnxBackend.validate(cfg, quantization="neuron_quant")  # s8 by default
    monkeypatch.setenv("NEURON_QUANT_DTYPE", "int4")
    with pytest.raises(nc.NeuronConfigError, match="NEURON_QUANT_DTYPE='int4'"):
        TnxBackend.validate(cfg, quantization="neuron_quant")
    with pytest.raises(nc.NeuronConfigError, match="quantization='awq'"):
        TnxBackend.validate(cfg, quantization="awq")
    with pytest.raises(nc.NeuronConfigError, match="'sequence_parallel_enabled'"):
        TnxBackend.validate({**cfg, "sequence_parallel_enabled": True})


def test_sampling_settings_are_pushed_per_kv_line_when_they_change(tiny_llama, tmp_path, sim):
    backend = make_backend(tiny_llama, tmp_path)
    history = backend.model.sim_generation_configs
    params = torch.tensor([[5, 0.9, 0.7], [1, 1.0, 1.0]])
    out = backend.forward(*prefill_args([[5, 6, 7], [8, 9]], [2, 0]), params)
    assert out.tokens.shape == (2,)
    pushed = history[-1]
    assert (pushed.per_batch_line, pushed.dynamic, pushed.global_top_k) == (True, True, 256)
    assert pushed.top_k == [1, 256, 5, 256]  # indexed by KV line, not by row
    assert pushed.top_p == pytest.approx([1.0, 1.0, 0.9, 1.0])
    assert pushed.temperature == pytest.approx([1.0, 1.0, 0.7, 1.0])
    updates = backend.generation_updates
    # decode rows (sorted by line) with unchanged settings: nothing is pushed
    backend.forward(out.tokens[[1, 0]][:, None], torch.tensor([[2], [3]]), torch.tensor([0, 2]),
                    torch.tensor([[1, 1.0, 1.0], [5, 0.9, 0.7]]))
    assert backend.generation_updates == updates
    # a new request on line 1 changes that line only
    backend.forward(*prefill_args([[4, 4]], [1]), torch.tensor([[3, 0.5, 2.0]]))
    assert backend.generation_updates == updates + 1
    assert history[-1].top_k == [1, 3, 5, 256] and history[-1].temperature[1] == 2.0


def test_tokens_match_hf_with_unsorted_rows_and_one_token_prompts(tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, tmp_path, ods=False)  # logits mode
    prompts, lines = [[5, 6, 7, 8, 9], [10, 11, 12]], [3, 1]
    seqs = [list(p) for p in prompts]
    out = backend.forward(*prefill_args(prompts, lines), greedy(2))
    assert out.tokens is None and out.logits.shape == (2, backend.vocab_size)
    for s, t in zip(seqs, out.logits.argmax(-1).tolist(), strict=True):
        s.append(t)
    # a 1-token prompt joins on line 0 while lines 1 and 3 are mid-sequence; TNx's
    # token-generation graph would overwrite their position 0, so it must not be used
    late = [42]
    seqs.append(list(late))
    out = backend.forward(*prefill_args([late], [0]), greedy(1))
    seqs[2].append(int(out.logits.argmax(-1)))
    lines.append(0)
    for _ in range(4):
        rows = [2, 0, 1]  # deliberately not sorted by line (0, 3, 1)
        out = backend.forward(
            torch.tensor([[seqs[r][-1]] for r in rows]),
            torch.tensor([[len(seqs[r]) - 1] for r in rows]),
            torch.tensor([lines[r] for r in rows]),
            greedy(3),
        )
        for r, t in zip(rows, out.logits.argmax(-1).tolist(), strict=True):
            seqs[r].append(t)
    all_prompts = prompts + [late]
    expected = hf_greedy(tiny_llama, all_prompts, [5, 5, 5])
    assert [s[len(p):] for s, p in zip(seqs, all_prompts, strict=True)] == expected


def test_saved_graphs_load_without_compiling(tiny_llama, tmp_path, sim):
    folder = tmp_path / "artifacts"
    folder.mkdir()
    first = make_backend(tiny_llama, folder)
    ids, pos, lines = prefill_args([[5, 6, 7, 8]], [1])
    expected = first.forward(ids, pos, lines, greedy(1)).tokens
    before = dict(sim.SIM_CALLS)
    warm = make_backend(tiny_llama, folder, compile_it=False)
    warm.load(str(folder))
    assert sim.SIM_CALLS["load"] == before["load"] + 1
    assert sim.SIM_CALLS["compile"] == before["compile"]
    assert torch.equal(warm.forward(ids, pos, lines, greedy(1)).tokens, expected)
    # graphs for other buckets are not there: TNx's own FileNotFoundError
    other = make_backend(tiny_llama, folder, compile_it=False,
                         overrides={"context_encoding_buckets": [32, 128]})
    with pytest.raises(FileNotFoundError, match="matching NEFF"):
        other.load(str(folder))
    with pytest.raises(RuntimeError, match="load"):
        other.forward(ids, pos, lines, greedy(1))


def test_unsupported_architecture_is_a_clear_error(tmp_path, sim):
    from vllm_neuronx.backends.tnx import TnxBackend

    path = make_tiny_llama(tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf["architectures"] = ["Qwen2ForCausalLM"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=128,
                                   dtype="float32")
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM.*LlamaForCausalLM.*Mistral"):
        TnxBackend(path, cfg)


# -- the simulator is strict ---------------------------------------------------------------------
def test_simulator_refuses_bad_calls(tiny_llama, tmp_path, sim):
    from transformers_neuronx import ContinuousBatchingConfig, LlamaForSampling, NeuronConfig

    def build(**kw):
        return LlamaForSampling.from_pretrained(
            tiny_llama, tp_degree=1, amp="f32", batch_size=2, n_positions=[128],
            context_length_estimate=[64],
            neuron_config=NeuronConfig(
                continuous_batching=ContinuousBatchingConfig(batch_size_for_shared_caches=2)),
            **kw)

    with pytest.raises(TypeError, match="bogus"):
        build(bogus=1)
    with pytest.raises(TypeError, match="fuse_qvk"):
        NeuronConfig(fuse_qvk=True)
    model = build()
    ids, pos, _ = prefill_args([[5, 6, 7]], [0])
    with pytest.raises(sim.SimulatorError, match="to_neuron"):
        model(ids, cache_ids=pos, start_ids=torch.tensor([0]))
    model.to_neuron()
    with pytest.raises(sim.SimulatorError, match=r"start_ids \[2\]"):
        model(ids, cache_ids=pos, start_ids=torch.tensor([2]))
    with pytest.raises(AssertionError, match="prompt length"):
        model(torch.ones((1, 65), dtype=torch.long), cache_ids=torch.arange(65)[None],
              start_ids=torch.tensor([0]))
    two_ids, two_pos, _ = prefill_args([[5, 6, 7], [8, 9]], [0, 1])
    # prefill rows may come in any line order: line 1 holds 3 positions, line 0 holds 2
    model(two_ids, cache_ids=two_pos, start_ids=torch.tensor([1, 0]))
    with pytest.raises(sim.SimulatorError, match="sorted"):
        model(torch.tensor([[3], [4]]), cache_ids=torch.tensor([[3], [2]]),
              start_ids=torch.tensor([1, 0]))
    with pytest.raises(sim.SimulatorError, match="does not continue"):
        model(torch.tensor([[3]]), cache_ids=torch.tensor([[7]]), start_ids=torch.tensor([0]))
    # a width-1 call is token generation, padded to the whole batch: line 0 is not in it,
    # so its position 0 is overwritten and continuing it is refused
    model(torch.tensor([[4]]), cache_ids=torch.tensor([[3]]), start_ids=torch.tensor([1]))
    with pytest.raises(sim.SimulatorError, match="overwritten"):
        model(torch.tensor([[3]]), cache_ids=torch.tensor([[2]]), start_ids=torch.tensor([0]))
    from transformers_neuronx import GenerationConfig

    with pytest.raises(sim.SimulatorError, match="on_device_generation"):
        model.update_generation_config(GenerationConfig(per_batch_line=True, top_k=[1, 1]))


def test_simulator_checks_generation_config_values(tiny_llama, tmp_path, sim):
    from transformers_neuronx import GenerationConfig

    backend = make_backend(tiny_llama, tmp_path, max_num_seqs=2)
    model = backend.model

    def push(**kw):
        args = dict(per_batch_line=True, top_k=[1, 1], top_p=[1.0, 1.0], temperature=[1.0, 1.0],
                    dynamic=True, global_top_k=256)
        model.update_generation_config(GenerationConfig(**{**args, **kw}))

    push()
    with pytest.raises(ValueError, match="top_k"):
        push(top_k=[1, 300])
    with pytest.raises(ValueError, match="top_p"):
        push(top_p=[0.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        push(temperature=[1.0, -1.0])
    with pytest.raises(AssertionError, match="batch_size=2"):
        push(top_k=[1, 1, 1])
    with pytest.raises(AssertionError, match="per_batch_line"):
        push(per_batch_line=False, top_k=1, top_p=1.0, temperature=1.0)
