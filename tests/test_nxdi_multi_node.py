"""NxDI multi-node against the NxDI simulator: the backend of one node (tp_degree the total
of ranks, local_ranks_size and start_rank_id its share) gives NxDI's NeuronConfig its keys,
compiles, loads its ranks and computes what every other node computes; keys that no set of
nodes could run are refused by name, by the backend and by the simulator (as a device
would fail). The two-node run through rank 0's OpenAI server is tests/test_multi_node*."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import hf_greedy
from tests.engine_checks import prefill_args, use_nxdi_simulator
from vllm_neuronx import neuron_config as nc

TP = 4  # the total of ranks: two nodes of LOCAL ranks
LOCAL = 2
ROOT = "127.0.0.1:45654"


@pytest.fixture(scope="module", autouse=True)
def sim():
    yield from use_nxdi_simulator()


@pytest.fixture
def root_comm(monkeypatch):
    monkeypatch.setenv("NEURON_RT_ROOT_COMM_ID", ROOT)


def node_overrides(node: int, *, local: int = LOCAL) -> dict:
    """What a launcher puts into override_neuron_config on ``node`` (tp_degree, the total,
    comes from tensor_parallel_size)."""
    return {"local_ranks_size": local, "start_rank_id": node * local}


def make_node(model_path, folder=None, *, overrides=None, tp=TP, **kw):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = nc.resolve_neuron_config(tp_degree=tp, max_num_seqs=2, max_model_len=64,
                                   dtype="float32", overrides=overrides, **kw)
    backend = NxdiBackend(str(model_path), cfg)
    if folder is not None:
        backend.compile(str(folder))
        backend.load(str(folder))
    return backend


def greedy(n: int) -> torch.Tensor:
    return torch.tensor([[1, 1.0, 1.0]] * n)


def generate(backend, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens: a prefill, then ``steps - 1`` decodes, as the runner calls them."""
    ids, pos, _ = prefill_args(prompts)
    lines = torch.arange(len(prompts))
    seqs = [p + [t] for p, t in zip(prompts, backend.forward(ids, pos, lines, greedy(
        len(prompts))).tokens.tolist(), strict=True)]
    for _ in range(steps - 1):
        out = backend.forward(torch.tensor([[s[-1]] for s in seqs]),
                              torch.tensor([[len(s) - 1] for s in seqs]), lines,
                              greedy(len(prompts))).tokens
        for s, t in zip(seqs, out.tolist(), strict=True):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


# -- two nodes ------------------------------------------------------------------------------------
def test_node_one_of_two_loads_its_ranks_and_computes_what_node_zero_does(sim, tiny_llama,
                                                                          tmp_path, root_comm):
    nodes = [make_node(tiny_llama, tmp_path / f"node{n}", overrides=node_overrides(n))
             for n in (0, 1)]
    for n, backend in enumerate(nodes):
        got = backend.config.neuron_config  # the keys reached NxDI's NeuronConfig
        assert (got.tp_degree, got.world_size, got.local_ranks_size, got.start_rank_id) == (
            TP, TP, LOCAL, n * LOCAL)
        saved = json.loads((tmp_path / f"node{n}" / "neuron_config.json").read_text())
        assert saved["neuron_config"]["start_rank_id"] == n * LOCAL
        assert saved["neuron_config"]["local_ranks_size"] == LOCAL
        assert (backend.rank_layout.node, backend.rank_layout.nodes) == (n, 2)
    assert list(sim.SIM_LOADS)[-2:] == [
        {"tp_degree": TP, "world_size": TP, "local_ranks_size": LOCAL, "start_rank_id": n * LOCAL,
         "ranks": [n * LOCAL, n * LOCAL + 1], "NEURON_RT_ROOT_COMM_ID": ROOT} for n in (0, 1)]
    prompts = [[5, 6, 7, 8], [9, 10]]
    tokens = [generate(backend, prompts, 6) for backend in nodes]
    assert tokens[0] == tokens[1] == hf_greedy(tiny_llama, prompts, [6, 6])


def test_single_node_gets_nxdi_defaults_and_needs_no_root_comm(sim, tiny_llama, tmp_path,
                                                               monkeypatch):
    monkeypatch.delenv("NEURON_RT_ROOT_COMM_ID", raising=False)
    backend = make_node(tiny_llama, tmp_path)
    assert "start_rank_id" not in backend.neuron_config  # NxDI's defaults, not ours
    got = backend.config.neuron_config
    assert (got.world_size, got.local_ranks_size, got.start_rank_id) == (TP, TP, 0)
    assert sim.SIM_LOADS[-1]["ranks"] == [0, 1, 2, 3]
    assert (backend.rank_layout.node, backend.rank_layout.nodes) == (0, 1)


def test_a_node_needs_the_runtime_root_comm_id(sim, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("NEURON_RT_ROOT_COMM_ID", raising=False)
    backend = make_node(tiny_llama, overrides=node_overrides(1))
    backend.compile(str(tmp_path))  # compiling needs no runtime
    with pytest.raises(nc.NeuronConfigError, match="NEURON_RT_ROOT_COMM_ID=''.*host:port"):
        backend.load(str(tmp_path))
    monkeypatch.setenv("NEURON_RT_ROOT_COMM_ID", "node0")  # no port
    with pytest.raises(nc.NeuronConfigError, match="NEURON_RT_ROOT_COMM_ID='node0'"):
        backend.load(str(tmp_path))
    # the simulator refuses it too, as the runtime would
    with pytest.raises(RuntimeError, match="NEURON_RT_ROOT_COMM_ID='node0'"):
        backend.model.load(str(tmp_path))
    monkeypatch.setenv("NEURON_RT_ROOT_COMM_ID", "[fd00::1]:45654")
    backend.load(str(tmp_path))
    assert sim.SIM_LOADS[-1]["start_rank_id"] == 2


@pytest.mark.parametrize("overrides, message", [
    ({"local_ranks_size": 3}, "local_ranks_size=3 does not divide tp_degree=4"),
    ({"local_ranks_size": 2, "start_rank_id": 1},
     "start_rank_id=1 is not a multiple of local_ranks_size=2"),
    ({"local_ranks_size": 2, "start_rank_id": 4}, "start_rank_id=4 .* past the last rank 3"),
    ({"start_rank_id": 2}, "start_rank_id=2 is not a multiple of local_ranks_size=4: .*"
                           "local_ranks_size was left out"),
    ({"start_rank_id": 4}, "start_rank_id=4 with local_ranks_size=4 .* past the last rank 3"),
    ({"local_ranks_size": 8}, "local_ranks_size=8 does not divide tp_degree=4"),
    ({"local_ranks_size": 0}, "local_ranks_size=0 must be a positive integer"),
    ({"local_ranks_size": True}, "local_ranks_size=True must be a positive integer"),
    ({"start_rank_id": -2, "local_ranks_size": 2}, "start_rank_id=-2 must be a non-negative"),
    ({"world_size": 8, "local_ranks_size": 4}, "world_size=8 with tp_degree=4"),
])
def test_inconsistent_rank_keys_are_refused_by_name(tiny_llama, overrides, message):
    from vllm_neuronx.backends.nxdi import NxdiBackend

    cfg = nc.resolve_neuron_config(tp_degree=TP, max_num_seqs=2, max_model_len=64,
                                   dtype="float32", overrides=overrides)
    with pytest.raises(nc.NeuronConfigError, match=message):
        NxdiBackend.validate(cfg)
    with pytest.raises(nc.NeuronConfigError, match=message):
        NxdiBackend(str(tiny_llama), cfg)


def test_check_process_ties_a_node_to_its_process(tiny_llama):
    from vllm_neuronx.backends.nxdi import RankLayout

    layout = RankLayout.of({"tp_degree": 8, "local_ranks_size": 4, "start_rank_id": 4})
    layout.check_process(1, 2)
    with pytest.raises(nc.NeuronConfigError, match="set start_rank_id=0 and local_ranks_size=4"):
        layout.check_process(0, 2)
    with pytest.raises(nc.NeuronConfigError, match="node 1 of 2: set start_rank_id=2 and "
                                                   "local_ranks_size=2"):
        layout.check_process(1, 4)
    with pytest.raises(nc.NeuronConfigError, match="not a multiple of 3 nodes"):
        layout.check_process(1, 3)


# -- artifacts across nodes -----------------------------------------------------------------------
def test_artifacts_of_another_node_load_unless_presharded(sim, tiny_llama, tmp_path, root_comm):
    """NxDI shards the weights on load for the loading node's ranks, so node 0's folder
    serves node 1; save_sharded_checkpoint keeps only the compiling node's shards."""
    make_node(tiny_llama, tmp_path / "node0", overrides=node_overrides(0))
    node1 = make_node(tiny_llama, overrides=node_overrides(1))
    node1.load(str(tmp_path / "node0"))
    assert sim.SIM_LOADS[-1]["ranks"] == [2, 3]
    presharded = {"save_sharded_checkpoint": True}
    make_node(tiny_llama, tmp_path / "pre0", overrides={**node_overrides(0), **presharded})
    assert sorted(p.name for p in (tmp_path / "pre0" / "weights").iterdir()) == [
        "tp0_sharded_checkpoint.safetensors", "tp1_sharded_checkpoint.safetensors"]
    node1 = make_node(tiny_llama, overrides={**node_overrides(1), **presharded})
    with pytest.raises(FileNotFoundError, match="tp2_sharded_checkpoint"):
        node1.load(str(tmp_path / "pre0"))
    # a folder compiled for one node of all the ranks is another graph
    make_node(tiny_llama, tmp_path / "whole")
    with pytest.raises(ValueError, match=r"local_ranks_size': \(4, 2\)"):
        make_node(tiny_llama, overrides=node_overrides(1)).load(str(tmp_path / "whole"))


def test_the_simulator_enforces_nxdi_ranks(sim, tiny_llama, tmp_path, root_comm):
    """Without the backend's checks, the simulator refuses what NxD could not run."""
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    cls = NeuronLlamaForCausalLM

    def app(**ranks):
        neuron_config = cls.get_neuron_config_cls()(
            batch_size=1, seq_len=64, torch_dtype="float32", tp_degree=TP, **ranks)
        config = cls.get_config_cls()(neuron_config,
                                      load_config=load_pretrained_config(tiny_llama),
                                      rope_theta=10000.0)
        return cls(tiny_llama, config)

    for ranks, error, message in (
        ({"local_ranks_size": 2, "start_rank_id": 1}, ValueError,
         "start_rank_id=1 is not a multiple of local_ranks_size=2"),
        ({"local_ranks_size": 3}, ValueError, "local_ranks_size=3 does not divide"),
        ({"local_ranks_size": 2, "start_rank_id": 4}, ValueError, "goes past world_size=4"),
        ({"world_size": 6}, RuntimeError, r"`world_size` \(6\) is not divisible"),
        ({"world_size": 8}, NotImplementedError, "no data parallelism"),
    ):
        with pytest.raises(error, match=message):
            app(**ranks).compile(str(tmp_path / "refused"))
    model = app(local_ranks_size=2, start_rank_id=2)
    model.compile(str(tmp_path))
    with pytest.raises(ValueError, match=r"load\(start_rank_id=0\) differs"):
        model.load(str(tmp_path), start_rank_id=0)
    with pytest.raises(ValueError, match=r"load\(local_ranks_size=4\)"):
        model.load(str(tmp_path), start_rank_id=0, local_ranks_size=4)
    model.load(str(tmp_path), start_rank_id=2, local_ranks_size=2)
    assert sim.SIM_LOADS[-1]["ranks"] == [2, 3]
