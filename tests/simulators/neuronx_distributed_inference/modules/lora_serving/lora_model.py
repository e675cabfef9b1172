"""Simulated ``neuronx_distributed_inference.modules.lora_serving.lora_model``: the
``LoraModelManager`` a NxDI application holds as ``model.lora_model_manager``.

NxDI's rules, as its source has them (0.9):
- adapter *names* get integer ids in the order NxDI first sees them, from 1 with
  ``enable_base_model_only`` (0 is the dummy zero adapter) and from 0 without it, so
  without base-only, id 0 is the first adapter, never "no adapter";
- ``convert_adapter_id_to_index(name)`` is a dict lookup (KeyError for an unknown name);
  ``convert_adapter_ids_to_indices`` refuses a batch longer than ``max_loras``;
- two caches of ids, each a list of positions with LRU (or LFU) eviction that never
  evicts the dummy: the CPU cache (``max_cpu_loras``, the adapters' weights) and the
  device cache (``max_loras`` slots of the compiled LoRA weights);
- ``add_adapter(request)`` streams ``request.lora_path`` into the CPU cache under
  ``request.lora_name`` unless that name is cached already (then nothing is re-read);
  ``remove_adapter(id)`` drops it from the CPU cache only;
- a dynamic context encoding calls ``dynamic_update_weights_for_lora``: each id in the
  batch is brought into the CPU cache (an evicted streamed adapter cannot come back:
  KeyError on its path) and then into a device slot, and the ids become slot positions.
  An id evicted by a later id of the same batch has no position: the ValueError NxDI's
  ``list.index`` raises.

The weights of a cache entry are whatever the model's loader returns (the simulated
model's: vllm_neuronx's CPU LoRA weights); a device slot holds a reference to them.
"""

from __future__ import annotations

import itertools
import logging

import torch

from neuronx_distributed_inference.modules.lora_serving.config import LoraServingConfig

logger = logging.getLogger("Neuron")

_clock = itertools.count(1)  # NxDI uses time.monotonic(); a counter never ties


class AdapterCacheEntry:
    def __init__(self, position: int = 0) -> None:
        self.timestamp = 0
        self.access_count = 0
        self.weights = None
        self.weight_idx = position

    def access(self) -> None:
        self.timestamp = next(_clock)
        self.access_count += 1

    def decay(self) -> None:
        self.access_count //= 2


class AdapterCache:
    """Ids in ``capacity`` positions; base-only puts the dummy id 0 at position 0."""

    def __init__(self, capacity: int, device: str, adapter_ids=(), eviction_policy="lru",
                 enable_base_model_only: bool = False) -> None:
        self.size = 0
        self.capacity = capacity
        self.device = device
        self.enable_base_model_only = enable_base_model_only
        self.map: dict[int, AdapterCacheEntry] = {}
        self.eviction_policy = eviction_policy
        self.adapter_id_position_mapping = [-1] * capacity
        ids = list(adapter_ids)
        if enable_base_model_only:
            ids.insert(0, 0)
        for position, adapter_id in enumerate(ids):
            self.add_adapter(adapter_id, position)
            self.update_adapter(adapter_id)

    def update_adapter(self, adapter_id: int) -> None:
        self.map[adapter_id].access()

    def access_adapter(self, adapter_id: int) -> bool:
        return adapter_id in self.map

    def add_adapter(self, adapter_id: int, position: int) -> None:
        # NxDI writes past the list's end with an IndexError when over capacity.
        self.map[adapter_id] = AdapterCacheEntry(position)
        self.adapter_id_position_mapping[position] = adapter_id
        self.size += 1

    def remove_adapter(self, adapter_id: int) -> None:
        del self.map[adapter_id]  # KeyError when it is not cached, as in NxDI
        position = self.adapter_id_position_mapping.index(adapter_id)
        self.adapter_id_position_mapping[position] = -1
        self.size -= 1

    def is_full(self) -> bool:
        return self.size == self.capacity

    def _evictable(self) -> dict[int, AdapterCacheEntry]:
        if self.enable_base_model_only:
            return {k: v for k, v in self.map.items() if k != 0}
        return self.map

    def evict_adapter(self) -> tuple[int, int]:
        if self.eviction_policy == "lru":
            adapter_id, entry = min(self._evictable().items(), key=lambda i: i[1].timestamp)
        elif self.eviction_policy == "lfu":
            adapter_id, entry = min(self._evictable().items(),
                                    key=lambda i: (i[1].access_count, i[1].timestamp))
        else:
            raise ValueError(f"Invalid eviction policy {self.eviction_policy}.")
        self.remove_adapter(adapter_id)
        logger.debug("Adapter ID %s evicted from %s", adapter_id, self.device)
        return adapter_id, entry.weight_idx

    def decay_adapters(self) -> None:
        for entry in self.map.values():
            entry.decay()

    def get_adapter_ids(self) -> list[int]:
        return list(self._evictable())

    def get_adapter_id_positions(self, adapter_ids) -> list[int]:
        return [self.adapter_id_position_mapping.index(a) for a in adapter_ids]

    def get_swap_position(self) -> int:
        if not self.is_full():
            return self.adapter_id_position_mapping.index(-1)
        return self.evict_adapter()[1]


class LoraModelManager:
    def __init__(self, config: LoraServingConfig) -> None:
        self.lora_config = config
        self.ckpt_paths = dict(config.lora_ckpt_paths)
        self.ckpt_paths_cpu = dict(config.lora_ckpt_paths_cpu)
        self.model = None  # set at load (init_dynamic_multi_lora): streaming needs it
        self.init_adapter_id_mapping()
        cpu_ids = [self.lora_adapter_id_mapping[n] for n in self.ckpt_paths_cpu]
        device_ids = [self.lora_adapter_id_mapping[n] for n in self.ckpt_paths]
        self.cpu_adapter_cache = AdapterCache(config.max_cpu_loras, "CPU", cpu_ids,
                                              config.eviction_policy,
                                              config.enable_base_model_only)
        self.device_adapter_cache = AdapterCache(config.max_loras, "device", device_ids,
                                                 config.eviction_policy,
                                                 config.enable_base_model_only)
        self.decay_count = 0
        self.decay_max = config.lfu_decay_period

    # -- names -> ids --------------------------------------------------------------------------
    def init_adapter_id_mapping(self) -> None:
        self.lora_adapter_id_mapping: dict[str, int] = {}
        self.lora_adapter_name_mapping: dict[int, str] = {}
        self.global_adapter_id = 1 if self.lora_config.enable_base_model_only else 0
        for name in self.ckpt_paths | self.ckpt_paths_cpu:
            self.add_adapter_mapping(name)

    def add_adapter_mapping(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_adapter_id_mapping:
            adapter_id = self.global_adapter_id
            self.global_adapter_id += 1
            self.lora_adapter_id_mapping[adapter_name] = adapter_id
            self.lora_adapter_name_mapping[adapter_id] = adapter_name

    def convert_adapter_ids_to_indices(self, adapter_ids, batch_size):
        if adapter_ids is None:
            return torch.zeros(batch_size, dtype=torch.int32)
        if len(adapter_ids) > self.lora_config.max_loras:
            raise ValueError(
                f"The number of LoRA adapter IDs is {len(adapter_ids)}, "
                f"but the maximum number of adapters is {self.lora_config.max_loras}."
            )
        if len(adapter_ids) != batch_size:
            raise ValueError(
                f"The number of LoRA adapter IDs is {len(adapter_ids)}, "
                f"but it should equal the prompts number {batch_size}."
            )
        return torch.tensor([self.convert_adapter_id_to_index(a) for a in adapter_ids],
                            dtype=torch.int32)

    def convert_adapter_id_to_index(self, adapter_ids):
        return self.lora_adapter_id_mapping[adapter_ids]

    # -- weights ---------------------------------------------------------------------------------
    def init_dynamic_multi_lora(self, cpu_weights: dict, model=None) -> None:
        """At load: the CPU adapters' weights (name -> weights) and the model to stream
        later adapters with."""
        for name, weights in cpu_weights.items():
            self.cpu_adapter_cache.map[self.lora_adapter_id_mapping[name]].weights = weights
        self.model = model

    def _stream(self, name: str, path: str):
        if self.model is None:
            # NxDI passes its model (set at load) to the checkpoint loader.
            raise AttributeError("'NoneType' object has no attribute 'named_modules' "
                                 "(LoRA adapters stream only into a loaded model)")
        return self.model._sim_lora_weights(name, path)

    def insert_cpu_adapter(self, adapter_id: int, cpu_weights=None) -> None:
        cache = self.cpu_adapter_cache
        if cache.access_adapter(adapter_id):
            cache.update_adapter(adapter_id)
            return
        if cpu_weights is None:  # evicted: only a lora_ckpt_paths_cpu adapter comes back
            name = self.lora_adapter_name_mapping[adapter_id]
            cpu_weights = self._stream(name, self.ckpt_paths_cpu[name])
        position = cache.get_swap_position()
        cache.add_adapter(adapter_id, position)
        cache.map[adapter_id].weights = cpu_weights
        cache.update_adapter(adapter_id)

    def insert_device_adapter(self, adapter_id: int, device_weights: list) -> None:
        cache = self.device_adapter_cache
        if cache.access_adapter(adapter_id):
            cache.update_adapter(adapter_id)
            return
        position = cache.get_swap_position()
        device_weights[position] = self.cpu_adapter_cache.map[adapter_id].weights
        cache.add_adapter(adapter_id, position)
        cache.update_adapter(adapter_id)

    def dynamic_update_weights_for_lora(self, device_weights: list, adapter_ids: torch.Tensor):
        """Global ids of one context encoding -> device positions, swapping adapters in."""
        for adapter_id in adapter_ids.tolist():
            self.insert_cpu_adapter(adapter_id)
            self.insert_device_adapter(adapter_id, device_weights)
        if self.decay_count < self.decay_max:
            self.decay_count += 1
        else:
            self.cpu_adapter_cache.decay_adapters()
            self.device_adapter_cache.decay_adapters()
            self.decay_count = 0
        positions = self.device_adapter_cache.get_adapter_id_positions(adapter_ids.tolist())
        return torch.tensor(positions, dtype=adapter_ids.dtype)

    # -- vLLM's LoRA API -------------------------------------------------------------------------
    def add_new_cpu_adapter(self, adapter_name: str, adapter_path: str) -> bool:
        self.add_adapter_mapping(adapter_name)
        adapter_id = self.lora_adapter_id_mapping[adapter_name]
        weights = None
        if not self.cpu_adapter_cache.access_adapter(adapter_id):
            weights = self._stream(adapter_name, adapter_path)
            if weights is None:
                return False
        self.insert_cpu_adapter(adapter_id, weights)
        return True

    def add_adapter(self, lora_request) -> bool:
        return self.add_new_cpu_adapter(lora_request.lora_name, lora_request.lora_path)

    def remove_adapter(self, adapter_id: int) -> bool:
        self.cpu_adapter_cache.remove_adapter(adapter_id)
        return True

    def pin_adapter(self, lora_id: int) -> bool:
        return True

    def list_adapters(self) -> set[str]:
        return set(self.lora_adapter_id_mapping)
