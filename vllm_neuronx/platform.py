"""The Neuron platform for vLLM (an out-of-tree platform plugin).

vLLM builds CPU tensors (device_type "cpu"); the backend moves them to the
device, as NxDI expects. check_and_update_config turns vLLM's settings into
Neuron's: one KV block of max_model_len tokens per sequence, max_num_seqs blocks, no
chunked prefill, no prefix caching (unless the user asks: then the block KV layout's
blocks, block_kv.py), async scheduling only where asked (platform_config.async_scheduling),
no vLLM compilation,
world size 1 (tensor parallelism runs inside the backend), our worker and
scheduler. Requests the device cannot serve are refused in validate_request.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import TYPE_CHECKING

import torch
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_neuronx import envs
from vllm_neuronx.log import get_logger
from vllm_neuronx.platform_config import NeuronSettings, async_scheduling

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = get_logger(__name__)

WORKER_CLS = "vllm_neuronx.worker.worker.NeuronWorker"
SCHEDULER_CLS = "vllm_neuronx.scheduler.NeuronScheduler"
ASYNC_SCHEDULER_CLS = "vllm_neuronx.scheduler.NeuronAsyncScheduler"


class NeuronPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "neuron"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    ray_device_key: str = "neuron_cores"
    device_control_env_var: str = "NEURON_RT_VISIBLE_CORES"
    dist_backend: str = "gloo"
    simple_compile_backend: str = "eager"
    supported_quantization: list[str] = ["neuron_quant"]

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float32, torch.float16]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "neuron"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        import psutil

        return psutil.virtual_memory().total

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    def is_cpu(self) -> bool:
        # vLLM's shutdown and memory paths treat us as host memory.
        return True

    @classmethod
    def import_kernels(cls) -> None:
        """No vllm._C on Neuron: our kernels live in the backend."""

    @classmethod
    def inference_mode(cls):
        return torch.inference_mode(mode=True)

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        return

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        torch.manual_seed(seed)

    @classmethod
    def get_current_memory_usage(cls, device: torch.types.Device | None = None) -> float:
        return 0.0

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        parallel.distributed_executor_backend = "uni"
        parallel.world_size = 1
        if model_config is None:  # vLLM also calls this on partial configs
            return
        settings, warnings = NeuronSettings.resolve(vllm_config)
        if multiprocessing.parent_process() is None:  # the user's process, not the engine core
            for warning in warnings:
                logger.warning(warning)
        settings.publish(vllm_config)
        settings.align(vllm_config)

        max_len = model_config.max_model_len
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        cache = vllm_config.cache_config
        sched = vllm_config.scheduler_config
        block = settings.block_layout
        cache.user_specified_block_size = True
        sched.async_scheduling = async_scheduling(settings, vllm_config)
        sched.scheduler_cls = ASYNC_SCHEDULER_CLS if sched.async_scheduling else SCHEDULER_CLS
        if block is None:  # one line of max_model_len per sequence
            cache.block_size = max_len
            cache.enable_prefix_caching = False
            cache.num_gpu_blocks_override = max_seqs + 1  # + upstream's null block
        else:  # vLLM's KV manager hands out the backend's blocks
            cache.block_size = block.block_size
            cache.enable_prefix_caching = block.prefix_caching
            cache.num_gpu_blocks_override = block.num_blocks
        sched.enable_chunked_prefill = block is not None and block.chunked_prefill
        if not sched.enable_chunked_prefill:  # every prompt whole, any batch of them
            sched.long_prefill_token_threshold = 0
            budget = max(sched.max_num_batched_tokens, max_len * max_seqs)
            sched.max_num_batched_tokens = budget
            sched.max_num_scheduled_tokens = budget

        from vllm.config import CompilationMode
        from vllm.config.compilation import CUDAGraphMode

        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_mode = CUDAGraphMode.NONE
        comp.cudagraph_capture_sizes = []

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        """Upstream's check of VLLM_* variables, knowing ours (VLLM_NEURON_FRAMEWORK...)."""
        from vllm import envs as vllm_envs

        for name in os.environ:
            if not name.startswith("VLLM_") or name in vllm_envs.environment_variables:
                continue
            if name in envs.OWN_VARIABLES:
                continue
            if hard_fail:
                raise ValueError(f"Unknown vLLM environment variable detected: {name}")
            logger.warning("Unknown vLLM environment variable detected: %s", name)

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: VllmConfig) -> None:
        """Our block size is max_model_len, set above; no attention backend to ask."""

    @classmethod
    def validate_request(cls, prompt, params, processed_inputs) -> None:
        from vllm_neuronx.validation import validate_request

        validate_request(processed_inputs, params)
