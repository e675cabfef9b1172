# Speculative decoding offline, fused as NxDI runs it: each step a draft proposes
# num_speculative_tokens tokens and the model verifies them all in one pass, keeping the
# longest agreeing run plus its own next token, so the text is the model's own (greedy:
# token for token). By default the model drafts for itself from int8 weights (NxDI's
# draft_model_modules_to_not_convert quantizes only the draft; vllm_neuronx.drafts), which
# agrees with it on most tokens. Pass a draft folder to use another draft model: a trained
# small sibling of the family (e.g. Llama-3.2-1B for Llama-3.1-70B) on a Neuron device.
# vLLM's metrics report the acceptance. On a machine without Neuron devices it runs on
# vllm-neuronx's CPU backend.
# Usage: python examples/offline_inference/neuron_speculation.py [MODEL] [DRAFT]
import os
import sys

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402
from vllm_neuronx.drafts import INT8_DRAFT  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
draft = sys.argv[2] if len(sys.argv) > 2 else None

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
    speculative_config={"model": draft or model, "num_speculative_tokens": 3},
    override_neuron_config=None if draft else INT8_DRAFT,
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
