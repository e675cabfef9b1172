# The vLLM-on-Neuron user guide's offline quickstart, as written there, with the
# model swapped for one that ships offline. On a machine without Neuron devices
# it runs on vllm-neuronx's CPU backend (one warning says so).
# Usage: python examples/offline_inference/neuron.py [MODEL]
import os
import sys

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(top_k=1, max_tokens=32)

# Create an LLM.
llm = LLM(
    model=model,
    max_num_seqs=4,
    max_model_len=128,
    device="neuron",
    tensor_parallel_size=2,
)
# Generate texts from the prompts. The output is a list of RequestOutput objects
# that contain the prompt, generated text, and other information.
outputs = llm.generate(prompts, sampling_params)
# Print the outputs.
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
