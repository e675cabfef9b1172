"""vllm-neuronx: vLLM on AWS Inferentia and Trainium through NxD Inference,
and on any CPU through our own backend that honours the same contract.

Layout: platform -> scheduler -> worker/model_runner -> backends (one protocol:
nxdi, tnx, cpu). ``patches`` holds the few changes upstream's entry points cannot make.
"""

import os

__version__ = "0.1.0"


def register() -> str:
    """vllm.platform_plugins entry point: the Neuron platform, always active when installed."""
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
    before the engine core starts (the backend loads inside it), library use (``LLM``)
    forks already, and vLLM releases torch's OpenMP threads before it forks. This runs
    when the platform is resolved, before the CLI's own default is set.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")


def register_patches() -> None:
    """vllm.general_plugins entry point (every process, before args are parsed)."""
    from vllm_neuronx import quantization
    from vllm_neuronx.patches import apply_all

    apply_all()
    quantization.register()
