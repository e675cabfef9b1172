# EAGLE speculative decoding offline, fused as NxDI runs it: a small head reads the model's
# own features (its final hidden state) with the next token and proposes the tokens after
# it; the model verifies every proposal in one pass, so the text is the model's own. Pass a
# trained EAGLE head for your model (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B with
# Llama-3-8B-Instruct; NxDI wants the model's lm_head inside the head's checkpoint). Without
# one the example makes a head from the model's first layer (vllm_neuronx.drafts): it runs
# the whole EAGLE path but, untrained, agrees with the model on few tokens. On a machine
# without Neuron devices it runs on vllm-neuronx's CPU backend.
# Usage: python examples/offline_inference/neuron_eagle.py [MODEL] [EAGLE_HEAD]
import os
import sys
import tempfile

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402
from vllm_neuronx.drafts import eagle_head_from_first_layer  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
head = sys.argv[2] if len(sys.argv) > 2 else eagle_head_from_first_layer(
    model, os.path.join(tempfile.gettempdir(), "neuron-eagle-head"))

prompts = [
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0, max_tokens=32)

llm = LLM(
    model=model,
    max_num_seqs=2,
    max_model_len=256,
    device="neuron",
    speculative_config={"method": "eagle", "model": head, "num_speculative_tokens": 3},
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
