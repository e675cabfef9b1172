"""A CPU simulator of the parts of NxD Inference (neuronx-distributed-inference) that
vllm_neuronx.backends.nxdi calls, for tests on machines without Neuron devices.

Same module paths, class names and signatures as NxDI, so the backend under test
runs unchanged. It is stricter than NxDI on purpose: what NxDI accepts silently
(unknown NeuronConfig keys) or what would only misbehave on a device (unsorted
seq_ids, mixed prefill/decode rows, decoding a KV line at the wrong position) is
an error here. The numbers come from vllm_neuronx's CPU Llama, so tokens are real.

Tests put ``tests/simulators`` first on ``sys.path`` and read the counters below
to prove the simulator was the path taken.
"""

from __future__ import annotations

from collections import deque

__version__ = "0.0.0+simulator"

#: How often each entry point ran in this process.
SIM_CALLS: dict[str, int] = {
    "compile": 0,
    "load": 0,
    "forward": 0,
    "save_quantized_state_dict": 0,
}

#: The most recent forward calls, oldest first: what reached "the device".
SIM_FORWARDS: deque[dict] = deque(maxlen=4096)

#: Each load in this process, oldest first: the ranks it put on "this node" (tp_degree,
#: world_size, local_ranks_size, start_rank_id, ranks, and NEURON_RT_ROOT_COMM_ID).
SIM_LOADS: list[dict] = []


def reset_simulator() -> None:
    """Zero the counters and forget recorded forward calls."""
    for key in SIM_CALLS:
        SIM_CALLS[key] = 0
    SIM_FORWARDS.clear()
    SIM_LOADS.clear()
