"""The NxDI backend against the NxDI simulator (tests/simulators): the real engine
routed through NxdiBackend with VLLM_NEURONX_FORCE_BACKEND=nxdi, and the backend's
own contract (row order, config translation, refusals). The simulator is strict
(unknown NeuronConfig keys, unsorted seq_ids...), and its counters prove it ran."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from vllm import LLM

from tests.conftest import hf_greedy
from tests.engine_checks import (
    check_aborts_free_lines,
    check_greedy_matches_hf,
    prefill_args,
    use_nxdi_simulator,
)
from vllm_neuronx import neuron_config as nc

MAX_NUM_SEQS = 3


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture(scope="module")
def llm(sim, tiny_llama, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("nxdi-artifacts") / "compiled"
    mp = pytest.MonkeyPatch()
    mp.setenv("NEURON_COMPILED_ARTIFACTS", str(artifacts))
    before = dict(sim.SIM_CALLS)
    llm = LLM(model=tiny_llama, device="neuron", max_num_seqs=MAX_NUM_SEQS, max_model_len=256,
              skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2)
    llm.artifacts = artifacts
    llm.startup_calls = {k: sim.SIM_CALLS[k] - before[k] for k in before}
    yield llm
    del llm
    mp.undo()


def greedy(n: int) -> torch.Tensor:
    return torch.tensor([[1, 1.0, 1.0]] * n)


def make_backend(model_path, folder=None, *, max_num_seqs=4, max_model_len=128, **kw):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = nc.resolve_neuron_config(
        tp_degree=1, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype="float32",
        overrides=kw.pop("overrides", None), **kw,
    )
    backend = NxdiBackend(str(model_path), cfg)
    if folder is not None:
        backend.compile(str(folder))
        backend.load(str(folder))
    return backend


# -- the engine, end to end through NxdiBackend and the simulator ------------------------------
def test_greedy_matches_hf_with_continuous_batching(llm, sim, tiny_llama):
    assert llm.startup_calls["compile"] == 1 and llm.startup_calls["load"] == 1
    assert {"model.pt", "neuron_config.json"} <= set(os.listdir(llm.artifacts))
    (view,) = llm.collective_rpc("get_model")
    assert view.backend_name == "NxdiBackend"
    forwards_before = sim.SIM_CALLS["forward"]
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 150))] for _ in range(8)]
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    check_greedy_matches_hf(llm, tiny_llama, prompts, max_tokens)
    # every token came from the simulator: prefills of at most MAX_NUM_SEQS prompts,
    # then decodes of at most MAX_NUM_SEQS rows
    calls = sim.SIM_CALLS["forward"] - forwards_before
    recorded = list(sim.SIM_FORWARDS)[-calls:]
    assert len(recorded) == calls
    prefills = [f["seq_ids"].numel() for f in recorded if f["phase"] == "prefill"]
    decodes = [f["seq_ids"].numel() for f in recorded if f["phase"] == "decode"]
    assert sum(prefills) == len(prompts) and max(prefills + decodes) <= MAX_NUM_SEQS
    assert sum(decodes) == sum(max_tokens) - len(prompts)


def test_tp_and_neuron_config_reach_nxdi(llm):
    with open(os.path.join(llm.artifacts, "neuron_config.json")) as f:
        saved = json.load(f)["neuron_config"]
    assert saved["tp_degree"] == 2 and saved["batch_size"] == MAX_NUM_SEQS
    assert saved["seq_len"] == 256 and saved["ctx_batch_size"] == 1
    assert saved["on_device_sampling_config"]["dynamic"] is True
    assert llm.llm_engine.vllm_config.parallel_config.world_size == 1


def test_aborted_requests_free_their_kv_lines(llm):
    check_aborts_free_lines(llm, MAX_NUM_SEQS)


# -- NxdiBackend's own contract -------------------------------------------------------------------
def test_rows_reach_nxdi_sorted_by_seq_id_and_come_back_in_input_order(sim, tiny_llama,
                                                                       tmp_path):
    backend = make_backend(tiny_llama, tmp_path)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    lines = torch.tensor([3, 0, 1])
    rows = torch.tensor([[1, 0.9, 1.0], [1, 0.8, 1.0], [1, 0.7, 1.0]])  # greedy, distinct
    ids, pos, _ = prefill_args(prompts)
    tokens = backend.forward(ids, pos, lines, rows).tokens
    sent = sim.SIM_FORWARDS[-1]
    assert sent["seq_ids"].tolist() == [0, 1, 3]
    assert torch.equal(sent["sampling_params"], rows[[1, 2, 0]])
    assert torch.equal(sent["input_ids"], ids[[1, 2, 0]])
    seqs = [p + [t] for p, t in zip(prompts, tokens.tolist(), strict=True)]
    for _ in range(5):  # decode rows given in reverse line order; the backend sorts
        order = [0, 2, 1]
        out = backend.forward(
            torch.tensor([[seqs[i][-1]] for i in order]),
            torch.tensor([[len(seqs[i]) - 1] for i in order]),
            lines[order], rows[order],
        ).tokens
        assert sim.SIM_FORWARDS[-1]["seq_ids"].tolist() == [0, 1, 3]
        for i, t in zip(order, out.tolist(), strict=True):
            seqs[i].append(t)
    expected = hf_greedy(tiny_llama, prompts, [6] * 3)
    assert [s[len(p):] for s, p in zip(seqs, prompts, strict=True)] == expected


def test_logits_when_on_device_sampling_is_off(tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, tmp_path, on_device_sampling_disabled=True)
    assert backend.config.neuron_config.on_device_sampling_config is None
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    ids, pos, _ = prefill_args(prompts)
    out = backend.forward(ids, pos, torch.tensor([2, 0]), greedy(2))
    assert out.tokens is None and out.logits.shape == (2, 512)
    assert out.logits.dtype == torch.float32
    assert out.logits.argmax(-1).tolist() == [t[0] for t in hf_greedy(tiny_llama, prompts,
                                                                       [1, 1])]


def test_output_logits_gives_tokens_and_logits(tiny_llama, tmp_path):
    backend = make_backend(tiny_llama, tmp_path, overrides={"output_logits": True})
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    ids, pos, _ = prefill_args(prompts)
    out = backend.forward(ids, pos, torch.tensor([2, 0]), greedy(2))
    assert out.logits.shape == (2, 512)  # the simulator pads the vocab; it is cut back
    assert out.tokens.tolist() == out.logits.argmax(-1).tolist()
    assert out.tokens.tolist() == [t[0] for t in hf_greedy(tiny_llama, prompts, [1, 1])]


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from vllm_neuronx.backends.nxdi import MODEL_CLASSES, NxdiBackend

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cfg = nc.resolve_neuron_config(tp_degree=1, max_num_seqs=2, max_model_len=64,
                                   dtype="float32")
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        NxdiBackend(str(tmp_path), cfg)
    for arch in MODEL_CLASSES:
        assert arch in str(err.value)


def test_validate_refuses_what_nxdi_cannot_compile():
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = nc.resolve_neuron_config(tp_degree=2, max_num_seqs=2, max_model_len=64,
                                   dtype="float32")
    NxdiBackend.validate(cfg)
    with pytest.raises(nc.NeuronConfigError) as err:
        NxdiBackend.validate(cfg, quantization="neuron_quant")
    for key in ("quantized", "quantized_checkpoints_path", "quantization_type",
                "quantization_dtype"):
        assert key in str(err.value)
    for tp in (3, 12, 128):
        with pytest.raises(nc.NeuronConfigError, match=f"tp_degree={tp}"):
            NxdiBackend.validate({**cfg, "tp_degree": tp})
    with pytest.raises(nc.NeuronConfigError, match="ctx_batch_size"):
        NxdiBackend.validate({**cfg, "ctx_batch_size": 2})
    with pytest.raises(nc.NeuronConfigError, match="lora_modules"):
        NxdiBackend.validate({**cfg, "lora_modules": ["no-separator"]})


def test_the_simulator_is_strict(sim, tiny_llama, tmp_path):
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM

    with pytest.raises(TypeError, match="lora_serving_config"):
        NeuronLlamaForCausalLM.get_neuron_config_cls()(batch_size=2, lora_serving_config=None)
    backend = make_backend(tiny_llama)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        backend.load(str(tmp_path))  # nothing compiled there
    backend.compile(str(tmp_path))
    backend.load(str(tmp_path))
    model = backend.model
    ids, pos, _ = prefill_args([[5, 6], [7, 8, 9]])
    with pytest.raises(ValueError, match="sorted ascending"):
        model(ids, attention_mask=None, position_ids=pos, seq_ids=torch.tensor([1, 0]),
              sampling_params=greedy(2))
    with pytest.raises(ValueError, match=r"KV lines in \[0, 4\)"):
        model(ids, position_ids=pos, seq_ids=torch.tensor([0, 4]), sampling_params=greedy(2))
    with pytest.raises(ValueError, match="top-k"):
        model(ids, position_ids=pos, seq_ids=torch.tensor([0, 1]),
              sampling_params=torch.tensor([[1, 1.0, 1.0], [999, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"must be \[2, 3\]"):
        model(ids, position_ids=pos, seq_ids=torch.tensor([0, 1]), sampling_params=greedy(3))
    mixed_ids, mixed_pos = torch.tensor([[5, 6], [7, 0]]), torch.tensor([[0, 1], [4, 0]])
    with pytest.raises(ValueError, match="must not be mixed"):
        model(mixed_ids, position_ids=mixed_pos, seq_ids=torch.tensor([0, 1]),
              sampling_params=greedy(2))
    with pytest.raises(ValueError, match="longer than max_context_length"):
        model(torch.ones((1, 129), dtype=torch.long), position_ids=torch.arange(129)[None],
              seq_ids=torch.tensor([0]), sampling_params=greedy(1))
    model(ids, position_ids=pos, seq_ids=torch.tensor([0, 1]), sampling_params=greedy(2))
    with pytest.raises(ValueError, match="holds 2 tokens"):  # row paired with the wrong line
        model(torch.tensor([[1], [2]]), position_ids=torch.tensor([[3], [2]]),
              seq_ids=torch.tensor([0, 1]), sampling_params=greedy(2))


def test_lora_modules_become_lora_config_never_lora_serving_config(sim, tiny_llama, tmp_path):
    from neuronx_distributed_inference.modules.lora_serving import LoraServingConfig

    from tests.lora_utils import make_peft_adapter

    adapters = {name: make_peft_adapter(tiny_llama, tmp_path / name, seed=seed,
                                        targets=("q_proj", "v_proj"))
                for seed, name in enumerate(("sql", "chat"))}
    overrides = {
        "lora_modules": [{"name": "sql", "path": adapters["sql"]},
                         f"chat={adapters['chat']}"],
        "target_modules": ["q_proj", "v_proj"],
    }
    backend = make_backend(tiny_llama, tmp_path / "compiled", overrides=overrides)
    neuron_config = backend.config.neuron_config
    assert isinstance(neuron_config.lora_config, LoraServingConfig)
    assert not hasattr(neuron_config, "lora_serving_config")
    assert neuron_config.lora_config.lora_ckpt_paths == adapters
    # the two adapters and NxDI's base-model dummy, index 0
    assert neuron_config.lora_config.max_loras == 3
    assert neuron_config.lora_config.enable_base_model_only
    saved = backend.stored_config(str(tmp_path / "compiled"))
    assert saved["lora_config"]["lora_ckpt_paths"] == adapters
    assert "lora_modules" not in saved and "lora_serving_config" not in saved
    prompt = [5, 6, 7]
    ids, pos, _ = prefill_args([prompt])
    tokens = backend.forward(ids, pos, torch.tensor([1]), greedy(1)).tokens.tolist()
    adapter_ids = sim.SIM_FORWARDS[-1]["adapter_ids"]
    assert adapter_ids.dtype == torch.int32 and adapter_ids.tolist() == [0]
    assert tokens == hf_greedy(tiny_llama, [prompt], [1])[0]  # 0: the base model
    # NxDI's own form, a lora_config object in the override, lands in the same place
    backend = make_backend(tiny_llama, overrides={
        "lora_config": {"max_loras": 3, "lora_ckpt_paths": {"sql": adapters["sql"]}}})
    assert backend.config.neuron_config.lora_config.max_loras == 4


def test_stored_config_and_shape_mismatch(tiny_llama, tmp_path):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    assert NxdiBackend.stored_config(str(tmp_path)) is None
    (tmp_path / "neuron_config.json").write_text("not json")
    assert NxdiBackend.stored_config(str(tmp_path)) is None
    folder = tmp_path / "compiled"
    make_backend(tiny_llama, folder, max_num_seqs=4)
    stored = NxdiBackend.stored_config(str(folder))
    assert stored["batch_size"] == 4 and stored["torch_dtype"] == "float32"
    assert set(stored) <= nc.NEURON_CONFIG_KEYS  # NxDI's internal attributes left out
    other = make_backend(tiny_llama, max_num_seqs=2)
    with pytest.raises(ValueError, match="batch_size"):
        other.load(str(folder))


def test_moe_models_get_moe_neuron_config(tmp_path):
    from neuronx_distributed_inference.models.config import MoENeuronConfig
    from transformers import MixtralConfig

    MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, architectures=["MixtralForCausalLM"]
                  ).save_pretrained(tmp_path)
    backend = make_backend(tmp_path, max_num_seqs=2, max_model_len=64)
    assert type(backend.config.neuron_config) is MoENeuronConfig
    assert backend.config.rope_theta > 0  # from rope_parameters (transformers >= 5 configs)
    assert backend.vocab_size == 128


def test_artifacts_compiled_by_nxdi_itself_load_with_their_stored_config(sim, tiny_llama,
                                                                         tmp_path):
    """A folder NxDI compiled outside vLLM (no manifest of ours): its neuron_config.json
    becomes our config, and it loads without a compile."""
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    from vllm_neuronx.backends.nxdi import NxdiBackend

    cls = NeuronLlamaForCausalLM
    neuron_config = cls.get_neuron_config_cls()(
        batch_size=2, ctx_batch_size=1, seq_len=64, torch_dtype="float32",
        is_continuous_batching=True, enable_bucketing=True,
        on_device_sampling_config={"dynamic": True, "global_topk": 64})
    config = cls.get_config_cls()(neuron_config, load_config=load_pretrained_config(tiny_llama),
                                  rope_theta=10000.0)
    cls(tiny_llama, config).compile(str(tmp_path))
    compiles = sim.SIM_CALLS["compile"]
    stored = NxdiBackend.stored_config(str(tmp_path))
    assert stored["batch_size"] == 2 and stored["on_device_sampling_config"]["global_topk"] == 64
    backend = NxdiBackend(tiny_llama, stored)
    backend.load(str(tmp_path))
    assert sim.SIM_CALLS["compile"] == compiles
    prompts = [[5, 6, 7], [8, 9]]
    ids, pos, _ = prefill_args(prompts)
    tokens = backend.forward(ids, pos, torch.tensor([1, 0]), greedy(2)).tokens.tolist()
    assert tokens == [t[0] for t in hf_greedy(tiny_llama, prompts, [1, 1])]
