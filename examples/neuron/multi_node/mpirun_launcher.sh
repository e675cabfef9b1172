#!/usr/bin/env bash
# Serve one model over several machines with OpenMPI's mpirun. Run it once, on the node
# that will serve (the first of HOSTS); mpirun starts the processes on every host over ssh,
# so the python environment, this folder and the model must be at the same paths on all.
# Edit the values below, or set them in the environment; extra arguments go to vLLM.
set -euo pipefail

HOSTS=${HOSTS:-node0,node1}              # comma separated; the first runs the server (rank 0)
MASTER_ADDR=${MASTER_ADDR:-${HOSTS%%,*}} # rank 0's address as the other hosts reach it
MASTER_PORT=${MASTER_PORT:-29500}        # launch.py uses +1 (rank group) and +2 (Neuron runtime)
MODEL=${MODEL:-/models/Meta-Llama-3.1-405B-Instruct}
PYTHON=${PYTHON:-python3}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/mode.sh"  # NEURON_CORES_PER_NODE or PROCS_PER_NODE -> LAUNCH_OPTS

# host:slots for each host; by-slot mapping fills a host before the next, so ranks
# 0..PROCS_PER_NODE-1 land on the first host (launch.py takes node = rank // per-host).
HOST_SLOTS=""
for host in ${HOSTS//,/ }; do
    HOST_SLOTS+="${HOST_SLOTS:+,}$host:$PROCS_PER_NODE"
done
NP=$(( $(tr ',' '\n' <<< "$HOSTS" | grep -c .) * PROCS_PER_NODE ))

# -x forwards a variable to the remote hosts (only those set here are forwarded).
export MASTER_ADDR MASTER_PORT
FORWARD=()
for var in MASTER_ADDR MASTER_PORT FI_PROVIDER FI_EFA_USE_DEVICE_RDMA FI_EFA_FORK_SAFE \
        PATH LD_LIBRARY_PATH VLLM_NEURON_FRAMEWORK NEURON_COMPILED_ARTIFACTS; do
    if [[ -n "${!var:-}" ]]; then FORWARD+=(-x "$var"); fi
done

# --bind-to none: mpirun would otherwise pin each process to one core, starving the
# server's threads and the CPU backend's matmuls.
exec mpirun -np "$NP" --host "$HOST_SLOTS" --map-by slot --bind-to none "${FORWARD[@]}" \
    "$PYTHON" "$HERE/launch.py" ${LAUNCH_OPTS[@]+"${LAUNCH_OPTS[@]}"} -- \
    --model "$MODEL" \
    --max-num-seqs 4 \
    --max-model-len 4096 \
    --port 8000 \
    "$@"
