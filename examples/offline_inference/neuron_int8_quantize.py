# The offline quickstart with the model's weights quantized to int8. vLLM's
# --quantization stays unset: NxDI quantizes through the neuron config's keys. On a
# machine without Neuron devices it runs on vllm-neuronx's CPU backend (one warning
# says so), which quantizes from the same keys.
# Usage: python examples/offline_inference/neuron_int8_quantize.py [MODEL_FOLDER]
import os
import sys

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
# On the first start NxDI quantizes the model's weights into this file (a folder would
# get safetensors files) before compiling; later starts read it from there. The CPU
# backend keeps its quantized weights with its compiled artifacts instead.
quantized_checkpoint = model.rstrip("/") + "-int8-per-channel.pt"

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object (greedy).
sampling_params = SamplingParams(top_k=1, max_tokens=32)

# Create an LLM whose linear layers hold int8 weights, one scale per output channel.
# The embedding stays in the model's dtype. To keep a layer in float too, list it, e.g.
# "modules_to_not_convert": ["lm_head"].
llm = LLM(
    model=model,
    max_num_seqs=4,
    max_model_len=128,
    device="neuron",
    tensor_parallel_size=2,
    override_neuron_config={
        "quantized": True,
        "quantized_checkpoints_path": quantized_checkpoint,
        "quantization_type": "per_channel_symmetric",
        "quantization_dtype": "int8",
    },
)
# Generate texts from the prompts. The output is a list of RequestOutput objects
# that contain the prompt, generated text, and other information.
outputs = llm.generate(prompts, sampling_params)
# Print the outputs.
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
