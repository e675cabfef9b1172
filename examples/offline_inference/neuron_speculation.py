# Speculative decoding offline with a draft model, fused as NxDI runs it: each step the
# draft proposes num_speculative_tokens tokens and the model verifies them all in one pass,
# keeping the longest agreeing run plus its own next token, so the text is the model's own
# (greedy: token for token). The example makes its draft from the model itself, its first
# 6 layers; a trained small sibling of the family (e.g. Llama-3.2-1B for Llama-3.1-70B)
# agrees with the target more often and gains more. vLLM's metrics report the acceptance.
# On a machine without Neuron devices it runs on vllm-neuronx's CPU backend.
# Usage: python examples/offline_inference/neuron_speculation.py [MODEL] [DRAFT]
import os
import sys
import tempfile

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402
from vllm_neuronx.drafts import first_layers_draft  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
draft = sys.argv[2] if len(sys.argv) > 2 else first_layers_draft(
    model, os.path.join(tempfile.gettempdir(), "neuron-speculation-draft"), num_layers=6)

prompts = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List the first five prime numbers.",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0, max_tokens=48)

llm = LLM(
    model=model,
    max_num_seqs=4,
    max_model_len=256,
    device="neuron",
    speculative_config={"model": draft, "num_speculative_tokens": 4},
    disable_log_stats=False,
)
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")

counts = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
          if m.name.startswith("vllm:spec_decode")}
drafted = counts.get("vllm:spec_decode_num_draft_tokens") or 0
accepted = counts.get("vllm:spec_decode_num_accepted_tokens") or 0
if drafted:
    print(f"Speculation: {accepted} of {drafted} proposed tokens accepted "
          f"({accepted / drafted:.0%})")
