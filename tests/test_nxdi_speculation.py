"""Fused speculation through NxdiBackend and the NxDI simulator (tests/simulators): the
draft's config built as NxDI expects, fused_outputs read for either pad value of NxDI's
releases, greedy tokens equal to HF transformers' greedy decoding of the target, and what
NxDI cannot do with speculation refused by name. The simulator computes real tokens: the
target and a draft model with vllm_neuronx's CPU model (an EAGLE head's stand-in is the
target's own greedy continuation, see the simulator's model_base.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import hf_greedy, make_tiny_llama
from tests.eagle_utils import write_eagle3_head, write_eagle_head
from tests.engine_checks import prefill_args, use_nxdi_simulator
from tests.tiny_families import make_tiny
from vllm_neuronx import neuron_config as nc
from vllm_neuronx import nxdi_keys
from vllm_neuronx.speculation import Draft

MAX_MODEL_LEN = 128
GREEDY = (1, 1.0, 1.0)


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory) -> str:
    """A random one-layer draft of the tiny target's vocabulary: it rarely agrees."""
    return make_tiny_llama(tmp_path_factory.mktemp("draft"), seed=7, num_hidden_layers=1)


@pytest.fixture(scope="module")
def eagle_head(tiny_llama, tmp_path_factory) -> str:
    """A random EAGLE-1 head in NxDI's format (the target's lm_head copied in)."""
    return write_eagle_head(tiny_llama, tmp_path_factory.mktemp("eagle"), lm_head="target")


def resolve(draft: Draft | None, *, max_num_seqs=4, overrides=None, **kw) -> dict:
    return nc.resolve_neuron_config(tp_degree=1, max_num_seqs=max_num_seqs,
                                    max_model_len=MAX_MODEL_LEN, dtype="float32",
                                    overrides=overrides, draft=draft, **kw)


def make_backend(target, draft: Draft | None, folder=None, **kw):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    backend = NxdiBackend(str(target), resolve(draft, **kw), draft=draft)
    if folder is not None:
        backend.compile(str(folder))
        backend.load(str(folder))
    return backend


def generate(backend, prompts, max_tokens, params=None):
    """Prefill every prompt (line i), then fused decode steps (rows in reverse line order,
    finished rows left out) until each has max_tokens; every returned token is kept, up to
    max_tokens. Returns (outputs, per step: {line: tokens returned})."""
    k = backend.speculation_length
    params = params or [GREEDY] * len(prompts)
    ids, pos, lines = prefill_args(prompts)
    out = backend.forward(ids, pos, lines, torch.tensor(params))
    assert out.spec_tokens is None and out.tokens.shape == (len(prompts),)
    outputs = [[t] for t in out.tokens.tolist()]
    steps = []
    while True:
        live = [i for i in reversed(range(len(prompts))) if len(outputs[i]) < max_tokens[i]]
        if not live:
            return outputs, steps
        seqs = [prompts[i] + outputs[i] for i in live]
        out = backend.forward(torch.tensor([[s[-1]] for s in seqs]),
                              torch.tensor([[len(s) - 1] for s in seqs]),
                              torch.tensor(live), torch.tensor([params[i] for i in live]))
        spec = out.spec_tokens
        assert spec.shape == (len(live), k) and spec.dtype == torch.int64
        assert torch.equal(out.tokens, spec[:, 0]) and out.logits is None
        step = {}
        for row, i in enumerate(live):
            got = spec[row].tolist()
            n = got.index(-1) if -1 in got else k
            assert n >= 1 and all(t == -1 for t in got[n:]) and min(got[:n]) >= 0
            step[i] = got[:n]
            outputs[i] += got[:n][: max_tokens[i] - len(outputs[i])]
        steps.append(step)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
MAX_TOKENS = [24, 17, 30]


# -- greedy tokens equal HF's -----------------------------------------------------------------
def test_random_draft_greedy_tokens_equal_hf(sim, tiny_llama, random_draft, tmp_path):
    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)
    backend = make_backend(tiny_llama, draft, tmp_path)
    outputs, steps = generate(backend, PROMPTS, MAX_TOKENS)
    assert outputs == hf_greedy(tiny_llama, PROMPTS, MAX_TOKENS)
    counts = [len(t) for step in steps for t in step.values()]
    assert min(counts) == 1 and max(counts) <= 4  # a random draft: mostly rejected
    # the simulator ran the draft (its proposals differ from the target's tokens)
    decodes = [f for f in sim.SIM_FORWARDS if f["phase"] == "decode"][-len(steps):]
    assert all(f["drafts"].shape[1] == 4 for f in decodes)
    assert any(not torch.equal(f["drafts"][:, :-1], f["target_tokens"][:, :-1])
               for f in decodes)


def test_target_as_its_own_draft_yields_k_tokens_every_step(tiny_llama, tmp_path):
    draft = Draft("draft_model", tiny_llama, num_speculative_tokens=4)
    backend = make_backend(tiny_llama, draft, tmp_path)
    outputs, steps = generate(backend, PROMPTS, MAX_TOKENS)
    assert outputs == hf_greedy(tiny_llama, PROMPTS, MAX_TOKENS)
    assert all(len(t) == 5 for step in steps for t in step.values())
    # 1 prefill token + 5 per step: ceil((max - 1) / 5) steps for the longest row
    assert len(steps) == -(-(max(MAX_TOKENS) - 1) // 5)


def test_eagle_head_runs_with_the_stand_in_proposer(sim, tiny_llama, eagle_head, tmp_path):
    """An EAGLE head is configured and checked as NxDI would; the simulator proposes the
    target's own greedy continuation for it, so every step yields k tokens."""
    draft = Draft("eagle", eagle_head, num_speculative_tokens=2)
    backend = make_backend(tiny_llama, draft, tmp_path)
    dnc = backend.model.config.fused_spec_config.draft_config.neuron_config
    assert dnc.is_eagle_draft and dnc.speculation_length == 3
    assert not dnc.enable_fused_speculation and not dnc.sequence_parallel_enabled
    tnc = backend.model.config.neuron_config
    assert tnc.enable_eagle_speculation and tnc.enable_fused_speculation and not tnc.is_eagle3
    outputs, steps = generate(backend, PROMPTS[:2], MAX_TOKENS[:2])
    assert outputs == hf_greedy(tiny_llama, PROMPTS[:2], MAX_TOKENS[:2])
    assert all(len(t) == 3 for step in steps for t in step.values())


def test_eagle3_head_without_a_draft_vocabulary(tiny_llama, tmp_path):
    head = write_eagle3_head(tiny_llama, tmp_path / "head", d2t=False, aux_layer_ids=[0, 1, 1])
    draft = Draft("eagle3", head, num_speculative_tokens=2)
    backend = make_backend(tiny_llama, draft, tmp_path / "c")
    cfg = backend.model.config
    assert cfg.neuron_config.is_eagle3
    assert cfg.fused_spec_config.draft_config.neuron_config.is_eagle3
    outputs, _ = generate(backend, PROMPTS[:1], MAX_TOKENS[:1])
    assert outputs == hf_greedy(tiny_llama, PROMPTS[:1], MAX_TOKENS[:1])


def test_sampled_rows_beside_greedy_rows(tiny_llama, random_draft, tmp_path):
    """A sampled row (the draft and the target sample with its parameters; NxDI accepts a
    draft equal to the target's sample) leaves the greedy rows' tokens HF's."""
    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)
    backend = make_backend(tiny_llama, draft, tmp_path)
    params = [(50, 0.9, 1.0), GREEDY, GREEDY]
    outputs, _ = generate(backend, PROMPTS, MAX_TOKENS, params)
    expected = hf_greedy(tiny_llama, PROMPTS, MAX_TOKENS)
    assert outputs[1:] == expected[1:]
    assert len(outputs[0]) == MAX_TOKENS[0] and all(0 <= t < 512 for t in outputs[0])


# -- NxDI's pad value, release by release --------------------------------------------------
@pytest.mark.parametrize("pad", [0, -1])
def test_either_pad_value_gives_the_same_tokens(sim, tiny_llama, random_draft, tmp_path,
                                                monkeypatch, pad):
    """NxDI 0.2-0.7 pad the accepted tokens with 0 (a real token id), 0.8 on with -1: the
    backend reads each row's count from the next position ids, never from the pad."""
    from neuronx_distributed_inference.models import model_base

    from vllm_neuronx.backends.nxdi import FUSED_PAD_BY_RELEASE

    assert FUSED_PAD_BY_RELEASE == {(0, 2): 0, (0, 8): -1}
    monkeypatch.setattr(model_base, "ACCEPTANCE_PADDING_TOKEN", pad)
    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)
    backend = make_backend(tiny_llama, draft, tmp_path)
    before = len(sim.SIM_FORWARDS)
    outputs, _ = generate(backend, PROMPTS, MAX_TOKENS)
    assert outputs == hf_greedy(tiny_llama, PROMPTS, MAX_TOKENS)
    sent = list(sim.SIM_FORWARDS)[before:]
    padded = [f["fused_tokens"] for f in sent]
    assert any(bool((t == pad).any()) for t in padded)  # the device padded with its value


def test_read_fused_outputs():
    from vllm_neuronx.backends.nxdi import read_fused_outputs

    pos = torch.tensor([[10], [20], [30]])
    for pad in (0, -1):
        tokens = torch.tensor([[0, 4, pad, pad], [7, 0, 0, 9], [3, pad, pad, pad]],
                              dtype=torch.int32)  # token 0 accepted twice, pad 0 or -1
        fused = [tokens, torch.zeros(3, 1), torch.ones(3, 64),
                 torch.tensor([[12], [24], [31]], dtype=torch.int32),
                 torch.zeros(3, 4, 512)]  # logits after next_pos: [3], not [-1]
        got = read_fused_outputs(fused, pos, 4, prefill=False)
        assert got.tolist() == [[0, 4, -1, -1], [7, 0, 0, 9], [3, -1, -1, -1]]
        assert got.dtype == torch.int64
        first = read_fused_outputs([tokens] + fused[1:4], torch.zeros(3, 5), 4, prefill=True)
        assert first.tolist() == [0, 7, 3]
    fused = [torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 1), torch.ones(3, 64),
             torch.tensor([[15], [21], [31]])]
    with pytest.raises(RuntimeError, match="outside 1..speculation_length=4"):
        read_fused_outputs(fused, pos, 4, prefill=False)
    # NxDI 0.1's layout: the drafts [n, k] and the target's tokens, no next position
    with pytest.raises(RuntimeError, match="next position ids"):
        read_fused_outputs([torch.zeros(3, 4), torch.zeros(3, 4)], pos, 4, prefill=False)
    with pytest.raises(RuntimeError, match="expected \\[3, 4\\]"):
        read_fused_outputs([torch.zeros(3, 5)], pos, 4, prefill=False)


# -- the configuration NxDI gets -----------------------------------------------------------------
def test_fused_spec_config_built_as_nxdi_expects(tiny_llama, random_draft, tmp_path):
    from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig
    from neuronx_distributed_inference.models.llama.modeling_llama import (
        LlamaInferenceConfig,
        NeuronLlamaForCausalLM,
    )

    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)
    backend = make_backend(tiny_llama, draft, tmp_path, max_num_seqs=3)
    config = backend.model.config
    target = config.neuron_config
    assert (target.speculation_length, target.enable_fused_speculation) == (4, True)
    assert not target.enable_eagle_speculation and not target.is_eagle3
    assert target.seq_len == MAX_MODEL_LEN + 4 and target.max_context_length == MAX_MODEL_LEN
    fused = config.fused_spec_config
    assert isinstance(fused, FusedSpecNeuronConfig)
    assert fused.worker_cls is NeuronLlamaForCausalLM._model_cls
    assert fused.draft_model_cls is None and fused.draft_model_path == random_draft
    assert isinstance(fused.draft_config, LlamaInferenceConfig)
    assert fused.draft_config.num_hidden_layers == 1  # the draft's own HF config
    assert fused.draft_config._name_or_path == random_draft
    dnc = fused.draft_config.neuron_config
    assert dnc is not target
    assert (dnc.speculation_length, dnc.enable_fused_speculation, dnc.is_eagle_draft) == (
        0, False, False)
    for key in ("batch_size", "seq_len", "max_context_length", "tp_degree", "torch_dtype",
                "is_continuous_batching", "ctx_batch_size"):
        assert getattr(dnc, key) == getattr(target, key), key
    assert dnc.on_device_sampling_config.dynamic is True
    with open(tmp_path / "neuron_config.json") as f:
        saved = json.load(f)
    assert saved["fused_spec_config"]["worker_cls"] == {
        "__module__": "neuronx_distributed_inference.models.llama.modeling_llama",
        "__name__": "NeuronLlamaModel"}
    assert saved["fused_spec_config"]["draft_config"]["neuron_config"]["speculation_length"] == 0
    # the stored neuron config is the target's, speculation keys and all
    stored = backend.stored_config(str(tmp_path))
    assert stored["speculation_length"] == 4 and stored["enable_fused_speculation"] is True


def test_a_draft_of_another_family_is_named_by_draft_model_cls(tiny_llama, tmp_path,
                                                                monkeypatch):
    from neuronx_distributed_inference.models import config as sim_config
    from neuronx_distributed_inference.models.qwen2.modeling_qwen2 import (
        NeuronQwen2ForCausalLM,
    )

    qwen = make_tiny(tmp_path / "qwen2", "qwen2", seed=3, num_hidden_layers=1)
    draft = Draft("draft_model", qwen, num_speculative_tokens=2)
    backend = make_backend(tiny_llama, draft, tmp_path / "c")
    assert backend.model.config.fused_spec_config.draft_model_cls is NeuronQwen2ForCausalLM
    outputs, _ = generate(backend, PROMPTS[:2], MAX_TOKENS[:2])
    assert outputs == hf_greedy(tiny_llama, PROMPTS[:2], MAX_TOKENS[:2])

    class FusedSpecNeuronConfig06:  # NxDI 0.2-0.6's signature: no draft_model_cls
        def __init__(self, worker_cls, draft_config=None, draft_model_path=None):
            self.worker_cls, self.draft_config = worker_cls, draft_config
            self.draft_model_path, self.draft_model_cls = draft_model_path, None

    monkeypatch.setattr(sim_config, "FusedSpecNeuronConfig", FusedSpecNeuronConfig06)
    with pytest.raises(nc.NeuronConfigError, match=r">= 0\.7.*draft_model_cls"):
        make_backend(tiny_llama, draft)


# -- refusals -------------------------------------------------------------------------------
def test_refusals(tiny_llama, random_draft, eagle_head, tmp_path, monkeypatch):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)
    # on-device sampling off: NxDI's fused graph samples and accepts on the device
    with pytest.raises(nc.NeuronConfigError, match="needs on-device sampling"):
        NxdiBackend.validate(resolve(draft, on_device_sampling_disabled=True))
    with pytest.raises(nc.NeuronConfigError, match="output_logits"):
        NxdiBackend.validate(resolve(draft, overrides={"output_logits": True}))
    lora = resolve(draft)
    lora["lora_config"] = {"max_loras": 1, "max_lora_rank": 8, "max_cpu_loras": 1}
    with pytest.raises(nc.NeuronConfigError, match="LoRA adapters are not served"):
        NxdiBackend.validate(lora)
    quantized = resolve(draft, overrides={"quantized": True,
                                          "quantization_type": "per_channel_symmetric",
                                          "quantization_dtype": "int8"})
    with pytest.raises(nc.NeuronConfigError, match="quantized weights are not served"):
        NxdiBackend.validate(quantized)
    # eagle3 where the installed NxDI has no is_eagle3 (0.6: Neuron SDK 2.26)
    from vllm_neuronx import nxdi_keys_table as table

    old = nxdi_keys.key_set("NxDI 0.6.0", table.RELEASES["0.6.0"]["keys"])
    monkeypatch.setattr(nc, "neuron_config_keys", lambda: old)
    eagle3 = resolve(Draft("eagle3", eagle_head, 2))
    with pytest.raises(nc.NeuronConfigError, match=r"eagle3 needs .*>= 0\.7 .*NxDI 0\.6\.0"):
        NxdiBackend.validate(eagle3)
    monkeypatch.undo()
    # the capabilities: never logits with fused speculation, and what to do about it
    caps = NxdiBackend.sampling_capabilities(resolve(draft))
    assert not caps.logits and "speculative_config" in caps.enable_logits
    assert NxdiBackend.sampling_capabilities(resolve(None, on_device_sampling_disabled=True)
                                             ).logits
    # the draft and the neuron config must agree
    with pytest.raises(nc.NeuronConfigError, match="speculation_length=4 but the draft"):
        NxdiBackend(tiny_llama, resolve(draft), draft=None)
    with pytest.raises(nc.NeuronConfigError, match="speculation_length=0 but the draft"):
        NxdiBackend(tiny_llama, resolve(None), draft=draft)
    # a draft of another vocabulary
    other = make_tiny_llama(tmp_path / "vocab", vocab=256, num_hidden_layers=1)
    with pytest.raises(nc.NeuronConfigError, match="vocab_size 256"):
        make_backend(tiny_llama, Draft("draft_model", other, 3))
    # an EAGLE head without the LM head NxDI loads from it (aws-neuron-sdk#1143)
    bare = write_eagle_head(tiny_llama, tmp_path / "bare")
    with pytest.raises(nc.NeuronConfigError, match="no lm_head.weight"):
        make_backend(tiny_llama, Draft("eagle", bare, 2))
    # an EAGLE3 head with its own vocabulary (d2t)
    d2t = write_eagle3_head(tiny_llama, tmp_path / "d2t", aux_layer_ids=[0, 1, 1])
    with pytest.raises(nc.NeuronConfigError, match="draft_vocab_size=256"):
        make_backend(tiny_llama, Draft("eagle3", d2t, 2))
    # EAGLE on a family NxDI's EAGLE draft does not build
    qwen = make_tiny(tmp_path / "qwen", "qwen2")
    with pytest.raises(nc.NeuronConfigError, match="not Qwen2ForCausalLM"):
        make_backend(qwen, Draft("eagle", eagle_head, 2))


def test_the_simulator_enforces_nxdi_preconditions(sim, tiny_llama, random_draft, eagle_head,
                                                   tmp_path):
    """What the backend builds right, broken afterwards: the simulator fails as NxDI would."""
    from neuronx_distributed_inference.models.llama.modeling_llama import (
        NeuronLlamaForCausalLM,
    )

    draft = Draft("draft_model", random_draft, num_speculative_tokens=3)

    def broken(change, folder):
        backend = make_backend(tiny_llama, draft)
        change(backend.config)
        backend.compile(str(tmp_path / folder))

    def no_fused(c):
        c.fused_spec_config = None

    def worker_is_application(c):
        c.fused_spec_config.worker_cls = NeuronLlamaForCausalLM

    def draft_speculates(c):
        c.fused_spec_config.draft_config.neuron_config.speculation_length = 4

    def no_sampling(c):
        c.neuron_config.on_device_sampling_config = None

    with pytest.raises(AttributeError, match="fused_spec_config"):
        broken(no_fused, "a")
    with pytest.raises(TypeError, match="_model_cls"):
        broken(worker_is_application, "b")
    with pytest.raises(ValueError, match="speculation_length"):
        broken(draft_speculates, "c")
    with pytest.raises(AssertionError, match="on_device_sampling_config"):
        broken(no_sampling, "d")

    # an EAGLE draft config without is_eagle_draft
    head = Draft("eagle", eagle_head, 2)
    backend = make_backend(tiny_llama, head)
    backend.config.fused_spec_config.draft_config.neuron_config.is_eagle_draft = False
    with pytest.raises(ValueError, match="is_eagle_draft"):
        backend.compile(str(tmp_path / "e"))

    # positions: p + k must fit the largest token bucket (seq_len = max_model_len + k)
    backend = make_backend(tiny_llama, draft, tmp_path / "f")
    ids, pos, lines = prefill_args([[5, 6, 7]])
    backend.forward(ids, pos, lines, torch.tensor([GREEDY]))
    k, seq_len = backend.speculation_length, backend.max_length
    with pytest.raises(ValueError, match="beyond the largest bucket"):
        backend.model(torch.tensor([[5]]), position_ids=torch.tensor([[seq_len - k + 1]]),
                      seq_ids=torch.tensor([0]), sampling_params=torch.tensor([GREEDY]))
    # a decode must start where the line's tokens end (here 3, the prompt's length)
    with pytest.raises(ValueError, match="holds 3 tokens"):
        backend.model(torch.tensor([[5]]), position_ids=torch.tensor([[5]]),
                      seq_ids=torch.tensor([0]), sampling_params=torch.tensor([GREEDY]))


def test_a_runner_may_keep_fewer_tokens_than_accepted(tiny_llama, tmp_path):
    """The next step may start anywhere from p + 1 to p + count (the scheduler capped the
    step): the KV past what was kept is overwritten, and the tokens stay HF's."""
    draft = Draft("draft_model", tiny_llama, num_speculative_tokens=3)
    backend = make_backend(tiny_llama, draft, tmp_path)
    prompt, want = PROMPTS[0], hf_greedy(tiny_llama, PROMPTS[:1], [20])[0]
    ids, pos, lines = prefill_args([prompt])
    seq = prompt + backend.forward(ids, pos, lines, torch.tensor([GREEDY])).tokens.tolist()
    keep = [1, 2, 4, 3, 1, 4]
    for n in keep:
        out = backend.forward(torch.tensor([[seq[-1]]]), torch.tensor([[len(seq) - 1]]),
                              torch.tensor([0]), torch.tensor([GREEDY]))
        assert out.spec_tokens.shape == (1, 4) and -1 not in out.spec_tokens[0].tolist()
        seq += out.spec_tokens[0, :n].tolist()
    assert seq[len(prompt):] == want[: 1 + sum(keep)]
