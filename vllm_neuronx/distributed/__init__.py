"""Several processes running one model: tensor-parallel ranks of the CPU backend, or
the nodes of a multi-node NxDI model.

topology (who runs what, from settings and environment) -> group (gloo between the
processes) -> leader (rank 0: vLLM's process, broadcasting each step's call) and
follower (every other rank, running the same call on its own backend).
"""
