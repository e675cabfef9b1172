"""Our CPU backend: the NxDI contract honoured by plain PyTorch.

"compile" does the work a warm start can skip: it converts the HF checkpoint to
the requested dtype and our fused layout (quantizing the linear layers to int8 or
fp8 when the neuron config asks: quant_config.py, quantize.py), builds the native
kernel for this CPU (kernels.py), and stores both with the resolved config. "load"
maps them back (packing bf16 weights on a CPU without bf16 units, and quantized
weights on every CPU, for the kernel; widening them to fp32 without it) and
allocates the KV lines in the model's torch_dtype, as NxDI does (bf16 for a bf16 model,
whose activations run in fp32; fp8 with ``kv_cache_quant``). A step runs natively
(native.py) where it can, else on the model's torch path (llama.py); both follow
the contract: static buckets, KV lines indexed by seq_id, sampling on the
"device". Like NxDI
with ``output_logits`` it returns the logits with the tokens (it computes them
anyway), and, beyond NxDI's contract, the logits of every prompt position on
request (prompt_logprobs). LoRA adapters (lora.py) are bound to KV lines at prefill
as NxDI binds them; a step with adapter rows runs natively too (each row's adapter slot
into decode_step.c), or on the torch path where the native step does not run.
With a draft (vLLM's speculative_config) a decode call is NxDI's fused speculation step
(speculation.py): a draft model, converted beside the target's weights and run natively
too, or an EAGLE head (eagle.py) proposes, the target verifies in one multi-token step.
With the block KV layout (prefix caching: block_kv.py) the cache is vLLM's blocks,
``[pa_num_blocks, pa_block_size, kv_heads, head_dim]`` per layer, and every step is the
layout's one graph (llama.py's ``block_rows``, natively ``NativeStep.rows``): a prefill
computes each sequence past its cached prefix only.
With ``tp_degree`` N > 1 the backend is one of N tensor-parallel ranks (one process each,
joined by the loader through ``ranks``): it loads its shard of the weights and a KV cache
of its KV heads (tensor_parallel.py), and runs every step on the torch path, whose
all-reduces the native step does not have; a LoRA adapter is cut as the weights are.
Speculation runs with one rank only.
"""

from __future__ import annotations

import functools
import glob
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_neuronx import envs, nxdi_keys, sampling
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.cpu import kernels, memory
from vllm_neuronx.backends.cpu import speculation as cpu_spec
from vllm_neuronx.backends.cpu.llama import (
    ATTEND_STEP,
    SUPPORTED_ARCHITECTURES,
    BlockKV,
    LlamaModel,
    LlamaSpec,
    round_up,
    to_dtype,
)
from vllm_neuronx.backends.cpu.lora import AdapterSlots, LoraWeights
from vllm_neuronx.backends.cpu.native import NativeStep
from vllm_neuronx.backends.cpu.quantize import QuantizedWeight, quantize_parts
from vllm_neuronx.backends.cpu.tensor_parallel import (
    Collective,
    ShardPlan,
    shard_adapter,
    shard_weights,
)
from vllm_neuronx.backends.protocol import (
    Batch,
    ForwardOutput,
    NeuronBackend,
    SamplingCapabilities,
)
from vllm_neuronx.log import get_logger
from vllm_neuronx.lora import peft
from vllm_neuronx.quant_config import QuantConfig
from vllm_neuronx.speculation import Draft

logger = get_logger(__name__)

WEIGHTS_FILE = "weights.safetensors"
SCALE = "_scale"  # a quantized weight's scales are stored beside it under this suffix
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16). Without it,
    oneDNN/MKL convert every bf16 matmul and run it several times slower than fp32."""
    flags = kernels.cpu_flags()
    if not flags:
        return True  # not Linux: trust the requested dtype
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(requested: torch.dtype, variant: kernels.Variant | None) -> torch.dtype:
    """The activations' dtype. bf16 weights: fp32 wherever a kernel variant runs (it
    multiplies the weights as stored, kernels.py), and on the torch path of CPUs without
    bf16 units (oneDNN converts every bf16 matmul there: slower than fp32, and less
    precise); bf16 on the torch path of CPUs with them."""
    if requested is torch.bfloat16 and (variant is not None or not native_bf16()):
        return torch.float32
    return requested


def read_safetensors(paths: list[str], desc: str, skip=()) -> dict[str, torch.Tensor]:
    """Every tensor of these safetensors files but ``skip``, with a progress bar on a
    terminal."""
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            names = [name for name in f.keys() if name not in skip]
            for name in tqdm(names, desc=desc, unit="tensor", disable=None):
                tensors[name] = f.get_tensor(name)
    return tensors


def read_hf_checkpoint(model_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint (one file or shards)."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    return read_safetensors(files, "Compiling: reading the checkpoint")


def cpu_threads(share: int = 1) -> int:
    """The cores this process may run on, unless the user says otherwise.

    An OpenMP team waits at every op for its slowest thread: on cores shared with
    another busy process, a SmolLM2 decode step took 1.68 s with 2 threads against
    60 ms with 1. On a machine of its own (the API server and the benchmark client
    beside it), all cores won: 28.1 against 16.7 tok/s at concurrency 1, 213 against
    121 at 32. So all cores by default; VLLM_NEURONX_CPU_THREADS for shared machines.
    ``share``: processes sharing this machine's cores (tensor-parallel ranks on one node),
    each getting its part, for the same reason.
    """
    if envs.VLLM_NEURONX_CPU_THREADS:
        return max(1, int(envs.VLLM_NEURONX_CPU_THREADS))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // share)


@functools.cache
def _note_device_only(keys: tuple[str, ...]) -> None:
    """One line per process for a set of keys: validate runs several times a start."""
    logger.info(
        "CPU backend: override_neuron_config keys %s only change how a Neuron device "
        "compiles or runs the model; they have no effect on the CPU", ", ".join(keys))


def _dims(s: LlamaSpec) -> peft.ModelDims:
    """A model's projection sizes, as LoRA adapters see them."""
    return peft.ModelDims(hidden=s.hidden_size, heads=s.num_heads, kv_heads=s.num_kv_heads,
                          head_dim=s.head_dim, intermediate=s.intermediate_size,
                          layers=s.num_layers, moe_layers=frozenset(s.moe_layers))


class CpuBackend(NeuronBackend):
    framework = "cpu"
    architectures = SUPPORTED_ARCHITECTURES

    def __init__(self, model_path: str, neuron_config: dict, *, seed: int = 0,
                 draft: Draft | None = None) -> None:
        super().__init__(model_path, neuron_config, seed=seed, draft=draft)
        self.spec = LlamaSpec.from_folder(model_path)
        self.validate(neuron_config)
        self.quant = QuantConfig.from_neuron_config(neuron_config)
        # A draft model's weights: quantized as NxDI quantizes a fused draft.
        self.draft_quant = QuantConfig.for_draft(neuron_config)
        requested = self.stored_dtype = _DTYPES[neuron_config["torch_dtype"]]
        self.variant = kernels.chosen()
        # Quantized weights are widened to fp32 (by the kernel, or once at load).
        self.dtype = torch.float32 if self.quant.weights else \
            compute_dtype(requested, self.variant)
        self.model: LlamaModel | None = None
        # The packed-weight kernel (kernels.py) and the native step (native.py), where they run.
        self.matmul: kernels.PackedMatmul | None = None
        self.native: NativeStep | None = None
        self.generator = torch.Generator().manual_seed(seed)
        # LoRA (init_lora): the adapter slots and the KV lines' bindings.
        self.adapters: AdapterSlots | None = None
        self.max_lora_rank = 0
        # Fused speculation (speculation.py): the proposer and the fused step, from load.
        self.speculation: cpu_spec.FusedSpeculation | None = None
        # Tensor parallelism: this process's rank among tp_degree (set by the loader
        # before load; unused with tp_degree 1).
        self.tp_degree = int(neuron_config.get("tp_degree") or 1)
        self.ranks: Collective | None = None
        if draft is not None:
            if self.tp_degree > 1:
                raise ValueError(
                    f"speculation (a {draft.method} draft) with tp_degree={self.tp_degree}: "
                    "the CPU backend's fused speculation runs on one rank only; set "
                    "tensor_parallel_size=1 or drop the speculative config")
            cpu_spec.check_draft(draft, self.spec)
            if self.block_layout is not None:
                raise ValueError("fused speculation runs on KV lines, not on the block KV "
                                 "layout (prefix caching)")

    @classmethod
    def version(cls) -> str:
        # 2: weights stored in the requested dtype, with the native kernels; 3: the
        # kernel variant in the key; 4: torch's version (it converts the weights; the
        # checkpoint is read without transformers); 5: quantized weights and scales; 6: a
        # draft model's weights beside the target's (fused speculation).
        from vllm_neuronx.artifacts import package_versions

        return (f"cpu-6-{kernels.chosen_name()}-{kernels.source_digest()} "
                + package_versions(("torch",)))

    @classmethod
    def validate(cls, neuron_config: dict, *, quantization: str | None = None) -> None:
        try:
            kernels.chosen()
        except kernels.KernelChoiceError as e:
            raise nc.NeuronConfigError(str(e)) from None
        if quantization is not None:
            raise nc.NeuronConfigError(
                f"--quantization {quantization}: the CPU backend quantizes from the neuron "
                'config as NxDI does; drop --quantization and set override_neuron_config '
                '{"quantized": true, "quantization_type": "per_channel_symmetric", '
                '"quantization_dtype": "int8"} (or "f8e4m3"; "kv_cache_quant": true for an '
                "fp8 KV cache)"
            )
        QuantConfig.from_neuron_config(neuron_config)
        if neuron_config["torch_dtype"] == "float16":
            raise nc.NeuronConfigError(
                "torch_dtype float16 is not supported by the CPU backend; use bfloat16 or float32"
            )
        if neuron_config.get("capacity_factor") is not None:
            raise nc.NeuronConfigError(
                f"capacity_factor={neuron_config['capacity_factor']!r}: NxDI then drops the "
                "tokens past each expert's capacity, while the CPU backend computes every "
                "token (full capacity), so the two would give different tokens; remove it")
        device_only = nxdi_keys.device_only(neuron_config)
        if device_only:
            _note_device_only(tuple(device_only))

    @classmethod
    def sampling_capabilities(cls, neuron_config: dict) -> SamplingCapabilities:
        return SamplingCapabilities(logits=True, prompt_logits=True)

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def compile(self, folder: str) -> None:
        start = time.perf_counter()
        self.convert(self.model_path, self.spec, os.path.join(folder, WEIGHTS_FILE))
        if self.draft is not None and not self.draft.is_eagle:  # a draft model: its weights
            cpu_spec.compile_draft(self, folder)
        if self.uses_kernel():
            kernels.build(folder, self.variant)
        logger.info(
            "CPU backend: converted weights to %s%s in %.1f s",
            self.stored_dtype,
            f" ({self.quant.dtype} where quantized)" if self.quant.weights else "",
            time.perf_counter() - start,
        )

    def convert(self, model_path: str, spec: LlamaSpec, path: str,
                quant: QuantConfig | None = None) -> None:
        """An HF checkpoint of ``spec`` -> our layout in the stored dtype, quantized as
        ``quant`` (the target's: the neuron config's keys) says, into the safetensors file
        ``path``."""
        quant = quant or self.quant
        hf = read_hf_checkpoint(model_path)
        weights = LlamaModel.convert_hf_weights(
            spec, hf, self.stored_dtype,
            functools.partial(self._quantize, quant) if quant.weights else None)
        # Tied embeddings share storage; safetensors stores each tensor once.
        head = weights["lm_head"]  # a quantized head is a copy of its own
        if isinstance(head, torch.Tensor) and head.data_ptr() == weights["embed"].data_ptr():
            del weights["lm_head"]
        stored = {}
        for name, w in weights.items():
            if isinstance(w, QuantizedWeight):
                stored[name], stored[name + SCALE] = w.values, w.scale
            else:
                stored[name] = w
        save_file(stored, path)

    @staticmethod
    def _quantize(quant: QuantConfig, modules: list[str], parts: list[torch.Tensor]):
        """One matmul's HF modules quantized, or None where modules_to_not_convert names
        them; a fused matmul (q, k, v) is quantized whole or not at all."""
        converted = [quant.converts(m) for m in modules]
        if not any(converted):
            return None
        if not all(converted):
            raise nc.NeuronConfigError(
                f"modules_to_not_convert={list(quant.not_convert)} names some of "
                f"{modules} but not all; the CPU backend multiplies them as one matmul, so "
                "name all of them or none")
        return quantize_parts(parts, quant)

    def uses_kernel(self) -> bool:
        """bf16 weights computed in fp32, or quantized weights (the target's or a draft
        model's): the native kernel multiplies them (kernels.py)."""
        draft_quantized = self.draft is not None and not self.draft.is_eagle and \
            self.draft_quant.weights
        return self.variant is not None and (self.quant.weights or draft_quantized or (
            self.stored_dtype is torch.bfloat16 and self.dtype is torch.float32))

    @property
    def kernel(self) -> str:
        name = self.variant.name if self.matmul is not None else kernels.TORCH
        return name if self.tp_degree == 1 else f"{name} (tp {self.tp_degree})"

    def _collective(self) -> Collective | None:
        """The tensor-parallel ranks to shard over (None with tp_degree 1), checked."""
        tp, ranks = self.tp_degree, self.ranks
        if tp == 1:
            return None
        if ranks is None:
            raise RuntimeError(
                f"tp_degree={tp}: the CPU backend runs one process per tensor-parallel "
                "rank, and this one was given no ranks to join (backend.ranks is unset)")
        if ranks.world != tp or not 0 <= ranks.rank < ranks.world:
            raise RuntimeError(
                f"tp_degree={tp}, but this backend's ranks are rank {ranks.rank} of "
                f"{ranks.world}: the CPU backend needs one rank per tensor-parallel shard")
        return ranks

    def _load(self, folder: str) -> None:
        ranks = self._collective()
        local = int(self.neuron_config.get("local_ranks_size") or self.tp_degree)
        torch.set_num_threads(cpu_threads(share=1 if ranks is None else local))
        matmul = kernels.load(folder, self.variant) if self.uses_kernel() else None
        self.model, self.native = self.build_model(os.path.join(folder, WEIGHTS_FILE),
                                                   self.spec, matmul, ranks=ranks)
        self.matmul = matmul
        self.speculation = None
        if self.draft is not None:
            self.speculation = cpu_spec.FusedSpeculation.load(self, folder)

    def build_model(self, path: str, spec: LlamaSpec, matmul: kernels.PackedMatmul | None,
                    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ranks: Collective | None = None
                    ) -> tuple[LlamaModel, NativeStep | None]:
        """A model of ``spec`` from its converted weights (``convert``) with KV lines of its
        own (or ``kv``, another model's K and V caches of the same shape), and its native
        step where one runs. With ``ranks``, the model is this rank's shard (its weights
        cut before they are packed for the kernel, which multiplies the shard) and runs
        on the torch path only."""
        weights = read_safetensors([path], "Loading artifacts", skip={"embed"})
        # Looked up a few rows a step: mapped, so only the rows of tokens seen are resident.
        weights["embed"] = mapped = memory.mapped_tensor(path, "embed")
        weights.setdefault("lm_head", weights["embed"])
        for name in [n for n in weights if n.endswith(SCALE)]:
            scale = weights.pop(name)
            weights[name.removesuffix(SCALE)] = QuantizedWeight(
                weights[name.removesuffix(SCALE)], scale)
        if ranks is not None:
            weights, spec = shard_weights(weights, spec,
                                          ShardPlan.of(spec, ranks.world, ranks.rank))
        if matmul is not None:
            packed = matmul.pack_all(  # fp32 weights (not converted) stay torch's
                {n: w for n, w in weights.items() if LlamaModel.is_matmul(n)
                 and (isinstance(w, QuantizedWeight) or w.dtype is torch.bfloat16)})
            embed = weights["embed"]  # looked up a row at a time: it can stay bf16
            weights = to_dtype(
                {n: w for n, w in weights.items() if n not in packed and n != "embed"},
                self.dtype,
            )
            weights.update(packed, embed=embed)
        else:  # torch's matmuls: quantized weights widened once, here
            weights = to_dtype({n: w.dequantize() if isinstance(w, QuantizedWeight) else w
                                for n, w in weights.items()}, self.dtype)
        cfg = self.neuron_config
        layout = self.block_layout
        model = LlamaModel(
            spec,
            weights,
            num_lines=cfg["batch_size"],
            max_len=cfg["seq_len"],
            dtype=self.dtype,
            linear=matmul.linear if matmul is not None else torch.nn.functional.linear,
            zeros=memory.huge_page_zeros,
            kv_fp8=self.quant.kv_fp8,
            kv_dtype=self.stored_dtype,  # NxDI's: the KV cache in the model's torch_dtype
            kv=kv,
            blocks=None if layout is None else BlockKV(layout.num_blocks, layout.block_size),
            collective=ranks,
        )
        native = None
        if matmul is not None and ranks is None:  # its whole-layer step has no all-reduce
            native = NativeStep.for_model(model, matmul)
        memory.drop_pages(mapped)  # a tied head was packed (or widened) from all of it
        return model, native

    # -- LoRA adapters ------------------------------------------------------------
    def init_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> None:
        if self.model is None:
            raise RuntimeError("load() must run before init_lora()")
        if max_loras < 1 or max_lora_rank < 1 or max_cpu_loras < max_loras:
            raise ValueError(f"max_loras={max_loras}, max_lora_rank={max_lora_rank}, "
                             f"max_cpu_loras={max_cpu_loras}: need 1 <= max_loras <= "
                             "max_cpu_loras and max_lora_rank >= 1")
        on_change = None
        if self.native is not None:  # its descriptors follow the slots
            self.native.enable_lora(max_loras, max_lora_rank)
            on_change = self.native.set_slot
        self.adapters = AdapterSlots(max_loras, self.num_lines, on_change)
        self.max_lora_rank = max_lora_rank

    @property
    def dims(self) -> peft.ModelDims:
        """The whole model's (an adapter is checked against it on every rank)."""
        return _dims(self.spec)

    def prepare_adapter(self, spec: peft.AdapterSpec) -> LoraWeights:
        """The adapter's weights in our fused layout, scaled, in the compute dtype; with
        tensor-parallel ranks, this rank's shard of them (tensor_parallel.shard_adapter)."""
        if self.adapters is None:
            raise RuntimeError("init_lora() must run before prepare_adapter()")
        if spec.max_rank > self.max_lora_rank:
            raise peft.AdapterError(spec.name, spec.path, f"rank {spec.max_rank} is greater "
                                    f"than max_lora_rank {self.max_lora_rank}")
        loaded, ranks = peft.load(spec), self.model.collective
        if ranks is not None:
            loaded = shard_adapter(loaded, self.spec,
                                   ShardPlan.of(self.spec, ranks.world, ranks.rank))
        return LoraWeights.prepare(loaded, spec, _dims(self.model.spec), self.dtype)

    def release_adapter(self, handle: object) -> None:
        if self.adapters is not None and isinstance(handle, LoraWeights):
            self.adapters.release(handle)

    def adapter_indices(self, handles, live) -> torch.Tensor:
        if self.adapters is None:
            raise RuntimeError("init_lora() must run before adapter_indices()")
        return self.adapters.indices(handles, live)

    # -- steps ----------------------------------------------------------------------
    def prefill(self, batch: Batch) -> ForwardOutput:
        """Prompts are checked against the context buckets as on a device, but
        computed only as wide as the longest one (right padding under a causal
        mask cannot change the real positions), not as wide as its bucket."""
        if batch.blocks is not None:
            return self._block_step(batch)
        wanted = batch.prompt_logits
        rows = [] if wanted is None else wanted.nonzero().flatten().tolist()
        lengths = batch.position_ids.max(dim=1).values + 1
        longest = int(lengths.max())
        bucket = nc.pick_bucket(self.context_buckets, longest)
        width = min(bucket, round_up(longest, ATTEND_STEP))
        padded = torch.zeros((batch.size, width), dtype=torch.long)
        given = min(batch.input_ids.shape[1], width)
        padded[:, :given] = batch.input_ids[:, :given]
        if self.adapters is not None:
            lora = self.adapters.bind(batch.seq_ids, batch.adapter_ids)
        elif batch.adapter_ids is not None:
            raise ValueError("adapter_ids given to a backend without LoRA (init_lora)")
        else:
            lora = None
        logits, every = None, {}
        spec = self.speculation
        capture = spec.prefill_capture() if spec is not None else None
        if self.native is not None and not rows and (lora is None or lora.slots is not None):
            logits = self.native.prefill(padded, lengths, batch.seq_ids,
                                         None if lora is None else lora.slots,
                                         **({} if capture is None else {"capture": capture}))
        if logits is None:
            logits, every = self.model.context_encode(padded, lengths, batch.seq_ids, rows,
                                                      lora, capture)
        prompt = None if wanted is None else [every.get(row) for row in range(batch.size)]
        out = self._sampled(logits, batch, prompt)
        if spec is not None:  # the proposer's prefill of the same prompts
            spec.prefill(padded, lengths, batch.seq_ids, capture)
        return out

    def decode(self, batch: Batch) -> ForwardOutput:
        seq_ids = batch.seq_ids
        if not bool(torch.all(seq_ids[1:] > seq_ids[:-1])):
            raise ValueError("decode seq_ids must be sorted ascending and unique")
        if batch.blocks is not None:
            return self._block_step(batch)
        lora = self.adapters.bound(seq_ids) if self.adapters is not None else None
        if self.speculation is not None:
            return self.speculation.decode(batch, lora)
        ids, positions = batch.input_ids[:, 0], batch.position_ids[:, 0]
        bucket = nc.pick_bucket(self.token_buckets, int(positions.max()))
        logits = None
        if self.native is not None and (lora is None or lora.slots is not None):
            logits = self.native.decode(ids, positions, seq_ids,
                                        None if lora is None else lora.slots)
        if logits is None:
            logits = self.model.token_generate(ids, positions, seq_ids, bucket, lora)
        return self._sampled(logits, batch)

    def chunked(self, batch: Batch) -> ForwardOutput:
        return self._block_step(batch)

    def _block_step(self, batch: Batch) -> ForwardOutput:
        """A step on the block layout: each sequence's positions past its cached prefix
        (``computed_context_lens``; a decode row's one, a chunked step's chunk), written at
        its slots and attending through its block table, natively where the step is small
        enough (as ``prefill`` decides) or on the torch graph."""
        b = batch.blocks
        full, computed = b.full_context_lens.tolist(), b.computed_context_lens.tolist()
        if not batch.chunked:
            buckets = self.context_buckets if batch.is_prefill else self.token_buckets
            nc.pick_bucket(buckets, max(full) - (0 if batch.is_prefill else 1))
        wanted = batch.prompt_logits
        prompt_rows = [] if wanted is None else wanted.nonzero().flatten().tolist()
        if any(computed[r] for r in prompt_rows):
            raise ValueError("prompt logits need the whole prompt computed: vLLM reads no "
                             "cached prefix for requests with prompt_logprobs")
        n, counts = batch.size, [f - c for f, c in zip(full, computed, strict=True)]
        if not (batch.is_prefill or batch.chunked):  # a decode: one token a row, as given
            ids, positions = batch.input_ids, batch.position_ids
            slots = b.slot_mapping[:, :1].to(torch.long)
        else:
            ids, positions, slots = self._block_rows_of(batch, full, computed)
        table = b.block_table.to(torch.int64).contiguous()
        if self.adapters is not None:
            lora = (self.adapters.bind(batch.seq_ids, batch.adapter_ids) if batch.is_prefill
                    else self.adapters.bound(batch.seq_ids))
        elif batch.adapter_ids is not None:
            raise ValueError("adapter_ids given to a backend without LoRA (init_lora)")
        else:
            lora = None
        native = self.native
        tokens = sum(counts)
        if native is not None and not prompt_rows and (lora is None or lora.slots is not None) \
                and (native.split_prefills or tokens < native.prefill_rows):
            width = ids.shape[1]
            real = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
            row_of = torch.arange(n)[:, None].expand(n, width)[real]
            logits, _, _ = native.rows(
                ids[real], positions[real], row_of,
                out_rows=torch.tensor(counts).cumsum(0) - 1,
                slots=None if lora is None else lora.slots[row_of], block_table=table)
            return self._sampled(logits, batch)
        hidden = self.model.block_rows(ids, positions, table, slots, lora)
        last = hidden[torch.arange(n), torch.tensor(counts) - 1]
        prompt = None
        if wanted is not None:
            prompt = [self.model.logits(hidden[r, :counts[r]]) if r in prompt_rows else None
                      for r in range(n)]
        return self._sampled(self.model.logits(last), batch, prompt)

    @staticmethod
    def _block_rows_of(batch: Batch, full: list[int], computed: list[int]):
        """A prefill's or a chunked step's (tokens, positions, slots) [n, widest], each
        sequence's positions computed..full-1 from column 0, padding past them."""
        n, width = batch.size, max(f - c for f, c in zip(full, computed, strict=True))
        ids = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        slots = torch.full((n, width), -1, dtype=torch.long)
        first = 0  # a chunked step's tokens: sequence after sequence in row 0
        for r, (f, c) in enumerate(zip(full, computed, strict=True)):
            if batch.chunked:
                ids[r, :f - c] = batch.input_ids[0, first:first + f - c]
                slots[r, :f - c] = batch.blocks.slot_mapping[0, first:first + f - c]
                first += f - c
            else:
                ids[r, :f - c] = batch.input_ids[r, c:f]
                slots[r, :f - c] = batch.blocks.slot_mapping[r, :f - c]
            positions[r, :f - c] = torch.arange(c, f)
            positions[r, f - c:] = f - 1  # padding attends where the row's last token does
        return ids, positions, slots

    def _sampled(self, logits, batch: Batch, prompt=None) -> ForwardOutput:
        """The step's logits, and the tokens sampled from them "on the device"."""
        topk = self.global_topk
        tokens = None
        if topk is not None:
            tokens = sampling.sample(logits, batch.sampling_params, topk, self.generator)
        return ForwardOutput(tokens=tokens, logits=logits, prompt_logits=prompt)
