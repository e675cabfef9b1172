"""Our CPU backend (backend.py): a PyTorch model per family (llama.py) and, where the
CPU allows, a native path beside it (native.py over kernels.py's library)."""

from vllm_neuronx.backends.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
