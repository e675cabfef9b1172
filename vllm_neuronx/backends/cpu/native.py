"""The native path of the CPU backend: a whole Llama step in one call of decode_step.c.

It takes a model (llama.py, with its matmul weights packed for the kernel) and
a batch, and decides whether it can run it: a decode of up to ``max_rows`` rows, or
a prefill whose prompts hold fewer tokens in all than ``max_rows`` and the kernel
variant's ``widen_rows`` (rows of one line at positions 0..n-1 are that line's prefill;
past ``widen_rows``, sgemm over widened weights is faster). What it declines (bigger
batches, prompt logits) runs on the model's torch path with the same numerics. Models with biases
other than q/k/v's, heads wider than 256, or an fp8 KV cache with heads not a whole
number of vectors wide have no native path (``NativeStep.for_model`` is None).
"""

from __future__ import annotations

import ctypes

import torch

from vllm_neuronx.backends.cpu.kernels import (
    NATIVE_ROWS,
    Layer,
    Model,
    PackedMatmul,
    PackedWeight,
    Weight,
)
from vllm_neuronx.backends.cpu.llama import LlamaModel

# decode_step.c keeps a head's attention output in registers.
MAX_HEAD_DIM = 256


class DecodeStep:
    """``decode_step.c``: every layer of a decode step (or a small prefill) of up to
    ``max_rows`` rows in one native call. Holds pointers into the model's tensors, which
    must outlive it."""

    __slots__ = ("_fn", "_model", "_layers", "_scratch", "_weights", "max_rows", "hidden",
                 "vocab", "max_len", "num_lines")

    def __init__(self, matmul: PackedMatmul, *, dims: dict[str, int], eps: float,
                 scale: float, tensors: dict[str, torch.Tensor | PackedWeight],
                 layers: list[dict[str, torch.Tensor | PackedWeight]], max_rows: int) -> None:
        self._weights = []  # the weights' descriptors, alive as long as the step
        kv_dtype = torch.float8_e4m3fn if dims["kv_fp8"] else torch.float32

        def ptr(t: torch.Tensor | PackedWeight | list | None) -> int | None:
            if t is None:  # an optional tensor the model does not have: NULL
                return None
            if isinstance(t, (PackedWeight, list)):  # a weight, or one per expert
                t = t if isinstance(t, list) else [t]
                array = (Weight * len(t))(*[e.describe() for e in t])
                self._weights.append(array)
                return ctypes.addressof(array)
            cache = t.dtype is kv_dtype and t.dim() == 4
            if not t.is_contiguous() or (t.dtype is not torch.float32 and not cache):
                raise ValueError("decode_step needs packed weights and contiguous fp32 tensors")
            return t.data_ptr()

        self._layers = (Layer * len(layers))(
            *[Layer(*[ptr(layer[name]) for name, _ in Layer._fields_]) for layer in layers]
        )
        self._model = Model(**dims, eps=eps, scale=scale,
                            **{name: ptr(tensors[name])
                               for name in ("cos", "sin", "norm", "lm_head")},
                            layer=self._layers)
        lib = matmul.lib
        lib.decode_scratch_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int]
        lib.decode_scratch_floats.restype = ctypes.c_long
        self._fn = lib.decode_step
        self._fn.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p]
        self._fn.restype = None
        self.max_rows, self.hidden, self.vocab = max_rows, dims["hidden"], dims["vocab"]
        self.max_len, self.num_lines = dims["max_len"], layers[0]["k_cache"].shape[0]
        floats = lib.decode_scratch_floats(ctypes.byref(self._model), max_rows)
        self._scratch = torch.empty(floats, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, lines: torch.Tensor,
                 out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [m, hidden] fp32 (overwritten), positions and lines [m] int64 -> logits of every
        row [m, vocab], or of ``out_rows`` only. Rows of one line at positions 0..n-1 are
        that line's prefill (decode_step.c)."""
        m = x.shape[0]
        if not 0 < m <= self.max_rows or x.shape != (m, self.hidden) or \
                x.dtype is not torch.float32 or not x.is_contiguous():
            raise ValueError(f"decode_step takes [1..{self.max_rows}, {self.hidden}] fp32 rows")
        positions = positions.to(torch.int64).contiguous()
        lines = lines.to(torch.int64).contiguous()
        # Native code writes the KV cache at these: out of range would corrupt memory.
        if positions.shape != (m,) or lines.shape != (m,) or \
                int(positions.min()) < 0 or int(positions.max()) >= self.max_len or \
                int(lines.min()) < 0 or int(lines.max()) >= self.num_lines:
            raise ValueError(f"decode_step takes positions in [0, {self.max_len}) and lines "
                             f"in [0, {self.num_lines}), one of each per row")
        rows_ptr, n_out = None, m
        if out_rows is not None:
            out_rows = out_rows.to(torch.int64).contiguous()
            n_out = out_rows.shape[0]
            if out_rows.dim() != 1 or not 0 < n_out <= m or int(out_rows.min()) < 0 or \
                    int(out_rows.max()) >= m:
                raise ValueError(f"out_rows must be 1 to {m} rows of the {m} given")
            rows_ptr = out_rows.data_ptr()
        logits = torch.empty((n_out, self.vocab), dtype=torch.float32)
        self._fn(ctypes.byref(self._model), x.data_ptr(), m, positions.data_ptr(),
                 lines.data_ptr(), rows_ptr, n_out, self._scratch.data_ptr(), logits.data_ptr())
        return logits


class NativeStep:
    """The model's steps through ``DecodeStep``, where it can run them."""

    __slots__ = ("model", "step", "prefill_rows")

    def __init__(self, model: LlamaModel, step: DecodeStep, prefill_rows: int | None) -> None:
        self.model = model
        self.step = step
        # A prefill of this many tokens or more is faster widened through sgemm (None:
        # never), or more rows than the step's scratch holds.
        self.prefill_rows = min(prefill_rows or step.max_rows + 1, step.max_rows + 1)

    @classmethod
    def for_model(cls, model: LlamaModel, matmul: PackedMatmul) -> NativeStep | None:
        """The native path of ``model``, or None where decode_step.c cannot run it: a
        weight not packed for the kernel, a bias other than q/k/v's, heads wider than it
        handles, or an fp8 KV cache with heads not a whole number of vectors wide."""
        s, w = model.spec, model.w
        packed = [name for name in w if LlamaModel.is_matmul(name)]
        other_bias = any(name + "_bias" in w for name in packed if not name.endswith("qkv"))
        kv_fp8 = model.k_cache.dtype is torch.float8_e4m3fn
        if s.head_dim > MAX_HEAD_DIM or other_bias or \
                (kv_fp8 and s.head_dim % (matmul.panel // 3)) or \
                not all(isinstance(w[name], PackedWeight) for name in packed):
            return None
        layers = []
        for i in range(s.num_layers):
            p = f"layers.{i}."
            experts = range(s.num_experts) if s.is_moe(i) else ()
            layers.append({"ln1": w[p + "ln1"], "ln2": w[p + "ln2"],
                           "k_cache": model.k_cache[i], "v_cache": model.v_cache[i],
                           **{name: w.get(p + name) for name in ("qkv", "o", "gate_up", "down",
                                                                 "qkv_bias", "q_norm", "k_norm",
                                                                 "router")},
                           "expert_gate_up": [w[p + f"experts.{e}.gate_up"] for e in experts]
                           or None,
                           "expert_down": [w[p + f"experts.{e}.down"] for e in experts] or None})
        dims = {"hidden": s.hidden_size, "intermediate": s.intermediate_size,
                "heads": s.num_heads, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                "layers": s.num_layers, "max_len": model.max_len, "window": model.window or 0,
                "vocab": s.vocab_size, "experts": s.num_experts,
                "experts_per_token": s.experts_per_token, "norm_topk": int(s.norm_topk_prob),
                "expert_size": s.expert_size, "kv_fp8": int(kv_fp8)}
        tensors = {"cos": model.cos, "sin": model.sin, "norm": w["norm"],
                   "lm_head": w["lm_head"]}
        step = DecodeStep(matmul, dims=dims, eps=s.rms_norm_eps, scale=model.scale,
                          tensors=tensors, layers=layers, max_rows=NATIVE_ROWS)
        return cls(model, step, matmul.widen_rows)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                seq_ids: torch.Tensor) -> torch.Tensor | None:
        """Last-token logits [n, vocab] of right-padded prompts [n, width], or None when
        their real tokens are more rows than the native step is faster at."""
        if int(lengths.sum()) >= self.prefill_rows:
            return None
        n, t = input_ids.shape
        real = torch.arange(t)[None, :] < lengths[:, None]
        positions = torch.arange(t).expand(n, t)[real]
        lines = seq_ids[:, None].expand(n, t)[real]
        last = lengths.cumsum(0) - 1
        return self.step(self.model.embed(input_ids[real]), positions, lines, last)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor,
               seq_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [m, vocab] of one token per row, or None past ``max_rows`` rows."""
        if input_ids.shape[0] > self.step.max_rows:
            return None
        return self.step(self.model.embed(input_ids), positions, seq_ids)
