"""vllm-neuronx: vLLM on AWS Inferentia and Trainium through NxD Inference,
and on any CPU through our own backend that honours the same contract.

Layout: platform -> scheduler -> worker/model_runner -> backends (one protocol:
nxdi, tnx, cpu). ``patches`` holds the few changes upstream's entry points cannot make.
"""

import os

__version__ = "0.1.0"


def register() -> str | None:
    """vllm.platform_plugins entry point: the Neuron platform where it is wanted, else None
    so that vLLM keeps its own (a GPU host stays on its GPU): ``activation.py`` decides."""
    from vllm_neuronx import activation

    if not activation.here().active:
        return None
    from vllm_neuronx.patches import PatchError, apply_all

    try:
        apply_all()
    except PatchError as e:  # vLLM swallows a platform plugin's errors: say it first
        from vllm_neuronx.log import get_logger

        get_logger(__name__).error("%s", e)
        raise
    prefer_fork()
    return "vllm_neuronx.platform.NeuronPlatform"


def prefer_fork() -> None:
    """Start the engine core by fork, unless the user chose otherwise.

    vLLM's CLI picks "spawn" (the safe choice where the parent may hold an accelerator
    context), so the engine core imports vLLM, torch and the model code a second time:
    12 of a 25 s warm start on 2 cores (fork: 12.6 s). Here nothing touches a device
    before the engine core starts (the backend loads inside it), and library use
    (``LLM``) forks already. This runs when the platform is resolved, before the CLI's
    own default is set.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    _release_openmp_before_fork()


_fork_hook_registered = False


def _release_openmp_before_fork() -> None:
    """Free torch's OpenMP thread pool before every fork of this process.

    GNU libgomp (torch's, and our kernels') keeps its pool across fork() without the
    threads, so a child whose parent ever ran a parallel torch op hangs in its first
    one: an ``LLM`` made after any torch work (a test comparing with HF, a user's own
    pre-processing) never finished starting its engine core. vLLM 0.16 forks without
    freeing it; ``omp_pause_resource_all`` frees it (the parent's next parallel op
    builds a new pool, in microseconds).
    """
    global _fork_hook_registered
    if not _fork_hook_registered:
        _fork_hook_registered = True
        os.register_at_fork(before=_pause_openmp)


def _pause_openmp() -> None:
    import sys

    if "torch" not in sys.modules:  # no torch, no pool to free
        return
    import ctypes

    try:
        libgomp = ctypes.CDLL("libgomp.so.1")  # the copy already loaded, by its soname
    except OSError:
        return
    libgomp.omp_pause_resource_all(ctypes.c_int(2))  # omp_pause_hard


def register_patches() -> None:
    """vllm.general_plugins entry point (every process, before args are parsed).

    Patches nothing where the platform stays out: the patches serve our platform and
    change upstream for everyone (``tensor_parallel_size`` folded into NxDI's
    ``tp_degree``, ``max_num_seqs`` 32, our middleware, exit statuses), so a GPU host
    must keep upstream's vLLM untouched. Both entry points read the same decision.
    """
    from vllm_neuronx import activation

    if not activation.here().active:
        return
    from vllm_neuronx import quantization
    from vllm_neuronx.patches import apply_all

    apply_all()
    quantization.register()
