"""The rank group: who runs what (pure), and the wire between processes (real gloo over
real processes on this machine): calls, collectives, a rank that dies or hangs."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from vllm_neuronx import neuron_config as nc
from vllm_neuronx.distributed import topology as topo
from vllm_neuronx.distributed.group import RankFailure, RankGroup, free_port


def cfg(**keys):
    return {"tp_degree": 1, "batch_size": 2, "seq_len": 64, **keys}


# -- topology (pure) -------------------------------------------------------------------
def test_one_process_needs_no_group():
    assert topo.resolve("cpu", cfg(), {}) is None
    assert topo.resolve("nxdi", cfg(tp_degree=32), {}) is None  # NxDI shards in-process


def test_cpu_ranks_are_started_by_the_leader_without_a_launcher():
    t = topo.resolve("cpu", cfg(tp_degree=4), {})
    assert (t.rank, t.world, t.spawn, t.master) == (0, 4, True, None)


def test_processes_per_backend():
    two_nodes = cfg(tp_degree=64, local_ranks_size=32)
    assert topo.processes("nxdi", two_nodes) == 2
    assert topo.processes("cpu", cfg(tp_degree=4, local_ranks_size=2)) == 4


def test_launcher_environment():
    env = {"VLLM_NEURONX_RANK": "1", "VLLM_NEURONX_WORLD_SIZE": "2",
           "VLLM_NEURONX_MASTER": "10.0.0.1:29501"}
    t = topo.resolve("nxdi", cfg(tp_degree=64, local_ranks_size=32, start_rank_id=32), env)
    assert (t.rank, t.world, t.spawn, t.master) == (1, 2, False, "10.0.0.1:29501")


@pytest.mark.parametrize("keys, env, named", [
    (cfg(tp_degree=64, local_ranks_size=32), {}, "launch.py"),
    (cfg(tp_degree=6, local_ranks_size=4), {}, "whole number of nodes"),
    (cfg(tp_degree=8, local_ranks_size=4, start_rank_id=2), {}, "start_rank_id=2"),
    (cfg(tp_degree=4), {"VLLM_NEURONX_WORLD_SIZE": "2", "VLLM_NEURONX_RANK": "0",
                        "VLLM_NEURONX_MASTER": "h:1"}, "VLLM_NEURONX_WORLD_SIZE=2"),
    (cfg(tp_degree=2), {"VLLM_NEURONX_WORLD_SIZE": "2"}, "VLLM_NEURONX_RANK"),
    (cfg(tp_degree=2), {"VLLM_NEURONX_WORLD_SIZE": "2", "VLLM_NEURONX_RANK": "2",
                        "VLLM_NEURONX_MASTER": "h:1"}, "VLLM_NEURONX_RANK=2"),
    (cfg(tp_degree=2), {"VLLM_NEURONX_WORLD_SIZE": "2", "VLLM_NEURONX_RANK": "1"},
     "VLLM_NEURONX_MASTER"),
])
def test_inconsistent_topologies_are_named(keys, env, named):
    backend = "cpu" if "local_ranks_size" not in keys else "nxdi"
    with pytest.raises(nc.NeuronConfigError, match=named):
        topo.resolve(backend, keys, env)


def test_what_a_group_does_not_run_is_refused_by_name():
    with pytest.raises(nc.NeuronConfigError, match="speculative decoding"):
        topo.check_served("cpu", cfg(tp_degree=2), draft=True)
    with pytest.raises(nc.NeuronConfigError, match="transformers-neuronx runs on one node"):
        topo.check_served("tnx", cfg(tp_degree=64, local_ranks_size=32), draft=False)
    topo.check_served("nxdi", cfg(tp_degree=32), draft=True)  # one process


def test_fingerprint_skips_what_differs_by_node(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    a = topo.fingerprint("nxdi", cfg(tp_degree=4, start_rank_id=0), str(tmp_path))
    b = topo.fingerprint("nxdi", cfg(tp_degree=4, start_rank_id=2), str(tmp_path))
    c = topo.fingerprint("nxdi", cfg(tp_degree=2, start_rank_id=2), str(tmp_path))
    assert topo.differences(a, b) == []
    assert topo.differences(a, c) == ["tp_degree: 4 != 2"]


# -- the wire (processes) -----------------------------------------------------------------
def _rank_main(rank: int, world: int, master: str, script: str, out) -> None:
    import os

    # 3 s for the scripts that time a failure; the calls' script only moves data, and on a
    # loaded 2-core machine 3 processes may take longer than 3 s between two collectives.
    os.environ["VLLM_NEURONX_RANK_TIMEOUT"] = "30" if script == "calls" else "3"
    group = RankGroup(topo.Topology(rank, world, master, False), master)
    result = {"rank": rank}
    start = time.monotonic()  # a failure says how long after, whatever the script
    try:
        if script == "calls":
            big = torch.arange(50_000)  # past the first broadcast's bytes
            for call in (("forward", (torch.ones(2, 3),), {"blocks": None}), ("x", (big,), {}),
                         None):
                got = group.send(call) if rank == 0 else group.receive()
                if rank:
                    result.setdefault("calls", []).append(got)
            x = torch.full((3,), float(rank + 1))
            result["sum"] = group.all_reduce(x).tolist()
            result["gathered"] = group.all_gather(torch.full((1, 2), float(rank))).tolist()
            result["objects"] = group.all_gather_object({"r": rank})
            result["failed"] = group.agree(rank == 1)
        elif script == "rank 1 dies":
            if rank == 1:
                os._exit(3)
            start = time.monotonic()
            group.all_reduce(torch.ones(4))
        elif script == "rank 1 hangs":
            if rank == 1:
                time.sleep(30)
            start = time.monotonic()
            group.all_reduce(torch.ones(4))
        elif script == "leader dies":
            if rank == 0:
                os._exit(0)
            start = time.monotonic()
            group.receive()
    except RankFailure as e:
        result["error"] = str(e)
        result["after"] = time.monotonic() - start
    out.put(result)


def _run(world: int, script: str, wait_for=None, timeout: float = 60) -> dict[int, dict]:
    """Each rank's result; waits for ``wait_for``'s (default: every rank's) only."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    master = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, master, script, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    wanted = set(range(world) if wait_for is None else wait_for)
    while not wanted <= set(results) and time.monotonic() < deadline:
        try:
            r = out.get(timeout=1)
            results[r["rank"]] = r
        except Exception:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.kill()
        p.join()
    while not out.empty():
        r = out.get()
        results[r["rank"]] = r
    return results


def test_calls_and_collectives_across_three_processes():
    results = _run(3, "calls")
    assert set(results) == {0, 1, 2}
    for rank in (1, 2):
        calls = results[rank]["calls"]
        assert calls[0][0] == "forward" and torch.equal(calls[0][1][0], torch.ones(2, 3))
        assert torch.equal(calls[1][1][0], torch.arange(50_000))
        assert calls[2] is None
    for r in results.values():
        assert r["sum"] == [6.0, 6.0, 6.0]
        assert r["gathered"] == [[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]
        assert r["objects"] == [{"r": 0}, {"r": 1}, {"r": 2}]
        assert r["failed"] == [1]


def test_a_rank_that_dies_fails_the_others_at_once():
    r = _run(2, "rank 1 dies", wait_for=[0])[0]
    assert "all-reduce across 2 ranks failed" in r["error"] and r["after"] < 3


def test_a_rank_that_hangs_fails_the_others_within_the_timeout():
    r = _run(2, "rank 1 hangs", wait_for=[0])[0]
    assert "VLLM_NEURONX_RANK_TIMEOUT=3" in r["error"] and 2.5 < r["after"] < 10


def test_a_follower_learns_that_the_leader_is_gone():
    r = _run(2, "leader dies", wait_for=[1])[1]
    assert "the leader (rank 0) is gone" in r["error"] and r["after"] < 5
