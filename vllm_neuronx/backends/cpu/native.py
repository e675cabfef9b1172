"""The native path of the CPU backend: a whole Llama step in one call of decode_step.c.

It takes a model (llama.py, with its matmul weights packed for the kernel) and
a batch, and decides whether it can run it: a decode of up to ``max_rows`` rows, or
a prefill whose prompts hold fewer tokens in all than ``max_rows`` and the kernel
variant's ``widen_rows`` (rows of one line at positions 0..n-1 are that line's prefill;
past ``widen_rows``, sgemm over widened weights is faster), or any rows in order
(``rows``: a speculation's verify pass, k rows of a line at p..p+k-1, in steps of
``max_rows``), handing back hidden states (and those entering given layers) for EAGLE.
What it declines (bigger batches, prompt logits) runs on the model's torch path with the
same numerics. Models with biases other than q/k/v's, heads wider than 256, or an fp8 KV
cache with heads not a whole number of vectors wide have no native path
(``NativeStep.for_model`` is None).

The KV cache is the model's: a line of ``max_len`` positions per sequence, or llama.py's
block layout (``LlamaModel.blocks``: prefix caching, chunked prefill), where each call
takes a block table and a row's "line" is its sequence's row in it; then only ``rows``
runs it (``prefill`` and ``decode`` are the lines').

LoRA (``enable_lora``): the step holds, per layer and fused matmul, one descriptor per
adapter slot (kernels.h's ``Lora``); ``set_slot`` points a slot's descriptors at an
adapter's tensors (or empties them) when the backend's AdapterSlots moves adapters, and
each step takes its rows' slots.
"""

from __future__ import annotations

import ctypes

import torch

from vllm_neuronx.backends.cpu.kernels import (
    LORA_KINDS,
    NATIVE_ROWS,
    Layer,
    Lora,
    Model,
    PackedMatmul,
    PackedWeight,
    Weight,
)
from vllm_neuronx.backends.cpu.llama import Capture, LlamaModel
from vllm_neuronx.backends.cpu.lora import FUSED, FusedDelta, LoraWeights

# decode_step.c keeps a head's attention output in registers.
MAX_HEAD_DIM = 256


class DecodeStep:
    """``decode_step.c``: every layer of a decode step (or a small prefill) of up to
    ``max_rows`` rows in one native call. Holds pointers into the model's tensors, which
    must outlive it."""

    __slots__ = ("_fn", "_lib", "_model", "_layers", "_lora", "_lora_held", "_scratch",
                 "_weights", "max_rows", "hidden", "vocab", "max_len", "num_lines",
                 "block_size", "num_blocks")

    def __init__(self, matmul: PackedMatmul, *, dims: dict[str, int], eps: float,
                 scale: float, tensors: dict[str, torch.Tensor | PackedWeight],
                 layers: list[dict[str, torch.Tensor | PackedWeight]], max_rows: int) -> None:
        """``dims["block_size"]`` > 0: the block layout, each layer's caches
        [num_blocks, block_size, kv_heads, head_dim]; else (0 or absent) KV lines,
        [lines, kv_heads, max_len, head_dim]."""
        self._weights = []  # the weights' descriptors, alive as long as the step
        kv_dtype = torch.float8_e4m3fn if dims["kv_fp8"] else \
            torch.bfloat16 if dims.get("kv_bf16") else torch.float32
        # Native code addresses the caches by these shapes: checked, as it trusts them.
        self.block_size = dims.get("block_size", 0)
        first = layers[0]["k_cache"].shape[0]
        kv_heads, d, max_len = dims["kv_heads"], dims["head_dim"], dims["max_len"]
        shape = (first, self.block_size, kv_heads, d) if self.block_size > 0 else \
            (first, kv_heads, max_len, d)
        if self.block_size < 0 or any(layer[name].shape != shape for layer in layers
                                      for name in ("k_cache", "v_cache")):
            raise ValueError(f"decode_step needs every layer's K/V caches {list(shape)}")
        self.num_lines = 0 if self.block_size else first  # KV lines (lines' layout)
        self.num_blocks = first if self.block_size else 0  # blocks (block layout)

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

        self._layers = (Layer * len(layers))(  # LoRA's tables NULL until enable_lora
            *[Layer(**{name: ptr(layer[name]) for name, _ in Layer._fields_
                       if not name.startswith("lora_")}) for layer in layers]
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
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._fn.restype = None
        self._lib = lib
        self.max_rows, self.hidden, self.vocab = max_rows, dims["hidden"], dims["vocab"]
        self.max_len = max_len
        # LoRA (enable_lora): per fused kind, each layer's descriptors by slot; what each
        # slot's descriptors point into (alive as long as they do).
        self._lora: dict[str, list] = {}
        self._lora_held: list[LoraWeights | None] = []
        self._scratch = self._new_scratch()

    # decode_step.c's phases, in its order (its PH_ enum).
    PHASES = ("norm", "qkv", "rope", "attend", "o", "gate_up", "act", "down", "experts",
              "lm_head")

    def time_phases(self, on: bool) -> None:
        """Time every later step by phase (decode_step.c), or stop; for benchmarks. The
        times are the library's, shared by every step it runs."""
        if self._lib.phase_count() != len(self.PHASES):
            raise RuntimeError("decode_step.c's phases differ from DecodeStep.PHASES")
        self._lib.time_phases(int(on))

    def phase_times(self) -> dict[str, float]:
        """Milliseconds in each phase since the last call (while timed), then zero."""
        out = (ctypes.c_double * len(self.PHASES))()
        self._lib.phase_times(out)
        return {name: out[i] / 1e6 for i, name in enumerate(self.PHASES)}

    def _new_scratch(self) -> torch.Tensor:
        floats = self._lib.decode_scratch_floats(ctypes.byref(self._model), self.max_rows)
        return torch.empty(floats, dtype=torch.float32)

    @property
    def lora_slots(self) -> int:
        """Adapter slots the step takes (max_loras + 1, slot 0 the base model's); 0: no
        LoRA."""
        return self._model.lora_slots

    def _lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Each fused kind's (in, out) widths."""
        md = self._model
        q, kv = md.heads * md.head_dim, md.kv_heads * md.head_dim
        return {"qkv": (md.hidden, q + 2 * kv), "o": (q, md.hidden),
                "gate_up": (md.hidden, 2 * md.intermediate), "down": (md.intermediate, md.hidden)}

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Room for ``max_loras`` adapters of rank up to ``max_rank`` (each part's): one
        empty descriptor per slot (and slot 0, the base model's) for each layer's fused
        matmuls, and the scratch for each row's ``x·Aᵀ``."""
        slots = max_loras + 1
        self._lora = {kind: [(Lora * slots)() for _ in range(len(self._layers))]
                      for kind in LORA_KINDS}
        for kind, tables in self._lora.items():
            for layer, table in zip(self._layers, tables, strict=True):
                setattr(layer, f"lora_{kind}", ctypes.addressof(table))
        self._lora_held = [None] * slots
        self._model.lora_slots = slots
        # The widest fused delta stacks every part's ranks (q, k and v).
        self._model.lora_rank = max_rank * max(len(parts) for parts in FUSED.values())
        self._scratch = self._new_scratch()

    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Point ``slot``'s descriptors at ``weights``' tensors (None: empty them). The
        tensors are checked here, since native code trusts their shapes."""
        if not 0 < slot < self.lora_slots:
            raise ValueError(f"LoRA slot {slot}: the step has slots 1 to "
                             f"{self.lora_slots - 1} (enable_lora)")
        shapes = self._lora_shapes()
        described = {}
        for kind, tables in self._lora.items():
            for i in range(len(tables)):
                part = None if weights is None else weights.parts.get((i, kind))
                described[kind, i] = Lora() if part is None else \
                    self._describe(part, *shapes[kind], f"layer {i} {kind}")
        for (kind, i), desc in described.items():
            self._lora[kind][i][slot] = desc
        self._lora_held[slot] = weights

    def _describe(self, part: FusedDelta, k: int, n: int, where: str) -> Lora:
        rank, parts = part.rank, part.spans.shape[0]
        ok = (part.a.dtype is part.bt.dtype is torch.float32 and part.a.is_contiguous()
              and part.bt.is_contiguous() and part.a.shape == (rank, k)
              and part.bt.shape == (rank, n) and 0 < rank <= self._model.lora_rank
              and part.spans.dtype is torch.int32 and part.spans.is_contiguous()
              and part.spans.dim() == 2 and parts > 0 and part.spans.shape[1] == 4)
        spans = part.spans.tolist() if ok else []
        if not ok or not all(0 <= r0 < r1 <= rank and 0 <= c0 < c1 <= n
                             for r0, r1, c0, c1 in spans):
            raise ValueError(
                f"LoRA delta of {where}: the native step needs contiguous fp32 A [r, {k}] and "
                f"Bt [r, {n}] with r in [1, {self._model.lora_rank}], and int32 spans "
                f"[parts, 4] within them; got A {tuple(part.a.shape)} {part.a.dtype}, Bt "
                f"{tuple(part.bt.shape)} {part.bt.dtype}, spans {spans or part.spans}")
        return Lora(part.a.data_ptr(), part.bt.data_ptr(), part.spans.data_ptr(), rank, parts)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, lines: torch.Tensor,
                 out_rows: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None,
                 aux_layers: tuple[int, ...] = (),
                 block_table: torch.Tensor | None = None) -> torch.Tensor:
        """x [m, hidden] fp32 (overwritten: each row's last hidden state, before the final
        norm), positions and lines [m] int64 -> logits of every row [m, vocab], or of
        ``out_rows`` only (none: an empty ``out_rows``). Rows of one line at positions
        0..n-1 are that line's prefill, k rows at p..p+k-1 a speculation's verify pass
        (decode_step.c). ``slots``: each row's adapter slot [m] (0: the base model; None:
        every row's). ``aux_layers``: also return the hidden states entering those layers,
        [m, len(aux_layers) * hidden] (then the result is (logits, aux)). ``block_table``:
        the block layout's (and only its) int64 [n, W] of block ids, each row's line its
        sequence's row in it; position p is in block ``block_table[line, p // block_size]``."""
        m = x.shape[0]
        if not 0 < m <= self.max_rows or x.shape != (m, self.hidden) or \
                x.dtype is not torch.float32 or not x.is_contiguous():
            raise ValueError(f"decode_step takes [1..{self.max_rows}, {self.hidden}] fp32 rows")
        positions = positions.to(torch.int64).contiguous()
        lines = lines.to(torch.int64).contiguous()
        table, width, num_lines, max_len = self._table(block_table)
        # Native code writes the KV cache at these: out of range would corrupt memory.
        if positions.shape != (m,) or lines.shape != (m,) or \
                int(positions.min()) < 0 or int(positions.max()) >= max_len or \
                int(lines.min()) < 0 or int(lines.max()) >= num_lines:
            raise ValueError(f"decode_step takes positions in [0, {max_len}) and lines "
                             f"in [0, {num_lines}), one of each per row")
        rows_ptr, n_out = None, m
        if out_rows is not None:
            out_rows = out_rows.to(torch.int64).contiguous()
            n_out = out_rows.shape[0]
            if out_rows.dim() != 1 or n_out > m or (n_out and (
                    int(out_rows.min()) < 0 or int(out_rows.max()) >= m)):
                raise ValueError(f"out_rows must be 0 to {m} rows of the {m} given")
            rows_ptr = out_rows.data_ptr()
        slots_ptr = None
        if slots is not None:
            slots = slots.to(torch.int32).contiguous()
            if slots.shape != (m,) or not self.lora_slots or int(slots.min()) < 0 or \
                    int(slots.max()) >= self.lora_slots:
                raise ValueError(f"slots must be one adapter slot per row, in [0, "
                                 f"{self.lora_slots}) (enable_lora)")
            slots_ptr = slots.data_ptr()
        logits = torch.empty((n_out, self.vocab), dtype=torch.float32)
        aux = layers = None
        if aux_layers:
            if not all(0 <= i < self._model.layers for i in aux_layers):
                raise ValueError(f"aux_layers {aux_layers}: the model has layers 0 to "
                                 f"{self._model.layers - 1}")
            layers = torch.tensor(aux_layers, dtype=torch.int32)
            aux = torch.empty((m, len(aux_layers) * self.hidden), dtype=torch.float32)
        self._fn(ctypes.byref(self._model), x.data_ptr(), m, positions.data_ptr(),
                 lines.data_ptr(), None if table is None else table.data_ptr(), width,
                 slots_ptr, rows_ptr, n_out, self._scratch.data_ptr(),
                 logits.data_ptr(), None if layers is None else layers.data_ptr(),
                 len(aux_layers), None if aux is None else aux.data_ptr())
        return logits if aux is None else (logits, aux)

    def _table(self, block_table: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, int, int, int]:
        """(the block table, its width, lines, positions) a call may use: the KV lines'
        without one, and with one (the block layout) its rows and the positions its
        blocks hold (and the rotary tables). Every entry must name one of the cache's
        blocks: native code reads and writes where they point."""
        if not self.block_size:
            if block_table is not None:
                raise ValueError("block_table is for the block KV layout; this step's cache "
                                 "is in KV lines")
            return None, 0, self.num_lines, self.max_len
        if block_table is None:
            raise ValueError("the block KV layout needs a block_table [sequences, width] "
                             "for each call")
        if block_table.dtype is not torch.int64 or block_table.dim() != 2 or \
                not block_table.is_contiguous() or 0 in block_table.shape:
            raise ValueError(f"block_table must be a contiguous int64 [sequences, width] "
                             f"tensor, not {block_table.dtype} {list(block_table.shape)}")
        if int(block_table.min()) < 0 or int(block_table.max()) >= self.num_blocks:
            raise ValueError(f"block_table entries must be block ids in [0, "
                             f"{self.num_blocks})")
        n, width = block_table.shape
        return block_table, width, n, min(self.max_len, width * self.block_size)


class NativeStep:
    """The model's steps through ``DecodeStep``, where it can run them."""

    __slots__ = ("model", "step", "prefill_rows", "split_prefills")

    def __init__(self, model: LlamaModel, step: DecodeStep, prefill_rows: int | None) -> None:
        self.model = model
        self.step = step
        # A prefill of this many tokens or more is faster widened through sgemm (None:
        # never), or more rows than the step's scratch holds.
        self.prefill_rows = min(prefill_rows or step.max_rows + 1, step.max_rows + 1)
        # Without a sgemm threshold (amx, avx2) a prefill of more tokens than one step
        # holds runs as several native steps, a long prompt's rows split across them (amx,
        # 8 prompts of 448 tokens: 2.9-3.3 s against 4.2-6.6 on the torch path); with
        # one (avx512, measured there before the split existed) it goes to sgemm.
        self.split_prefills = prefill_rows is None

    @classmethod
    def for_model(cls, model: LlamaModel, matmul: PackedMatmul) -> NativeStep | None:
        """The native path of ``model``, or None where decode_step.c cannot run it: a
        weight not packed for the kernel, a bias other than q/k/v's, heads wider than it
        handles, or an fp8 KV cache with heads not a whole number of vectors wide. A model
        with ``blocks`` (llama.py's block layout) gets a step over its blocks (``rows``
        with a block table)."""
        s, w = model.spec, model.w
        packed = [name for name in w if LlamaModel.is_matmul(name)]
        other_bias = any(name + "_bias" in w for name in packed if not name.endswith("qkv"))
        kv_fp8 = model.k_cache.dtype is torch.float8_e4m3fn
        kv_bf16 = model.k_cache.dtype is torch.bfloat16
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
                "expert_size": s.expert_size, "kv_fp8": int(kv_fp8), "kv_bf16": int(kv_bf16),
                "block_size": model.blocks.block_size if model.blocks is not None else 0}
        tensors = {"cos": model.cos, "sin": model.sin, "norm": w["norm"],
                   "lm_head": w["lm_head"]}
        step = DecodeStep(matmul, dims=dims, eps=s.rms_norm_eps, scale=model.scale,
                          tensors=tensors, layers=layers, max_rows=NATIVE_ROWS)
        return cls(model, step, matmul.widen_rows)

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        self.step.enable_lora(max_loras, max_rank)

    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """AdapterSlots' ``on_change``: ``slot`` now holds ``weights`` (None: nothing)."""
        self.step.set_slot(slot, weights)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, seq_ids: torch.Tensor,
                slots: torch.Tensor | None = None, *, logits: bool = True,
                capture: Capture | None = None) -> torch.Tensor | None:
        """Last-token logits [n, vocab] of right-padded prompts [n, width] (``slots``: each
        prompt's adapter slot; ``logits`` False: none, [0, vocab], for a draft's prefill):
        the prompts' tokens as rows in order, in native steps of ``max_rows`` (a step's
        rows attend to the K/V of the steps before), so prompts of any length. None where
        the variant has an sgemm threshold and the prompts hold more tokens in all (the
        torch path is faster there). ``capture`` gets every position's hidden states,
        [n, width, ...] (zero past each prompt)."""
        self._lines_only("prefill")
        if not self.split_prefills and int(lengths.sum()) >= self.prefill_rows:
            return None
        n, t = input_ids.shape
        real = torch.arange(t)[None, :] < lengths[:, None]
        last = lengths.cumsum(0) - 1 if logits else torch.empty(0, dtype=torch.long)
        aux_layers = capture.aux_layers if capture is not None else ()
        out, x, aux = self.rows(input_ids[real], torch.arange(t).expand(n, t)[real],
                                seq_ids[:, None].expand(n, t)[real], last,
                                None if slots is None else slots[:, None].expand(n, t)[real],
                                aux_layers)
        if capture is not None:
            for name, rows in (("hidden", x), ("aux", aux)):
                if rows is not None:
                    padded = rows.new_zeros((n, t, rows.shape[-1]))
                    padded[real] = rows
                    setattr(capture, name, padded)
        return out

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
               slots: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [m, vocab] of one token per row (``slots``: each row's adapter slot), or
        None past ``max_rows`` rows."""
        self._lines_only("decode")
        if input_ids.shape[0] > self.step.max_rows:
            return None
        return self.step(self.model.embed(input_ids), positions, seq_ids, None, slots)

    def _lines_only(self, what: str) -> None:
        if self.model.blocks is not None:
            raise ValueError(f"NativeStep.{what} runs KV lines; this model has the block KV "
                             "layout: run its rows (NativeStep.rows) with a block table")

    def rows(self, input_ids: torch.Tensor, positions: torch.Tensor, lines: torch.Tensor,
             out_rows: torch.Tensor | None = None, slots: torch.Tensor | None = None,
             aux_layers: tuple[int, ...] = (), block_table: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Any number of rows [r] (tokens, positions, KV lines; ``slots``: adapter slots),
        as one native step or several of ``max_rows`` in row order: a row may attend to
        the K/V of rows before it in the order (a line's rows by position: a verify pass,
        a draft's catch-up, a prompt's chunk). The block layout's model takes its
        ``block_table`` [n, W] (``DecodeStep``), ``lines`` then each row's sequence in
        it. Returns (logits of ``out_rows``, ascending, or of every row (None); hidden
        states [r, hidden] before the final norm; the ``aux_layers``' entering states
        [r, len * hidden] or None)."""
        r, most = input_ids.shape[0], self.step.max_rows
        x = self.model.embed(input_ids)
        logits, aux = [], []
        for a in range(0, r, most):
            b = min(r, a + most)
            if out_rows is None:
                chunk_out = None
            else:
                chunk_out = out_rows[(out_rows >= a) & (out_rows < b)] - a
            out = self.step(x[a:b], positions[a:b], lines[a:b], chunk_out,
                            None if slots is None else slots[a:b], aux_layers, block_table)
            if aux_layers:
                out, chunk_aux = out
                aux.append(chunk_aux)
            logits.append(out)
        return (logits[0] if len(logits) == 1 else torch.cat(logits), x,
                (aux[0] if len(aux) == 1 else torch.cat(aux)) if aux_layers else None)
