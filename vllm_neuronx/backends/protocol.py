"""The one backend protocol: NxDI's application contract, as the runner sees it.

construct(model path, neuron config) -> compile(folder) -> load(folder) -> forward.
forward takes NxDI's inputs (input_ids, position_ids, seq_ids, sampling_params)
and returns device-sampled tokens, or logits when on-device sampling is off.
A call is a prefill when its positions start at 0 (NxDI's own dispatch rule);
prefill and decode rows never mix. The runner knows nothing else.
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
    logits: torch.Tensor | None = None  # [n, vocab] float32, without it


class NeuronBackend(abc.ABC):
    """A model served through the NxDI execution contract."""

    #: The framework name users give in VLLM_NEURON_FRAMEWORK.
    framework: ClassVar[str]

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

    # -- run ------------------------------------------------------------------
    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        sampling_params: torch.Tensor,
    ) -> ForwardOutput:
        """Prefill ([n, L] right-padded, positions 0..len-1 then 0) or decode ([m, 1])."""

    # -- facts the runner reads back ----------------------------------------------
    @property
    def on_device_sampling(self) -> bool:
        return self.neuron_config.get("on_device_sampling_config") is not None

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
