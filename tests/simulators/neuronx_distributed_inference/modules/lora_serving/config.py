"""Simulated ``neuronx_distributed_inference.modules.lora_serving.config``.

Like NxDI, adapter paths must exist and ids must be unique; a folder adapter needs
its adapter_config.json (target modules and rank are read from it). The
simulator serves the base model only: adapters are configured, never applied.
"""

from __future__ import annotations

import json
import os


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
        if lora_ckpt_json is not None or dynamic_multi_lora:
            raise NotImplementedError("the simulator models static lora_ckpt_paths only")
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.batch_size = batch_size
        self.target_modules = target_modules
        self.lora_bias = lora_bias
        self.lora_ckpt_json = lora_ckpt_json
        self.lora_ckpt_paths = self._paths_to_dict(lora_ckpt_paths)
        self.lora_ckpt_paths_cpu = dict(lora_ckpt_paths_cpu or {})
        self.lora_memory_transpose = lora_memory_transpose
        self.lora_shard_linear_layer = lora_shard_linear_layer
        self.is_context_encoding = is_context_encoding
        self.dynamic_multi_lora = dynamic_multi_lora
        self.eviction_policy = eviction_policy
        self.lfu_decay_period = lfu_decay_period
        self.base_model_quantized = base_model_quantized
        self.enable_base_model_only = enable_base_model_only
        self.max_loras = max(self.max_loras, len(self.lora_ckpt_paths) + enable_base_model_only)
        modules, rank = self._from_checkpoints()
        if self.target_modules is None or not set(modules) <= set(self.target_modules):
            self.target_modules = sorted(modules)
        self.max_lora_rank = max(self.max_lora_rank, rank)

    @staticmethod
    def _paths_to_dict(paths) -> dict[str, str]:
        if paths is None:
            return {}
        items = paths.items() if isinstance(paths, dict) else (p.split(":", 1) for p in paths)
        out: dict[str, str] = {}
        for adapter_id, path in items:
            adapter_id, path = str(adapter_id).strip(), os.path.expanduser(str(path).strip())
            if adapter_id in out:
                raise ValueError(f"The adapter ID {adapter_id} appears more than once")
            if not os.path.exists(path):
                raise FileNotFoundError(f"LoRA adapter path {path} for {adapter_id} is not found")
            out[adapter_id] = path
        return out

    def _from_checkpoints(self) -> tuple[list[str], int]:
        modules: set[str] = set()
        rank = 0
        for path in self.lora_ckpt_paths.values():
            if not os.path.isdir(path):
                continue
            cfg_file = os.path.join(path, "adapter_config.json")
            if not os.path.isfile(cfg_file):
                raise FileNotFoundError(f"No LoRA configuration json file is found in {path}")
            with open(cfg_file) as f:
                cfg = json.load(f)
            modules |= set(cfg["target_modules"])
            rank = max(rank, int(cfg.get("r", cfg.get("lora_rank", 0))))
        return sorted(modules), rank
