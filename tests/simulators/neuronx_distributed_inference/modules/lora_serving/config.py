"""Simulated ``neuronx_distributed_inference.modules.lora_serving.config`` (NxDI 0.9).

NxDI's constructor, rule for rule: ``enable_base_model_only`` adds one to ``max_loras``
and ``max_cpu_loras`` (the dummy zero adapter at index 0); adapter paths must exist
(FileNotFoundError) and ids be unique; ``lora_ckpt_json`` names a JSON file of
``lora-ckpt-dir`` / ``lora-ckpt-paths`` / ``lora-ckpt-paths-cpu``; with
``dynamic_multi_lora`` the CPU paths include the device ones; ``max_loras`` grows to the
number of checkpoints; ``target_modules`` and ``max_lora_rank`` are widened from the
adapters' ``adapter_config.json`` (NxDI only warns). With no checkpoints at all and no
``target_modules``, NxDI sets them to [] (the model then fails to wrap), as here.
"""

from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger("Neuron")


class LoraServingConfig:
    def __init__(
        self,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int = 100,
        batch_size: int = 1,
        target_modules: list[str] | None = None,
        lora_bias: str = "none",
        lora_ckpt_paths: list[str] | dict[str, str] | None = None,
        lora_ckpt_paths_cpu: list[str] | dict[str, str] | None = None,
        lora_ckpt_json: str | None = None,
        lora_memory_transpose: bool = True,
        lora_shard_linear_layer: bool = True,
        is_context_encoding: bool = False,
        dynamic_multi_lora: bool = False,
        eviction_policy: str = "lru",
        lfu_decay_period: int = 128,
        base_model_quantized: bool = False,
        enable_base_model_only: bool = False,
    ) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.batch_size = batch_size
        self.target_modules = target_modules
        self.lora_bias = lora_bias
        self.dynamic_multi_lora = dynamic_multi_lora
        self.eviction_policy = eviction_policy
        self.lfu_decay_period = lfu_decay_period
        self.enable_base_model_only = enable_base_model_only
        if self.enable_base_model_only:  # the dummy adapter takes a slot on both
            self.max_loras += 1
            self.max_cpu_loras += 1
        self.lora_ckpt_json = lora_ckpt_json
        self.lora_ckpt_paths = self.convert_ckpt_paths_to_dict(lora_ckpt_paths)
        self.lora_ckpt_paths_cpu = (
            self.convert_ckpt_paths_to_dict(lora_ckpt_paths_cpu, is_cpu=True)
            | self.lora_ckpt_paths
        ) if self.dynamic_multi_lora else {}
        self._check_ckpt_config()
        self.lora_memory_transpose = lora_memory_transpose
        self.lora_shard_linear_layer = lora_shard_linear_layer
        self.is_context_encoding = is_context_encoding
        self.base_model_quantized = base_model_quantized

        modules, rank = self._from_checkpoints()
        if self.target_modules is None or not set(modules) <= set(self.target_modules):
            logger.warning("Setting target modules to %s based on the LoRA configurations in "
                           "checkpoint paths.", modules)
            self.target_modules = modules
        if self.max_lora_rank < rank:
            logger.warning("Setting max_lora_rank to %d based on the LoRA configurations in "
                           "checkpoint paths.", rank)
            self.max_lora_rank = rank

    # -- checkpoint paths, as NxDI reads them ----------------------------------------------
    def _check_valid_path(self, path: str, adapter_id=None) -> str:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"LoRA adapter path {path} for adapter ID {adapter_id} is not found. "
                "Please check lora_ckpt_path and try again."
            )
        return path

    def _add(self, out: dict[str, str], adapter_id, path: str) -> None:
        path = self._check_valid_path(path, adapter_id)
        if adapter_id in out:
            raise ValueError(
                f"The adapter ID {adapter_id} appears more than once in lora_ckpt_paths. "
                "Please check lora_ckpt_path and try again."
            )
        out[adapter_id] = path

    def _from_json(self, is_cpu: bool) -> dict[str, str]:
        if self.lora_ckpt_json is None:
            return {}
        with open(self._check_valid_path(self.lora_ckpt_json)) as f:
            content = json.load(f)
        folder = content.get("lora-ckpt-dir", os.getcwd())
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"The LoRA checkpoint directory {folder} specified in {self.lora_ckpt_json} "
                "doesn't exist. Please check lora-ckpt-dir and try again."
            )
        entries = content["lora-ckpt-paths-cpu" if is_cpu else "lora-ckpt-paths"]
        out: dict[str, str] = {}
        for adapter_id, path in entries.items():
            self._add(out, adapter_id, os.path.join(folder, path))
        return out

    def convert_ckpt_paths_to_dict(self, lora_ckpt_paths, is_cpu: bool = False) -> dict:
        out = self._from_json(is_cpu)
        if lora_ckpt_paths is None:
            return out
        if isinstance(lora_ckpt_paths, dict):
            for adapter_id, path in lora_ckpt_paths.items():
                self._add(out, adapter_id, path)
            return out
        for entry in lora_ckpt_paths:
            parts = entry.split(":")
            self._add(out, parts[0].strip(), parts[1].strip())
        return out

    def _check_ckpt_config(self) -> None:
        base = int(self.enable_base_model_only)
        num_ckpts = len(self.lora_ckpt_paths) + base
        if self.max_loras < num_ckpts:
            self.max_loras = num_ckpts
        if self.dynamic_multi_lora and len(self.lora_ckpt_paths_cpu) + base > self.max_cpu_loras:
            raise ValueError(
                f"The total number of LoRA checkpoints specified in {self.lora_ckpt_json} is "
                f"{len(self.lora_ckpt_paths_cpu)}, but the maximum number of adapters that can "
                f"be hosted on CPU is {self.max_cpu_loras}."
            )

    def _from_checkpoints(self) -> tuple[list[str], int]:
        """The union of the adapters' target modules, and the largest rank (at least ours)."""
        modules: set[str] = set()
        ranks = [self.max_lora_rank]
        for path in [*self.lora_ckpt_paths.values(), *self.lora_ckpt_paths_cpu.values()]:
            cfg = read_adapter_config(path)
            if cfg is None:
                continue
            modules |= set(cfg["target_modules"])
            ranks.append(int(cfg["r"] if "r" in cfg else cfg["lora_rank"]))
        return sorted(modules), max(ranks)


def read_adapter_config(path: str) -> dict | None:
    """A folder's adapter_config.json (FileNotFoundError without one), or the
    ``lora_config`` entry of an NxD checkpoint file."""
    if os.path.isdir(path):
        if "adapter_config.json" not in os.listdir(path):
            raise FileNotFoundError(f"No LoRA configuration json file is found in {path}")
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path).get("lora_config")
    if path.endswith((".bin", ".pt")):
        return torch.load(path, weights_only=False).get("lora_config")
    raise FileNotFoundError(f"Invalid checkpoint filename {path} for LoRA adapter.")
