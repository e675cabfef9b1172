"""``NeuronModelBase``: from_pretrained / to_neuron / save / load / forward, simulated.

Only what vLLM's continuous-batching path uses is modelled; the rest refuses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import torch

from transformers_neuronx import bucket
from transformers_neuronx._sim_state import SimulatorError, count
from transformers_neuronx.config import AMP_DTYPES, GenerationConfig, NeuronConfig
from vllm_neuronx import sampling
from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint
from vllm_neuronx.backends.cpu.llama import LlamaModel, LlamaSpec

_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Keywords of LlamaForSampling/MistralForSampling.__init__ (TNx ignores others; we refuse).
_INIT_KEYWORDS = {
    "n_positions": 2048,
    "batch_size": 1,
    "amp": "f32",
    "tp_degree": 2,
    "context_length_estimate": None,
    "context_unroll": None,
    "unroll": None,
    "neuron_config": None,
    "prefixed_length": 0,
}
# Marks a KV line whose position 0 a token-generation call overwrote (it was not in start_ids).
_CLOBBERED = -1


def _fake_quantize(weight: torch.Tensor, quant_dtype: str) -> torch.Tensor:
    """Per-output-channel quantize -> dequantize round trip (vector_dynamic)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    if quant_dtype == "s8":
        scale = absmax / 127.0
        q = torch.round(w / scale).clamp(-127, 127)
    else:  # f8e4m3fn, with TNx's +-240 bound
        scale = absmax / 240.0
        q = (w / scale).to(torch.float8_e4m3fn).float()
    return (q * scale).to(weight.dtype)


class NeuronModelBase:
    """One compiled model: the KV lines, the graphs per bucket, the device sampler."""

    #: The Hugging Face class whose checkpoint this TNx class reads.
    hf_architecture: str = ""

    def __init__(self, config: dict[str, Any], model_path: str, **kwargs) -> None:
        unknown = set(kwargs) - set(_INIT_KEYWORDS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}"
            )
        args = {**_INIT_KEYWORDS, **kwargs}
        archs = config.get("architectures") or []
        if self.hf_architecture not in archs:
            raise ValueError(
                f"{type(self).__name__} reads {self.hf_architecture} checkpoints; "
                f"this one is {archs}"
            )
        self.spec = LlamaSpec.from_hf_config(config)
        self.model_path = model_path
        self.config = config
        neuron_config = args["neuron_config"] or NeuronConfig()
        if not isinstance(neuron_config, NeuronConfig):
            raise TypeError(f"neuron_config must be a NeuronConfig, got {type(neuron_config)}")
        neuron_config.check_modelled()
        self.neuron_config = neuron_config
        for name in ("context_unroll", "unroll"):
            if args[name] not in (None, self.spec.num_layers):
                raise NotImplementedError(f"the TNx simulator does not model partial {name}")
        if args["prefixed_length"]:
            raise NotImplementedError("the TNx simulator does not model prefixed_length")
        if args["amp"] not in AMP_DTYPES:
            raise ValueError(f"amp={args['amp']!r} must be one of {AMP_DTYPES}")
        self.amp = args["amp"]
        tp = args["tp_degree"]
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tp_degree must be a positive int, got {tp!r}")
        self.tp_degree = tp
        batch = args["batch_size"]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise TypeError(
                f"batch_size must be one positive int with continuous batching: {batch!r}"
            )
        self.batch_size = batch
        self.batch_sizes = [batch]
        self.context_batch_sizes = [1]  # continuous batching encodes one prompt per graph run
        self.token_buckets = bucket.as_buckets("n_positions", args["n_positions"])
        self.context_buckets = bucket.as_buckets(
            "context_length_estimate", args["context_length_estimate"]
        )
        generation = neuron_config.on_device_generation
        if generation is not None:
            generation.vocab_size = self.spec.vocab_size  # as TNx does
            self._generation = generation.validated(batch, self.spec.vocab_size)
        else:
            self._generation = None
        #: Every generation config the model ran with (the simulator's log for tests).
        self.sim_generation_configs: list[GenerationConfig] = (
            [copy.deepcopy(self._generation)] if generation is not None else []
        )
        self._artifacts_dir: str | None = None
        self._model: LlamaModel | None = None
        self._line_len = [0] * batch  # valid positions per KV line (or _CLOBBERED)
        self._generator = torch.Generator().manual_seed(0)

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_path, *model_args, **kwargs):
        if model_args:
            raise TypeError("the TNx simulator takes from_pretrained options as keywords only")
        config_file = os.path.join(pretrained_model_path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {pretrained_model_path}")
        # TNx's own sanity checks, before anything is built.
        npos = kwargs.get("n_positions", _INIT_KEYWORDS["n_positions"])
        cle = kwargs.get("context_length_estimate")
        max_npos = max(npos) if isinstance(npos, list) else npos
        max_cle = max(cle) if isinstance(cle, list) else cle
        if isinstance(max_npos, int) and isinstance(max_cle, int) and max_cle > max_npos:
            raise AssertionError(
                f"Max context_length_estimate {max_cle} cannot be more than max n_positions "
                f"{max_npos}."
            )
        nc = kwargs.get("neuron_config")
        if nc is not None and getattr(nc, "continuous_batching", None) is not None:
            shared = nc.continuous_batching.batch_size_for_shared_caches
            if shared != kwargs.get("batch_size"):
                raise AssertionError(
                    f"invalid batch_size_for_shared_caches ({shared}), "
                    f"{kwargs.get('batch_size')} is expected"
                )
        with open(config_file) as f:
            config = json.load(f)
        model = cls(config, pretrained_model_path, **kwargs)
        count("from_pretrained")
        return model

    # -- compiled graphs -------------------------------------------------------------
    def _graphs(self) -> dict[str, dict[str, Any]]:
        """Every graph this configuration compiles, by TNx's file name (hash + '.neff')."""
        nc = self.neuron_config
        quant = nc.quant
        gen = self._generation
        common = {
            "class": type(self).__name__,
            "model": {k: v for k, v in self.config.items() if k != "transformers_version"},
            "amp": self.amp,
            "tp_degree": self.tp_degree,
            "fuse_qkv": nc.fuse_qkv,
            "weight_tiling": nc.weight_tiling,
            "layouts": [nc.attention_layout, nc.collectives_layout, nc.cache_layout],
            "cast_logits_dtype": nc.cast_logits_dtype,
            "quant": None if quant is None else vars(quant),
            # Dynamic sampling values are runtime inputs; the rest is baked into the graph.
            "generation": None
            if gen is None
            else {
                "dynamic": gen.dynamic,
                "per_batch_line": gen.per_batch_line,
                "global_top_k": gen.global_top_k,
                "do_sample": gen.do_sample,
                **(
                    {}
                    if gen.dynamic
                    else {"top_k": gen.top_k, "top_p": gen.top_p, "temperature": gen.temperature}
                ),
            },
            "max_positions": self.token_buckets[-1],
        }
        graphs = {}
        for kind, buckets, batch in (
            ("context", self.context_buckets, 1),
            ("token", self.token_buckets, self.batch_size),
        ):
            for size in buckets:
                desc = {**common, "kind": kind, "bucket": size, "batch": batch}
                text = json.dumps(desc, sort_keys=True, default=str)
                graphs[hashlib.sha256(text.encode()).hexdigest()[:20] + ".neff"] = desc
        return graphs

    def to_neuron(self) -> None:
        """Load the weights; compile every graph, or read them from ``load(dir)``'s folder."""
        graphs = self._graphs()
        if self._artifacts_dir is not None:
            for name, desc in graphs.items():
                path = os.path.join(self._artifacts_dir, name)
                try:
                    with open(path) as f:
                        stored = json.load(f)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        "Could not find a matching NEFF for your HLO in this directory. "
                        f"({desc['kind']} graph, bucket {desc['bucket']}, in "
                        f"{self._artifacts_dir})"
                    ) from None
                if stored != json.loads(json.dumps(desc, default=str)):
                    raise SimulatorError(f"{path} does not hold the graph its name claims")
        else:
            count("compile")
        self._materialize()
        self._compiled = graphs
        count("to_neuron")

    def _materialize(self) -> None:
        dtype = _TORCH_DTYPES[self.amp]
        weights = LlamaModel.convert_hf_weights(
            self.spec, read_hf_checkpoint(self.model_path), dtype
        )
        quant = self.neuron_config.quant
        if quant is not None:
            names = ["gate_up", "down"] + (["qkv", "o"] if quant.quantize_attn else [])
            for i in range(self.spec.num_layers):
                if f"model.layers.{i}" in quant.no_quantize_list:
                    continue
                for n in names:
                    key = f"layers.{i}.{n}"
                    weights[key] = _fake_quantize(weights[key], quant.quant_dtype)
        self._model = LlamaModel(
            self.spec,
            weights,
            num_lines=self.batch_size,
            max_len=self.token_buckets[-1],
            dtype=dtype,
        )
        self._line_len = [0] * self.batch_size

    def serialization_enabled(self) -> bool:
        return True

    def save(self, directory, sharded_weights=False) -> None:
        if sharded_weights:
            raise NotImplementedError("the TNx simulator does not model presharded weights")
        if self._model is None:
            raise AssertionError("cannot save a model which has not been successfully compiled")
        if os.path.isfile(directory):
            raise FileExistsError(
                f"Artifacts should be saved to a directory. Found file {directory}"
            )
        os.makedirs(directory, exist_ok=True)
        for name, desc in self._compiled.items():
            with open(os.path.join(directory, name), "w") as f:
                json.dump(desc, f, sort_keys=True, default=str)
        count("save")

    def load(self, directory) -> None:
        """Register a folder of compiled graphs; the next ``to_neuron()`` reads them."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Did not find directory: {directory}.")
        self._artifacts_dir = str(directory)
        count("load")

    # -- sampling ------------------------------------------------------------
    def update_generation_config(self, generation_config: GenerationConfig) -> None:
        current = self.neuron_config.on_device_generation
        if current is None or self._generation is None:
            raise SimulatorError(
                "update_generation_config needs a model compiled with on_device_generation"
            )
        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"expected a GenerationConfig, got {type(generation_config)}")
        if not current.dynamic:
            raise SimulatorError(
                "the compiled sampling values are static (dynamic=False); they cannot be updated"
            )
        if generation_config.per_batch_line != current.per_batch_line:
            raise AssertionError(
                "Invalid new generation config: per_batch_line = "
                f"{generation_config.per_batch_line}, compiled with {current.per_batch_line}"
            )
        if generation_config.global_top_k != current.global_top_k:
            raise SimulatorError(
                f"global_top_k is compiled into the graph ({current.global_top_k}); got "
                f"{generation_config.global_top_k}"
            )
        validated = generation_config.validated(self.batch_size, self.spec.vocab_size)
        self._generation = validated
        self.sim_generation_configs.append(copy.deepcopy(validated))
        count("update_generation_config")

    def _sample(self, logits: torch.Tensor, lines: list[int]) -> torch.Tensor:
        """Tokens [n, 1] (int32) from logits [n, V], each row with its line's settings."""
        g = self._generation
        if not g.dynamic and not g.do_sample:
            return logits.argmax(dim=-1, keepdim=True).to(torch.int32)
        rows = []
        for line in lines:
            if g.per_batch_line:
                rows.append((g.top_k[line], g.top_p[line], g.temperature[line]))
            else:
                rows.append((g.top_k, g.top_p, g.temperature))
        params = torch.tensor(rows, dtype=torch.float32)
        topk = g.global_top_k or self.spec.vocab_size
        tokens = sampling.sample(logits, params, topk, self._generator)
        return tokens[:, None].to(torch.int32)

    # -- run ----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids, cache_ids=None, start_ids=None, last_token_id=None, **kwargs):
        if kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(kwargs)}")
        if last_token_id is not None:
            raise NotImplementedError("the TNx simulator does not model preprocessed inputs")
        if self._model is None:
            raise SimulatorError(
                "call to_neuron() (after load(dir) for saved graphs) before forward"
            )
        if cache_ids is None or start_ids is None:
            raise SimulatorError(
                "continuous batching needs cache_ids and start_ids (the KV lines) on every call"
            )
        for name, t in (
            ("input_ids", input_ids),
            ("cache_ids", cache_ids),
            ("start_ids", start_ids),
        ):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype.is_floating_point
                or t.dtype == torch.bool
            ):
                raise TypeError(f"{name} must be an integer tensor")
        if input_ids.dim() != 2 or cache_ids.shape != input_ids.shape:
            raise SimulatorError(
                f"input_ids {list(input_ids.shape)} and cache_ids {list(cache_ids.shape)} must be "
                "the same [batch, tokens] shape"
            )
        lines = start_ids.flatten().tolist()  # TNx flattens start_ids too
        n, width = input_ids.shape
        if len(lines) != n or n == 0:
            raise SimulatorError(f"start_ids has {len(lines)} entries for {n} rows")
        if len(set(lines)) != n or min(lines) < 0 or max(lines) >= self.batch_size:
            raise SimulatorError(
                f"start_ids {lines} must be distinct KV lines in [0, {self.batch_size})"
            )
        count("forward")
        if width > 1:
            if int(cache_ids[0, 0]) != 0:
                raise NotImplementedError(
                    "cache_ids not starting at 0 with several tokens is speculative decoding, "
                    "which the simulator does not model"
                )
            out = self._context(input_ids, cache_ids, lines)
        else:
            out = self._decode(input_ids[:, 0], cache_ids[:, 0], lines)
        if self._generation is not None:
            return self._sample(out, lines)
        return out.to(getattr(torch, self.neuron_config.cast_logits_dtype))

    def _context(self, input_ids, cache_ids, lines) -> torch.Tensor:
        n, width = input_ids.shape
        largest = self.context_buckets[-1]
        if width > largest:
            raise AssertionError(
                f"invalid input prompt length ({width} <= {largest}): longer than the largest "
                "context_length_estimate"
            )
        size = bucket.find(self.context_buckets, width)
        logits = []
        for row in range(n):
            ids = cache_ids[row]
            length = int(ids.max()) + 1
            expected = torch.zeros(width, dtype=ids.dtype)
            expected[:length] = torch.arange(length)
            if length > width or not torch.equal(ids, expected):
                raise SimulatorError(
                    f"row {row}: prompt cache_ids must be 0..len-1 then zero padding, got "
                    f"{ids.tolist()}"
                )
            padded = torch.zeros((1, size), dtype=torch.long)
            padded[0, :width] = input_ids[row]
            line = lines[row]
            out = self._model.context_encode(padded, torch.tensor([length]), torch.tensor([line]))
            logits.append(out[0] if isinstance(out, tuple) else out)  # (last-token logits, ...)
            self._line_len[line] = length
            count("context")
        return torch.cat(logits)

    def _decode(self, tokens, positions, lines) -> torch.Tensor:
        if any(b <= a for a, b in zip(lines, lines[1:], strict=False)):
            raise SimulatorError(
                f"token-generation start_ids must be sorted ascending, got {lines}"
            )
        largest = self.token_buckets[-1]
        for line, pos in zip(lines, positions.tolist(), strict=True):
            if not 0 <= pos < largest:
                raise SimulatorError(
                    f"KV line {line}: position {pos} is outside the largest n_positions bucket "
                    f"({largest})"
                )
            have = self._line_len[line]
            if pos != 0 and pos != have:
                why = (
                    "its position 0 was overwritten by an earlier token-generation call that did "
                    "not include it (TNx runs every line in each such call)"
                    if have == _CLOBBERED
                    else f"it holds {have} positions"
                )
                raise SimulatorError(
                    f"KV line {line}: cache_id {pos} does not continue the line: {why}"
                )
        # TNx pads token generation to the whole batch: other lines run token 0 at position 0.
        full_tokens = torch.zeros(self.batch_size, dtype=torch.long)
        full_positions = torch.zeros(self.batch_size, dtype=torch.long)
        index = torch.tensor(lines, dtype=torch.long)
        full_tokens[index] = tokens.long()
        full_positions[index] = positions.long()
        size = next(b for b in self.token_buckets if b >= int(full_positions.max()) + 1)
        logits = self._model.token_generate(
            full_tokens, full_positions, torch.arange(self.batch_size), size
        )
        for line in range(self.batch_size):
            if line in lines:
                self._line_len[line] = int(full_positions[line]) + 1
            elif self._line_len[line] > 0:
                self._line_len[line] = _CLOBBERED
        count("decode")
        return logits[index]
