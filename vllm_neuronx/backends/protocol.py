"""The one backend protocol: NxDI's application contract, as the runner sees it.

construct(model path, neuron config) -> compile(folder) -> load(folder) -> forward.
forward takes NxDI's inputs (input_ids, position_ids, seq_ids, sampling_params)
and returns device-sampled tokens, logits, or both (NxDI's ``output_logits``).
A call is a prefill when every row's positions start at 0 (NxDI's own dispatch
rule, ``is_prefill``); prefill and decode rows never mix. What comes back is declared
up front by ``sampling_capabilities`` (from the neuron config alone, so request
validation can read it before any model exists). The runner knows nothing else.

The contract is checked here, once per call, for every backend (``check_call``):
loaded state, batch shapes, KV lines, phase, the sampling tensor. A backend then
implements only its ``prefill`` and ``decode`` of a checked ``Batch``.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_neuronx import block_kv, sampling, speculation
from vllm_neuronx import neuron_config as nc

if TYPE_CHECKING:
    from vllm_neuronx.lora.peft import AdapterSpec


@dataclass(slots=True)
class ForwardOutput:
    """One row per input row, in input row order."""

    tokens: torch.Tensor | None = None  # [n] int64, with on-device sampling
    logits: torch.Tensor | None = None  # [n, vocab] float32: the next-token logits
    # Only when forward was called with prompt_logits: per row, [len, vocab] float32
    # logits of every prompt position for the rows asked, None for the others.
    prompt_logits: list[torch.Tensor | None] | None = None
    # Fused speculation's decode steps only: [n, k] int64, each row's accepted tokens
    # (1..k of them, in order) then -1. ``tokens`` is then column 0 and ``logits`` the
    # target's logits for that first token.
    spec_tokens: torch.Tensor | None = None


@dataclass(slots=True)
class BlockInputs:
    """The block KV layout's forward inputs (``block_kv``), in NxDI's names and padding.

    A prefill still passes whole sequences (positions from 0, as NxDI's vLLM integration
    does); ``computed_context_lens`` says how many leading positions the cache already
    holds (vLLM's prefix hits, whole blocks), and only the rest is computed and written."""

    # [n, width] int64: a prefill row's slots (block * block_size + offset) of positions
    # computed .. full - 1 in order, then -1; a decode row's [1] slot of its position.
    slot_mapping: torch.Tensor
    # [n, seq_len // block_size] int64: each sequence's blocks in order, then 0 (the null
    # block, never a sequence's).
    block_table: torch.Tensor
    full_context_lens: torch.Tensor  # [n] int64: the sequence's positions after the step
    computed_context_lens: torch.Tensor  # [n] int64: those already in the cache before it


@dataclass(slots=True)
class Batch:
    """One forward call's inputs, checked against the contract (``check_call``)."""

    input_ids: torch.Tensor  # [n, width] int64: prefill right-padded, decode width 1
    position_ids: torch.Tensor  # [n, width]: prefill 0..len-1 then 0; decode the position
    seq_ids: torch.Tensor  # [n] the KV line of each row, unique
    sampling_params: torch.Tensor  # [n, 3] top_k, top_p, temperature
    is_prefill: bool
    prompt_logits: torch.Tensor | None = None  # [n] bool: rows that want every prompt logit
    # [n] a prefill row's LoRA adapter index (adapter_indices; 0 = the base model)
    adapter_ids: torch.Tensor | None = None
    blocks: BlockInputs | None = None  # the block KV layout's inputs (only there)
    # A chunked-prefill step (``check_chunked_call``): input_ids [1, T] hold the tokens of
    # the seq_ids' [N] sequences one after another, prefill chunks and decodes alike.
    chunked: bool = False

    @property
    def size(self) -> int:
        """Rows of the output: sequences (a chunked step's seq_ids), one each."""
        return self.seq_ids.shape[0]


_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def step_adapters(handles, live, max_loras: int) -> list:
    """A prefill's distinct adapters in row order (``adapter_indices``' rows: a handle, or
    None for the base model), after checking that they and ``live`` (the running requests'
    adapters) fit in ``max_loras`` slots: more is a scheduling bug, never a request's."""
    step = list(dict.fromkeys(h for h in handles if h is not None))
    in_flight = set(step) | {h for h in live if h is not None}
    if len(in_flight) > max_loras:
        raise RuntimeError(
            f"{len(in_flight)} LoRA adapters in flight (this prefill's and the running "
            f"requests'), more than max_loras={max_loras}: a scheduling bug")
    return step


def is_prefill(position_ids: torch.Tensor) -> bool:
    """NxDI's phase rule: a call whose every row starts at position 0 encodes context."""
    return bool((position_ids[:, 0] == 0).all())


ENABLE_LOGITS_HINT = (
    'compile the model with logits output: override_neuron_config {"output_logits": true}, '
    "or turn on-device sampling off with NEURON_ON_DEVICE_SAMPLING_DISABLED=1"
)


@dataclass(frozen=True, slots=True)
class SamplingCapabilities:
    """What a compiled model gives back beyond its device-sampled tokens.

    Request validation reads this (through ``platform_config.current()``) to refuse,
    up front, what the host sampler cannot serve; the runner reads it to know
    whether forward's output carries logits.
    """

    #: forward returns next-token logits for every row (with on-device sampling as
    #: well as its tokens): penalties, seeds, logprobs... are sampled on the host.
    logits: bool = False
    #: forward(prompt_logits=mask) returns the logits of every prompt position of
    #: the rows asked on a prefill (prompt_logprobs).
    prompt_logits: bool = False
    #: What the user changes to get logits, quoted when a request is refused.
    enable_logits: str = ENABLE_LOGITS_HINT


class NeuronBackend(abc.ABC):
    """A model served through the NxDI execution contract."""

    #: The framework name users give in VLLM_NEURON_FRAMEWORK.
    framework: ClassVar[str]
    #: HF architectures this backend serves (checked when vLLM's config is resolved).
    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model_path: str, neuron_config: dict[str, Any], *, seed: int = 0,
                 draft: speculation.Draft | None = None) -> None:
        self.model_path = model_path
        self.neuron_config = neuron_config
        self.seed = seed
        # Fused speculation (vllm_neuronx/speculation.py): what proposes the tokens; the
        # neuron config carries speculation_length. None: one token per decode row.
        self.draft = draft
        self.loaded = False

    # -- checks before anything is built ------------------------------------------
    @classmethod
    def validate(cls, neuron_config: dict[str, Any], *, quantization: str | None = None) -> None:
        """Refuse, naming the field, a config this backend cannot compile
        (called when vLLM's config is resolved, before the engine starts)."""
        return None

    @classmethod
    def check_architectures(cls, architectures: list[str]) -> None:
        """Refuse, at start-up, a model this backend lists but cannot build here (e.g. a
        family newer than the installed framework)."""
        return None

    @classmethod
    def stored_config(cls, folder: str) -> dict[str, Any] | None:
        """The neuron config of compiled artifacts in ``folder`` written by a tool
        other than ours (e.g. NxDI's own neuron_config.json), or None."""
        return None

    # -- compile / load ---------------------------------------------------------
    @abc.abstractmethod
    def compile(self, folder: str) -> None:
        """Write everything ``load`` needs into ``folder`` (which exists and is empty)."""

    def load(self, folder: str) -> None:
        """Make the model ready to run from a folder ``compile`` wrote."""
        self.loaded = False
        self._load(folder)
        self.loaded = True

    @abc.abstractmethod
    def _load(self, folder: str) -> None:
        """The backend's own loading (``load`` marks it done for the contract check)."""

    @classmethod
    def version(cls) -> str:
        """Changes whenever compiled artifacts of an older version must not be reused."""
        return "1"

    @classmethod
    def sampling_capabilities(cls, neuron_config: dict[str, Any]) -> SamplingCapabilities:
        """What forward returns for a model compiled with ``neuron_config``.

        The default is NxDI's: logits when on-device sampling is off, or with
        ``output_logits`` (then tokens and logits); context encoding gathers the
        last position only, so never the prompt's logits. A backend that returns
        more (or less) overrides this.
        """
        ods_off = neuron_config.get("on_device_sampling_config") is None
        return SamplingCapabilities(
            logits=ods_off or bool(neuron_config.get("output_logits")), prompt_logits=False
        )

    # -- LoRA adapters (multi-LoRA; vllm_neuronx/lora) -------------------------------
    # Each adapter is bound to a KV line at the prefill that fills the line, like NxDI's
    # per-seq_id active weights: decode rows use their line's adapter, and a prefill row of
    # the base model unbinds its line, so a reused line carries no adapter.
    def _no_lora(self) -> NotImplementedError:
        return NotImplementedError(f"the {self.framework} backend serves no LoRA adapters")

    def init_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> None:
        """Get ready to serve adapters (called once by the runner, after ``load``, when
        vLLM's lora_config is set): ``max_loras`` of them in one step, none of rank above
        ``max_lora_rank``, up to ``max_cpu_loras`` prepared at once."""
        raise self._no_lora()

    def prepare_adapter(self, spec: AdapterSpec) -> object:
        """The backend's host-side handle on a checked adapter (``lora.peft.inspect``),
        made when it enters the runner's host pool."""
        raise self._no_lora()

    def release_adapter(self, handle: object) -> None:
        """The host pool dropped this adapter (no running request uses it)."""
        raise self._no_lora()

    def adapter_indices(self, handles: Sequence[object | None],
                        live: Collection[object]) -> torch.Tensor:
        """A prefill's rows (a handle, or None for the base model) -> int32 [n] indices
        for ``forward(adapter_ids=)``, 0 for the base model. Binds each adapter to one of
        ``max_loras`` slots, never taking the slot of an adapter in ``live`` (running
        requests outside this step); more than ``max_loras`` distinct adapters in
        ``handles`` and ``live`` together is a RuntimeError (a scheduling bug)."""
        raise self._no_lora()

    # -- run ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        sampling_params: torch.Tensor,
        *,
        prompt_logits: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | None = None,
        blocks: BlockInputs | None = None,
    ) -> ForwardOutput:
        """Prefill ([n, L] right-padded, positions 0..len-1 then 0) or decode ([m, 1]).

        Returns ``tokens`` with on-device sampling, and ``logits`` whenever
        ``sampling_capabilities(...).logits`` says so. A backend whose capabilities
        include ``prompt_logits`` also takes ``prompt_logits=`` ([n] bool) on a
        prefill and fills ``ForwardOutput.prompt_logits`` for those rows.

        ``adapter_ids`` ([n] ints from ``adapter_indices``, prefill only): each row's
        LoRA adapter, bound to the row's KV line until the next prefill on that line;
        decode rows use their line's adapter.

        ``blocks``: the block KV layout's inputs, required there and refused elsewhere.
        """
        return self.run(self.check_call(
            input_ids, position_ids, seq_ids, sampling_params, prompt_logits, adapter_ids,
            blocks,
        ))

    def run(self, batch: Batch) -> ForwardOutput:
        """A checked call (``check_call``). The runner checks a step while the step before
        it runs, and fills in a row's input token the step before computes (its tokens
        are in the vocabulary by construction) before calling this."""
        if batch.chunked:
            return self.chunked(batch)
        return self.prefill(batch) if batch.is_prefill else self.decode(batch)

    @abc.abstractmethod
    def prefill(self, batch: Batch) -> ForwardOutput:
        """Context encoding of a checked batch: each prompt into its KV line."""

    @abc.abstractmethod
    def decode(self, batch: Batch) -> ForwardOutput:
        """Token generation of a checked batch: one token per row."""

    def chunked(self, batch: Batch) -> ForwardOutput:
        """A chunked-prefill step of a checked batch (``Batch.chunked``): per sequence, the
        logits (and tokens) of its last token in the step."""
        raise NotImplementedError(f"the {self.framework} backend runs no chunked prefill")

    def check_call(self, input_ids, position_ids, seq_ids, sampling_params,
                   prompt_logits=None, adapter_ids=None, blocks=None) -> Batch:
        """The contract's preconditions, as a device would enforce them; a ValueError
        (RuntimeError before load) naming what is wrong, never a corrupted KV line."""
        if not self.loaded:
            raise RuntimeError("load() must run before forward()")
        layout = self.block_layout
        if layout is not None and layout.chunked_prefill:
            return self.check_chunked_call(input_ids, position_ids, seq_ids, sampling_params,
                                           prompt_logits, adapter_ids, blocks)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be [batch, width] with batch >= 1, got "
                             f"{list(input_ids.shape)}")
        n = input_ids.shape[0]
        if seq_ids.shape != (n,) or position_ids.shape != input_ids.shape:
            raise ValueError("input_ids, position_ids and seq_ids disagree on the batch")
        if int(seq_ids.min()) < 0 or int(seq_ids.max()) >= self.num_lines:
            raise ValueError(f"seq_ids must be KV lines in [0, {self.num_lines})")
        if torch.unique(seq_ids).numel() != n:
            raise ValueError("seq_ids must be unique: one row per KV line")
        prefill = is_prefill(position_ids)
        if not prefill:
            if bool((position_ids[:, 0] == 0).any()):
                raise ValueError("prefill rows (positions from 0) and decode rows must not be "
                                 "mixed in one call")
            if input_ids.shape[1] != 1:
                raise ValueError("decode rows take one token each; prefill rows (positions "
                                 "from 0) and decode rows must not be mixed in one call")
            # A fused speculation step writes positions p .. p+k-1 (k = 1 without it).
            last = self.max_length - max(1, self.speculation_length)
            if int(position_ids.min()) < 0 or int(position_ids.max()) > last:
                raise ValueError(f"decode positions must be in [0, {last}]")
        topk = self.global_topk
        if topk is not None:
            sampling.validate_sampling_tensor(sampling_params, topk, n)
        if prompt_logits is not None:
            if not self.capabilities.prompt_logits:
                raise ValueError(f"{type(self).__name__} returns no prompt logits")
            if prompt_logits.shape != (n,):
                raise ValueError(f"prompt_logits must be [{n}] bool")
            if not prefill and bool(prompt_logits.any()):
                raise ValueError("prompt logits exist on a prefill only")
        if adapter_ids is not None:
            if not prefill:
                raise ValueError("adapter_ids are for prefill rows only: a decode row's "
                                 "adapter is the one its KV line was bound to at prefill")
            if adapter_ids.shape != (n,) or adapter_ids.dtype not in _INDEX_DTYPES:
                raise ValueError(f"adapter_ids must be [{n}] integers, one adapter per row, "
                                 f"got {list(adapter_ids.shape)} {adapter_ids.dtype}")
            if int(adapter_ids.min()) < 0:
                raise ValueError("adapter_ids must be >= 0 (0: the base model)")
        if layout is None and blocks is not None:
            raise ValueError("block inputs (slot_mapping, block_table...) given to a model "
                             "compiled with contiguous KV lines")
        if layout is not None:
            check_blocks(blocks, layout, position_ids, prefill, self.max_length)
        return Batch(input_ids, position_ids, seq_ids, sampling_params, prefill,
                     prompt_logits, adapter_ids, blocks)

    def check_chunked_call(self, input_ids, position_ids, seq_ids, sampling_params,
                           prompt_logits, adapter_ids, blocks) -> Batch:
        """A chunked-prefill step's preconditions (NxDI's chunked prefill contract, before
        SDK 2.28 removed it): input_ids and position_ids [1, T], the step's tokens sequence
        after sequence, each sequence's positions computed..full-1 in order; seq_ids and
        sampling_params one row per sequence [N]; slot_mapping [1, T]."""
        n = seq_ids.shape[0] if seq_ids.dim() == 1 else 0
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or \
                position_ids.shape != input_ids.shape or n == 0:
            raise ValueError("a chunked-prefill step takes input_ids and position_ids [1, "
                             "tokens] (every sequence's tokens of the step, one after "
                             "another) and seq_ids [sequences]")
        if int(seq_ids.min()) < 0 or int(seq_ids.max()) >= self.num_lines or \
                torch.unique(seq_ids).numel() != n:
            raise ValueError(f"seq_ids must be unique KV lines in [0, {self.num_lines})")
        if prompt_logits is not None or adapter_ids is not None:
            raise ValueError("prompt logits and LoRA adapters are not served with chunked "
                             "prefill")
        if blocks is None:
            raise ValueError("a chunked-prefill step needs slot_mapping, block_table, "
                             "full_context_lens and computed_context_lens")
        full, computed = blocks.full_context_lens, blocks.computed_context_lens
        if full.shape != (n,) or computed.shape != (n,):
            raise ValueError(f"full_context_lens and computed_context_lens must be [{n}]")
        counts = full - computed
        if bool((counts < 1).any() | (computed < 0).any()) or \
                int(counts.sum()) != input_ids.shape[1]:
            raise ValueError("each sequence computes full - computed >= 1 tokens, and "
                             "input_ids holds all of them")
        expected = torch.cat([torch.arange(c, f) for c, f in
                              zip(computed.tolist(), full.tolist(), strict=True)])
        if not torch.equal(position_ids[0].to(torch.int64), expected):
            raise ValueError("position_ids must be each sequence's positions computed.."
                             "full-1, sequence after sequence")
        if int(full.max()) > self.max_length:
            raise ValueError(f"positions must stay below seq_len {self.max_length}")
        topk = self.global_topk
        if topk is not None:
            sampling.validate_sampling_tensor(sampling_params, topk, n)
        if blocks.slot_mapping.shape != input_ids.shape:
            raise ValueError("slot_mapping must be [1, tokens]: each token's slot")
        check_table(blocks.block_table, self.block_layout, n, self.max_length)
        # Each sequence's slots as a row of their own, then -1: the prefill rows' check.
        real = torch.arange(int(counts.max()))[None, :] < counts[:, None]
        rows = torch.full(real.shape, -1, dtype=torch.int64)
        rows[real] = blocks.slot_mapping[0].to(torch.int64)
        check_rows_slots(blocks.block_table, computed, full, rows, self.block_layout.block_size)
        return Batch(input_ids, position_ids, seq_ids, sampling_params, False, None, None,
                     blocks, chunked=True)

    # -- facts the runner reads back ----------------------------------------------
    @property
    def on_device_sampling(self) -> bool:
        return self.neuron_config.get("on_device_sampling_config") is not None

    @property
    def capabilities(self) -> SamplingCapabilities:
        return self.sampling_capabilities(self.neuron_config)

    @property
    def global_topk(self) -> int | None:
        return nc.global_topk(self.neuron_config)

    @property
    def context_buckets(self) -> list[int]:
        return nc.context_buckets(self.neuron_config)

    @property
    def token_buckets(self) -> list[int]:
        return nc.token_buckets(self.neuron_config)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Width of the logits (and the top_k limit when sampling on the host)."""

    @property
    def kernel(self) -> str:
        """What runs the model's steps, for the start-up log: the device's compiled graphs
        here, the CPU backend's kernel variant there."""
        return "device"

    @property
    def num_lines(self) -> int:
        return int(self.neuron_config["batch_size"])

    @property
    def max_length(self) -> int:
        """Positions per KV line (max_model_len, plus speculation_length with it)."""
        return int(self.neuron_config["seq_len"])

    @property
    def block_layout(self) -> block_kv.BlockLayout | None:
        """The block KV layout compiled (prefix caching, chunked prefill), or None."""
        return block_kv.of(self.neuron_config)

    @property
    def speculation_length(self) -> int:
        """NxDI's k: the most tokens a decode step yields per row (0: no speculation)."""
        return speculation.speculation_length(self.neuron_config)


def check_blocks(blocks: BlockInputs | None, layout: block_kv.BlockLayout,
                 position_ids: torch.Tensor, prefill: bool, seq_len: int) -> None:
    """The block layout's preconditions: shapes, block ids within the cache, context
    lengths that match the positions, and slots that match the block table (so a wrong
    input is a named error, never a write into another sequence's block)."""
    if blocks is None:
        raise ValueError("a model compiled with the block KV layout needs slot_mapping, "
                         "block_table, full_context_lens and computed_context_lens")
    n, bs = position_ids.shape[0], layout.block_size
    slot_mapping = blocks.slot_mapping
    full, computed = blocks.full_context_lens, blocks.computed_context_lens
    for name, t in (("full_context_lens", full), ("computed_context_lens", computed)):
        if tuple(t.shape) != (n,) or t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be [{n}] integers, got {list(t.shape)} {t.dtype}")
    if slot_mapping.dim() != 2 or slot_mapping.shape[0] != n or \
            slot_mapping.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be [{n}, width] integers, got "
                         f"{list(slot_mapping.shape)} {slot_mapping.dtype}")
    check_table(blocks.block_table, layout, n, seq_len)
    last = position_ids.max(dim=1).values
    if prefill:
        if not bool((full == last + 1).all()):
            raise ValueError("full_context_lens must be each prefill row's length")
        if bool((computed < 0).any() | (computed >= full).any() | (computed % bs != 0).any()):
            raise ValueError(f"computed_context_lens must be whole blocks of {bs} before "
                             "each row's last position (vLLM's prefix hits)")
    elif not bool((full == last + 1).all() & (computed == last).all()):
        raise ValueError("a decode row's full_context_lens is its position + 1 and its "
                         "computed_context_lens its position")
    counts = full - computed
    if slot_mapping.shape[1] < int(counts.max()):
        raise ValueError("slot_mapping must hold a slot for every position computed")
    check_rows_slots(blocks.block_table, computed, full, slot_mapping, bs)


def check_table(table: torch.Tensor, layout: block_kv.BlockLayout, n: int,
                seq_len: int) -> None:
    """A block table: [n, seq_len // block_size] block ids of the cache (0: padding)."""
    width = seq_len // layout.block_size
    if tuple(table.shape) != (n, width) or table.dtype not in _INDEX_DTYPES:
        raise ValueError(f"block_table must be [{n}, {width}] integers, got "
                         f"{list(table.shape)} {table.dtype}")
    if int(table.min()) < 0 or int(table.max()) >= layout.num_blocks:
        raise ValueError(f"block_table entries must be block ids in [0, "
                         f"{layout.num_blocks}) (0: padding, the null block)")


def check_rows_slots(table: torch.Tensor, computed: torch.Tensor, full: torch.Tensor,
                     slot_mapping: torch.Tensor, block_size: int) -> None:
    """Each row owns a block (never the null block 0) for each of its ``full`` positions,
    and its slot_mapping row holds the slots of positions computed..full-1 through its
    table, then -1 (one vectorised pass: it runs on every decode step)."""
    n, width = slot_mapping.shape
    table = table.to(torch.int64)
    owned = torch.arange(table.shape[1])[None, :] < (-(-full // block_size))[:, None]
    bad = ((table <= 0) & owned).any(dim=1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"row {r}: block_table must name a block (not the null block 0) "
                         f"for each of its {int(full[r])} positions")
    offsets = torch.arange(width)[None, :]
    real = offsets < (full - computed)[:, None]
    positions = torch.where(real, computed[:, None] + offsets, 0)
    expected = table.gather(1, positions // block_size) * block_size + positions % block_size
    expected = torch.where(real, expected, -1)
    wrong = (slot_mapping.to(torch.int64) != expected).any(dim=1)
    if bool(wrong.any()):
        r = int(wrong.nonzero()[0])
        raise ValueError(f"row {r}: slot_mapping must be the slots of positions "
                         f"{int(computed[r])}..{int(full[r]) - 1} through its block_table, "
                         "then -1")
