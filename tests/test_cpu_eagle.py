"""The CPU backend's EAGLE heads (vllm_neuronx/backends/cpu/eagle.py) against a plain
re-implementation of vLLM 0.16's llama_eagle.py / llama_eagle3.py written out below: a
sequence at once equals it token by token, KV lines are independent, EAGLE3's draft
vocabulary lands on the target's ids, both checkpoint formats load, bad folders are
named, and vLLM's SpeculativeConfig accepts the head folders tests/eagle_utils.py writes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_llama
from tests.eagle_utils import (
    hf_features,
    make_eagle_target,
    write_eagle3_head,
    write_eagle_head,
    write_layer_eagle_head,
)
from vllm_neuronx.backends.cpu.eagle import EagleHead, EagleHeadError
from vllm_neuronx.backends.cpu.llama import LlamaModel, LlamaSpec

MAX_LEN = 64


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    """Four layers: an EAGLE3 head reads three distinct ones of 1..L-1."""
    return make_tiny_llama(tmp_path_factory.mktemp("eagle-target"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def eagle1(target, tmp_path_factory) -> str:
    return write_eagle_head(target, tmp_path_factory.mktemp("eagle1"))


@pytest.fixture(scope="module")
def eagle3(target, tmp_path_factory) -> str:
    return write_eagle3_head(target, tmp_path_factory.mktemp("eagle3"))


def target_weights(path: str) -> dict:
    spec = LlamaSpec.from_folder(path)
    return LlamaModel.convert_hf_weights(spec, load_file(os.path.join(path, "model.safetensors")),
                                         torch.float32)


def load(head: str, target: str, *, lines: int = 4, dtype=torch.float32, **kw) -> EagleHead:
    kw.setdefault("target_weights", target_weights(target))
    return EagleHead.from_folder(head, LlamaSpec.from_folder(target), num_lines=lines,
                                 max_len=MAX_LEN, dtype=dtype, **kw)


# -- the reference: vLLM's two heads over one whole sequence, from their definitions ------
def rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, pos, theta):
    """HF's rotary (rotate_half) on x [n, heads, d] at positions pos [n]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def reference(head: str, target: str, tokens, feats, start: int = 0):
    """Rows (tokens[j], feats[j]) at positions start + j of one fresh line, causal:
    (logits over the target vocabulary [n, V], hidden [n, H])."""
    with open(os.path.join(head, "config.json")) as f:
        cfg = json.load(f)
    t = {n.removeprefix("model.").replace("midlayer.", "layers.0."): v
         for n, v in load_file(os.path.join(head, "model.safetensors")).items()}
    tgt = load_file(os.path.join(target, "model.safetensors"))
    eagle3 = "LlamaForCausalLMEagle3" in cfg["architectures"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    embed = t.get("embed_tokens.weight", tgt["model.embed_tokens.weight"])
    lm_head = t.get("lm_head.weight", tgt.get("lm_head.weight"))
    e = embed[torch.tensor(tokens)]
    feats = feats.float()
    n = len(tokens)
    pos = torch.arange(start, start + n)
    if eagle3:
        g = feats @ t["fc.weight"].T if feats.shape[-1] != cfg["hidden_size"] else feats
        normed = rms(g, t["layers.0.hidden_norm.weight"], eps)
        x = normed if cfg.get("norm_before_residual") else g
        a = torch.cat([rms(e, t["layers.0.input_layernorm.weight"], eps), normed], -1)
    else:
        x = torch.cat([e, feats], -1) @ t["fc.weight"].T + t.get("fc.bias", 0)
        a = x
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        if i > 0:
            a = rms(x, t[p + "input_layernorm.weight"], eps)
        q = rotate((a @ t[p + "self_attn.q_proj.weight"].T).view(n, heads, d), pos, theta)
        k = rotate((a @ t[p + "self_attn.k_proj.weight"].T).view(n, kv, d), pos, theta)
        v = (a @ t[p + "self_attn.v_proj.weight"].T).view(n, kv, d)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
        x = x + attn @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
        act = torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T)
        x = x + (act * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    if not eagle3:
        return x @ lm_head.T, x
    draft = rms(x, t["norm.weight"], eps) @ t["lm_head.weight"].T
    if "d2t" not in t:
        return draft, x
    full = torch.full((n, cfg["vocab_size"]), float("-inf"))
    full[:, torch.arange(len(t["d2t"])) + t["d2t"]] = draft
    return full, x


def close(a, b):
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def sequence(target: str, n: int, aux=None, seed: int = 0):
    """Random tokens t_0..t_n and the target's features: rows (t_{j+1}, f_j), j < n."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 512, (n + 1,), generator=g).tolist()
    _, feats = hf_features(target, tokens, aux)
    return tokens[1:], feats[:n]


def run(head: EagleHead, tokens, feats, line: int, start: int = 0):
    n = len(tokens)
    return head.forward(torch.tensor(tokens), feats, torch.arange(start, start + n),
                        torch.full((n,), line))


# -- tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_a_sequence_at_once_equals_token_by_token_and_the_reference(method, target, eagle1,
                                                                    eagle3):
    path = eagle1 if method == "eagle" else eagle3
    head = load(path, target)
    assert head.method == method
    tokens, feats = sequence(target, 12, head.aux_layer_ids)
    assert feats.shape[-1] == head.feature_size
    ref_logits, ref_hidden = reference(path, target, tokens, feats)
    logits, hidden = run(head, tokens, feats, line=1)
    close(logits, ref_logits)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    assert logits.dtype is torch.float32 and logits.shape == (12, 512)

    fresh = load(path, target)
    for j in range(12):  # one row a call, the same line: KV lines carry the past
        lj, hj = run(fresh, tokens[j:j + 1], feats[j:j + 1], line=1, start=j)
        close(lj, ref_logits[j:j + 1])
        torch.testing.assert_close(hj, ref_hidden[j:j + 1], rtol=1e-4, atol=1e-4)

    # Catching up on accepted positions and proposing in one call: rows 5..8 at once.
    again = load(path, target)
    run(again, tokens[:5], feats[:5], line=1)
    lj, _ = run(again, tokens[5:9], feats[5:9], line=1, start=5)
    close(lj, ref_logits[5:9])


def test_eagle3_proposal_steps_feed_the_heads_own_hidden(target, eagle3):
    """vLLM's later steps: the token just proposed, one position on, and the head's pre-norm
    hidden (H wide, no fc) as the feature; rows of both kinds mix after ``combine``."""
    head = load(eagle3, target)
    tokens, feats = sequence(target, 6, head.aux_layer_ids)
    logits, hidden = run(head, tokens, feats, line=0)
    proposal = int(logits[-1].argmax())
    step, _ = run(head, [proposal], hidden[-1:], line=0, start=6)
    ref, _ = reference(eagle3, target, tokens + [proposal],
                       torch.cat([head.combine(feats), hidden[-1:]]))
    close(step, ref[-1:])
    mixed = load(eagle3, target)
    both, _ = run(mixed, tokens + [proposal], torch.cat([mixed.combine(feats), hidden[-1:]]),
                  line=0)
    close(both, ref)
    with pytest.raises(ValueError, match="features are 7 wide"):
        run(mixed, tokens[:1], torch.zeros(1, 7), line=0)
    none, nothing = run(mixed, [], torch.zeros(0, 64), line=0)  # a one-token prompt's rows
    assert none.shape == (0, 512) and nothing.shape == (0, 64)


def test_lines_are_independent(target, eagle1):
    head = load(eagle1, target)
    a_tok, a_feat = sequence(target, 5, seed=1)
    b_tok, b_feat = sequence(target, 3, seed=2)
    ref_a, _ = reference(eagle1, target, a_tok, a_feat)
    ref_b, _ = reference(eagle1, target, b_tok, b_feat)
    # Interleaved rows of two lines in one call (line 3 after line 0's rows, mixed order).
    order = [0, 5, 1, 6, 2, 3, 7, 4]
    tokens = torch.tensor(a_tok + b_tok)[order]
    feats = torch.cat([a_feat, b_feat])[order]
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])[order]
    lines = torch.tensor([0] * 5 + [3] * 3)[order]
    logits, _ = head.forward(tokens, feats, positions, lines)
    close(logits, torch.cat([ref_a, ref_b])[order])
    # A line's later rows see only that line; another line's new prefill does not touch it.
    c_tok, c_feat = sequence(target, 5, seed=3)
    head.forward(torch.tensor(c_tok), c_feat, torch.arange(5), torch.full((5,), 2))
    nxt_a, nxt_b = sequence(target, 6, seed=1), sequence(target, 4, seed=2)
    step, _ = head.forward(torch.tensor([nxt_a[0][5], nxt_b[0][3]]),
                           torch.stack([nxt_a[1][5], nxt_b[1][3]]),
                           torch.tensor([5, 3]), torch.tensor([0, 3]))
    close(step[0:1], reference(eagle1, target, *nxt_a)[0][5:6])
    close(step[1:2], reference(eagle1, target, *nxt_b)[0][3:4])


def test_eagle3_maps_its_draft_vocabulary_onto_the_targets(target, eagle3):
    head = load(eagle3, target)
    d2t = load_file(os.path.join(eagle3, "model.safetensors"))["d2t"]
    ids = torch.arange(len(d2t)) + d2t
    assert len(ids) == 256 and head.draft_to_target.tolist() == ids.tolist()
    tokens, feats = sequence(target, 4, head.aux_layer_ids)
    logits, _ = run(head, tokens, feats, line=0)
    finite = torch.isfinite(logits)
    assert finite.sum(-1).tolist() == [256] * 4
    assert finite[:, ids].all()
    # The draft's own logits, in draft order, sit at the mapped target ids.
    draft_logits = logits[:, ids]
    assert logits.argmax(-1).tolist() == ids[draft_logits.argmax(-1)].tolist()


def test_eagle3_without_d2t_spans_the_targets_vocabulary(target, tmp_path):
    path = write_eagle3_head(target, tmp_path / "full", d2t=False, norm_before_residual=True,
                             embed="random")
    head = load(path, target)
    assert head.draft_to_target is None and head.norm_before_residual
    assert head.borrowed == frozenset()  # its own embed_tokens and lm_head
    tokens, feats = sequence(target, 5, head.aux_layer_ids)
    logits, _ = run(head, tokens, feats, line=0)
    assert torch.isfinite(logits).all()
    close(logits, reference(path, target, tokens, feats)[0])


def test_both_checkpoint_formats_load(target, eagle1, tmp_path):
    """vLLM's (no lm_head, no embed_tokens: the target's) and NxDI's (its own lm_head and
    embed_tokens, fc.bias, names under ``model.``), and a pytorch_model.bin."""
    calls = []

    def counting_linear(x, w, b=None):
        calls.append(tuple(w.shape))
        return torch.nn.functional.linear(x, w, b)

    vllm_head = load(eagle1, target, target_linear=counting_linear)
    assert vllm_head.borrowed == {"embed", "lm_head"}
    tokens, feats = sequence(target, 4)
    run(vllm_head, tokens, feats, line=0)
    assert calls == [(512, 64)]  # the target's lm_head through the target's matmul

    nxdi = write_eagle_head(target, tmp_path / "nxdi", seed=5, lm_head="random", embed="random",
                            fc_bias=True, prefix="model.")
    head = load(nxdi, target)
    assert head.borrowed == frozenset() and "fc_bias" in head.w
    close(run(head, tokens, feats, line=0)[0], reference(nxdi, target, tokens, feats)[0])
    # HF names for the target's weights work as well as ours.
    hf = load_file(os.path.join(target, "model.safetensors"))
    close(run(load(eagle1, target, target_weights=hf), tokens, feats, line=0)[0],
          reference(eagle1, target, tokens, feats)[0])

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(eagle1, "config.json"), binary)
    torch.save(load_file(os.path.join(eagle1, "model.safetensors")),
               binary / "pytorch_model.bin")
    close(run(load(str(binary), target), tokens, feats, line=0)[0],
          reference(eagle1, target, tokens, feats)[0])


def test_a_two_layer_eagle1_head_has_an_input_norm_on_layer_1_only(target, tmp_path):
    path = write_eagle_head(target, tmp_path / "two", num_layers=2)
    head = load(path, target)
    assert "layers.0.ln1" not in head.w and "layers.1.ln1" in head.w
    tokens, feats = sequence(target, 6)
    close(run(head, tokens, feats, line=2)[0], reference(path, target, tokens, feats)[0])


def test_bf16_head_runs_close_to_fp32(target, eagle3):
    tokens, feats = sequence(target, 8, (1, 2, 3))
    ref, _ = run(load(eagle3, target), tokens, feats, line=0)
    half, hidden = run(load(eagle3, target, dtype=torch.bfloat16), tokens, feats, line=0)
    assert half.dtype is torch.float32 and hidden.dtype is torch.bfloat16
    finite = torch.isfinite(ref)
    torch.testing.assert_close(half[finite], ref[finite], rtol=0.05, atol=0.15)


def _broken(src: str, dst, drop=(), config=None) -> str:
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = {n: t for n, t in load_file(file).items() if n not in drop}
    save_file(tensors, file)
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return str(dst)


def test_bad_folders_are_named(target, eagle1, eagle3, tmp_path):
    no_fc = _broken(eagle1, tmp_path / "no-fc", drop={"fc.weight"})
    with pytest.raises(EagleHeadError, match=f"EAGLE head {no_fc}: fc.weight is missing"):
        load(no_fc, target)
    no_fc3 = _broken(eagle3, tmp_path / "no-fc3", drop={"fc.weight"})
    with pytest.raises(EagleHeadError, match=f"EAGLE head {no_fc3}: fc.weight is missing"):
        load(no_fc3, target)
    narrow = make_tiny_llama(tmp_path / "narrow", hidden_size=32, num_hidden_layers=4)
    with pytest.raises(EagleHeadError, match=f"EAGLE head {eagle1}: hidden_size 64 differs "
                                             "from the target's 32"):
        load(eagle1, narrow)
    with pytest.raises(EagleHeadError, match=f"EAGLE head {eagle3}: fc reads the target's "
                                             "hidden size 64"):
        load(eagle3, narrow)
    with pytest.raises(EagleHeadError, match="no config.json"):
        load(str(tmp_path), target)
    with pytest.raises(EagleHeadError, match="embed_tokens.weight is missing and no target"):
        load(eagle1, target, target_weights=None)
    no_d2t = _broken(eagle3, tmp_path / "no-d2t", drop={"d2t"})
    with pytest.raises(EagleHeadError, match="draft_vocab_size 256 < vocab_size 512 needs"):
        load(no_d2t, target)
    other_vocab = _broken(eagle1, tmp_path / "vocab", config={"vocab_size": 1000})
    with pytest.raises(EagleHeadError, match="vocab_size 1000 differs from the target's 512"):
        load(other_vocab, target)
    two_layers = make_tiny_llama(tmp_path / "two-layers")  # EAGLE3 reads 3 layers of 1..L-1
    defaults = _broken(eagle3, tmp_path / "defaults",
                       config={"eagle_aux_hidden_state_layer_ids": None})
    with pytest.raises(EagleHeadError, match=r"three distinct target layers in 1\.\.1 to read "
                                             r"\(the default \[2, 1, -1\]"):
        load(defaults, two_layers)


def test_vllm_accepts_the_head_folders(target, eagle1, eagle3):
    """vLLM 0.16's SpeculativeConfig (no GPU needed) takes both folders: EAGLEConfig wraps
    them as EagleLlamaForCausalLM / LlamaForCausalLMEagle3 and keeps the aux layer ids."""
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig

    model = ModelConfig(model=target, skip_tokenizer_init=True, dtype="float32",
                        max_model_len=MAX_LEN)
    for method, head, arch in (("eagle", eagle1, "EagleLlamaForCausalLM"),
                               ("eagle3", eagle3, "LlamaForCausalLMEagle3")):
        spec = SpeculativeConfig(model=head, method=method, num_speculative_tokens=2,
                                 target_model_config=model,
                                 target_parallel_config=ParallelConfig())
        assert spec.method == method
        assert spec.draft_model_config.architectures == [arch]
    hf = spec.draft_model_config.hf_config
    assert list(hf.eagle_aux_hidden_state_layer_ids) == [1, 2, 3]
    assert hf.draft_vocab_size == 256


def test_a_head_made_of_the_targets_layer_mostly_agrees_with_it(tmp_path):
    """write_layer_eagle_head: the head's proposal from (t_{j+1}, f_j) is the target's
    greedy token after t_{j+1} far more often than a random head's."""
    from tests.conftest import hf_greedy

    tgt = make_eagle_target(tmp_path / "target")
    layer = write_layer_eagle_head(tgt, tmp_path / "layer")
    rand = write_eagle_head(tgt, tmp_path / "random")
    prompt = [1, 17, 93, 201, 7]
    tokens = prompt + hf_greedy(tgt, [prompt], [24])[0]
    logits, feats = hf_features(tgt, tokens)
    target_next = logits.argmax(-1)[1:]  # the target's token after t_{j+1}
    rates = {}
    for name, path in (("layer", layer), ("random", rand)):
        head = load(path, tgt)
        proposals, _ = run(head, tokens[1:], feats[:-1], line=0)
        rates[name] = (proposals.argmax(-1) == target_next).float().mean().item()
    assert rates["layer"] >= 0.85 and rates["random"] <= 0.2, rates  # 0.96 and 0.0 seen
