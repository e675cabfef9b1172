"""A CPU simulator of transformers-neuronx (TNx), for tests only.

Importable as ``transformers_neuronx`` when ``tests/simulators`` is on sys.path.
It offers exactly the modules, classes and signatures that
``vllm_neuronx/backends/tnx.py`` uses, with TNx's continuous-batching semantics
(as read from aws-neuron/transformers-neuronx, release of Dec 2024):

- ``from_pretrained(path, **kwargs)`` builds the model object; ``to_neuron()``
  loads the weights and compiles (or, after ``load(dir)``, reads the compiled
  graphs that ``save(dir)`` wrote, one file per graph, named by a hash of it).
- ``model(input_ids, cache_ids=, start_ids=)``: a width > 1 call whose first
  cache id is 0 is context encoding (one sequence at a time, padded to the
  smallest context bucket >= its width); a width-1 call is token generation,
  padded to the full batch: lines not in ``start_ids`` run with token 0 at
  position 0, so their position 0 is overwritten, as on the device.
- Per-line sampling parameters (``GenerationConfig(per_batch_line=True)``) are
  indexed by KV line (the seq id), and pushed with ``update_generation_config``.

It is stricter than TNx where a violation would silently corrupt results:
unknown keyword arguments, forward before ``to_neuron``, seq ids out of range,
duplicated or (for decode) unsorted, cache ids that do not continue a line,
prompts longer than the largest context bucket, positions past the largest
token bucket, sampling values out of range. Features the simulator does not
model raise ``NotImplementedError`` instead of being ignored.

The numbers come from vllm-neuronx's own CPU Llama, so tokens are real.
``SIM_CALLS`` counts what was called, so tests can prove this path ran.
"""

from transformers_neuronx._sim_state import SIM_CALLS, SimulatorError, reset_counters
from transformers_neuronx.config import (
    ContinuousBatchingConfig,
    GenerationConfig,
    NeuronConfig,
    QuantizationConfig,
)
from transformers_neuronx.constants import LAYOUT_BSH, LAYOUT_HSB, LAYOUT_SBH
from transformers_neuronx.llama.model import LlamaForSampling
from transformers_neuronx.mistral.model import MistralForSampling

__version__ = "0.13.0+vllm-neuronx-simulator"

__all__ = [
    "ContinuousBatchingConfig",
    "GenerationConfig",
    "LAYOUT_BSH",
    "LAYOUT_HSB",
    "LAYOUT_SBH",
    "LlamaForSampling",
    "MistralForSampling",
    "NeuronConfig",
    "QuantizationConfig",
    "SIM_CALLS",
    "SimulatorError",
    "reset_counters",
]
