"""Multi-LoRA through the NxDI backend and the NxDI simulator (tests/simulators).

The simulator keeps NxDI's own LoRA rules (LoraServingConfig's constructor, the
LoraModelManager's ids and caches, the device slots, the per-seq_id binding) and applies
adapters with the CPU backend's LoRA math, so tokens are real: every request's greedy
tokens equal HF transformers with PEFT's unmerged adapter. The sabotage tests show the
simulator would catch the bug issue 19 started from (base rows sent as index 0 without
NxDI's base-model dummy) and a one-token prompt sent unpadded.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from tests.engine_checks import prefill_args, use_nxdi_simulator
from tests.lora_utils import make_peft_adapter, peft_greedy
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.lora import peft

MAX_NUM_SEQS = 3
RANK = 8


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Four random PEFT adapters: every projection, q/v/up only, and two more."""
    root = tmp_path_factory.mktemp("nxdi-adapters")
    return {
        "a1": make_peft_adapter(tiny_llama, root / "a1", seed=1, r=RANK),
        "a2": make_peft_adapter(tiny_llama, root / "a2", seed=2, r=4, alpha=8,
                                targets=("q_proj", "v_proj", "up_proj")),
        "a3": make_peft_adapter(tiny_llama, root / "a3", seed=3, r=RANK, use_rslora=True),
        "a4": make_peft_adapter(tiny_llama, root / "a4", seed=4, r=RANK,
                                targets=("o_proj", "down_proj")),
    }


@pytest.fixture(scope="module")
def dims(tiny_llama):
    with open(os.path.join(tiny_llama, "config.json")) as f:
        return peft.ModelDims.from_hf(json.load(f))


def greedy(n: int) -> torch.Tensor:
    return torch.tensor([[1, 1.0, 1.0]] * n)


def vllm_lora(max_loras=2, max_lora_rank=RANK, max_cpu_loras=None):
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank,
                      max_cpu_loras=max_cpu_loras)


def neuron_cfg(*, max_num_seqs=4, lora=None, overrides=None, **kw):
    """A resolved neuron config with vLLM's LoRA settings in it, as the platform puts them."""
    from vllm_neuronx.backends.nxdi import vllm_lora_config

    overrides = dict(overrides or {})
    if lora is not None:
        overrides["lora_config"] = vllm_lora_config(overrides.get("lora_config"), lora)
    return nc.resolve_neuron_config(tp_degree=1, max_num_seqs=max_num_seqs, max_model_len=128,
                                    dtype="float32", overrides=overrides, **kw)


def lora_backend(model_path, folder, *, max_loras=2, max_cpu_loras=None, **kw):
    """A compiled and loaded NxdiBackend serving adapters, as the runner sets it up."""
    from vllm_neuronx.backends.nxdi import NxdiBackend

    lora = vllm_lora(max_loras, RANK, max_cpu_loras)
    backend = NxdiBackend(str(model_path), neuron_cfg(lora=lora, **kw))
    backend.compile(str(folder))
    backend.load(str(folder))
    backend.init_lora(lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras)
    return backend


def run(backend, prompts, handles, lines, steps=5):
    """Prefill with each row's adapter, then ``steps`` decodes: each row's new tokens."""
    ids, pos, seq = prefill_args(prompts, lines)
    adapter_ids = backend.adapter_indices(handles, [])
    tokens = backend.forward(ids, pos, seq, greedy(len(prompts)),
                             adapter_ids=adapter_ids).tokens.tolist()
    seqs = [list(p) + [t] for p, t in zip(prompts, tokens, strict=True)]
    for _ in range(steps):
        out = backend.forward(torch.tensor([[s[-1]] for s in seqs]),
                              torch.tensor([[len(s) - 1] for s in seqs]), seq,
                              greedy(len(seqs))).tokens.tolist()
        for s, t in zip(seqs, out, strict=True):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


# -- LoraServingConfig from vLLM's settings ------------------------------------------------------
def test_lora_serving_config_follows_vllms_settings(sim, tiny_llama):
    from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

    from vllm_neuronx.backends.nxdi import NxdiBackend, lora_serving_kwargs

    cfg = neuron_cfg(max_num_seqs=5, lora=vllm_lora(max_loras=2, max_cpu_loras=4))
    assert cfg["lora_config"] == {"max_loras": 2, "max_lora_rank": RANK, "max_cpu_loras": 4}
    assert lora_serving_kwargs(cfg) == {
        "max_loras": 2, "max_lora_rank": RANK, "max_cpu_loras": 4, "batch_size": 5,
        "dynamic_multi_lora": True, "enable_base_model_only": True,
        "base_model_quantized": False, "target_modules": list(peft.TARGETS)}
    lora = NxdiBackend(tiny_llama, cfg).config.neuron_config.lora_config
    assert isinstance(lora, LoraServingConfig)
    # NxDI's dummy adapter (the base model) takes a device slot and a host slot
    assert (lora.max_loras, lora.max_cpu_loras, lora.batch_size) == (3, 5, 5)
    assert lora.enable_base_model_only and lora.dynamic_multi_lora
    assert lora.target_modules == list(peft.TARGETS) and lora.max_lora_rank == RANK
    # max_cpu_loras defaults to max_loras, as in vLLM
    assert neuron_cfg(lora=vllm_lora(max_loras=3))["lora_config"]["max_cpu_loras"] == 3
    assert lora_serving_kwargs(neuron_cfg()) is None
    quantized = neuron_cfg(lora=vllm_lora(), overrides={
        "quantized": True, "quantized_checkpoints_path": "/tmp/q"})
    assert lora_serving_kwargs(quantized)["base_model_quantized"] is True


def test_legacy_overrides_and_user_keys_merge(tiny_llama, adapters):
    from vllm_neuronx.backends.nxdi import NxdiBackend, lora_serving_kwargs

    cfg = neuron_cfg(lora=vllm_lora(max_loras=2, max_cpu_loras=2), overrides={
        "lora_modules": [{"name": "legacy", "path": adapters["a2"]}],
        "target_modules": ["q_proj", "v_proj", "up_proj"],
        "lora_config": {"eviction_policy": "lfu"}})
    args = lora_serving_kwargs(cfg)
    assert args["lora_ckpt_paths"] == {"legacy": adapters["a2"]}
    assert args["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    assert args["eviction_policy"] == "lfu"
    # NxDI's CPU cache holds the start-up adapters besides the max_cpu_loras vLLM streams
    assert args["max_cpu_loras"] == 3
    lora = NxdiBackend(tiny_llama, cfg).config.neuron_config.lora_config
    assert lora.lora_ckpt_paths == {"legacy": adapters["a2"]}
    assert lora.lora_ckpt_paths_cpu == {"legacy": adapters["a2"]}  # dynamic: CPU ones too


@pytest.mark.parametrize("overrides, match", [
    ({"lora_config": {"enable_base_model_only": False}}, "enable_base_model_only=True"),
    ({"lora_config": {"dynamic_multi_lora": False}}, "dynamic_multi_lora=True"),
    ({"lora_config": {"batch_size": 1}}, "batch_size=4"),
    ({"lora_config": {"max_loras": 5}}, r"lora_config.max_loras=5 contradicts vLLM's "
                                        r"max_loras=2 \(--max-loras\)"),
    ({"target_modules": ["lm_head"]}, "adapt only"),
    ({"save_sharded_checkpoint": True}, "save_sharded_checkpoint with LoRA"),
    ({"fused_qkv": True}, "fused_qkv with LoRA"),
])
def test_what_nxdi_cannot_serve_is_refused_by_name(overrides, match):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    with pytest.raises(nc.NeuronConfigError, match=match):
        NxdiBackend.validate(neuron_cfg(lora=vllm_lora(), overrides=overrides))


def test_an_nxdi_without_the_base_model_dummy_is_refused(sim, tiny_llama, monkeypatch):
    """NxDI 0.8 (SDK 2.28) has no enable_base_model_only: index 0 would be an adapter."""
    from vllm_neuronx import nxdi_keys
    from vllm_neuronx import nxdi_keys_table as table
    from vllm_neuronx.backends import nxdi
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = neuron_cfg(lora=vllm_lora())
    NxdiBackend.validate(cfg)
    old = nxdi_keys.key_set("NxDI 0.8.0", table.RELEASES["0.8.0"]["keys"])
    monkeypatch.setattr(nc, "neuron_config_keys", lambda: old)
    with pytest.raises(nc.NeuronConfigError, match=r"Neuron SDK 2\.29\): LoraServingConfig of "
                                                    r"NxDI 0\.8\.0 has no enable_base_model_only"):
        NxdiBackend.validate(cfg)
    NxdiBackend.validate(neuron_cfg())  # without LoRA, 0.8 serves
    monkeypatch.undo()

    # The class itself is checked too (a source the key reader could not follow).
    from neuronx_distributed_inference.modules import lora_serving

    class Release08(lora_serving.LoraServingConfig):
        def __init__(self, max_loras=1, max_lora_rank=16, max_cpu_loras=100, batch_size=1,
                     target_modules=None, dynamic_multi_lora=False):
            super().__init__(max_loras, max_lora_rank, max_cpu_loras, batch_size,
                             target_modules, dynamic_multi_lora=dynamic_multi_lora)

    monkeypatch.setattr(lora_serving, "LoraServingConfig", Release08)
    with pytest.raises(nc.NeuronConfigError, match="takes no enable_base_model_only"):
        nxdi.NxdiBackend(tiny_llama, cfg)


# -- the backend's LoRA methods against the simulator --------------------------------------------
def test_mixed_adapters_and_base_rows_match_peft(sim, tiny_llama, adapters, dims, tmp_path):
    backend = lora_backend(tiny_llama, tmp_path)
    h1 = backend.prepare_adapter(peft.inspect("a1", adapters["a1"], dims, RANK))
    h2 = backend.prepare_adapter(peft.inspect("a2", adapters["a2"], dims, RANK))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    handles = [h1, None, h2, h1]
    got = run(backend, prompts, handles, [2, 0, 3, 1])
    sent = [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]
    manager = backend.model.lora_model_manager
    ids = {h: manager.convert_adapter_id_to_index(h.lora_name) for h in (h1, h2)}
    assert sorted(ids.values()) == [1, 2]  # NxDI numbers adapters from 1 with the dummy
    # rows sorted by seq_id: lines 0 (base), 1 (a1), 2 (a1), 3 (a2)
    assert sent["adapter_ids"].tolist() == [0, ids[h1], ids[h1], ids[h2]]
    assert sent["adapter_slots"][0] == 0  # the dummy's slot: the base model
    decodes = [f for f in sim.SIM_FORWARDS if f["phase"] == "decode"][-1]
    assert decodes["adapter_ids"].tolist() == [0, 0, 0, 0]  # ignored: lines keep theirs
    paths = {h1: adapters["a1"], h2: adapters["a2"], None: None}
    assert got == [peft_greedy(tiny_llama, paths[h], [p], 6)[0]
                   for h, p in zip(handles, prompts, strict=True)]


def test_a_line_reused_by_a_base_request_carries_no_adapter(sim, tiny_llama, adapters, dims,
                                                           tmp_path):
    backend = lora_backend(tiny_llama, tmp_path)
    h3 = backend.prepare_adapter(peft.inspect("a3", adapters["a3"], dims, RANK))
    prompt = [21, 22, 23]
    assert run(backend, [prompt], [h3], [0]) == peft_greedy(tiny_llama, adapters["a3"],
                                                            [prompt], 6)
    base = peft_greedy(tiny_llama, None, [prompt], 6)
    assert base != peft_greedy(tiny_llama, adapters["a3"], [prompt], 6)
    assert run(backend, [prompt], [None], [0]) == base  # same line 0, now the base model


def test_a_one_token_prompt_on_an_adapter(sim, tiny_llama, adapters, dims, tmp_path):
    """NxDI maps adapter ids to slots only on a call wider than one token: the backend
    pads a one-token prefill (token 0 at position 0, cut off again by NxDI)."""
    backend = lora_backend(tiny_llama, tmp_path)
    h1 = backend.prepare_adapter(peft.inspect("a1", adapters["a1"], dims, RANK))
    h4 = backend.prepare_adapter(peft.inspect("a4", adapters["a4"], dims, RANK))
    # a4 (id 2) first, so the device's slot 1 holds a4 and slot 2 a1: an unpadded call
    # would use a1's id 1 as a slot and apply a4
    assert run(backend, [[30, 31]], [h4], [1]) == peft_greedy(tiny_llama, adapters["a4"],
                                                              [[30, 31]], 6)
    got = run(backend, [[40], [41]], [h1, None], [0, 2])
    sent = [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]
    assert sent["input_ids"].tolist() == [[40, 0], [41, 0]]
    assert sent["position_ids"].tolist() == [[0, 0], [0, 0]]
    assert got == [peft_greedy(tiny_llama, adapters["a1"], [[40]], 6)[0],
                   peft_greedy(tiny_llama, None, [[41]], 6)[0]]


def test_adapter_lifecycle_in_nxdis_caches(sim, tiny_llama, adapters, dims, tmp_path):
    backend = lora_backend(tiny_llama, tmp_path, max_loras=1, max_cpu_loras=2)
    manager = backend.model.lora_model_manager
    spec = peft.inspect("a1", adapters["a1"], dims, RANK)
    first, again = backend.prepare_adapter(spec), backend.prepare_adapter(spec)
    # each load has its own NxDI name, so NxDI never serves an earlier folder's weights
    assert first.lora_name != again.lora_name and first.name == again.name == "a1"
    cached = manager.cpu_adapter_cache.get_adapter_ids()
    assert {manager.convert_adapter_id_to_index(h.lora_name) for h in (first, again)} == set(
        cached)
    backend.release_adapter(first)
    assert manager.cpu_adapter_cache.get_adapter_ids() == [
        manager.convert_adapter_id_to_index(again.lora_name)]
    backend.release_adapter(first)  # gone already: nothing to do
    # NxDI dropped an adapter from its CPU cache: the next prefill streams it in again
    manager.remove_adapter(manager.convert_adapter_id_to_index(again.lora_name))
    assert run(backend, [[7, 8, 9]], [again], [0], steps=2) == peft_greedy(
        tiny_llama, adapters["a1"], [[7, 8, 9]], 3)
    other = backend.prepare_adapter(peft.inspect("a2", adapters["a2"], dims, RANK))
    with pytest.raises(RuntimeError, match="more than max_loras=1: a scheduling bug"):
        backend.adapter_indices([other], [again])
    # What NxDI itself does with such a batch: the second adapter takes the only slot
    ids, pos, _ = prefill_args([[5, 6], [7, 8]])
    names = [again.lora_name, other.lora_name]
    with pytest.raises(ValueError, match="is not in list"):
        backend.model(ids, position_ids=pos, seq_ids=torch.tensor([0, 1]),
                      sampling_params=greedy(2),
                      adapter_ids=manager.convert_adapter_ids_to_indices(names, 2))
    # and why the backend converts row by row: NxDI's batch helper caps the batch itself
    with pytest.raises(ValueError, match="maximum number of adapters is 2"):
        manager.convert_adapter_ids_to_indices([again.lora_name] * 3, 3)
    narrow = lora_backend(tiny_llama, tmp_path / "narrow",
                          overrides={"target_modules": ["q_proj", "v_proj", "up_proj"]})
    narrow.prepare_adapter(peft.inspect("a2", adapters["a2"], dims, RANK))
    with pytest.raises(peft.AdapterError, match=r"'a1'.*compiled without"):
        narrow.prepare_adapter(spec)


def test_init_lora_checks_the_compiled_config(sim, tiny_llama, tmp_path):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    backend = lora_backend(tiny_llama, tmp_path, max_loras=1)
    with pytest.raises(ValueError, match=r"1 device adapter slots < max_loras=2"):
        backend.init_lora(2, RANK, 2)
    with pytest.raises(ValueError, match=rf"max_lora_rank {RANK} < 16"):
        backend.init_lora(1, 16, 1)
    plain = NxdiBackend(tiny_llama, neuron_cfg())
    plain.compile(str(tmp_path / "plain"))
    plain.load(str(tmp_path / "plain"))
    with pytest.raises(RuntimeError, match="compiled without lora_config"):
        plain.init_lora(1, RANK, 1)


# -- sabotage: the simulator catches what NxDI would get wrong ---------------------------------
@pytest.mark.parametrize("base_only", [True, False])
def test_index_0_is_the_base_model_only_with_base_model_only(sim, tiny_llama, adapters,
                                                              tmp_path, base_only):
    """A runner that sends 0 for base rows without enable_base_model_only gets the first
    adapter's tokens (NxDI's ids start at 0 then): the base-vs-HF checks fail."""
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    from vllm_neuronx.backends.nxdi import NxdiAdapter

    cls = NeuronLlamaForCausalLM
    neuron_config = cls.get_neuron_config_cls()(
        batch_size=2, ctx_batch_size=1, seq_len=64, torch_dtype="float32",
        is_continuous_batching=True, lora_config={
            "max_loras": 1, "max_lora_rank": RANK, "max_cpu_loras": 1, "batch_size": 2,
            "target_modules": list(peft.TARGETS), "dynamic_multi_lora": True,
            "enable_base_model_only": base_only})
    config = cls.get_config_cls()(neuron_config, load_config=load_pretrained_config(tiny_llama),
                                  rope_theta=10000.0)
    model = cls(tiny_llama, config)
    model.compile(str(tmp_path))
    model.load(str(tmp_path))
    manager = model.lora_model_manager
    assert manager.add_adapter(NxdiAdapter("a1", adapters["a1"], "a1"))
    assert manager.convert_adapter_id_to_index("a1") == (1 if base_only else 0)
    prompt = [5, 6, 7]
    ids, pos, _ = prefill_args([prompt])
    logits = model(ids, position_ids=pos, seq_ids=torch.tensor([0]),
                   adapter_ids=torch.tensor([0], dtype=torch.int32)).logits
    first = int(logits[0, -1].argmax())
    base = peft_greedy(tiny_llama, None, [prompt], 1)[0][0]
    adapted = peft_greedy(tiny_llama, adapters["a1"], [prompt], 1)[0][0]
    assert base != adapted
    assert first == (base if base_only else adapted)


def test_without_base_model_only_a_base_row_before_any_adapter_fails(sim, tiny_llama,
                                                                      tmp_path):
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    cls = NeuronLlamaForCausalLM
    neuron_config = cls.get_neuron_config_cls()(
        batch_size=1, seq_len=64, torch_dtype="float32", lora_config={
            "max_loras": 1, "target_modules": ["q_proj"], "dynamic_multi_lora": True})
    config = cls.get_config_cls()(neuron_config, load_config=load_pretrained_config(tiny_llama),
                                  rope_theta=10000.0)
    model = cls(tiny_llama, config)
    model.compile(str(tmp_path))
    model.load(str(tmp_path))
    ids, pos, _ = prefill_args([[5, 6, 7]])
    with pytest.raises(KeyError):  # id 0 names no adapter: NxDI's lookup fails
        model(ids, position_ids=pos, seq_ids=torch.tensor([0]),
              adapter_ids=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(AttributeError, match="adapter_ids on every context encoding"):
        model(ids, position_ids=pos, seq_ids=torch.tensor([0]))


def test_the_simulated_lora_serving_config_is_nxdis(sim, tmp_path, adapters):
    from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

    with pytest.raises(FileNotFoundError, match="not found"):
        LoraServingConfig(lora_ckpt_paths={"x": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="appears more than once"):
        LoraServingConfig(lora_ckpt_paths=[f"x:{adapters['a1']}", f"x:{adapters['a2']}"])
    # JSON form, dynamic: the CPU adapters include the device ones; ranks and targets widen
    (tmp_path / "ckpts.json").write_text(json.dumps({
        "lora-ckpt-dir": os.path.dirname(adapters["a1"]),
        "lora-ckpt-paths": {"one": "a1"}, "lora-ckpt-paths-cpu": {"two": "a2"}}))
    cfg = LoraServingConfig(max_loras=1, max_lora_rank=2, max_cpu_loras=2,
                            target_modules=["q_proj"], lora_ckpt_json=str(tmp_path / "ckpts.json"),
                            dynamic_multi_lora=True, enable_base_model_only=True)
    assert cfg.lora_ckpt_paths == {"one": adapters["a1"]}
    assert cfg.lora_ckpt_paths_cpu == {"two": adapters["a2"], "one": adapters["a1"]}
    assert (cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank) == (2, 3, RANK)
    assert set(cfg.target_modules) == set(peft.TARGETS)
    with pytest.raises(ValueError, match="hosted on CPU is 2"):
        LoraServingConfig(max_cpu_loras=1, dynamic_multi_lora=True, enable_base_model_only=True,
                          lora_ckpt_paths={"one": adapters["a1"], "two": adapters["a2"]})


# -- the engine, end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(sim, tiny_llama, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("nxdi-lora-artifacts") / "compiled"
    mp = pytest.MonkeyPatch()
    mp.setenv("NEURON_COMPILED_ARTIFACTS", str(artifacts))
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=128,
              skip_tokenizer_init=True, dtype="float32", enable_lora=True, max_loras=2,
              max_lora_rank=RANK, max_cpu_loras=2)
    llm.artifacts = artifacts
    yield llm
    del llm
    mp.undo()


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)


def generate(llm, prompts, loras, n=6):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(n),
                        lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_engine_compiles_vllms_lora_settings(llm):
    with open(os.path.join(llm.artifacts, "neuron_config.json")) as f:
        lora = json.load(f)["neuron_config"]["lora_config"]
    assert (lora["max_loras"], lora["max_cpu_loras"], lora["batch_size"]) == (3, 3, MAX_NUM_SEQS)
    assert lora["max_lora_rank"] == RANK and lora["target_modules"] == list(peft.TARGETS)
    assert lora["dynamic_multi_lora"] and lora["enable_base_model_only"]


def test_engine_mixed_batch_matches_peft(llm, sim, tiny_llama, adapters):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    loras = [LoRARequest("a1", 1, adapters["a1"]), None, LoRARequest("a2", 2, adapters["a2"])]
    paths = [adapters["a1"], None, adapters["a2"]]
    got = generate(llm, prompts, loras)
    assert got == [peft_greedy(tiny_llama, p, [q], 6)[0]
                   for p, q in zip(paths, prompts, strict=True)]
    prefill = [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]
    assert 0 in prefill["adapter_ids"].tolist()  # the base row: NxDI's dummy


def test_engine_line_reuse_and_one_token_prompt(llm, sim, tiny_llama, adapters):
    a3 = LoRARequest("a3", 3, adapters["a3"])
    prompt = [21, 22, 23]
    assert generate(llm, [prompt], [a3]) == peft_greedy(tiny_llama, adapters["a3"], [prompt], 6)
    first_line = [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]["seq_ids"]
    assert generate(llm, [prompt], [None]) == peft_greedy(tiny_llama, None, [prompt], 6)
    assert [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]["seq_ids"].equal(
        first_line)  # the same KV line, rebound to no adapter
    assert generate(llm, [[40]], [a3]) == peft_greedy(tiny_llama, adapters["a3"], [[40]], 6)
    assert [f for f in sim.SIM_FORWARDS if f["phase"] == "prefill"][-1]["input_ids"].shape[1] == 2


def test_engine_more_adapters_than_slots(llm, tiny_llama, adapters):
    """Four adapters, max_loras=2, max_cpu_loras=2: the scheduler holds requests, the host
    pool and NxDI's caches evict and load again; every request gets its own tokens."""
    names = ["a1", "a2", "a3", "a4", "a2", "a1"]
    prompts = [[50 + i, 60 + i, 70 + i] for i in range(len(names))]
    ids = {"a1": 1, "a2": 2, "a3": 3, "a4": 4}
    loras = [LoRARequest(n, ids[n], adapters[n]) for n in names]
    got = generate(llm, prompts, loras, n=4)
    assert got == [peft_greedy(tiny_llama, adapters[n], [p], 4)[0]
                   for n, p in zip(names, prompts, strict=True)]
