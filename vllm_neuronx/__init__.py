"""vllm-neuronx: vLLM on AWS Inferentia and Trainium through NxD Inference,
and on any CPU through our own backend that honours the same contract.

Layout: platform -> scheduler -> worker/model_runner -> backends (one protocol:
nxdi, tnx, cpu). ``patches`` holds the few changes upstream's entry points cannot make.
"""

__version__ = "0.1.0"


def register() -> str:
    """vllm.platform_plugins entry point: the Neuron platform, always active when installed."""
    from vllm_neuronx.patches import apply_all

    apply_all()
    return "vllm_neuronx.platform.NeuronPlatform"


def register_patches() -> None:
    """vllm.general_plugins entry point (every process, before args are parsed)."""
    from vllm_neuronx import quantization
    from vllm_neuronx.patches import apply_all

    apply_all()
    quantization.register()
