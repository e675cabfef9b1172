# Sourced by torchrun_launcher.sh and mpirun_launcher.sh: which backend's process layout.
# NxDI: one process per node drives NEURON_CORES_PER_NODE NeuronCores (trn1.32xlarge: 32;
# trn2.48xlarge at the default logical core size 2: 64); tp_degree becomes nodes x this.
# Set it empty to try the CPU backend instead: PROCS_PER_NODE processes per node, one per
# tensor-parallel rank (tp_degree = nodes x PROCS_PER_NODE).
NEURON_CORES_PER_NODE=${NEURON_CORES_PER_NODE-32}
PROCS_PER_NODE=${PROCS_PER_NODE:-1}

LAUNCH_OPTS=()
if [[ -n "$NEURON_CORES_PER_NODE" ]]; then
    LAUNCH_OPTS=(--neuron-cores-per-node "$NEURON_CORES_PER_NODE")
    PROCS_PER_NODE=1
    # Inter-node collectives of the Neuron runtime go over EFA (libfabric's efa provider).
    export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 FI_EFA_FORK_SAFE=1
fi
