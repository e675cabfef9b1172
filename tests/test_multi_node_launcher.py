"""The multi-node launcher's plan (examples/neuron/multi_node/launch.py), without processes.

Each case is one node's view: the environment torchrun or OpenMPI's mpirun gives a
process, and vLLM's arguments; the plan says what that process becomes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent / "examples" / "neuron" / "multi_node"


def _load_launch():
    spec = importlib.util.spec_from_file_location("multi_node_launch", HERE / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


launch = _load_launch()

SERVE = ["--model", "/models/llama", "--max-num-seqs", "4"]


def torchrun_env(rank: int, world: int, local_world: int, **extra) -> dict[str, str]:
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % local_world,
           "LOCAL_WORLD_SIZE": local_world, "GROUP_RANK": rank // local_world,
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": 29500, **extra}
    return {k: str(v) for k, v in env.items()}


def mpirun_env(rank: int, world: int, local_world: int, **extra) -> dict[str, str]:
    env = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": world,
           "OMPI_COMM_WORLD_LOCAL_RANK": rank % local_world,
           "OMPI_COMM_WORLD_LOCAL_SIZE": local_world, **extra}
    return {k: str(v) for k, v in env.items()}


def overrides_of(plan) -> dict:
    i = plan.argv.index("--override-neuron-config")
    return json.loads(plan.argv[i + 1])


def tp_of(plan) -> int:
    i = plan.argv.index("--tensor-parallel-size")
    return int(plan.argv[i + 1])


ENVS = {
    "torchrun": lambda rank, world, local: torchrun_env(rank, world, local),
    "mpirun": lambda rank, world, local: mpirun_env(rank, world, local, MASTER_ADDR="10.0.0.1",
                                                    MASTER_PORT=29500),
}


@pytest.mark.parametrize("launcher", sorted(ENVS))
def test_nxdi_two_nodes_one_process_each(launcher):
    """trn1.32xlarge x 2: tp_degree is the total 64 (the fork set 32), 32 ranks per node."""
    plans = [launch.build_plan(ENVS[launcher](rank, 2, 1), SERVE, neuron_cores_per_node=32)
             for rank in range(2)]
    for node, plan in enumerate(plans):
        assert plan.launcher == launcher
        assert (plan.node, plan.nodes) == (node, 2)
        assert overrides_of(plan) == {"tp_degree": 64, "local_ranks_size": 32,
                                      "start_rank_id": 32 * node}
        assert tp_of(plan) == 64
        assert plan.env == {
            "VLLM_NEURONX_RANK": str(node), "VLLM_NEURONX_WORLD_SIZE": "2",
            "VLLM_NEURONX_MASTER": "10.0.0.1:29501",
            "NEURON_RT_ROOT_COMM_ID": "10.0.0.1:29502", "NEURON_RANK_ID": str(node)}
        assert plan.argv[:4] == SERVE
    assert plans[0].module == "vllm.entrypoints.openai.api_server"
    assert plans[1].module == "vllm_neuronx.distributed.follower"
    assert plans[1].command("/py") == ["/py", "-m", "vllm_neuronx.distributed.follower",
                                       *plans[1].argv]


@pytest.mark.parametrize("launcher", sorted(ENVS))
def test_cpu_two_nodes_two_processes_each(launcher):
    """CPU backend: one process per rank, so 2 nodes x 2 processes is TP 4."""
    plans = [launch.build_plan(ENVS[launcher](rank, 4, 2), SERVE) for rank in range(4)]
    assert [p.node for p in plans] == [0, 0, 1, 1]
    assert [overrides_of(p)["start_rank_id"] for p in plans] == [0, 0, 2, 2]
    assert {overrides_of(p)["tp_degree"] for p in plans} == {4}
    assert {overrides_of(p)["local_ranks_size"] for p in plans} == {2}
    assert {tp_of(p) for p in plans} == {4}
    assert [p.env["VLLM_NEURONX_RANK"] for p in plans] == ["0", "1", "2", "3"]
    assert [p.env["NEURON_RANK_ID"] for p in plans] == ["0", "0", "1", "1"]
    assert [p.module.rsplit(".", 1)[1] for p in plans] == [
        "api_server", "follower", "follower", "follower"]


@pytest.mark.parametrize("form", ["split", "equals"])
def test_user_overrides_are_kept_and_merged(form):
    user = {"max_context_length": 1024, "tp_degree": 64}  # an agreeing tp_degree is fine
    flag = (["--override-neuron-config", json.dumps(user)] if form == "split"
            else [f"--override-neuron-config={json.dumps(user)}"])
    args = [*SERVE, *flag, "--tensor_parallel_size=64", "--port", "8000"]
    plan = launch.build_plan(torchrun_env(1, 2, 1), args, neuron_cores_per_node=32)
    assert overrides_of(plan) == {"max_context_length": 1024, "tp_degree": 64,
                                  "local_ranks_size": 32, "start_rank_id": 32}
    assert plan.argv.count("--override-neuron-config") == 1
    assert plan.argv.count("--tensor-parallel-size") == 1
    assert not any(a.startswith("--tensor_parallel_size") for a in plan.argv)
    assert plan.argv[-2:] == ["--port", "8000"]


@pytest.mark.parametrize("key,value", [("tp_degree", 32), ("local_ranks_size", 16),
                                       ("start_rank_id", 0)])
def test_contradicting_override_is_refused_by_name(key, value):
    args = [*SERVE, "--override-neuron-config", json.dumps({key: value})]
    with pytest.raises(launch.LaunchError, match=f"{key}={value}.*contradicts"):
        launch.build_plan(torchrun_env(1, 2, 1), args, neuron_cores_per_node=32)


@pytest.mark.parametrize("flag", [["--tensor-parallel-size", "32"], ["-tp", "32"],
                                  ["--tensor-parallel-size=32"]])
def test_contradicting_tp_size_is_refused(flag):
    with pytest.raises(launch.LaunchError, match="--tensor-parallel-size=32 contradicts.* 64"):
        launch.build_plan(torchrun_env(0, 2, 1), [*SERVE, *flag], neuron_cores_per_node=32)


@pytest.mark.parametrize("args,match", [
    ([*SERVE, "--override-neuron-config", "{bad"], "not valid JSON"),
    ([*SERVE, "--override-neuron-config", "[1]"], "must be a JSON object"),
    ([*SERVE, "--override-neuron-config"], "needs a value"),
    ([*SERVE, "--override-neuron-config", "{}", "--override-neuron-config", "{}"], "2 times"),
    ([*SERVE, "--nnodes", "2"], "--nnodes is not taken"),
    ([*SERVE, "--headless"], "--headless is not taken"),
    ([], "after '--'"),
])
def test_bad_serve_args_are_refused(args, match):
    with pytest.raises(launch.LaunchError, match=match):
        launch.build_plan(torchrun_env(0, 2, 1), args)


@pytest.mark.parametrize("drop", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                  "MASTER_ADDR", "MASTER_PORT"])
def test_missing_torchrun_variable_is_named(drop):
    env = torchrun_env(0, 2, 1)
    del env[drop]  # without RANK, LOCAL_WORLD_SIZE still says torchrun
    with pytest.raises(launch.LaunchError, match=rf"\b{drop} is not set"):
        launch.build_plan(env, SERVE)


@pytest.mark.parametrize("drop", ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                  "OMPI_COMM_WORLD_RANK"])
def test_missing_openmpi_variable_is_named(drop):
    env = mpirun_env(0, 2, 1, MASTER_ADDR="h0", MASTER_PORT=29500)
    del env[drop]
    with pytest.raises(launch.LaunchError, match=rf"\b{drop} is not set"):
        launch.build_plan(env, SERVE)


def test_mpirun_master_from_command_line():
    plan = launch.build_plan(mpirun_env(1, 2, 1), SERVE, 32, master_addr="h0",
                             master_port=40000)
    assert plan.env["VLLM_NEURONX_MASTER"] == "h0:40001"
    assert plan.env["NEURON_RT_ROOT_COMM_ID"] == "h0:40002"
    with pytest.raises(launch.LaunchError, match="MASTER_ADDR is not set"):
        launch.build_plan(mpirun_env(1, 2, 1), SERVE, 32)


def test_no_launcher_is_refused():
    with pytest.raises(launch.LaunchError, match="torchrun.*OMPI_COMM_WORLD_RANK"):
        launch.build_plan({"MASTER_ADDR": "h0", "MASTER_PORT": "1"}, SERVE)


@pytest.mark.parametrize("env,cores,match", [
    (torchrun_env(0, 4, 2), 32, "one process per node.*started 2"),
    (torchrun_env(0, 3, 2), None, "not a multiple"),
    (torchrun_env(1, 2, 1, GROUP_RANK=0), None, "GROUP_RANK 0"),
    (torchrun_env(0, 2, 1, MASTER_PORT=65534), None, "MASTER_PORT=65534"),
    (torchrun_env(0, 2, 1), 0, "must be >= 1"),
])
def test_inconsistent_launch_is_refused(env, cores, match):
    with pytest.raises(launch.LaunchError, match=match):
        launch.build_plan(env, SERVE, cores)


def test_dry_run_prints_the_plan(monkeypatch, capsys):
    for key, value in torchrun_env(1, 2, 1).items():
        monkeypatch.setenv(key, value)
    launch.main(["--neuron-cores-per-node", "32", "--dry-run", "--", *SERVE])
    printed = json.loads(capsys.readouterr().out)
    assert printed["module"] == "vllm_neuronx.distributed.follower"
    assert printed["start_rank_id"] == 32
    assert printed["command"][1:3] == ["-m", "vllm_neuronx.distributed.follower"]


def test_main_reports_errors_without_traceback(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="separate the launcher's options"):
        launch.main(["--dry-run"])


def test_without_the_separator_torchrun_drops_the_leading_options_are_the_launchers():
    assert launch.split_argv(["--model", "m"]) == ([], ["--model", "m"])
    assert launch.split_argv(["--neuron-cores-per-node", "2", "--dry-run", "--model", "m"]) \
        == (["--neuron-cores-per-node", "2", "--dry-run"], ["--model", "m"])
    assert launch.split_argv(["--master-port=9", "--", "--dry-run"]) == (["--master-port=9"],
                                                                        ["--dry-run"])


@pytest.mark.parametrize("script", ["torchrun_launcher.sh", "mpirun_launcher.sh"])
def test_scripts_parse(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    subprocess.run([bash, "-n", str(HERE / script)], check=True)
