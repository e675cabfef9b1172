#!/usr/bin/env bash
# Serve one model over NNODES machines with torchrun. Run this same script on every node,
# changing only NODE_RANK (0 on the node whose OpenAI server clients will call).
# Edit the values below, or set them in the environment; extra arguments go to vLLM.
set -euo pipefail

NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-10.0.0.1}   # node 0's address, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}      # torchrun's store; launch.py also uses +1 and +2
MODEL=${MODEL:-/models/Meta-Llama-3.1-405B-Instruct}  # the same path on every node
PYTHON=${PYTHON:-python3}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/mode.sh"  # NEURON_CORES_PER_NODE or PROCS_PER_NODE -> LAUNCH_OPTS

# Static rendezvous on MASTER_ADDR:MASTER_PORT; launch.py then execs vLLM's OpenAI server
# (rank 0) or vllm_neuronx.distributed.follower (every other rank) with the same arguments.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$PROCS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$HERE/launch.py" ${LAUNCH_OPTS[@]+"${LAUNCH_OPTS[@]}"} -- \
    --model "$MODEL" \
    --max-num-seqs 4 \
    --max-model-len 4096 \
    --port 8000 \
    "$@"
