"""The one backend protocol: NxDI's application contract, as the runner sees it.

construct(model path, neuron config) -> compile(folder) -> load(folder) -> forward.
forward takes NxDI's inputs (input_ids, position_ids, seq_ids, sampling_params)
and returns device-sampled tokens, logits, or both (NxDI's ``output_logits``).
A call is a prefill when its positions start at 0 (NxDI's own dispatch rule);
prefill and decode rows never mix. What comes back is declared up front by
``sampling_capabilities`` (from the neuron config alone, so request validation
can read it before any model exists). The runner knows nothing else.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_neuronx import neuron_config as nc


@dataclass(slots=True)
class ForwardOutput:
    """One row per input row, in input row order."""

    tokens: torch.Tensor | None = None  # [n] int64, with on-device sampling
    logits: torch.Tensor | None = None  # [n, vocab] float32: the next-token logits
    # Only when forward was called with prompt_logits: per row, [len, vocab] float32
    # logits of every prompt position for the rows asked, None for the others.
    prompt_logits: list[torch.Tensor | None] | None = None


ENABLE_LOGITS_HINT = (
    'compile the model with logits output: override_neuron_config {"output_logits": true}, '
    "or turn on-device sampling off with NEURON_ON_DEVICE_SAMPLING_DISABLED=1"
)


@dataclass(frozen=True, slots=True)
class SamplingCapabilities:
    """What a compiled model gives back beyond its device-sampled tokens.

    Request validation reads this (through the active NeuronSettings) to refuse,
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

    def __init__(self, model_path: str, neuron_config: dict[str, Any], *, seed: int = 0) -> None:
        self.model_path = model_path
        self.neuron_config = neuron_config
        self.seed = seed

    # -- checks before anything is built ------------------------------------------
    @classmethod
    def validate(cls, neuron_config: dict[str, Any], *, quantization: str | None = None) -> None:
        """Refuse, naming the field, a config this backend cannot compile
        (called when vLLM's config is resolved, before the engine starts)."""
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

    @abc.abstractmethod
    def load(self, folder: str) -> None:
        """Make the model ready to run from a folder ``compile`` wrote."""

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

    # -- run ------------------------------------------------------------------
    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        sampling_params: torch.Tensor,
    ) -> ForwardOutput:
        """Prefill ([n, L] right-padded, positions 0..len-1 then 0) or decode ([m, 1]).

        Returns ``tokens`` with on-device sampling, and ``logits`` whenever
        ``sampling_capabilities(...).logits`` says so. A backend whose capabilities
        include ``prompt_logits`` also takes ``prompt_logits=`` ([n] bool) on a
        prefill and fills ``ForwardOutput.prompt_logits`` for those rows; the
        runner passes that keyword to no other backend.
        """

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
    def num_lines(self) -> int:
        return int(self.neuron_config["batch_size"])
