"""The transformers-neuronx (TNx) backend: TNx's continuous-batching models behind our protocol.

What it builds, as vLLM's own TNx loader did:
``LlamaForSampling`` / ``MistralForSampling`` ``.from_pretrained(path, tp_degree, amp,
neuron_config=NeuronConfig(continuous_batching=ContinuousBatchingConfig(
batch_size_for_shared_caches=B), attention_layout=BSH, collectives_layout=BSH,
fuse_qkv=True, quant=..., weight_tiling=..., on_device_generation=GenerationConfig(...)),
context_length_estimate=[...], n_positions=[...], batch_size=B)``.

Buckets come from ``NEURON_CONTEXT_LENGTH_BUCKETS`` / ``NEURON_TOKEN_GEN_BUCKETS``
when set, else from the neuron config (the same buckets the other backends use).
``--quantization neuron_quant`` (or ``quantized: true`` in the neuron config)
quantizes weights to ``NEURON_QUANT_DTYPE`` (s8 or f8e4m3fn).

Compiled artifacts: TNx's ``model.save(dir)`` writes the compiled graphs (NEFFs,
one file per graph, named by a hash of it). Weights are not part of them: on a warm
start ``model.load(dir)`` registers the folder and ``to_neuron()`` reads the
weights from the checkpoint again and the graphs from the folder, skipping the
compiler. A folder whose graphs do not match the configuration fails to load
(FileNotFoundError) and is recompiled by the artifact cache.

Runtime: ``model(input_ids, cache_ids=positions, start_ids=kv_lines)``. TNx tells
prefill from decode by the width of the call: width > 1 with the first cache id 0
is context encoding, width 1 is token generation, which TNx pads to the whole
batch (lines not in the call run token 0 at position 0, overwriting their first
KV entry). So a prefill of 1-token prompts is widened to 2 columns here (padding at
position 0 that the prompt's last-token index ignores), keeping it on the
context-encoding graph that writes only its own lines. Rows go to TNx sorted by
KV line; results come back in the caller's row order. With on-device sampling,
each line's top_k/top_p/temperature live on the device and are pushed with
``update_generation_config`` whenever a line's values change.

``transformers_neuronx`` is imported only inside methods, so this module loads
on machines without it.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

from vllm_neuronx import envs
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.protocol import (
    Batch,
    ForwardOutput,
    NeuronBackend,
    SamplingCapabilities,
)
from vllm_neuronx.log import get_logger
from vllm_neuronx.speculation import Draft

logger = get_logger(__name__)

#: HF architecture -> (TNx module, class).
SUPPORTED_MODELS = {
    "LlamaForCausalLM": ("transformers_neuronx.llama.model", "LlamaForSampling"),
    "MistralForCausalLM": ("transformers_neuronx.mistral.model", "MistralForSampling"),
}
AMP = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
QUANTIZATION = "neuron_quant"
QUANT_DTYPES = ("s8", "f8e4m3fn")
CONTEXT_ENV = "NEURON_CONTEXT_LENGTH_BUCKETS"
TOKEN_ENV = "NEURON_TOKEN_GEN_BUCKETS"

# Neuron config keys this backend honours (plus vLLM's defaults, which it derives from).
_HONOURED_KEYS = frozenset(
    {"context_encoding_buckets", "token_generation_buckets", "cast_logits_dtype"}
)
# TNx-only override keys that this backend does not build objects from (yet).
_TNX_OBJECT_KEYS = ("continuous_batching", "quant", "on_device_generation", "sparse_attn")
_LOGITS_DTYPES = ("float32", "float16", "bfloat16")


def parse_buckets(var: str, raw: str | None) -> list[int] | None:
    """A comma list of positive, ascending ints from ``var``; None when unset or empty."""
    if raw is None or not raw.strip():
        return None
    buckets = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise nc.NeuronConfigError(
                f"{var}={raw!r}: {part!r} is not an integer; give a comma-separated list of "
                "token counts such as 128,512,1024"
            ) from None
        if value < 1:
            raise nc.NeuronConfigError(f"{var}={raw!r}: buckets must be positive, got {value}")
        buckets.append(value)
    if not buckets:
        raise nc.NeuronConfigError(f"{var}={raw!r} names no bucket")
    if buckets != sorted(set(buckets)):
        raise nc.NeuronConfigError(
            f"{var}={raw!r}: buckets must be ascending without repeats"
        )
    return buckets


def tnx_buckets(cfg: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(context_length_estimate, n_positions): from the env variables, else the config."""
    seq_len = cfg["seq_len"]
    context = parse_buckets(CONTEXT_ENV, envs.NEURON_CONTEXT_LENGTH_BUCKETS)
    context_src = CONTEXT_ENV if context is not None else "context_encoding_buckets"
    if context is None:
        context = nc.context_buckets(cfg)
    token = parse_buckets(TOKEN_ENV, envs.NEURON_TOKEN_GEN_BUCKETS)
    token_src = TOKEN_ENV if token is not None else "token_generation_buckets"
    if token is None:
        token = nc.token_buckets(cfg)
    if token[-1] < seq_len:
        raise nc.NeuronConfigError(
            f"{token_src} {token} end below max_model_len={seq_len}: sequences could not grow "
            f"to max_model_len; make the largest bucket {seq_len}"
        )
    if context[-1] > token[-1]:
        raise nc.NeuronConfigError(
            f"{context_src} {context} go past the largest token-generation bucket ({token[-1]}, "
            f"{token_src}); TNx needs max context_length_estimate <= max n_positions"
        )
    return context, token


def effective_quantization(cfg: dict[str, Any], quantization: str | None) -> str | None:
    """vLLM's --quantization, or neuron_quant when the config says ``quantized``."""
    if quantization is None and cfg.get("quantized"):
        return QUANTIZATION
    return quantization


def quant_dtype() -> str:
    value = envs.NEURON_QUANT_DTYPE or "s8"
    if value not in QUANT_DTYPES:
        raise nc.NeuronConfigError(
            f"NEURON_QUANT_DTYPE={value!r} is not a transformers-neuronx weight type; use one "
            f"of {list(QUANT_DTYPES)}"
        )
    return value


class TnxBackend(NeuronBackend):
    framework = "transformers-neuronx"
    architectures = tuple(SUPPORTED_MODELS)

    def __init__(
        self,
        model_path: str,
        neuron_config: dict[str, Any],
        *,
        seed: int = 0,
        quantization: str | None = None,
        draft: Draft | None = None,
    ) -> None:
        # Speculation is refused on transformers-neuronx when vLLM's config is resolved
        # (unserved.py), so ``draft`` is always None here.
        super().__init__(model_path, neuron_config, seed=seed, draft=draft)
        self.quantization = effective_quantization(neuron_config, quantization)
        self.validate(neuron_config, quantization=self.quantization)
        with open(os.path.join(model_path, "config.json")) as f:
            self.hf_config = json.load(f)
        archs = self.hf_config.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_MODELS), None)
        if arch is None:
            raise ValueError(
                f"transformers-neuronx backend: architectures {archs} are not supported; "
                f"supported: {sorted(SUPPORTED_MODELS)}"
            )
        self.architecture = arch
        self._context_buckets, self._token_buckets = tnx_buckets(neuron_config)
        self.model = None
        self._ready = False
        # Per KV line (top_k, top_p, temperature) as last pushed to the device.
        self._line_sampling: list[tuple[int, float, float]] | None = None
        self.generation_updates = 0

    @classmethod
    def version(cls) -> str:
        """Artifacts of another compiler, runtime or TNx release are recompiled."""
        from vllm_neuronx.artifacts import package_versions

        return "tnx-2 " + package_versions(
            ("torch", "transformers", "neuronx-cc", "torch-neuronx", "transformers-neuronx")
        )

    @classmethod
    def sampling_capabilities(cls, neuron_config: dict[str, Any]) -> SamplingCapabilities:
        """TNx returns device-sampled tokens or (on-device generation off) logits, never
        both, and only the last prompt position's logits."""
        return SamplingCapabilities(
            logits=neuron_config.get("on_device_sampling_config") is None,
            prompt_logits=False,
            enable_logits=(
                "turn on-device sampling off with NEURON_ON_DEVICE_SAMPLING_DISABLED=1 "
                "(transformers-neuronx returns either tokens or logits)"
            ),
        )

    # -- checks --------------------------------------------------------------------
    @classmethod
    def validate(cls, neuron_config: dict[str, Any], *, quantization: str | None = None) -> None:
        cfg = neuron_config
        quantization = effective_quantization(cfg, quantization)
        if quantization is not None:
            if quantization != QUANTIZATION:
                raise nc.NeuronConfigError(
                    f"quantization={quantization!r} is not supported by transformers-neuronx; "
                    f"use --quantization {QUANTIZATION} (with NEURON_QUANT_DTYPE s8 or f8e4m3fn)"
                )
            quant_dtype()
        if cfg["torch_dtype"] not in AMP:
            raise nc.NeuronConfigError(
                f"torch_dtype {cfg['torch_dtype']!r} has no transformers-neuronx amp; use one of "
                f"{sorted(AMP)}"
            )
        derived = nc.default_neuron_config(
            tp_degree=1, max_num_seqs=1, max_model_len=1, dtype="float32"
        )
        for key in cfg:
            if key in _TNX_OBJECT_KEYS:
                raise nc.NeuronConfigError(
                    f"override_neuron_config key {key!r} is not supported by the "
                    "transformers-neuronx backend; it builds continuous_batching, quant and "
                    "on_device_generation itself (see --quantization neuron_quant and "
                    "NEURON_ON_DEVICE_SAMPLING_DISABLED)"
                )
            if key not in derived and key not in _HONOURED_KEYS:
                raise nc.NeuronConfigError(
                    f"override_neuron_config key {key!r} has no transformers-neuronx "
                    "equivalent; remove it, or serve with VLLM_NEURON_FRAMEWORK="
                    "neuronx-distributed-inference"
                )
        if cfg.get("ctx_batch_size", 1) != 1:
            raise nc.NeuronConfigError(
                f"ctx_batch_size={cfg['ctx_batch_size']}: transformers-neuronx encodes one prompt "
                "per context-encoding run; leave ctx_batch_size at 1"
            )
        logits_dtype = cfg.get("cast_logits_dtype", "float32")
        if logits_dtype not in _LOGITS_DTYPES:
            raise nc.NeuronConfigError(
                f"cast_logits_dtype {logits_dtype!r} must be one of {list(_LOGITS_DTYPES)}"
            )
        tnx_buckets(cfg)

    # -- facts ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def context_buckets(self) -> list[int]:
        return list(self._context_buckets)

    @property
    def token_buckets(self) -> list[int]:
        return list(self._token_buckets)

    # -- build ----------------------------------------------------------------------
    def _model_class(self):
        module, name = SUPPORTED_MODELS[self.architecture]
        return getattr(importlib.import_module(module), name)

    def _initial_line_sampling(self) -> list[tuple[int, float, float]]:
        return [(int(self.global_topk), 1.0, 1.0)] * self.num_lines

    def _generation_config(self, lines: list[tuple[int, float, float]]):
        from transformers_neuronx.config import GenerationConfig

        ods = self.neuron_config["on_device_sampling_config"]
        return GenerationConfig(
            max_length=self.neuron_config["seq_len"],
            do_sample=True,
            per_batch_line=True,
            top_k=[k for k, _, _ in lines],
            top_p=[p for _, p, _ in lines],
            temperature=[t for _, _, t in lines],
            dynamic=True,
            deterministic=bool(ods.get("deterministic", False)),
            global_top_k=int(self.global_topk),
        )

    def tnx_neuron_config(self):
        """The TNx NeuronConfig this backend compiles with."""
        from transformers_neuronx.config import (
            ContinuousBatchingConfig,
            NeuronConfig,
            QuantizationConfig,
        )
        from transformers_neuronx.constants import LAYOUT_BSH

        amp = AMP[self.neuron_config["torch_dtype"]]
        quant = None
        if self.quantization == QUANTIZATION:
            quant = QuantizationConfig(
                quant_dtype=quant_dtype(), dequant_dtype=amp, quantize_method="vector_dynamic"
            )
        generation = None
        if self.on_device_sampling:
            generation = self._generation_config(self._initial_line_sampling())
        return NeuronConfig(
            continuous_batching=ContinuousBatchingConfig(
                batch_size_for_shared_caches=self.num_lines
            ),
            attention_layout=LAYOUT_BSH,
            collectives_layout=LAYOUT_BSH,
            fuse_qkv=True,
            quant=quant,
            weight_tiling=quant is not None,
            on_device_generation=generation,
            cast_logits_dtype=self.neuron_config.get("cast_logits_dtype", "float32"),
        )

    def _build(self):
        cfg = self.neuron_config
        self._ready = False
        self._line_sampling = self._initial_line_sampling() if self.on_device_sampling else None
        self.model = self._model_class().from_pretrained(
            self.model_path,
            tp_degree=cfg["tp_degree"],
            amp=AMP[cfg["torch_dtype"]],
            neuron_config=self.tnx_neuron_config(),
            context_length_estimate=self.context_buckets,
            n_positions=self.token_buckets,
            batch_size=self.num_lines,
        )
        return self.model

    def compile(self, folder: str) -> None:
        model = self._build()
        model.to_neuron()
        model.save(folder)
        self._ready = True
        logger.info(
            "transformers-neuronx: compiled %s (context buckets %s, token buckets %s) into %s",
            type(model).__name__,
            self.context_buckets,
            self.token_buckets,
            folder,
        )

    def _load(self, folder: str) -> None:
        if self._ready:  # compile() just built and compiled this very model
            return
        try:
            model = self._build()
            model.load(folder)
            model.to_neuron()
        except BaseException:
            self.model = None
            raise
        self._ready = True

    # -- run ---------------------------------------------------------------------------
    def _push_sampling(self, lines: list[int], params: torch.Tensor) -> None:
        """Write changed per-line top_k/top_p/temperature to the device, indexed by KV line."""
        current = list(self._line_sampling)
        topk = int(self.global_topk)
        for line, (k, p, t) in zip(lines, params.tolist(), strict=True):
            k = int(k)
            current[line] = (topk if k < 1 else k, float(p), float(t))
        if current != self._line_sampling:
            self.model.update_generation_config(self._generation_config(current))
            self._line_sampling = current
            self.generation_updates += 1

    def prefill(self, batch: Batch) -> ForwardOutput:
        return self._call(batch)

    def decode(self, batch: Batch) -> ForwardOutput:
        return self._call(batch)

    def _call(self, batch: Batch) -> ForwardOutput:
        n, topk = batch.size, self.global_topk
        order = torch.argsort(batch.seq_ids, stable=True)
        restore = torch.argsort(order)
        ids, pos, lines = batch.input_ids[order], batch.position_ids[order], batch.seq_ids[order]
        if batch.is_prefill:
            width = ids.shape[1]
            if width > self._context_buckets[-1]:
                raise ValueError(
                    f"a prompt of {width} tokens exceeds the largest context-encoding bucket "
                    f"({self._context_buckets[-1]}); raise {CONTEXT_ENV} or the "
                    "context_encoding_buckets"
                )
            if width == 1:  # keep TNx on the context-encoding graph (see module docstring)
                ids = torch.cat([ids, torch.zeros_like(ids)], dim=1)
                pos = torch.cat([pos, torch.zeros_like(pos)], dim=1)
        else:
            last = int(pos.max())
            if last >= self._token_buckets[-1]:
                raise ValueError(
                    f"position {last} is past the largest token-generation bucket "
                    f"({self._token_buckets[-1]}, {TOKEN_ENV})"
                )
        if topk is not None:
            self._push_sampling(lines.tolist(), batch.sampling_params[order])
        out = self.model(ids, cache_ids=pos, start_ids=lines)
        if topk is not None:
            tokens = out.reshape(-1)
            if tokens.shape[0] != n:
                raise RuntimeError(f"TNx returned {tokens.shape[0]} tokens for {n} rows")
            return ForwardOutput(tokens=tokens.to(torch.int64)[restore])
        logits = out.reshape(n, -1)[:, : self.vocab_size].float()
        return ForwardOutput(logits=logits[restore])
