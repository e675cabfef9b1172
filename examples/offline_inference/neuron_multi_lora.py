# Multi-LoRA offline: one base model, several PEFT LoRA adapters, the adapter chosen per
# request (vLLM's LoRARequest). The example writes two random adapters for the model itself
# (PEFT's folder layout, with torch and safetensors only), so they change the text, not
# improve it: use your own fine-tuned adapter folders instead. On a machine without Neuron
# devices it runs on vllm-neuronx's CPU backend (one warning says so).
# Usage: python examples/offline_inference/neuron_multi_lora.py [MODEL_FOLDER]
import json
import os
import shutil
import sys
import tempfile

os.environ["VLLM_NEURON_FRAMEWORK"] = "neuronx-distributed-inference"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

from vllm_neuronx.default_model import default_model_path  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()


def write_random_adapter(folder, seed, targets, rank=8, alpha=16):
    """A PEFT LoRA folder for ``model``: adapter_config.json and adapter_model.safetensors
    with lora_A [rank, in] and lora_B [out, rank] for each target projection of each layer."""
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    shapes = {  # projection: (section, in, out)
        "q_proj": ("self_attn", hidden, heads * head_dim),
        "k_proj": ("self_attn", hidden, kv_heads * head_dim),
        "v_proj": ("self_attn", hidden, kv_heads * head_dim),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj in targets:
            section, fan_in, fan_out = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.{section}.{proj}"
            a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=generator) * 0.1
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(targets), "bias": "none", "lora_dropout": 0.0,
              "base_model_name_or_path": model}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


adapters_root = tempfile.mkdtemp(prefix="neuron-multi-lora-")
attention_and_mlp = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
# A LoRARequest names an adapter, gives it a unique integer id (> 0) and its folder.
adapter_1 = LoRARequest("adapter-1", 1, write_random_adapter(
    os.path.join(adapters_root, "adapter-1"), seed=1, targets=attention_and_mlp))
adapter_2 = LoRARequest("adapter-2", 2, write_random_adapter(
    os.path.join(adapters_root, "adapter-2"), seed=2, targets=("q_proj", "v_proj")))

# Sample prompts: each runs with the first adapter, the second, and the base model.
prompts = ["The capital of France is", "The future of AI is"]
lora_requests = [adapter_1, adapter_2, None]
# Create a sampling params object (greedy).
sampling_params = SamplingParams(top_k=1, max_tokens=24)

# Create an LLM with LoRA on: up to max_loras adapters in one batch, of rank up to
# max_lora_rank; up to max_cpu_loras (default: max_loras) stay loaded on the host.
llm = LLM(
    model=model,
    max_num_seqs=4,
    max_model_len=128,
    device="neuron",
    tensor_parallel_size=2,
    enable_lora=True,
    max_loras=2,
    max_lora_rank=8,
)
# One generate call mixes both adapters and the base model: a list gives each prompt
# its own LoRARequest (None: the base model); a single one applies to every prompt.
batch = [(prompt, lora) for prompt in prompts for lora in lora_requests]
outputs = llm.generate([prompt for prompt, _ in batch], sampling_params,
                       lora_request=[lora for _, lora in batch])
# Print the outputs, each with its adapter.
for output, (_, lora) in zip(outputs, batch, strict=True):
    adapter = lora.lora_name if lora is not None else "base model"
    print(f"Prompt: {output.prompt!r}, Adapter: {adapter}, "
          f"Generated text: {output.outputs[0].text!r}")
# The random adapters were for this run only.
shutil.rmtree(adapters_root, ignore_errors=True)
