"""vLLM's config -> the Neuron settings every process agrees on, and their one channel.

The platform resolves them once, when vLLM's config is checked (so a bad override
fails at ``LLM(...)`` with its name), and ``publish``es them into that config, as
``additional_config["neuron_settings"]``. The config is the channel: it travels
with the engine to the engine-core process, where the worker reads the settings
back (``of``); a config without them is an error (our platform did not configure
it), never a silent second resolve. Request validation and the patches see
requests, not the config: they read ``current()``, the settings this process
published or read last, which only ``publish`` and ``of`` set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm_neuronx import block_kv, envs, framework, speculation, unserved
from vllm_neuronx import neuron_config as nc
from vllm_neuronx.backends.protocol import SamplingCapabilities
from vllm_neuronx.distributed import topology
from vllm_neuronx.lora.config import check_lora_config

SETTINGS_KEY = "neuron_settings"
OVERRIDES_KEY = "override_neuron_config"
# vLLM flags as the user gave them (patches/engine_args.py): vLLM's defaults turn on what
# selects the block KV layout on Neuron.
ASKED_KEY = "vllm_flags_asked"


@dataclass(frozen=True, slots=True)
class NeuronSettings:
    framework: str  # what the user chose (VLLM_NEURON_FRAMEWORK) or the default
    backend: str  # the backend that runs it: nxdi | tnx | cpu
    device: str  # "neuron" or "cpu"
    neuron_config: dict[str, Any]
    # What the compiled model returns besides tokens (request validation reads it).
    sampling: SamplingCapabilities = SamplingCapabilities()
    # The model's embedding rows: a prompt token id at or past it would crash a step.
    vocab_size: int | None = None
    # Fused speculation's draft model or EAGLE head (vLLM's speculative_config), or None.
    draft: speculation.Draft | None = None

    @classmethod
    def resolve(cls, vllm_config) -> tuple[NeuronSettings, list[str]]:
        """Compute the settings; also returns the warnings the user should see."""
        from vllm_neuronx import artifacts
        from vllm_neuronx.backends import backend_class

        warnings = []
        choice = framework.choose_from_env()
        if choice.warning:
            warnings.append(choice.warning)
        overrides = (vllm_config.additional_config or {}).get(OVERRIDES_KEY)
        unserved.check_vllm_features(vllm_config, choice.backend)
        unserved.check_kv_cache_dtype(vllm_config.cache_config.cache_dtype,
                                      vllm_config.model_config.dtype)
        draft = _draft(vllm_config)
        if draft is not None and vllm_config.lora_config is not None:
            raise nc.NeuronConfigError(
                "speculative decoding with LoRA adapters (enable_lora) is not served: the "
                "fused draft would propose without the adapters; use one or the other")
        block = _block_layout(vllm_config, overrides)
        unserved.check_block_layout(block, choice.backend)
        if block is not None and block.chunked_prefill and vllm_config.lora_config is not None:
            raise nc.NeuronConfigError(
                "chunked prefill with LoRA adapters (enable_lora) is not served: adapters are "
                "bound to a sequence at its one prefill step; use one or the other")
        if block is not None and draft is not None:
            raise nc.NeuronConfigError(
                "speculative decoding with the block KV layout (prefix caching, chunked "
                "prefill) is not served: the fused draft keeps KV lines of its own; use one "
                "or the other")
        cfg = nc.resolve_neuron_config(
            tp_degree=vllm_config.parallel_config.tensor_parallel_size,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            max_model_len=vllm_config.model_config.max_model_len,
            dtype=vllm_config.model_config.dtype,
            overrides=overrides,
            on_device_sampling_disabled=envs.NEURON_ON_DEVICE_SAMPLING_DISABLED,
            draft=draft,
            block=block,
        )
        backend = backend_class(choice.backend)
        _lora_into_neuron_config(cfg, overrides or {}, vllm_config.lora_config, choice.backend)
        found = artifacts.precompiled_config(choice.backend, backend.stored_config)
        if found is not None:
            folder, stored = found
            # A node's own place among the ranks stays its own: the folder may be another
            # node's (NxDI gives start_rank_id at load; the graphs do not depend on it).
            stored = {**stored, **{k: cfg[k] for k in topology.PER_NODE_KEYS if k in cfg}}
            diffs = artifacts.config_differences(cfg, stored)
            if diffs:
                changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
                warnings.append(
                    f"NEURON_COMPILED_ARTIFACTS={folder} holds compiled artifacts; their config "
                    f"wins over vLLM's arguments ({changes})"
                )
            cfg = dict(stored)
        archs = list(getattr(vllm_config.model_config.hf_config, "architectures", None) or [])
        if backend.architectures and not set(archs) & set(backend.architectures):
            raise nc.NeuronConfigError(
                f"{choice.framework} ({choice.backend} backend) does not serve architectures "
                f"{archs}; supported: {sorted(backend.architectures)}"
            )
        backend.check_architectures(archs)
        quantization = vllm_config.model_config.quantization
        backend.validate(cfg, quantization=quantization)
        unserved.check_neuron_config(cfg, choice.backend)
        topology.check_served(choice.backend, cfg, draft=draft is not None)
        check_lora_config(vllm_config.lora_config, vllm_config.model_config.dtype,
                          choice.backend)
        if quantization == "neuron_quant":  # the framework quantizes (and the cache key says so)
            cfg["quantized"] = True
        device = "neuron" if choice.backend in ("nxdi", "tnx") else "cpu"
        caps = backend.sampling_capabilities(cfg)
        vocab = vllm_config.model_config.get_vocab_size()
        return cls(choice.framework, choice.backend, device, cfg, caps, vocab, draft), warnings

    def publish(self, vllm_config) -> None:
        """Write the settings into ``vllm_config`` (and make them this process's)."""
        global _CURRENT
        if not isinstance(vllm_config.additional_config, dict):
            vllm_config.additional_config = {}
        vllm_config.additional_config[SETTINGS_KEY] = asdict(self)
        _CURRENT = self

    @classmethod
    def of(cls, vllm_config) -> NeuronSettings:
        """The settings the platform published into ``vllm_config`` (and make them
        this process's)."""
        global _CURRENT
        stored = (vllm_config.additional_config or {}).get(SETTINGS_KEY)
        if stored is None:
            raise RuntimeError(
                "vLLM's config carries no Neuron settings: the neuron platform did not "
                "configure this engine (is the vllm_neuronx plugin loaded? check "
                "VLLM_PLUGINS)"
            )
        _CURRENT = cls.from_dict(stored)
        return _CURRENT

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> NeuronSettings:
        """Settings from ``asdict`` (``publish``'s form, also what a rank's follower gets)."""
        stored = dict(stored)
        stored["sampling"] = SamplingCapabilities(**stored.get("sampling", {}))
        if stored.get("draft") is not None:
            stored["draft"] = speculation.Draft(**stored["draft"])
        return cls(**stored)

    @property
    def max_model_len(self) -> int:
        """vLLM's max_model_len as compiled: the KV line, less fused speculation's k."""
        return self.neuron_config["seq_len"] - speculation.speculation_length(self.neuron_config)

    @property
    def block_layout(self) -> block_kv.BlockLayout | None:
        """The block KV layout compiled (prefix caching, chunked prefill), or None."""
        return block_kv.of(self.neuron_config)

    def align(self, vllm_config) -> None:
        """Make vLLM's scheduler match what was compiled (precompiled artifacts may differ)."""
        vllm_config.scheduler_config.max_num_seqs = self.neuron_config["batch_size"]
        vllm_config.model_config.max_model_len = self.max_model_len


def async_scheduling(settings: NeuronSettings, vllm_config) -> bool:
    """Whether step N+1 is scheduled while step N runs (vLLM's async scheduling).

    On by default on a Neuron device (NxDI, transformers-neuronx), where the host's work
    per step is otherwise added to the device's: behind a 5 ms device step the host time
    exposed per decode step fell from 1.4-1.7 ms to 0.07-0.11 ms at batch 1 to 32
    (benchmarks/host_overhead.py, 2-core Xeon VM). Off by default on the CPU backend, whose
    steps share the cores with the host's work (--async-scheduling turns it on); off
    where the user says --no-async-scheduling. Not with fused speculation (the runner
    hands vLLM its placeholder drafts after each step) nor with the block KV layout (a
    preemption while a step is in flight is not handled yet): refused by name if asked,
    off by default."""
    asked = (vllm_config.additional_config or {}).get(ASKED_KEY, {}).get("async_scheduling")
    blockers = [why for why, present in (
        ("fused speculation (speculative_config)", settings.draft is not None),
        ("the block KV layout (prefix caching, chunked prefill)",
         settings.block_layout is not None)) if present]
    if blockers:
        if asked:
            raise nc.NeuronConfigError(
                f"--async-scheduling is not served with {blockers[0]} on Neuron; drop one")
        return False
    return settings.device == "neuron" if asked is None else bool(asked)


def _draft(vllm_config) -> speculation.Draft | None:
    """vLLM's speculative_config as the fused draft, or a named error."""
    from vllm_neuronx.worker.worker import resolve_model_folder

    try:
        return speculation.from_vllm(vllm_config.speculative_config,
                                     resolve_folder=resolve_model_folder)
    except speculation.SpeculationError as e:
        raise nc.NeuronConfigError(str(e)) from None


def _block_layout(vllm_config, overrides) -> block_kv.BlockLayout | None:
    """The block KV layout vLLM's settings and the NxDI keys ask for, or None."""
    asked = (vllm_config.additional_config or {}).get(ASKED_KEY, {})
    cache = vllm_config.cache_config
    try:
        return block_kv.resolve(
            overrides or {},
            prefix_caching=asked.get("enable_prefix_caching"),
            chunked_prefill=asked.get("enable_chunked_prefill"),
            block_size=cache.block_size,
            num_blocks=cache.num_gpu_blocks_override,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            seq_len=vllm_config.model_config.max_model_len,
        )
    except block_kv.BlockLayoutError as e:
        raise nc.NeuronConfigError(str(e)) from None


def _lora_into_neuron_config(cfg: dict, overrides: dict, lora_config, backend: str) -> None:
    """NxDI compiles its adapter slots: vLLM's max_loras, max_lora_rank and max_cpu_loras
    go into the neuron config's ``lora_config`` (so the artifacts key covers them), over
    the user's override, whose same keys must agree (backends/nxdi.py). NxDI's own LoRA
    keys alone, without vLLM's LoRA, would compile adapters no request can name."""
    if backend != "nxdi":
        return
    if lora_config is not None:
        from vllm_neuronx.backends.nxdi import vllm_lora_config

        cfg["lora_config"] = vllm_lora_config(cfg.get("lora_config"), lora_config)
        return
    asked = [k for k in ("lora_config", "lora_modules") if overrides.get(k)]
    if asked:
        raise nc.NeuronConfigError(
            f"override_neuron_config key {asked[0]!r} asks for LoRA adapters, but vLLM's LoRA "
            "is off: set enable_lora=True (--enable-lora), with max_loras and max_lora_rank, "
            "so that requests can name the adapters")


_CURRENT: NeuronSettings | None = None


def current() -> NeuronSettings | None:
    """The settings this process published or read last; None where no engine of ours
    was configured (request validation then has nothing to check)."""
    return _CURRENT
