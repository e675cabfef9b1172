"""What users can ask for that no backend serves yet: refused by name, never ignored.

Earlier Neuron code bases accepted such input and then crashed mid-run or quietly
did something else (a LoRA request served by the first adapter, images dropped,
speculation keys compiled into a graph the runner never drives). Each entry here
names what is refused, on which backends, and the issue that will serve it; the
entry goes when that issue lands. Config keys and vLLM features are refused when
vLLM's config is resolved (``LLM(...)`` or server start-up); request inputs at the
request (HTTP 400 on the server).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_neuronx import neuron_config as nc

ALL_BACKENDS = frozenset({"nxdi", "tnx", "cpu"})


@dataclass(frozen=True, slots=True)
class Unserved:
    """Something refused, where, and what will serve it."""

    what: str  # the feature, as users know it
    backends: frozenset[str]  # the backends that refuse it
    issue: int | None  # the issue that implements it (None: none planned yet)
    # Per backend, why it is refused there when not merely "not yet".
    why: tuple[tuple[str, str], ...] = ()

    def reason(self, backend: str) -> str:
        why = dict(self.why).get(backend)
        if why:
            return f"{self.what} is not served by the {backend} backend: {why}"
        later = f" (planned: issue {self.issue})" if self.issue else ""
        return f"{self.what} is not served by the {backend} backend yet{later}"


# Fused speculation (a draft model or an EAGLE head) is served on nxdi and cpu through
# vLLM's speculative_config (vllm_neuronx/speculation.py); transformers-neuronx's fused
# decoders never ran under a V1 runner.
_SPECULATION = Unserved("speculative decoding", frozenset({"tnx"}), None)
_MEDUSA = Unserved("Medusa heads and token trees", ALL_BACKENDS, None)
# Prefix caching runs on the block KV layout (block_kv.py) on nxdi and cpu. NxDI removed
# chunked prefill in SDK 2.28 (its NeuronBaseForCausalLM raises NotImplementedError); the
# CPU backend runs it through the block layout's flattened steps.
_PREFIX_CACHING = Unserved("prefix caching (the block KV layout)", frozenset({"tnx"}), None)
_CHUNKED_PREFILL = Unserved(
    "chunked prefill", frozenset({"tnx", "nxdi"}), None,
    why=(("nxdi", "NxDI removed it in Neuron SDK 2.28 (NeuronBaseForCausalLM raises "
                  "NotImplementedError); long prompts prefill whole, in their context "
                  "bucket"),))
# NxDI's async_mode runs each decode ahead from the device's own token, ignoring the inputs
# given (modules/async_execution.py at 4bcdc54), and leans on the runtime's implicit async
# execution, which Neuron SDK 2.31 removed. Host time is hidden by vLLM's asynchronous
# scheduling instead (--async-scheduling; model_runner.py).
_ASYNC_WHY = ("it continues each decode from the device's own token, ignoring the runner's "
              "inputs, which host-sampled requests (logprobs, penalties, seeds, structured "
              "output) and fused speculation need, and it relies on the runtime's implicit "
              "async execution, which Neuron SDK 2.31 removed; vLLM's --async-scheduling "
              "hides the host's time instead")
_ASYNC = Unserved("NxDI's async_mode", ALL_BACKENDS, None,
                  why=tuple((b, _ASYNC_WHY) for b in sorted(ALL_BACKENDS)))
# LoRA is served on nxdi and cpu through vLLM's own settings (enable_lora, max_loras...,
# --lora-modules, LoRARequest). transformers-neuronx's LoRA never took per-request adapters.
_LORA = Unserved("LoRA adapters", frozenset({"tnx"}), None)
# The neuron config's own LoRA keys: NxDI's legacy way to name adapters (kept there,
# backends/nxdi.py); the CPU backend takes adapters only the way vLLM gives them.
_LORA_KEYS = Unserved("LoRA adapters through override_neuron_config (use enable_lora with "
                      "--lora-modules or LoRARequest)", frozenset({"cpu", "tnx"}), None)
# The CPU backend quantizes weights and the KV cache (quant_config.py), not activations,
# and has no quantizing kernels (they change the numbers on a device).
_ACTIVATION_QUANTIZATION = Unserved("activation quantization and quantized kernels",
                                    frozenset({"cpu"}), None)

# override_neuron_config keys that ask for a feature -> the feature. Keys that only size
# or tune one (spec_batch_size, pa_num_blocks, pa_block_size, quantization_dtype...) ask
# for nothing by themselves: NxDI saves them with values in every config it compiles.
UNSERVED_KEYS: dict[str, Unserved] = {
    **dict.fromkeys(
        ("speculation_length", "enable_fused_speculation", "enable_eagle_speculation",
         "is_eagle_draft", "is_eagle3"),
        _SPECULATION),
    **dict.fromkeys(
        ("token_tree_config", "is_medusa", "medusa_speculation_length", "medusa_tree"),
        _MEDUSA),
    **dict.fromkeys(("is_prefix_caching", "is_block_kv_layout"), _PREFIX_CACHING),
    "chunked_prefill_config": _CHUNKED_PREFILL,
    "async_mode": _ASYNC,
    **dict.fromkeys(("lora_modules", "lora_config"), _LORA_KEYS),
    **dict.fromkeys(
        ("quantized_mlp_kernel_enabled", "activation_quantization_type"),
        _ACTIVATION_QUANTIZATION),
}

# vLLM engine features -> (the setting's name, what it asks for).
_FEATURES = {
    "speculative_config": ("speculative_config", _SPECULATION),
    "lora_config": ("enable_lora", _LORA),
}
MULTIMODAL = Unserved("multimodal input (images)", ALL_BACKENDS, None)


def check_neuron_config(cfg: Mapping[str, Any], backend: str) -> None:
    """Refuse every override key ``backend`` does not serve yet, naming it."""
    refused = [(key, entry) for key, entry in UNSERVED_KEYS.items()
               if backend in entry.backends and nc.asks_for(cfg.get(key))]
    if refused:
        key, entry = refused[0]
        others = [k for k, _ in refused[1:]]
        also = f" (also refused: {', '.join(others)})" if others else ""
        raise nc.NeuronConfigError(
            f"override_neuron_config key {key!r}: {entry.reason(backend)}; remove it{also}")


def check_vllm_features(vllm_config, backend: str) -> None:
    """Refuse vLLM features (speculative_config, enable_lora) ``backend`` does not serve."""
    for attr, (setting, entry) in _FEATURES.items():
        if getattr(vllm_config, attr, None) is not None and backend in entry.backends:
            raise nc.NeuronConfigError(f"{setting}: {entry.reason(backend)}; remove it")


def check_kv_cache_dtype(cache_dtype: str, model_dtype) -> None:
    """vLLM's kv_cache_dtype: every backend keeps the KV cache in the model's dtype, as
    NxDI does (its torch_dtype), or in fp8 through the neuron config's kv_cache_quant.
    Any other ask is refused by name rather than quietly served in the model's dtype."""
    model = str(model_dtype).removeprefix("torch.")
    if cache_dtype in ("auto", model):
        return
    fp8 = (" for an fp8 cache (e4m3, a direct cast as NxDI's) set override_neuron_config="
           '{"kv_cache_quant": true}' if cache_dtype.startswith("fp8") else "")
    raise nc.NeuronConfigError(
        f"kv_cache_dtype={cache_dtype!r}: the Neuron backends keep the KV cache in the "
        f"model's dtype ({model}); use 'auto'{fp8}")


def check_block_layout(layout, backend: str) -> None:
    """Refuse the block KV layout's features (vLLM's enable_prefix_caching and
    enable_chunked_prefill, or their NxDI keys) where ``backend`` does not serve them."""
    if layout is None:
        return
    if layout.chunked_prefill and backend in _CHUNKED_PREFILL.backends:
        raise nc.NeuronConfigError(f"enable_chunked_prefill: "
                                   f"{_CHUNKED_PREFILL.reason(backend)}; turn it off")
    if backend in _PREFIX_CACHING.backends:
        raise nc.NeuronConfigError(f"enable_prefix_caching: {_PREFIX_CACHING.reason(backend)}"
                                   "; turn it off")


def multimodal_parts(engine_input: Any) -> list[str]:
    """The multimodal parts (image, video...) a processed request carries."""
    if not hasattr(engine_input, "get"):
        return []
    kwargs = engine_input.get("mm_kwargs") or engine_input.get("multi_modal_data") or {}
    if not hasattr(kwargs, "keys"):
        return []
    return sorted(k for k in kwargs.keys() if kwargs[k])
