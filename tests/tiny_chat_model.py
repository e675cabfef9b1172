"""A tiny random Llama with SmolLM2's tokenizer and chat template, for server tests.

Server tests about errors, limits and security need a real tokenizer (chat,
tokenize, detokenize) but not real text: random weights start and run faster
than SmolLM2 on a shared 2-core machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import make_tiny_llama
from vllm_neuronx.default_model import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def tiny_chat_model(path) -> str:
    """Build it in ``path``: vocab, bos/eos/pad ids and tokenizer files from SmolLM2."""
    source = Path(default_model_path())
    make_tiny_llama(path, vocab=49152, pad_token_id=2)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, Path(path, name))
    return str(path)
