"""The vLLM worker for Neuron: one process drives every core (tensor parallelism
lives inside the backend as ``tp_degree``), so vLLM's world size stays 1.

It tells vLLM's KV manager about exactly ``max_num_seqs`` blocks of
``max_model_len`` tokens (plus upstream's null block): one block per sequence,
so a decode never needs a new block and the scheduler never has to preempt. With the
block KV layout (prefix caching, chunked prefill: block_kv.py) it tells it about the
backend's ``pa_num_blocks`` blocks instead.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.worker.worker_base import WorkerBase

from vllm_neuronx.distributed.leader import Leader, load_ranks
from vllm_neuronx.log import get_logger
from vllm_neuronx.platform_config import NeuronSettings
from vllm_neuronx.worker.model_runner import NeuronModelRunner

logger = get_logger(__name__)

KV_LAYER = "neuron_kv_lines"


def resolve_model_folder(model: str, revision: str | None = None) -> str:
    """A local folder as is; a hub id only from the local cache (never downloads)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"model {model!r} is neither a local folder nor in the local Hugging Face cache "
            "(vllm-neuronx never downloads at run time)"
        ) from e


class NeuronWorker(WorkerBase):
    def init_device(self) -> None:
        self.device = torch.device("cpu")
        self.settings = NeuronSettings.of(self.vllm_config)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        settings = self.settings
        model_path = resolve_model_folder(self.model_config.model, self.model_config.revision)
        backend, result = load_ranks(model_path, settings, seed=self.model_config.seed or 0)
        self.model_runner = NeuronModelRunner(backend, self.vllm_config)
        block = settings.block_layout
        logger.info(
            "Neuron ready: framework=%s backend=%s device=%s context buckets=%s "
            "token buckets=%s KV %s dtype=%s kernel=%s%s%s artifacts=%s (%s)",
            settings.framework,
            settings.backend,
            settings.device,
            backend.context_buckets,
            backend.token_buckets,
            f"lines={backend.num_lines} x {settings.neuron_config['seq_len']} tokens"
            if block is None else
            f"blocks={block.num_blocks} x {block.block_size} tokens (prefix caching "
            f"{'on' if block.prefix_caching else 'off'}, chunked prefill "
            f"{'on' if block.chunked_prefill else 'off'})",
            settings.neuron_config["torch_dtype"],
            backend.kernel,
            f" speculation={settings.draft.method} k={backend.speculation_length} "
            f"({settings.draft.path})" if settings.draft else "",
            f" ranks={backend.group.world} processes ({backend.group.transport})"
            if isinstance(backend, Leader) else "",
            result.folder,
            "compiled" if result.compiled else "loaded",
        )

    # -- KV cache: one block of max_model_len tokens per sequence ------------------------
    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        hf = self.model_config.hf_text_config
        heads = hf.num_attention_heads
        return {
            KV_LAYER: FullAttentionSpec(
                block_size=self.cache_config.block_size,
                num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                head_size=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                dtype=self.model_config.dtype,
            )
        }

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["LBHNC"]

    def determine_available_memory(self) -> int:
        """Room for exactly the blocks the platform set (num_gpu_blocks_override)."""
        spec = self.get_kv_cache_spec()[KV_LAYER]
        return spec.page_size_bytes * self.cache_config.num_gpu_blocks_override

    def initialize_from_config(self, kv_cache_config) -> None:
        """The backend owns the real KV cache; vLLM's blocks only do the bookkeeping."""

    def initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        self.cache_config.num_gpu_blocks = num_gpu_blocks
        self.cache_config.num_cpu_blocks = num_cpu_blocks

    def compile_or_warm_up_model(self) -> None:
        """Nothing to do: the backend compiled (or loaded its artifacts) in load_model."""

    def get_supported_tasks(self):
        return ("generate",)

    def execute_model(self, scheduler_output):
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self):
        """Fused speculation's placeholder drafts for the next step (model_runner.py)."""
        return self.model_runner.take_draft_token_ids()

    # -- LoRA adapters: vLLM's utility calls, answered by the runner's host pool ----------
    # An exception here fails that call only (HTTP 400/404 on the server; the engine
    # keeps serving).
    def _adapters(self):
        pool = getattr(getattr(self, "model_runner", None), "lora", None)
        if pool is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True "
                             "(--enable-lora)")
        return pool

    # With asynchronous scheduling they run in order with the steps (model_runner.py).
    def add_lora(self, lora_request) -> bool:
        pool = self._adapters()
        return self.model_runner.serialized(pool.add, lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        pool = self._adapters()
        return self.model_runner.serialized(pool.remove, lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        pool = self._adapters()
        return self.model_runner.serialized(pool.pin, lora_id)

    def list_loras(self) -> set[int]:
        return self._adapters().list()

    def kv_lines_in_use(self) -> int:
        """KV lines held by running requests (0 once everything finished or aborted), as
        of the last step vLLM handed the runner."""
        return self.model_runner.serialized(lambda: self.model_runner.lines_in_use)

    def step_times(self) -> list[dict]:
        """Backend ms and the engine's ms between steps, per phase and batch size
        (worker/step_times.py)."""
        return self.model_runner.step_times.summary()

    def get_model(self) -> torch.nn.Module:
        return _BackendView(self.model_runner.backend)

    def check_health(self) -> None:
        return

    def shutdown(self) -> None:
        runner = getattr(self, "model_runner", None)
        if runner is not None and runner.step_times.tallies:
            logger.info("Neuron steps: %s", runner.step_times.describe())
        if runner is not None:
            runner.shutdown()  # the step in flight, if any, ends first
        if runner is not None and isinstance(runner.backend, Leader):
            runner.backend.close()  # every follower stops with this engine


class _BackendView(torch.nn.Module):
    """What vLLM's model inspection (``repr(llm)``) shows: the backend, not a torch graph."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.backend_name = type(getattr(backend, "backend", backend)).__name__
        self.framework = backend.framework

    def extra_repr(self) -> str:
        return f"backend={self.backend_name}, framework={self.framework}"
