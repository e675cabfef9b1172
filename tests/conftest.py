"""Shared fixtures: tiny random-weight Llamas made on the fly, and HF references."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_tiny_llama(path, *, seed: int = 0, vocab: int = 512, tie: bool = False,
                    mistral: bool = False, **overrides):
    """A random Llama (or Mistral, for its sliding window) small enough to build and run
    in a second."""
    import transformers

    family = "Mistral" if mistral else "Llama"
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    model = model_class(config_class(**cfg))
    # Spread the logits so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(path)
    return str(path)


def pytest_collection_modifyitems(config, items):
    """Hardware tests (marker ``neuron``) run only where a Neuron device is present."""
    from vllm_neuronx.framework import neuron_device_present

    if neuron_device_present():
        return
    skip = pytest.mark.skip(reason="no Neuron device (/dev/neuron*) on this machine")
    for item in items:
        if "neuron" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def close_to(kernel: str, rtol: float, atol: float, kv_fp8: bool = False,
             kv_bf16: bool = False) -> dict[str, float]:
    """assert_close's tolerances for values from ``kernel`` (a variant's name, or what
    ``CpuBackend.kernel`` says) where fp32 sums would be held to ``rtol`` and ``atol``:
    the amx kernel multiplies each input of 10 rows or more as two bf16 halves (about
    2^-17 of it lost, not fp32's 2^-24: matmul.c), ten times looser; over an fp8 KV cache
    (``kv_fp8``), where such a difference can flip a value's e4m3 rounding (a step of 1/16
    of it), a hundred. Over a bf16 KV cache (``kv_bf16``), where sums in another order can
    land a K/V value one bf16 step (2^-8 of it) apart, ten times looser again."""
    loose = 1 if kernel.split()[0] != "amx" else 100 if kv_fp8 else 10
    loose *= 10 if kv_bf16 else 1
    return {"rtol": rtol * loose, "atol": atol * loose}


def bf16_kv(model) -> bool:
    """Whether a CPU backend's model (llama.py) keeps its KV cache in bf16."""
    return model.k_cache.dtype is torch.bfloat16


def cache_close(kernel: str, rtol: float, atol: float, cache: torch.Tensor) -> dict[str, float]:
    """``close_to`` for KV caches like ``cache``. In bf16, values written from fp32 sums
    that agree to ``close_to``'s tolerance land a bf16 step (2^-8 of the value) apart where
    one sat that near a rounding edge, and the next layer's values move with it: two
    bf16 steps, or a hundred times ``atol`` for values near 0 (a misplaced K/V is off by
    its whole size)."""
    tolerance = close_to(kernel, rtol, atol)
    if cache.dtype is torch.bfloat16:
        tolerance = {"rtol": max(tolerance["rtol"], 2.0 ** -7),
                     "atol": 100 * tolerance["atol"]}
    return tolerance


@contextlib.contextmanager
def hf_kv_cache_in(kv):
    """Hugging Face's KV cache holding each K/V value as the CPU backend's cache does,
    widened back before attention reads it: ``kv`` a dtype (the model's, under fp32
    activations) to round to, or a function rounding a tensor (fp8); None: as computed."""
    from transformers.cache_utils import DynamicLayer

    original = DynamicLayer.update
    rounded_as = kv if callable(kv) else lambda x: x.to(kv).to(x.dtype)

    def rounded(self, key_states, value_states, *args, **kwargs):
        return original(self, rounded_as(key_states), rounded_as(value_states), *args, **kwargs)

    if kv is not None:
        DynamicLayer.update = rounded
    try:
        yield
    finally:
        DynamicLayer.update = original


def hf_greedy(model_path: str, prompts: list[list[int]], max_new_tokens: list[int],
              dtype=torch.float32, weights_in=None) -> list[list[int]]:
    """Greedy continuations from Hugging Face transformers, one prompt at a time.

    ``weights_in``: round the weights to this dtype first, then compute in ``dtype``,
    with the KV cache in ``weights_in`` (the model's dtype, as the backend keeps it).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    if weights_in is not None:
        model = model.to(weights_in).to(dtype)
    outs = []
    with torch.no_grad(), hf_kv_cache_in(weights_in):
        for prompt, n in zip(prompts, max_new_tokens, strict=True):
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
            outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (tests/tiny_chat_model.py), built once."""
    from tests.tiny_chat_model import tiny_chat_model

    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def tiny_chat_server(tiny_chat):
    """The server tests' one way to start our API server on the tiny chat model:
    ``tiny_chat_server(*args, env=...)`` returns a running server with those arguments
    (``server.model`` is the model's path): the same one while it runs, a fresh one once
    a test has stopped it. All stop with the module."""
    from tests.server_utils import Server, api_server_argv

    running: dict[tuple, object] = {}
    started = []

    def get(*args: str, env: dict | None = None):
        key = (args, tuple(sorted((env or {}).items())))
        server = running.get(key)
        if server is None or server.proc.poll() is not None:
            server = Server(api_server_argv(tiny_chat, *args), env=env)
            server.model = tiny_chat
            running[key] = server
            started.append(server)
        return server

    yield get
    for server in started:
        server.stop()


# -- references for host sampling: HF's logits and vLLM's definitions, written out --------
def hf_causal_lm(model_path: str, dtype=torch.float32):
    """The model in HF transformers, for references computed in a test."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()


def hf_log_softmax(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] log-softmax of HF's fp32 logits at every position of ``token_ids``."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return logits.log_softmax(dim=-1)


def hf_decode_with(model, prompt: list[int], steps: int, choose) -> list[int]:
    """Token by token on HF's fp32 logits: ``choose(logits, prompt, generated)`` picks
    each next token from the last position's logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(choose(logits.clone(), list(prompt), ids[len(prompt):])))
    return ids[len(prompt):]


def penalized(logits: torch.Tensor, prompt: list[int], generated: list[int], *,
              repetition: float = 1.0, presence: float = 0.0,
              frequency: float = 0.0) -> torch.Tensor:
    """vLLM's penalties from their definitions, in vLLM's order: the repetition penalty on
    every token seen in the prompt or the output (a positive logit divided by it, a
    negative one multiplied), then OpenAI's frequency (times the count) and presence
    (once) penalties on the output's tokens only."""
    vocab = logits.shape[0]
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt + generated, dtype=torch.long)] = True
    logits = torch.where(seen & (logits > 0), logits / repetition,
                         torch.where(seen, logits * repetition, logits))
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab).float()
    return logits - frequency * counts - presence * (counts > 0).float()


class SeededSampling:
    """vLLM V1's random sampling of a request with a ``seed``, from its definition: a
    generator seeded once per request (``torch.Generator().manual_seed(seed)``); each
    step divides the fp32 logits by the temperature, applies ``min_p`` (tokens less
    likely than ``min_p`` times the likeliest are dropped), takes the softmax and draws
    the token by the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)`` drawn from
    that generator over the whole vocabulary (vLLM's ``random_sample``)."""

    def __init__(self, seed: int, temperature: float = 1.0, min_p: float = 0.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.temperature = temperature
        self.min_p = min_p

    def __call__(self, logits: torch.Tensor, _prompt=None, _generated=None) -> int:
        logits = logits.float() / self.temperature
        if self.min_p:
            probs = logits.softmax(dim=-1)
            logits = logits.masked_fill(probs < self.min_p * probs.max(), float("-inf"))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        return int((probs / q).argmax())
