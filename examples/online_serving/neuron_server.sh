#!/usr/bin/env bash
# The vLLM-on-Neuron user guide's server command, on the default model (SmolLM2-135M-Instruct).
# Without Neuron devices it runs on vllm-neuronx's CPU backend. Extra flags are passed through.
MODEL=${MODEL:-$(python -m vllm_neuronx.default_model)}
VLLM_NEURON_FRAMEWORK=${VLLM_NEURON_FRAMEWORK:-neuronx-distributed-inference} \
exec python -m vllm.entrypoints.openai.api_server \
    --model="$MODEL" \
    --max-num-seqs=4 \
    --max-model-len=128 \
    --tensor-parallel-size=8 \
    --port=${PORT:-8080} \
    --device "neuron" \
    --override-neuron-config "{\"enable_bucketing\":false}" \
    "$@"
