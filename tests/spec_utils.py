"""Drafts for speculation tests: a random tiny draft of a tiny target's vocabulary, the first
N layers of any Llama-family folder as a real HF checkpoint (SmolLM2's too), and the target
copied as its own draft."""

from __future__ import annotations

import json
import os
import shutil

from tests.conftest import make_tiny_llama
from vllm_neuronx.drafts import first_layers_draft


def tiny_draft(target: str, folder, *, seed: int = 7, **overrides) -> str:
    """A random tiny Llama with ``target``'s vocabulary (its other shapes its own: one
    layer by default): a draft that agrees with the target by chance only."""
    with open(os.path.join(target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    overrides.setdefault("num_hidden_layers", 1)
    return make_tiny_llama(folder, seed=seed, vocab=vocab, **overrides)


def first_layers(target: str, folder, num_layers: int) -> str:
    """``target``'s first ``num_layers`` layers with its embedding, final norm and LM head
    (config num_hidden_layers=N, the tokenizer files copied): an early-exit draft."""
    return first_layers_draft(target, str(folder), num_layers)


def self_draft(target: str, folder) -> str:
    """The target copied as its own draft: every proposal is the target's token."""
    return str(shutil.copytree(target, folder))
