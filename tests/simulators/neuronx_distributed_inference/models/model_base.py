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
The numbers come from vllm_neuronx's CPU Llama (LlamaModel).
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import neuronx_distributed_inference as sim
from neuronx_distributed_inference.models.application_base import NeuronApplicationBase
from neuronx_distributed_inference.modules.generation.sampling import (
    prepare_sampling_params,
    validate_sampling_params,
)

MIN_BUCKET = 128
LM_HEAD_PAD = 96  # simulated vocab padding of gathered logits (output_logits)
# Documented tp_degree values: trn2 1,2,4,8,16,32,64; inf2 1,2,4,8,24; trn1 1,2,8,16,32.
SUPPORTED_TP_DEGREES = frozenset({1, 2, 4, 8, 16, 24, 32, 64})


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


class NeuronBaseForCausalLM(NeuronApplicationBase):
    _model_cls = None

    def __init__(self, model_path, config=None, neuron_config=None) -> None:
        super().__init__(model_path, config, neuron_config)
        self._runtime = None
        self._line_len: list[int] = []
        self._generator = torch.Generator().manual_seed(0)

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
        for feature in ("speculation_length", "is_prefix_caching", "is_block_kv_layout",
                        "enable_fused_speculation", "async_mode"):
            if getattr(nc, feature):
                raise NotImplementedError(f"the simulator does not model {feature}")
        self._sim_spec()  # the architecture must be one the simulator computes

    def _sim_buckets(self) -> dict:
        nc = self.neuron_config
        if not nc.enable_bucketing:
            return {"context": [nc.max_context_length], "token": [nc.max_length]}
        return {
            "context": list(nc.context_encoding_buckets
                            or autobuckets(MIN_BUCKET, nc.max_context_length)),
            "token": list(nc.token_generation_buckets or autobuckets(MIN_BUCKET, nc.max_length)),
        }

    def _sim_spec(self):
        from vllm_neuronx.backends.cpu.llama import LlamaSpec

        hf = {k: v for k, v in vars(self.config).items() if k != "neuron_config"}
        return LlamaSpec.from_hf_config(hf)

    def _sim_state_dict(self) -> dict[str, torch.Tensor]:
        from vllm_neuronx.backends.cpu.backend import read_hf_checkpoint

        nc = self.neuron_config
        if nc.quantized:
            return self._sim_read_quantized(nc.quantized_checkpoints_path)
        return read_hf_checkpoint(self.config._name_or_path)

    def _sim_initialize(self, state_dict) -> None:
        from vllm_neuronx.backends.cpu.llama import LlamaModel

        nc = self.neuron_config
        spec = self._sim_spec()
        weights = LlamaModel.convert_hf_weights(spec, state_dict, nc.torch_dtype)
        self._runtime = LlamaModel(
            spec, weights, num_lines=nc.kv_cache_batch_size, max_len=nc.max_length,
            dtype=nc.torch_dtype,
        )
        self._buckets = self._sim_buckets()
        self._line_len = [-1] * nc.kv_cache_batch_size  # -1: nothing valid in the line

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
                            ("medusa_args", medusa_args), ("slot_mapping", slot_mapping),
                            ("block_table", block_table)):
            if value is not None:
                raise NotImplementedError(f"the simulator does not model {name}")
        nc = self.neuron_config
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
        if nc.lora_config is not None and adapter_ids is not None:
            ids = [int(a) for a in adapter_ids.reshape(-1)]
            if len(ids) != n or any(a < 0 or a >= nc.lora_config.max_loras for a in ids):
                raise ValueError(
                    f"adapter_ids {ids} must be [{n}] indices in [0, {nc.lora_config.max_loras})"
                )
        elif adapter_ids is not None:
            raise ValueError("adapter_ids given to a model compiled without lora_config")

        prefill = int(position_ids.min()) == 0
        sim.SIM_FORWARDS.append({
            "phase": "prefill" if prefill else "decode",
            "input_ids": input_ids.clone(),
            "position_ids": position_ids.clone(),
            "seq_ids": seq_ids.clone(),
            "sampling_params": sampling_params.clone(),
            "adapter_ids": None if adapter_ids is None else adapter_ids.clone(),
        })
        if prefill:
            logits = self._sim_context_encoding(input_ids, position_ids, lines)
        else:
            logits = self._sim_token_generation(input_ids, position_ids, lines)
        return self._sim_output(logits, sampling_params)

    def _sim_context_encoding(self, input_ids, position_ids, lines) -> torch.Tensor:
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
            result = self._runtime.context_encode(
                padded, torch.tensor([length]), torch.tensor([line]))
            # LlamaModel returns the last-token logits, or (those, per-row prompt logits)
            out.append(result[0] if isinstance(result, tuple) else result)
            self._line_len[line] = length
        return torch.cat(out)

    def _sim_token_generation(self, input_ids, position_ids, lines) -> torch.Tensor:
        nc = self.neuron_config
        if input_ids.shape[1] != 1:
            raise ValueError(
                f"decode rows take one token each ([m, 1]); got width {input_ids.shape[1]} "
                "with positions not starting at 0"
            )
        positions = [int(p) for p in position_ids[:, 0]]
        for line, p in zip(lines, positions, strict=True):
            if self._line_len[line] != p:
                held = self._line_len[line]
                raise ValueError(
                    f"decode of seq_id {line} at position {p}, but its KV line holds "
                    f"{'no valid' if held < 0 else held} tokens (rows paired with the "
                    "wrong seq_ids, or a line overwritten by batch padding)"
                )
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
            for line in set(range(batch)) - set(lines):
                if self._line_len[line] > positions[0]:
                    self._line_len[line] = -1
            logits = self._runtime.token_generate(full_ids, full_pos, torch.arange(batch),
                                                  bucket)[seq]
        else:
            logits = self._runtime.token_generate(ids, pos, seq, bucket)
        for line, p in zip(lines, positions, strict=True):
            self._line_len[line] = p + 1
        return logits

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
