"""Simulated ``neuronx_distributed_inference.models.model_base.NeuronBaseForCausalLM``.

The forward contract, enforced:
- a call is a prefill (context encoding) iff ``position_ids.min() == 0``; every
  prefill row holds positions 0..len-1 then 0 padding; decode rows are [m, 1];
- ``seq_ids`` are KV lines in [0, batch_size), sorted ascending, unique;
- ``sampling_params`` is [n, 3] and passes NxDI's checks;
- the CTE graph takes ``ctx_batch_size`` (1 with continuous batching) prompts per
  run, so prompts run one after another, each in the first bucket larger than it;
  a prompt beyond the largest bucket is a ValueError, as in NxDI;
- a partial decode batch is padded to the compiled batch with the first row, as
  NxDI's ModelWrapper does: the padding writes junk K/V into the absent lines;
- a decode row at position p needs its line to hold exactly p tokens, which is
  what a correct runner guarantees (a wrong row-to-seq_id pairing fails here).
With prefix caching (``is_prefix_caching`` on ``is_block_kv_layout``; NxDI main's rules,
the method docstrings cite its lines) the KV cache is ``pa_num_blocks + 1`` blocks of
``pa_block_size`` ([blocks, block_size, kv_heads, head_dim] per layer; slot -1 writes into
the last), and every call takes ``slot_mapping``, ``block_table``, ``full_context_lens``
and ``computed_context_lens`` ([n, 1]):
- a call is a context encoding iff it is wider than one token and its positions start at
  0, else token generation (a one-token prompt is token generation, as in NxDI);
- a context encoding runs each prompt (the whole sequence) in NxDI's [prefill, prefix]
  bucket: the first prefill bucket that holds the uncached tokens, whose free slots
  recompute cached ones (slot -1: not written again), and the first prefix bucket that
  holds the cached positions left, read from the blocks through the table; past the largest
  prefix bucket it is NxDI's bare AssertionError;
- token generation takes the smallest [1, S] bucket past every computed_context_len,
  recomputes each row's slot from its position and table (slot_mapping only says which
  rows are real) and reads the prior positions from the positions, NxDI's way; with the
  block TKG kernel a table lists a row's blocks, then -1;
- block ids and slots name the cache's pa_num_blocks blocks (the table is padded or cut to
  the bucket); outputs are each row's last real token. Attention is computed through the
  blocks, so a wrong table or slot gives wrong tokens.
With a ``lora_config`` (multi-LoRA, NxDI's rules; the LoraModelManager has the ids):
- a context encoding takes one adapter index per row. In dynamic mode, on a call NxDI
  deems context encoding (wider than one token), they are NxDI's global ids, turned
  into device slots by ``lora_model_manager``; otherwise they are the slots themselves
  (a one-token prompt in dynamic mode therefore uses its global id as a slot, as in
  NxDI). Slot 0 holds the zero adapter only with ``enable_base_model_only``; without
  it slot 0 is the first adapter, and it is applied;
- each prompt binds its KV line to its slot's adapter (NxDI copies the weights into the
  seq_id's active row); token generation ignores ``adapter_ids`` and applies each line's
  adapter, so a line keeps its adapter until the next context encoding on it.
The numbers come from vllm_neuronx's CPU Llama (LlamaModel), the adapters' deltas from
its LoRA math (backends/cpu/lora.py) on the weights NxDI would load.

Fused speculation (``enable_fused_speculation`` with ``fused_spec_config``), NxDI's
NeuronFusedSpecModel (main, model_base.py ~1598-3022) and its preconditions:
- on-device sampling (NxDI asserts it), the draft config derived from the target's as
  NxDI's inference_demo does, the draft's family built by ``worker_cls`` (or
  ``draft_model_cls``), the draft's vocabulary the target's; an EAGLE head's checkpoint
  must hold its ``lm_head`` and ``fc``;
- a decode at position p needs p + speculation_length within the largest token bucket
  (NxDI's bucket rule adds k to the attention mask's width, max(position_ids));
- context encoding runs the target and the draft over each prompt (each its own KV lines)
  and returns ``fused_outputs`` = [token then pad [n, k], next ids, next mask, next pos];
- a decode runs the draft k times from each row's token x at p (its KV gets x, d_1..d_{k-1}
  at p..p+k-1; the draft samples with the row's parameters, its config being a copy of the
  target's), then the target once over [x, d_1..d_{k-1}] at p..p+k-1, samples each
  position with the row's parameters, and accepts NxDI's way: the contiguous drafts equal
  to the target's tokens, plus one; ``fused_outputs[0]`` holds the target's tokens up to
  that count, then ACCEPTANCE_PADDING_TOKEN, and ``fused_outputs[3]`` = p + count;
- the next decode of a line may start at any position from p + 1 up to p + count (a
  runner may keep fewer tokens than accepted; the KV past them is overwritten later).
EAGLE heads are configured and checked as NxDI would, but not computed: the stand-in
proposer is the target's own weights run as a greedy draft (see ``_sim_draft_runtime``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

import neuronx_distributed_inference as sim
from neuronx_distributed_inference.models.application_base import NeuronApplicationBase
from neuronx_distributed_inference.modules.generation.sampling import (
    prepare_sampling_params,
    validate_sampling_params,
)
from neuronx_distributed_inference.modules.lora_serving.lora_checkpoint import (
    load_lora_state_dict,
    module_weights,
)

MIN_BUCKET = 128
# NxDI's pad after each row's accepted tokens in fused_outputs[0]
# (NeuronFusedSpecModel.acceptance_padding_token): -1 on main and since 0.8 (Neuron SDK
# 2.28), 0 in 0.2-0.7. A test sets 0 to simulate an older release.
ACCEPTANCE_PADDING_TOKEN = -1
LM_HEAD_PAD = 96  # simulated vocab padding of gathered logits (output_logits)
# Prefix caching's automatic buckets start here: context encoding's prefill and prefix axes,
# token generation's S (NxDI's autobucketing.py 186-193, 251-255).
PREFIX_MIN_BUCKET = 512
PREFIX_TKG_MIN_BUCKET = 256
# NxDI tiles each cache block when a sequence has fewer blocks than this and the block TKG
# kernel is off (block_kv_cache_manager.py 55-70).
BLOCK_TILING_BLOCKS = 128
# The narrowest context encoding NxDI's attention runs over a cached prefix as such
# (attention_base.py 1745-1751: narrower is token generation).
PREFIX_MIN_PREFILL = 128
CONTEXT_ENCODING_MODEL_TAG = "context_encoding_model"
TOKEN_GENERATION_MODEL_TAG = "token_generation_model"
# Documented tp_degree values: trn2 1,2,4,8,16,32,64; inf2 1,2,4,8,24; trn1 1,2,8,16,32.
SUPPORTED_TP_DEGREES = frozenset({1, 2, 4, 8, 16, 24, 32, 64})
# The projections a simulated decoder layer has LoRA modules for (NxDI's leaf names).
LORA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_MLP = ("gate_proj", "up_proj", "down_proj")


def autobuckets(min_length: int, max_length: int) -> list[int]:
    """NxDI's automatic buckets: powers of two from ``min_length``, then the maximum."""
    low, high = int(math.log2(min_length)), round(math.log2(max_length))
    return [2**i for i in range(low, high)] + [max_length]


def first_fit(buckets: list[int], length: int, what: str) -> int:
    for bucket in buckets:
        if bucket > length:
            return bucket
    if buckets[-1] == length:
        return length
    raise ValueError(f"{what} {length} is beyond the largest bucket {buckets[-1]}")


class NeuronBaseModel(torch.nn.Module):
    """NxDI's traced decoder (an application's ``_model_cls``), which fused speculation
    names as ``worker_cls``. The simulator computes with vllm_neuronx's CPU model; a
    class here only says which HF model types it builds."""

    _sim_model_types: tuple[str, ...] = ()


class NeuronBaseForCausalLM(NeuronApplicationBase):
    _model_cls = None

    def __init__(self, model_path, config=None, neuron_config=None) -> None:
        super().__init__(model_path, config, neuron_config)
        if self.neuron_config.is_chunked_prefill:  # NxDI main (SDK 2.28+), model_base.py 3054
            raise NotImplementedError("Chunked Prefill is not available in NxDI for now")
        self._runtime = None
        self._line_len: list[int] = []
        self._generator = torch.Generator().manual_seed(0)
        self._lora_slots: list = []  # device slots: LoraWeights, or None (zeros)
        self._line_adapter: list = []  # each KV line's active adapter (None: none)

    # -- compile-time checks and shapes ---------------------------------------------------
    def _sim_check_compilable(self) -> None:
        nc = self.neuron_config
        if nc.tp_degree not in SUPPORTED_TP_DEGREES:
            raise ValueError(f"tp_degree={nc.tp_degree} is not supported on Neuron devices")
        if nc.padding_side != "right":
            raise NotImplementedError("the simulator models padding_side='right' only")
        if nc.is_continuous_batching and nc.ctx_batch_size != 1:
            raise ValueError(
                "continuous batching needs ctx_batch_size=1: the context-encoding KV writer "
                "takes one seq_id per run"
            )
        if not nc.is_continuous_batching and nc.batch_size != 1:
            raise NotImplementedError("the simulator models batch_size > 1 only with "
                                      "is_continuous_batching")
        if nc.async_mode:
            raise NotImplementedError("the simulator does not model async_mode")
        if nc.is_prefix_caching or nc.is_block_kv_layout:
            self._sim_check_block_layout()
        self._sim_spec()  # the architecture must be one the simulator computes
        if nc.speculation_length or nc.enable_fused_speculation:
            self._sim_check_speculation()
        if nc.lora_config is not None:
            self._sim_lora_modules()

    def _sim_check_speculation(self) -> None:
        """What NxDI's fused speculation needs at compile (and would otherwise trace
        wrong): see the module docstring."""
        nc = self.neuron_config
        if not nc.enable_fused_speculation:
            raise NotImplementedError(
                "the simulator models fused speculation only: speculation_length without "
                "enable_fused_speculation compiles NxDI's unfused speculation graph, which "
                "takes k tokens per call and a separate draft model")
        if nc.speculation_length < 1:
            raise ValueError("enable_fused_speculation needs speculation_length >= 1")
        if nc.on_device_sampling_config is None:
            raise AssertionError("fused speculation needs on_device_sampling_config (NxDI "
                                 "asserts it in NeuronFusedSpecModel)")
        for feature in ("output_logits", "enable_token_tree"):
            if getattr(nc, feature):
                raise NotImplementedError(f"the simulator does not model {feature} with "
                                          "fused speculation")
        if nc.lora_config is not None:
            raise NotImplementedError(
                "NxDI's fused speculation passes no adapter_ids to its target model, so "
                "LoRA adapters would be ignored; the simulator refuses the combination")
        fused = self.fused_spec_config
        if fused is None or fused.draft_config is None:
            raise AttributeError("'NoneType' object has no attribute 'draft_config' (NxDI's "
                                 "fused speculation needs InferenceConfig.fused_spec_config="
                                 "FusedSpecNeuronConfig(Cls._model_cls, draft_config, "
                                 "draft_model_path))")
        if fused.worker_cls is not type(self)._model_cls:
            raise TypeError(
                f"fused_spec_config.worker_cls is {fused.worker_cls!r}: NxDI builds the "
                f"target (and the draft) with it, so it must be {type(self).__name__}."
                "_model_cls")
        draft = fused.draft_config
        dnc = draft.neuron_config
        eagle = nc.enable_eagle_speculation
        want = {"enable_fused_speculation": False, "is_eagle_draft": eagle,
                "speculation_length": nc.speculation_length if eagle else 0}
        for key in ("batch_size", "ctx_batch_size", "tkg_batch_size", "kv_cache_batch_size",
                    "seq_len", "max_length", "max_context_length", "is_continuous_batching",
                    "padding_side", "is_eagle3"):
            want[key] = getattr(nc, key)  # a deep copy of the target's keeps them
        wrong = {k: (getattr(dnc, k), v) for k, v in want.items() if getattr(dnc, k) != v}
        if wrong:
            raise ValueError(
                f"fused_spec_config.draft_config.neuron_config has (key: (draft, expected)) "
                f"{wrong}: NxDI's draft config is a deep copy of the target's with "
                "speculation_length=0 (kept for EAGLE), enable_fused_speculation=False and "
                "is_eagle_draft for an EAGLE head")
        if dnc.on_device_sampling_config is None:
            raise AttributeError("'NoneType' object has no attribute 'do_sample' (the draft's "
                                 "sampler is built from its on_device_sampling_config)")
        if dnc.torch_dtype != nc.torch_dtype and nc.cast_type == "config":
            raise ValueError("cast-type must be set to 'as-declared' to be able to run "
                             "different precisions for draft and target model!")
        if dnc.tp_degree not in SUPPORTED_TP_DEGREES:
            raise ValueError(f"draft tp_degree={dnc.tp_degree} is not supported")
        worker = fused.draft_model_cls._model_cls if fused.draft_model_cls else fused.worker_cls
        model_type = getattr(draft, "model_type", None)
        if model_type not in worker._sim_model_types:
            raise ValueError(
                f"the draft is a {model_type!r} model but NxDI would build it with "
                f"{worker.__name__} ({', '.join(worker._sim_model_types)}): name its "
                "application class in FusedSpecNeuronConfig(draft_model_cls=...)")
        if getattr(draft, "vocab_size", None) != self.config.vocab_size:
            raise ValueError(
                f"the draft's vocab_size {getattr(draft, 'vocab_size', None)} differs from "
                f"the target's {self.config.vocab_size}: fused speculation compares their "
                "token ids")
        path = fused.draft_model_path
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"draft_model_path {path!r} holds no config.json")
        if eagle:
            self._sim_check_eagle_head(path, draft)
        else:
            self._sim_spec_of(draft)  # a family the simulator computes

    def _sim_check_eagle_head(self, path: str, draft) -> None:
        """An EAGLE head's checkpoint as NxDI's EAGLE draft (modeling_llama.py, is_eagle_draft)
        loads it: ``fc`` over [embedding, hidden] (EAGLE3: three hidden states), and the
        LM head from the head's own checkpoint (copy the target's lm_head in: NxDI does not
        take it from the target; aws-neuron-sdk#1143)."""
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint

        state = {k.removeprefix("model."): v for k, v in read_hf_checkpoint(path).items()}
        hidden = int(draft.hidden_size)
        fc = state.get("fc.weight")
        width = hidden * (3 if self.neuron_config.is_eagle3 else 2)
        if fc is None or tuple(fc.shape) != (hidden, width):
            raise RuntimeError(
                f"the EAGLE head in {path} has fc.weight "
                f"{None if fc is None else list(fc.shape)}, NxDI's EAGLE draft takes "
                f"[{hidden}, {width}]")
        tied = getattr(draft, "tie_word_embeddings", False) and "embed_tokens.weight" in state
        head = state.get("lm_head.weight", state.get("embed_tokens.weight") if tied else None)
        if head is None:
            raise RuntimeError(
                f"the EAGLE head in {path} has no lm_head.weight: NxDI's EAGLE draft loads "
                "its LM head from the head's checkpoint (copy the target's lm_head.weight "
                "into it)")
        if tuple(head.shape) != (self.config.vocab_size, hidden):
            raise RuntimeError(
                f"the EAGLE head in {path} has an LM head of {list(head.shape)}; NxDI's "
                f"draft has [{self.config.vocab_size}, {hidden}] (no draft vocabulary)")

    def _sim_lora_modules(self) -> list[tuple[int, str, str]]:
        """(layer, section, proj) of each LoRA module NxDI's wrapper would make."""
        lora = self.neuron_config.lora_config
        targets = lora.target_modules
        if isinstance(targets, str) or not targets:
            raise ValueError(f"Target modules {targets} not found in the base model. Please "
                             "check the target modules and try again.")
        others = sorted(set(targets) - set(LORA_ATTENTION) - set(LORA_MLP))
        if others:
            raise NotImplementedError(f"the simulator models LoRA on {LORA_ATTENTION + LORA_MLP} "
                                      f"only, not {others}")
        if self.neuron_config.fused_qkv and set(targets) & {"q_proj", "k_proj", "v_proj"}:
            raise NotImplementedError("the simulator does not model LoRA with fused_qkv")
        spec = self._sim_spec()
        modules = []
        for layer in range(spec.num_layers):
            modules += [(layer, "self_attn", p) for p in LORA_ATTENTION if p in targets]
            if not spec.is_moe(layer):
                modules += [(layer, "mlp", p) for p in LORA_MLP if p in targets]
        return modules

    def _sim_lora_weights(self, name: str, path: str):
        """One adapter as NxDI loads it into its LoRA modules (A scaled NxDI's way; NxDI's
        zero padding to max_lora_rank adds nothing), in the CPU backend's fused layout."""
        from vllm_neuronx.backends.cpu.lora import LoraWeights
        from vllm_neuronx.lora.peft import AdapterSpec, ModelDims

        lora = self.neuron_config.lora_config
        dims = ModelDims.from_hf({k: v for k, v in vars(self.config).items()
                                  if k != "neuron_config"})
        scaling, state = load_lora_state_dict(path)
        found = module_weights(state, scaling)
        loaded = {}
        for layer, section, proj in self._sim_lora_modules():
            pair = found.get((layer, section, proj))
            if pair is None:
                continue
            a, b = pair
            fan_in, fan_out = dims.shape(proj)
            rank = a.shape[0]
            if rank > lora.max_lora_rank or a.shape[1] != fan_in or tuple(b.shape) != (
                    fan_out, rank):
                # NxDI copies the checkpoint into a [max_lora_rank, in] / [out, max_lora_rank]
                # slice: a tensor that does not fit fails the copy.
                raise RuntimeError(
                    f"LoRA adapter {name} ({path}): {proj} of layer {layer} has lora_A "
                    f"{list(a.shape)} and lora_B {list(b.shape)}, the compiled module takes "
                    f"[<= {lora.max_lora_rank}, {fan_in}] and [{fan_out}, <= "
                    f"{lora.max_lora_rank}]")
            loaded[layer, proj] = (a, b)
        ranks = tuple(sorted((module, pair[0].shape[0]) for module, pair in loaded.items()))
        spec = AdapterSpec(name=name, path=path, scaling=1.0, ranks=ranks)
        return LoraWeights.prepare(loaded, spec, dims, self.neuron_config.torch_dtype)

    def _sim_buckets(self) -> dict:
        nc = self.neuron_config
        if nc.is_prefix_caching:
            return self._sim_prefix_caching_buckets()
        if not nc.enable_bucketing:
            return {"context": [nc.max_context_length], "token": [nc.max_length]}
        return {
            "context": list(nc.context_encoding_buckets
                            or autobuckets(MIN_BUCKET, nc.max_context_length)),
            "token": list(nc.token_generation_buckets or autobuckets(MIN_BUCKET, nc.max_length)),
        }

    def _sim_spec(self):
        return self._sim_spec_of(self.config)

    @staticmethod
    def _sim_spec_of(config):
        from vllm_neuronx.backends.cpu.llama import LlamaSpec

        hf = {k: v for k, v in vars(config).items()
              if k not in ("neuron_config", "fused_spec_config")}
        return LlamaSpec.from_hf_config(hf)

    def _sim_state_dict(self) -> dict[str, torch.Tensor]:
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint

        nc = self.neuron_config
        if nc.quantized:
            return self._sim_read_quantized(nc.quantized_checkpoints_path)
        return read_hf_checkpoint(self.config._name_or_path)

    def _sim_initialize(self, state_dict) -> None:
        from vllm_neuronx.backends.cpu.llama import BlockKV, LlamaModel

        nc = self.neuron_config
        spec = self._sim_spec()
        weights = LlamaModel.convert_hf_weights(spec, state_dict, nc.torch_dtype)
        # The block layout: pa_num_blocks blocks and NxDI's extra one, where slot -1 writes
        # (block_kv_cache_manager.py 20-21, 72-77, 305-316).
        blocks = (BlockKV(nc.pa_num_blocks + 1, nc.pa_block_size) if nc.is_block_kv_layout
                  else None)
        self._runtime = LlamaModel(
            spec, weights, num_lines=nc.kv_cache_batch_size, max_len=nc.max_length,
            dtype=nc.torch_dtype, blocks=blocks,
        )
        self._buckets = self._sim_buckets()
        # A decode of a line must start at a position in [floor, len] (-1: nothing valid);
        # floor < len only after a fused step (a runner may keep fewer tokens).
        self._line_len = [-1] * nc.kv_cache_batch_size
        self._line_floor = [-1] * nc.kv_cache_batch_size
        self._draft = None
        if nc.enable_fused_speculation:
            self._draft = self._sim_draft_runtime(state_dict)
        if nc.lora_config is not None:
            self._sim_load_adapters()

    def _sim_draft_runtime(self, target_state_dict):
        """The draft with its own KV lines (NxDI's draft_model in NeuronFusedSpecModel).

        A draft model is a real model: its checkpoint, computed by vllm_neuronx's CPU
        model. An EAGLE head is NOT computed (the simulator does not model the target's
        hidden states it is fed with): its checkpoint is checked at compile, and the
        STAND-IN proposer here is the target's own weights run as a greedy draft, so the
        proposals are the target's own greedy continuation."""
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint
        from vllm_neuronx.backends.cpu.llama import LlamaModel

        nc = self.neuron_config
        fused = self.fused_spec_config
        if nc.enable_eagle_speculation:
            spec, state, dtype = self._sim_spec(), target_state_dict, nc.torch_dtype
        else:
            spec = self._sim_spec_of(fused.draft_config)
            state = read_hf_checkpoint(fused.draft_model_path)
            dtype = fused.draft_config.neuron_config.torch_dtype
        weights = LlamaModel.convert_hf_weights(spec, state, dtype)
        return LlamaModel(spec, weights, num_lines=nc.kv_cache_batch_size,
                          max_len=nc.max_length, dtype=dtype)

    def _sim_load_adapters(self) -> None:
        """NxDI's load: lora_ckpt_paths into the device slots (after the dummy with
        base-only), the CPU adapters' weights into the manager, every line unbound."""
        lora = self.neuron_config.lora_config
        base = int(lora.enable_base_model_only)
        self._lora_slots = [None] * lora.max_loras
        loaded = {}
        for i, (name, path) in enumerate(lora.lora_ckpt_paths.items()):
            loaded[name] = self._lora_slots[i + base] = self._sim_lora_weights(name, path)
        if lora.dynamic_multi_lora:
            cpu = {name: loaded[name] if name in loaded else self._sim_lora_weights(name, path)
                   for name, path in lora.lora_ckpt_paths_cpu.items()}
            self.lora_model_manager.init_dynamic_multi_lora(cpu, self)
        self._line_adapter = [None] * self.neuron_config.kv_cache_batch_size

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        seq_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        sampling_params=None,
        prev_hidden=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        adapter_ids=None,
        medusa_args=None,
        return_dict=None,
        llava_args=None,
        input_capture_hook=None,
        slot_mapping=None,
        block_table=None,
        full_context_lens=None,
        computed_context_lens=None,
    ):
        sim.SIM_CALLS["forward"] += 1
        if not self.is_loaded_to_neuron:
            raise RuntimeError("Forward called before load. Run load() before calling forward")
        for name, value in (("inputs_embeds", inputs_embeds), ("prev_hidden", prev_hidden),
                            ("medusa_args", medusa_args)):
            if value is not None:
                raise NotImplementedError(f"the simulator does not model {name}")
        nc = self.neuron_config
        block_args = (slot_mapping, block_table, full_context_lens, computed_context_lens)
        if not nc.is_prefix_caching and any(a is not None for a in block_args):
            raise ValueError("slot_mapping, block_table and the context lengths are prefix "
                             "caching's inputs; this model was compiled without it (NxDI "
                             "would ignore them)")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor")
        n = input_ids.shape[0]
        if position_ids is None or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids must match input_ids {tuple(input_ids.shape)}, got "
                f"{None if position_ids is None else tuple(position_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.shape[0] != n:
            raise ValueError("attention_mask must have one row per input row")
        if seq_ids is None:
            seq_ids = torch.arange(n)
        if seq_ids.dim() != 1 or seq_ids.shape[0] != n:
            raise ValueError(f"seq_ids must be [{n}], got {tuple(seq_ids.shape)}")
        lines = [int(s) for s in seq_ids]
        if any(s < 0 or s >= nc.batch_size for s in lines):
            raise ValueError(f"seq_ids {lines} must be KV lines in [0, {nc.batch_size})")
        if any(b <= a for a, b in zip(lines, lines[1:], strict=False)):
            raise ValueError(f"seq_ids {lines} must be sorted ascending and unique")
        if sampling_params is None:
            sampling_params = prepare_sampling_params(n)
        if sampling_params.dim() != 2 or sampling_params.shape != (n, 3):
            raise ValueError(
                f"sampling_params must be [{n}, 3], got {tuple(sampling_params.shape)}"
            )
        if self.on_device_sampling:
            validate_sampling_params(sampling_params, nc.on_device_sampling_config)
        if nc.lora_config is None and adapter_ids is not None:
            raise ValueError("adapter_ids given to a model compiled without lora_config")
        if adapter_ids is not None and tuple(adapter_ids.shape) != (n,):
            raise ValueError(f"adapter_ids must be [{n}], got {tuple(adapter_ids.shape)}")

        if nc.is_prefix_caching:  # NxDI's rule (model_base.py 3571)
            prefill = input_ids.shape[-1] > 1 and int(position_ids.min()) == 0
        else:
            prefill = int(position_ids.min()) == 0
        record = {
            "phase": "prefill" if prefill else "decode",
            "input_ids": input_ids.clone(),
            "position_ids": position_ids.clone(),
            "seq_ids": seq_ids.clone(),
            "sampling_params": sampling_params.clone(),
            "adapter_ids": None if adapter_ids is None else adapter_ids.clone(),
        }
        sim.SIM_FORWARDS.append(record)
        if nc.is_prefix_caching:
            blocks = self._sim_block_args(n, *block_args)
            record.update({k: v.clone() for k, v in blocks.items()})
            if prefill:
                adapters = self._sim_prefill_adapters(input_ids, adapter_ids, record)
                logits = self._sim_block_context_encoding(
                    input_ids, position_ids, lines, adapters, blocks, record)
            else:
                logits = self._sim_block_token_generation(
                    input_ids, position_ids, lines, blocks, record)
            return self._sim_output(logits, sampling_params)
        if self._draft is not None:
            return self._sim_fused(input_ids, position_ids, lines, sampling_params, record)
        if prefill:
            adapters = self._sim_prefill_adapters(input_ids, adapter_ids, record)
            logits = self._sim_context_encoding(input_ids, position_ids, lines, adapters)
        else:
            logits = self._sim_token_generation(input_ids, position_ids, lines)
        return self._sim_output(logits, sampling_params)

    def _sim_prefill_adapters(self, input_ids, adapter_ids, record) -> list:
        """Each prefill row's adapter (None: the base model), its slot recorded."""
        if self.neuron_config.lora_config is None:
            return [None] * input_ids.shape[0]
        slots = self._sim_adapter_slots(input_ids, adapter_ids)
        record["adapter_slots"] = slots.clone()
        return [self._lora_slots[int(s)] for s in slots]

    def _sim_adapter_slots(self, input_ids, adapter_ids) -> torch.Tensor:
        """A context encoding's adapter_ids -> device slots, NxDI's way."""
        lora = self.neuron_config.lora_config
        n = input_ids.shape[0]
        if lora.dynamic_multi_lora and input_ids.shape[-1] > 1:
            if adapter_ids is None:
                raise AttributeError("'NoneType' object has no attribute 'tolist' (NxDI's "
                                     "dynamic multi-LoRA needs adapter_ids on every context "
                                     "encoding)")
            slots = self.lora_model_manager.dynamic_update_weights_for_lora(
                self._lora_slots, adapter_ids.reshape(-1))
        else:  # the model wrapper's dummy for None: zeros
            slots = torch.zeros(n, dtype=torch.int32) if adapter_ids is None else adapter_ids
        bad = [int(s) for s in slots if not 0 <= int(s) < lora.max_loras]
        if bad:
            raise IndexError(f"adapter slots {bad} are outside the {lora.max_loras} compiled "
                             "LoRA slots (adapter_ids of a call NxDI does not convert are "
                             "slots, not adapter ids)")
        return slots.reshape(-1)

    def _sim_context_encoding(self, input_ids, position_ids, lines, adapters) -> torch.Tensor:
        from vllm_neuronx.backends.cpu.lora import LoraStep

        buckets = self._buckets["context"]
        width = input_ids.shape[1]
        if width > buckets[-1]:
            raise ValueError(
                f"Inputs supplied ({width} tokens) are longer than max_context_length "
                f"({buckets[-1]} tokens)"
            )
        out = []
        for row, line in enumerate(lines):  # ctx_batch_size=1: one prompt per CTE run
            pos = position_ids[row]
            length = int(pos.max()) + 1
            if not (torch.equal(pos[:length], torch.arange(length, dtype=pos.dtype))
                    and bool(torch.all(pos[length:] == 0))):
                raise ValueError(
                    f"prefill row {row} has positions {pos.tolist()}: a prefill row holds "
                    "0..len-1 then 0 padding (prefill and decode rows must not be mixed)"
                )
            bucket = first_fit(buckets, length, "prompt length")
            padded = torch.zeros((1, bucket), dtype=torch.long)
            padded[0, :length] = input_ids[row, :length]
            adapter = adapters[row]
            lora = None if adapter is None else LoraStep([(adapter, None)])
            result = self._runtime.context_encode(
                padded, torch.tensor([length]), torch.tensor([line]), lora=lora)
            # LlamaModel returns the last-token logits, or (those, per-row prompt logits)
            out.append(result[0] if isinstance(result, tuple) else result)
            if self._draft is not None:  # the draft encodes the prompt into its own lines
                self._draft.context_encode(padded, torch.tensor([length]), torch.tensor([line]))
            self._line_len[line] = self._line_floor[line] = length
            if self._line_adapter:
                self._line_adapter[line] = adapter  # NxDI copies it into the seq_id's row
        return torch.cat(out)

    @staticmethod
    def _sim_decode_positions(input_ids, position_ids) -> list[int]:
        """A decode call's positions, after NxDI's shape rule: one token per row."""
        if input_ids.shape[1] != 1:
            raise ValueError(
                f"decode rows take one token each ([m, 1]); got width {input_ids.shape[1]} "
                "with positions not starting at 0"
            )
        return [int(p) for p in position_ids[:, 0]]

    def _sim_token_generation(self, input_ids, position_ids, lines) -> torch.Tensor:
        nc = self.neuron_config
        positions = self._sim_decode_positions(input_ids, position_ids)
        self._sim_check_lines(lines, positions)
        bucket = first_fit(self._buckets["token"], max(positions), "position")
        ids = input_ids[:, 0].to(torch.long)
        pos = position_ids[:, 0].to(torch.long)
        seq = torch.tensor(lines)
        batch = nc.batch_size
        if len(lines) < batch and not nc.apply_seq_ids_mask:
            # NxDI pads to the compiled batch by repeating the first row; the padding
            # rows write their K/V into the absent lines at the first row's position.
            full_ids = ids[:1].repeat(batch)
            full_pos = pos[:1].repeat(batch)
            full_ids[seq], full_pos[seq] = ids, pos
            self._sim_padding_overwrites(lines, positions[0])
            logits = self._runtime.token_generate(
                full_ids, full_pos, torch.arange(batch), bucket,
                lora=self._sim_bound(range(batch)))[seq]
        else:
            logits = self._runtime.token_generate(ids, pos, seq, bucket,
                                                  lora=self._sim_bound(lines))
        for line, p in zip(lines, positions, strict=True):
            self._line_len[line] = self._line_floor[line] = p + 1
        return logits

    def _sim_check_lines(self, lines, positions) -> None:
        for line, p in zip(lines, positions, strict=True):
            held, floor = self._line_len[line], self._line_floor[line]
            if held < 0 or not floor <= p <= held:
                what = "no valid tokens" if held < 0 else (
                    f"{held} tokens" if floor == held else
                    f"{held} tokens (a decode may start at {floor}..{held})")
                raise ValueError(
                    f"decode of seq_id {line} at position {p}, but its KV line holds {what} "
                    "(rows paired with the wrong seq_ids, or a line overwritten by batch "
                    "padding)"
                )

    def _sim_padding_overwrites(self, lines, first_position: int) -> None:
        """NxDI pads a partial decode batch with the first row, sent to the absent lines:
        their K/V from the first row's position on is junk afterwards."""
        for line in set(range(self.neuron_config.batch_size)) - set(lines):
            if self._line_len[line] > first_position:
                self._line_len[line] = self._line_floor[line] = -1

    # -- prefix caching on the block KV layout ---------------------------------------------------
    # NxDI main 4bcdc54: models/model_wrapper.py (mw), models/model_base.py (mb),
    # modules/autobucketing.py (ab), modules/kvcache/block_kv_cache_manager.py (bkv).
    def _sim_check_block_layout(self) -> None:
        """What NxDI's prefix caching needs at compile (and would otherwise trace wrong)."""
        nc = self.neuron_config
        if not nc.is_block_kv_layout:
            raise NotImplementedError(
                "the simulator models prefix caching on the block KV layout only (without "
                "is_block_kv_layout NxDI keeps its contiguous KV cache, mb 170-171)")
        if not nc.is_prefix_caching:
            raise NotImplementedError(
                "NxDI shapes its block KV cache for prefix caching or chunked prefill only "
                "(bkv 37-43); the simulator models is_block_kv_layout with is_prefix_caching")
        if nc.speculation_length or nc.enable_fused_speculation:
            raise NotImplementedError("the simulator does not model speculation with prefix "
                                      "caching")
        bs, blocks = nc.pa_block_size, nc.pa_num_blocks
        if not (isinstance(bs, int) and bs >= 1 and isinstance(blocks, int) and blocks >= 1):
            raise ValueError(f"pa_block_size={bs!r} and pa_num_blocks={blocks!r} must be "
                             "positive integers")
        spec = self._sim_spec()
        if spec.sliding_window and spec.sliding_window < nc.max_length:
            raise NotImplementedError("the simulator does not model a sliding window with "
                                      "prefix caching")
        buckets = self._sim_buckets()  # NxDI's TypeError for [0] + prefix_buckets=None
        for what, axis in (("prefix", [b[1] for b in buckets["context"]]),
                           ("token generation", [b[1] for b in buckets["token"]])):
            partial = sorted({b for b in axis if b % bs})
            if partial:  # the table gets bucket // bs entries, the mask bucket positions
                raise ValueError(
                    f"{what} buckets {partial} are not whole blocks of pa_block_size={bs}: "
                    "their block table (bucket // block_size entries) and attention mask "
                    "(bucket positions) would not match")
        narrow = sorted({p for p, x in buckets["context"] if x and p < PREFIX_MIN_PREFILL})
        if narrow:  # attention_base.py 1745-1751 tells them from token generation by width
            raise ValueError(
                f"context encoding buckets {narrow} with a prefix are narrower than "
                f"{PREFIX_MIN_PREFILL}: NxDI's attention would run them as token generation")
        per_sequence = -(-nc.max_length // bs)
        if per_sequence < BLOCK_TILING_BLOCKS and not nc.attn_block_tkg_nki_kernel_enabled:
            tiles = 2 ** math.ceil(math.log2(BLOCK_TILING_BLOCKS / per_sequence))
            if bs % tiles:  # bkv 55-70 assumes the tiles divide the block
                raise ValueError(
                    f"cannot tile blocks of pa_block_size={bs} into {tiles} (the K/V cache "
                    f"shape ({blocks + 1}, {tiles}, {bs // tiles}, ...) does not hold them)")

    def _sim_prefix_caching_buckets(self) -> dict:
        """NxDI's 2-D buckets under prefix caching: context encoding [prefill, prefix] with a
        0 prefix, token generation [1, S] (ab 149-264)."""
        nc = self.neuron_config

        def cross(prefill, prefix):
            return [[p, x] for p in prefill for x in prefix]

        if not nc.enable_bucketing:
            return {"context": cross([nc.max_context_length], [0, nc.max_context_length]),
                    "token": [[1, nc.max_length]]}
        if nc.context_encoding_buckets is not None:
            context = cross(nc.context_encoding_buckets, [0] + nc.prefix_buckets)
        else:
            auto = autobuckets(PREFIX_MIN_BUCKET, nc.max_context_length)
            context = cross(auto, [0] + auto)
        token = nc.token_generation_buckets or autobuckets(PREFIX_TKG_MIN_BUCKET, nc.max_length)
        return {"context": context, "token": [[1, s] for s in token]}

    def _sim_context_bucket(self, queries: int, prefix: int) -> list[int]:
        """NxDI's get_target_2d_bucket_for_prefix_caching for context encoding (mw 991-1045)."""
        buckets = self._buckets["context"]
        prefills = list(dict.fromkeys(b[0] for b in buckets))
        prefixes = list(dict.fromkeys(b[1] for b in buckets))
        if 256 < queries + prefix <= 512:  # its corner case: recompute all in [512, 0]
            for b in buckets:
                if b == [512, 0]:
                    return b
        index = next((i for i, b in enumerate(prefills) if queries <= b), len(prefills))
        if index == len(prefills):
            raise ValueError(f"Prefill len {queries} exceeds largest bucket ({prefills[-1]}) "
                             f"for {CONTEXT_ENCODING_MODEL_TAG}")
        rest = max(0, prefix - max(0, prefills[index] - queries))
        cached = next((i for i, b in enumerate(prefixes) if rest <= b), len(prefixes))
        if cached == len(prefixes):  # a bare assert in NxDI (mw 1043)
            raise AssertionError(f"Prefix len {rest} exceeds largest bucket {prefixes[-1]} "
                                 f"for {CONTEXT_ENCODING_MODEL_TAG}")
        return buckets[index * len(prefixes) + cached]

    def _sim_block_args(self, n, slot_mapping, block_table, full, computed) -> dict:
        """The block layout's inputs, in the shapes NxDI's forward takes (mb 3566-3630)."""
        named = {"slot_mapping": slot_mapping, "block_table": block_table,
                 "full_context_lens": full, "computed_context_lens": computed}
        missing = [k for k, v in named.items() if v is None]
        if missing:  # NxDI: full_context_lens - computed_context_lens, then the graph inputs
            raise TypeError(f"prefix caching needs {missing} on every call (NxDI computes "
                            "num_queries = full_context_lens - computed_context_lens)")
        for name, t in named.items():
            if not torch.is_tensor(t) or t.dim() != 2 or t.shape[0] != n or \
                    t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"{name} must be a [{n}, width] integer tensor, got "
                                 f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")
        for name in ("full_context_lens", "computed_context_lens"):
            if named[name].shape[1] != 1:
                raise ValueError(f"{name} must be [{n}, 1] (NxDI reads num_queries' shape as "
                                 f"(batch, 1)), got {list(named[name].shape)}")
        return {k: v.to(torch.long) for k, v in named.items()}

    def _sim_check_blocks(self, ids: torch.Tensor, what: str) -> None:
        """Block ids must name the cache's pa_num_blocks blocks (not NxDI's extra one)."""
        blocks = self.neuron_config.pa_num_blocks
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= blocks):
            raise IndexError(f"{what} {ids.tolist()} reach outside the KV cache's "
                             f"pa_num_blocks={blocks} blocks")

    def _sim_block_context_encoding(self, input_ids, position_ids, lines, adapters, blocks,
                                    record) -> torch.Tensor:
        """NxDI's context encoding with prefix caching: one prompt per run (ctx batch 1; with
        several rows each is re-padded from its positions, mw 1297-1313, 1343-1381), in its
        [prefill, prefix] bucket; free prefill slots recompute cached tokens, whose slots are
        -1 (mw 1108-1131)."""
        from vllm_neuronx.backends.cpu.lora import LoraStep

        nc = self.neuron_config
        bs, pad_id = nc.pa_block_size, getattr(self.config, "pad_token_id", 0) or 0
        n = input_ids.shape[0]
        out, chosen = [], []
        for row in range(n):
            ids, pos = input_ids[row], position_ids[row]
            length = int(pos.max()) + 1
            if not (torch.equal(pos[:length], torch.arange(length, dtype=pos.dtype))
                    and bool(torch.all(pos[length:] == 0))):
                raise ValueError(
                    f"prefill row {row} has positions {pos.tolist()}: NxDI's context encoding "
                    "takes the whole sequence, 0..len-1 then 0 padding")
            if n > 1:  # vllm_cte_repadding cuts each row at max(position_ids) + 1
                ids, pos = ids[:length], pos[:length]
            full = int(blocks["full_context_lens"][row, 0])
            computed = int(blocks["computed_context_lens"][row, 0])
            if full != length or not 0 <= computed < full:
                raise ValueError(
                    f"prefill row {row}: full_context_lens={full} and computed_context_lens="
                    f"{computed} for a sequence of {length} positions (NxDI picks the bucket "
                    "from them and gathers the output at the last position)")
            queries = full - computed
            prefill, prefix = self._sim_context_bucket(queries, computed)
            chosen.append([prefill, prefix])
            start = max(0, computed - (prefill - queries))  # cached tokens recomputed from here
            act_ids = F.pad(ids[start:], (0, prefill - (ids.shape[0] - start)), value=pad_id)
            act_pos = F.pad(pos[start:], (0, prefill - (pos.shape[0] - start)), value=1)
            slots = F.pad(blocks["slot_mapping"][row:row + 1], (computed - start, 0), value=-1)
            slots = F.pad(slots, (0, prefill - slots.shape[1]), value=-1)
            table, visible = None, None
            if prefix:
                table = F.pad(blocks["block_table"][row:row + 1],
                              (0, prefix // bs - blocks["block_table"].shape[1]))
                self._sim_check_blocks(table, "block_table entries")
                visible = (torch.arange(prefix) < start)[None, :]  # the prefix's mask
            adapter = adapters[row]
            lora = None if adapter is None else LoraStep([(adapter, None)])
            hidden = self._sim_block_pass(act_ids[None], act_pos[None], slots, table, visible,
                                          lora)
            out.append(self._runtime.logits(hidden[:, length - 1 - start]))
            if self._line_adapter:
                self._line_adapter[lines[row]] = adapter  # NxDI copies it into the seq_id's row
        record["buckets"] = chosen
        return torch.cat(out)

    def _sim_block_token_generation(self, input_ids, position_ids, lines, blocks,
                                    record) -> torch.Tensor:
        """NxDI's token generation with prefix caching: the smallest [1, S] bucket with S past
        every computed_context_len (mw 964-991), the table padded or cut to S / block_size
        entries (mw 1133-1143), each row's slot recomputed in the graph from its position and
        table, slot_mapping only saying which rows are real (mb 763-774, bkv 376-399), and
        the prior mask from the positions (mb 3485-3504)."""
        nc = self.neuron_config
        bs = nc.pa_block_size
        m = input_ids.shape[0]
        if input_ids.shape[1] != 1:
            raise ValueError(f"token generation takes one token per row ([m, 1]); got width "
                             f"{input_ids.shape[1]} with positions not starting at 0")
        full, computed = blocks["full_context_lens"][:, 0], blocks["computed_context_lens"][:, 0]
        pos = position_ids[:, 0].to(torch.long)
        if int((full - computed).max()) > 1:
            raise ValueError(f"Input len {(full - computed).tolist()} exceeds largest bucket "
                             f"(1) for {TOKEN_GENERATION_MODEL_TAG}")
        if not (torch.equal(full, pos + 1) and torch.equal(computed, pos)):
            # NxDI takes the bucket from computed_context_lens and the mask from the positions
            raise ValueError(
                f"token generation rows at positions {pos.tolist()} have full_context_lens "
                f"{full.tolist()} and computed_context_lens {computed.tolist()} (position + 1 "
                "and position)")
        bucket = next((s for _, s in self._buckets["token"] if s > int(computed.max())), None)
        if bucket is None:
            raise ValueError(f"Input len {computed.tolist()} exceeds largest bucket "
                             f"({self._buckets['token'][-1][1]}) for "
                             f"{TOKEN_GENERATION_MODEL_TAG}")
        record["buckets"] = [[1, bucket]]
        width = bucket // bs
        kernel = nc.attn_block_tkg_nki_kernel_enabled
        table = blocks["block_table"]
        table = F.pad(table, (0, width - table.shape[1]), value=-1 if kernel else 0)
        if bool((pos // bs >= width).any()):
            raise IndexError(f"positions {pos.tolist()} need block-table entries past the "
                             f"{width} of bucket {bucket}")
        owned = torch.arange(width)[None, :] <= (pos // bs)[:, None]
        if kernel:  # the block TKG kernel reads each row's table up to its first -1
            if bool((table[~owned] != -1).any()) or bool((table[owned] < 0).any()):
                raise ValueError(
                    f"with attn_block_tkg_nki_kernel_enabled a token generation's block table "
                    f"lists each row's blocks, then -1; got {table.tolist()}")
            self._sim_check_blocks(table[owned], "block_table entries")
            table = torch.where(owned, table, torch.zeros_like(table))  # masked past pos
        else:
            self._sim_check_blocks(table, "block_table entries")
        current = table[torch.arange(m), pos // bs]
        slots = torch.where(blocks["slot_mapping"][:, :1] >= 0,
                            (current * bs + pos % bs)[:, None], torch.full((m, 1), -1))
        visible = torch.arange(bucket)[None, :] < pos[:, None]
        hidden = self._sim_block_pass(input_ids.to(torch.long), pos[:, None], slots, table,
                                      visible, self._sim_bound(lines))
        return self._runtime.logits(hidden[:, 0])

    def _sim_block_pass(self, ids, pos, slots, table, prior_visible, lora) -> torch.Tensor:
        """One graph run on the block layout, NxDI's attention: each query attends to the
        prior, the cache read through ``table`` ([b, k] block ids: bkv 150-181) where
        ``prior_visible`` ([b, k * block_size]), and causally to the call's own tokens; the
        call's K/V are then written at ``slots`` ([b, t]; -1 goes to the extra block past
        pa_num_blocks, bkv 305-316). Returns the last hidden states [b, t, hidden]."""
        nc = self.neuron_config
        rt, s = self._runtime, self._runtime.spec
        bs = nc.pa_block_size
        b, t = ids.shape
        real = slots[slots >= 0]
        if real.numel() and int(real.max()) >= nc.pa_num_blocks * bs:
            raise IndexError(f"slot_mapping {slots.tolist()} reaches past the KV cache's "
                             f"pa_num_blocks={nc.pa_num_blocks} blocks of {bs}")
        dest = torch.where(slots >= 0, slots, nc.pa_num_blocks * bs).reshape(-1)
        x = rt.embed(ids)
        cos, sin = rt.cos[pos][:, None], rt.sin[pos][:, None]
        active = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(b, t, t)
        mask = active if table is None else torch.cat(
            [prior_visible[:, None, :].expand(b, t, -1), active], dim=-1)

        def attend(i, q, k, v):
            keys, values = k, v
            if table is not None:  # [b, k, bs, kv_heads, d] -> [b, kv_heads, k * bs, d]
                keys = torch.cat([rt.k_cache[i][table].flatten(1, 2).transpose(1, 2), k], 2)
                values = torch.cat([rt.v_cache[i][table].flatten(1, 2).transpose(1, 2), v], 2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                                 scale=rt.scale, enable_gqa=True)
            # NxDI updates the cache after attending (the prior is the cache before the call)
            flat_k = rt.k_cache[i].view(-1, s.num_kv_heads, s.head_dim)
            flat_v = rt.v_cache[i].view(-1, s.num_kv_heads, s.head_dim)
            flat_k[dest] = k.transpose(1, 2).reshape(-1, s.num_kv_heads, s.head_dim)
            flat_v[dest] = v.transpose(1, 2).reshape(-1, s.num_kv_heads, s.head_dim)
            return out

        with torch.inference_mode():
            return rt._layers(x, cos, sin, attend, lora, None)

    # -- fused speculation ------------------------------------------------------------------
    def _sim_fused(self, input_ids, position_ids, lines, sampling_params, record):
        """NeuronFusedSpecModel's forward and its postprocessors (model_base.py ~2856-3022):
        ``fused_outputs`` = [tokens [n, k] int32 padded, next ids [n, 1], next attention mask,
        next position ids [n, 1] int32]."""
        nc = self.neuron_config
        k = nc.speculation_length
        n = input_ids.shape[0]
        pad = ACCEPTANCE_PADDING_TOKEN
        if int(position_ids.min()) == 0:  # context encoding: the target's token, then pad
            logits = self._sim_context_encoding(input_ids, position_ids, lines, [None] * n)
            first = self._sim_sample(logits, sampling_params).to(torch.long)
            tokens = torch.full((n, k), pad, dtype=torch.long)
            tokens[:, 0] = first
            next_pos = (position_ids.max(dim=1).values + 1).to(torch.long)  # the lengths
            count = torch.ones(n, dtype=torch.long)
            width = nc.seq_len
        else:
            tokens, next_pos, width = self._sim_fused_step(
                input_ids, position_ids, lines, sampling_params, record)
            count = next_pos - position_ids[:, 0].to(torch.long)
        record["fused_tokens"] = tokens.clone()
        record["next_pos_ids"] = next_pos.clone()
        last = tokens.gather(1, (count - 1)[:, None])
        mask = (torch.arange(width)[None, :] < next_pos[:, None]).to(torch.int32)
        fused = [tokens.to(torch.int32), last.to(torch.int32), mask,
                 next_pos[:, None].to(torch.int32)]
        out = CausalLMOutputWithPast(logits=None, hidden_states=fused)
        out.fused_outputs = fused  # NxDI sets no .tokens with fused speculation
        out.async_should_stop = False
        return out

    def _sim_fused_step(self, input_ids, position_ids, lines, params, record):
        """One fused decode: the draft proposes, the target verifies in one pass, NxDI's
        acceptance. Returns (tokens [n, k] padded, next positions [n], mask width)."""
        nc = self.neuron_config
        k = nc.speculation_length
        positions = self._sim_decode_positions(input_ids, position_ids)
        # NxDI's bucket (chosen before the graph runs): the attention mask's width (the
        # largest position) plus k
        bucket = first_fit(self._buckets["token"], max(positions) + k,
                           "position + speculation_length")
        self._sim_check_lines(lines, positions)
        ids = input_ids[:, 0].to(torch.long)
        pos = position_ids[:, 0].to(torch.long)
        seq = torch.tensor(lines)
        rows = torch.arange(len(lines))
        batch = nc.batch_size
        if len(lines) < batch and not nc.apply_seq_ids_mask:
            # padded to the compiled batch with the first row, sent to the absent lines
            ids, pos, params = (self._sim_pad_rows(t, seq, batch) for t in (ids, pos, params))
            self._sim_padding_overwrites(lines, positions[0])
            rows, seq = seq, torch.arange(batch)
        m = seq.shape[0]
        eagle = nc.enable_eagle_speculation
        # 1. the draft, k runs from x at p (its KV: x, d_1 .. d_{k-1} at p .. p+k-1)
        proposed = [ids]
        for i in range(k):
            logits = self._draft.token_generate(proposed[-1], pos + i, seq, bucket)
            proposed.append(logits.argmax(dim=-1) if eagle else self._sim_sample(logits, params))
        drafts = torch.stack(proposed[1:], dim=1)  # [m, k]: d_1 .. d_k
        # 2. the target over [x, d_1 .. d_{k-1}] at p .. p+k-1, one pass
        verify = torch.stack(proposed[:-1], dim=1)
        vpos = pos[:, None] + torch.arange(k)[None, :]
        logits = self._runtime.token_generate(verify.reshape(-1), vpos.reshape(-1),
                                              seq.repeat_interleave(k), bucket)
        target = self._sim_sample(logits, params.repeat_interleave(k, dim=0)).view(m, k)
        # 3. NxDI's _tkg_postprocessor: contiguous matches, plus the target's next token
        matches = ((drafts[:, :-1] != target[:, :-1]).cumsum(dim=-1) < 1).sum(dim=-1) + 1
        keep = torch.arange(k)[None, :] < matches[:, None]
        tokens = torch.where(keep, target, torch.full_like(target, ACCEPTANCE_PADDING_TOKEN))
        next_pos = pos + matches
        record["drafts"] = drafts[rows].clone()
        record["target_tokens"] = target[rows].clone()
        for line, p, c in zip(lines, positions, matches[rows].tolist(), strict=True):
            self._line_floor[line], self._line_len[line] = p + 1, p + c
        return tokens[rows], next_pos[rows], bucket

    @staticmethod
    def _sim_pad_rows(t: torch.Tensor, seq: torch.Tensor, batch: int) -> torch.Tensor:
        """Rows on their lines, the absent lines filled with the first row (NxDI's
        repeat_first_batchline)."""
        full = t[:1].repeat(batch, *([1] * (t.dim() - 1)))
        full[seq] = t
        return full

    def _sim_bound(self, lines):
        """Token generation's adapters: each row its line's (adapter_ids play no part)."""
        from vllm_neuronx.backends.cpu.lora import LoraStep

        if not self._line_adapter:
            return None
        rows: dict[int, tuple] = {}
        for row, line in enumerate(lines):
            adapter = self._line_adapter[line]
            if adapter is not None:
                rows.setdefault(id(adapter), (adapter, []))[1].append(row)
        if not rows:
            return None
        whole = len(rows) == 1 and len(next(iter(rows.values()))[1]) == len(lines)
        return LoraStep([(adapter, None if whole else torch.tensor(r))
                         for adapter, r in rows.values()])

    def _sim_output(self, logits: torch.Tensor, sampling_params: torch.Tensor):
        if not self.on_device_sampling:
            full = logits.float()[:, None, :]  # [n, 1, vocab]
            out = CausalLMOutputWithPast(logits=full, hidden_states=full)
            out.tokens = full
            return out
        tokens = self._sim_sample(logits, sampling_params).to(torch.int32)
        if self.neuron_config.output_logits:
            # As NxDI: tokens and gathered logits, hidden_states empty; the vocab is padded
            # to the lm_head's shard size with the dtype's minimum.
            pad = -logits.shape[-1] % LM_HEAD_PAD
            full = torch.nn.functional.pad(logits.float(), (0, pad),
                                           value=torch.finfo(torch.float32).min)
            out = CausalLMOutputWithPast(logits=full[:, None, :], hidden_states=[])
        else:
            out = CausalLMOutputWithPast(logits=None, hidden_states=tokens)
        out.tokens = tokens
        return out

    def _sim_sample(self, logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from vllm_neuronx import sampling

        ods = self.neuron_config.on_device_sampling_config
        if not (ods.do_sample or ods.dynamic):
            return logits.argmax(dim=-1)
        if not ods.dynamic:
            params = prepare_sampling_params(
                logits.shape[0], [ods.top_k], [ods.top_p], [ods.temperature])
        tokens = sampling.sample(logits, params, ods.global_topk, self._generator)
        uniform = params[:, 0] == -1  # NxDI masks every candidate: a uniform pick
        if bool(uniform.any()):
            k = min(ods.global_topk, logits.shape[-1])
            candidates = logits.topk(k, dim=-1).indices
            picks = torch.randint(k, (logits.shape[0], 1), generator=self._generator)
            tokens = torch.where(uniform, candidates.gather(-1, picks)[:, 0], tokens)
        return tokens
