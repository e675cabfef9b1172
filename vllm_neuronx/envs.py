"""Every environment variable vllm-neuronx reads, in one table.

Read lazily (``envs.NAME``) so tests can set them with monkeypatch.
"""

import os
from collections.abc import Callable
from typing import Any


def _flag(name: str) -> Callable[[], bool]:
    return lambda: os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _str(name: str, default: str | None = None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name, default) or default


_VARS: dict[str, Callable[[], Any]] = {
    # Which Neuron framework serves the model: "neuronx-distributed-inference"
    # (default when installed), "transformers-neuronx", or "cpu" (ours).
    "VLLM_NEURON_FRAMEWORK": _str("VLLM_NEURON_FRAMEWORK"),
    # Folder of compiled artifacts: loaded if present, else compiled and stored.
    "NEURON_COMPILED_ARTIFACTS": _str("NEURON_COMPILED_ARTIFACTS"),
    # Set to a non-zero value to return logits instead of device-sampled tokens.
    "NEURON_ON_DEVICE_SAMPLING_DISABLED": _flag("NEURON_ON_DEVICE_SAMPLING_DISABLED"),
    # transformers-neuronx bucket lists (comma separated), as upstream read them.
    "NEURON_CONTEXT_LENGTH_BUCKETS": _str("NEURON_CONTEXT_LENGTH_BUCKETS"),
    "NEURON_TOKEN_GEN_BUCKETS": _str("NEURON_TOKEN_GEN_BUCKETS"),
    "NEURON_QUANT_DTYPE": _str("NEURON_QUANT_DTYPE", "s8"),
    # Tests only: route through a backend even without a Neuron device
    # ("nxdi" or "tnx" against the simulators in tests/). Never set in production.
    "VLLM_NEURONX_FORCE_BACKEND": _str("VLLM_NEURONX_FORCE_BACKEND"),
    # Tests only: "KIND:N" (KIND forward, prefill or decode) makes the backend's N-th
    # call of that kind raise (vllm_neuronx/faults.py), to test engine failure end to
    # end. Never set in production.
    "VLLM_NEURONX_TEST_FAULT": _str("VLLM_NEURONX_TEST_FAULT"),
    # Threads for the CPU backend's matmuls (default: all cores this process may use).
    "VLLM_NEURONX_CPU_THREADS": _str("VLLM_NEURONX_CPU_THREADS"),
    # The CPU backend's native kernel: avx512, avx2, torch (none), or auto (default:
    # the best this CPU runs). For tests and benchmarks; part of the artifacts' key.
    "VLLM_NEURONX_CPU_KERNEL": _str("VLLM_NEURONX_CPU_KERNEL"),
    # The rank group (vllm_neuronx/distributed): the processes that run one model, rank 0
    # being vLLM's. Set by the multi-node launcher (examples/neuron/multi_node/launch.py),
    # or by the leader for the CPU backend's ranks it starts itself.
    "VLLM_NEURONX_RANK": _str("VLLM_NEURONX_RANK"),
    "VLLM_NEURONX_WORLD_SIZE": _str("VLLM_NEURONX_WORLD_SIZE"),
    "VLLM_NEURONX_MASTER": _str("VLLM_NEURONX_MASTER"),  # host:port of rank 0's store
    # Seconds a rank may keep the others waiting inside a step (or at start-up, times
    # ten) before they fail: a follower that hangs fails the leader's requests within it.
    "VLLM_NEURONX_RANK_TIMEOUT": _str("VLLM_NEURONX_RANK_TIMEOUT", "120"),
}


OWN_VARIABLES = frozenset(_VARS)


def __getattr__(name: str) -> Any:
    if name in _VARS:
        return _VARS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(_VARS)
