"""Tensor parallelism and multi-node serving end to end (issue 22): real processes, real
gloo, vLLM's real OpenAI server on rank 0, greedy tokens against HF transformers.

- ``tensor_parallel_size`` N on the CPU backend: N processes, rank 0 starting the others;
- two "nodes" started as users start them (torchrun + examples/neuron/multi_node/launch.py),
  over loopback, then across two network namespaces joined by a veth pair;
- faults: a follower killed mid-request, SIGTERM on rank 0, nodes started with
  different settings.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import hf_greedy, make_tiny_llama
from tests.engine_checks import nxdi_simulator_server_env
from tests.server_utils import Server, api_server_argv, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "examples", "neuron", "multi_node", "launch.py")
FLAGS = ("--max-num-seqs=2", "--max-model-len=256", "--dtype=float32")
ENV = {"VLLM_NEURONX_RANK_TIMEOUT": "20"}
EXIT_BOUND_S = 90  # a failed group or a stopped leader ends every process within this
PROMPTS = [[1, 20, 21, 22, 23], [1, 300, 7, 8, 9, 10, 11, 12], [1, 5]]


@pytest.fixture(scope="module")
def six_heads(tmp_path_factory, tiny_chat) -> str:
    """A tiny Llama whose 6 query heads over 2 KV heads make TP=4 replicate KV heads and
    pad query heads, with the tiny chat model's tokenizer files."""
    import shutil

    path = make_tiny_llama(tmp_path_factory.mktemp("six-heads"), vocab=49152, pad_token_id=2,
                           hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    for name in os.listdir(tiny_chat):
        if name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(os.path.join(tiny_chat, name), path)
    return path


def complete(url: str, model: str, prompt, **body) -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True} | body
    return requests.post(url + "/v1/completions", json=body, timeout=120)


def served_tokens(url: str, model: str) -> list[list[int]]:
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: complete(url, model, p), PROMPTS))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    return [r.json()["choices"][0]["token_ids"] for r in answers]


def processes_named(root: psutil.Process, text: str) -> list[psutil.Process]:
    found = []
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if text in " ".join(p.cmdline()):
                found.append(p)
    return found


# -- tensor parallelism on one machine: rank 0 starts the others ----------------------------
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_greedy_equals_tp1_and_hf(six_heads, tp):
    from vllm import LLM, SamplingParams

    llm = LLM(model=six_heads, tensor_parallel_size=tp, max_num_seqs=2, max_model_len=256,
              dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=False)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        core = psutil.Process(os.getpid())
        followers = processes_named(core, "vllm_neuronx.distributed.follower")
        assert len(followers) == tp - 1
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(six_heads, PROMPTS,
                                                                      [8] * 3)
    assert wait_gone(psutil.Process(os.getpid()), "vllm_neuronx.distributed.follower")


def test_lora_adapters_on_two_ranks_equal_peft(six_heads, tmp_path):
    """Rank 0 mirrors the adapter calls; each rank serves its shard of each adapter."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.lora_utils import make_peft_adapter, peft_greedy

    paths = [make_peft_adapter(six_heads, tmp_path / "a1", seed=1), None,
             make_peft_adapter(six_heads, tmp_path / "a2", seed=2, r=4)]
    llm = LLM(model=six_heads, tensor_parallel_size=2, max_num_seqs=2, max_model_len=256,
              dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=False,
              enable_lora=True, max_loras=2, max_lora_rank=8)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        requests_ = [None if p is None else LoRARequest(f"a{i}", i + 1, p)
                     for i, p in enumerate(paths)]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                            lora_request=requests_)
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [list(o.outputs[0].token_ids) for o in outs]
    expected = [peft_greedy(six_heads, path, [p], 8)[0] for p, path in zip(PROMPTS, paths,
                                                                           strict=True)]
    assert got == expected
    base = hf_greedy(six_heads, PROMPTS, [8] * 3)
    assert got[0] != base[0] and got[2] != base[2]  # the adapters change the tokens


def wait_gone(root: psutil.Process, text: str, timeout: float = EXIT_BOUND_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes_named(root, text):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_failed_follower_fails_the_requests_and_rank_0_exits_non_zero(six_heads, fault):
    """Killed: its connections close and rank 0 fails at once. Hung (SIGSTOP): rank 0 fails
    after VLLM_NEURONX_RANK_TIMEOUT (5 s here)."""
    server = Server(api_server_argv(six_heads, "--tensor-parallel-size=2", *FLAGS),
                    env={**ENV, "VLLM_NEURONX_RANK_TIMEOUT": "5"})
    try:
        (follower,) = processes_named(psutil.Process(server.proc.pid),
                                      "vllm_neuronx.distributed.follower")
        stream = requests.post(
            server.url + "/v1/completions", stream=True, timeout=120,
            json={"model": six_heads, "prompt": [1, 2, 3], "max_tokens": 200,
                  "ignore_eos": True, "temperature": 0, "stream": True})
        lines = stream.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: {"))
        started = time.monotonic()
        follower.kill() if fault == "killed" else follower.suspend()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == 500, rest[-3:]
        server.proc.wait(EXIT_BOUND_S)
        assert server.proc.returncode == 1
        log = server.output()
        assert "RankFailure" in log, log[-3000:]
        if fault == "killed":  # seen through /proc, or once reaped, its status
            assert re.search(r"rank 1 (\(pid \d+\) exited|exited with status -9)", log), \
                log[-3000:]
        else:
            assert "hung past VLLM_NEURONX_RANK_TIMEOUT=5 s" in log, log[-3000:]
        assert time.monotonic() - started < EXIT_BOUND_S
        assert wait_gone(psutil.Process(os.getpid()), "vllm_neuronx.distributed.follower")
    finally:
        with contextlib.suppress(psutil.Error):
            follower.kill()
        server.stop()


# -- two nodes, as users start them ---------------------------------------------------------
def node_argv(node: int, master: str, port: int, model: str, *flags: str,
              prefix: tuple[str, ...] = (), launch: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", master,
            "--master-port", str(port), LAUNCH, *launch, "--", "--model", model, *flags]


class TwoNodes:
    """Node 1 (a follower) in the background, then node 0 (rank 0's server). If node 0
    fails to start, its error carries node 1's exit status and log once node 1 ended by
    itself (``node1_status``, ``node1_log``; None: still running after the bound)."""

    def __init__(self, model: str, *, master: str = "127.0.0.1", prefix1=(), flags1=FLAGS,
                 launch=(), env=None, env1=None) -> None:
        port = free_port()
        env = dict(os.environ, **ENV, **(env or {}))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.log1 = open(f"/tmp/vllm-neuronx-test-node1-{port}.log", "w+")
        self.node1 = subprocess.Popen(
            node_argv(1, master, port, model, *flags1, prefix=prefix1, launch=launch),
            env=dict(env, **(env1 or {})), stdout=self.log1, stderr=subprocess.STDOUT)
        self.node0 = None
        try:
            self.node0 = Server(node_argv(0, master, port, model, *FLAGS, launch=launch),
                                env=dict(ENV, **(env or {})))
        except BaseException as e:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.node1.wait(EXIT_BOUND_S)
            e.node1_status, e.node1_log = self.node1.poll(), self.output1()
            self.stop()
            raise

    def output1(self) -> str:
        with open(self.log1.name, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.node0 is not None:
            self.node0.stop()
        if self.node1.poll() is None:
            self.node1.terminate()
            try:
                self.node1.wait(30)
            except subprocess.TimeoutExpired:
                self.node1.kill()
                self.node1.wait()
        self.log1.close()


def check_serves_then_sigterm_stops_every_node(nodes: TwoNodes, model: str,
                                               said0=("tp 2",), said1=()) -> None:
    assert served_tokens(nodes.node0.url, model) == hf_greedy(model, PROMPTS, [8] * 3)
    ready = nodes.node0.output()
    for text in ("ranks=2 processes", *said0):
        assert text in ready, ready[-3000:]
    for text in said1:
        assert text in nodes.output1(), nodes.output1()[-3000:]
    (rank0,) = processes_named(psutil.Process(nodes.node0.proc.pid),
                               "vllm.entrypoints.openai.api_server")
    rank0.send_signal(signal.SIGTERM)
    nodes.node0.proc.wait(EXIT_BOUND_S)
    nodes.node1.wait(EXIT_BOUND_S)
    assert (nodes.node0.proc.returncode, nodes.node1.returncode) == (0, 0), \
        nodes.node0.output()[-2000:] + nodes.output1()[-2000:]
    assert "rank 1: stopped by the leader" in nodes.output1()


def test_two_nodes_serve_through_rank_0_then_sigterm_stops_both(six_heads):
    nodes = TwoNodes(six_heads)
    try:  # one machine: the ranks sum through shared memory
        check_serves_then_sigterm_stops_every_node(
            nodes, six_heads, said0=("tp 2", "ranks=2 processes (shared memory)"))
    finally:
        nodes.stop()


@pytest.fixture
def veth_namespace():
    """A network namespace joined to this one by a veth pair: 10.231.0.1 here, 10.231.0.2
    there. Skipped, saying why, where namespaces cannot be made (not root, no iproute2)."""
    name, here, there = f"vnx{os.getpid()}", "10.231.0.1", "10.231.0.2"
    a, b = f"vnxa{os.getpid() % 10000}", f"vnxb{os.getpid() % 10000}"
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
             ["ip", "link", "set", b, "netns", name],
             ["ip", "addr", "add", f"{here}/24", "dev", a], ["ip", "link", "set", a, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{there}/24", "dev", b],
             ["ip", "netns", "exec", name, "ip", "link", "set", b, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make a network namespace joined by a veth pair here: "
                    f"{getattr(e, 'stderr', None) or e}")
    try:
        yield name, here
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_nodes_across_network_namespaces(six_heads, veth_namespace):
    namespace, address = veth_namespace
    nodes = TwoNodes(six_heads, master=address, prefix1=("ip", "netns", "exec", namespace))
    try:  # another network: every collective crosses the veth pair through gloo
        check_serves_then_sigterm_stops_every_node(
            nodes, six_heads, said0=("tp 2", "ranks=2 processes (gloo)"))
    finally:
        nodes.stop()


def test_nodes_started_with_different_settings_are_refused_naming_them(six_heads):
    flags1 = ("--max-num-seqs=2", "--max-model-len=128", "--dtype=float32")
    with pytest.raises(RuntimeError) as refused:
        TwoNodes(six_heads, flags1=flags1)
    for log in (str(refused.value), refused.value.node1_log):  # both nodes name it
        assert "rank 1 was started with settings that differ from rank 0's" in log, log[-3000:]
        assert "seq_len: 256 != 128" in log
    assert refused.value.node1_status not in (0, None)


def test_two_nxdi_nodes_on_the_simulator(six_heads, tmp_path):
    """NxDI: one process per node drives its NeuronCores (2 here), tp_degree the total."""
    env = nxdi_simulator_server_env(folder=tmp_path / "node0")
    nodes = TwoNodes(six_heads, launch=("--neuron-cores-per-node", "2"), env=env,
                     env1={"NEURON_COMPILED_ARTIFACTS": str(tmp_path / "node1")})
    try:
        check_serves_then_sigterm_stops_every_node(
            nodes, six_heads, said0=("NxDI: node 0 of 2, ranks 0..1 of tp_degree 4",),
            said1=("NxDI: node 1 of 2, ranks 2..3 of tp_degree 4",))
    finally:
        nodes.stop()



def test_mpirun_starts_the_server_and_a_follower(six_heads):
    """OpenMPI's variables, as mpirun sets them, through the same launcher."""
    import shutil

    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun (OpenMPI) on this machine: apt-get install openmpi-bin")
    argv = ["mpirun", "-np", "2", "--host", "localhost:2", "--map-by", "slot", "--bind-to",
            "none", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}",
            "-x", "PATH", sys.executable, LAUNCH, "--", "--model", six_heads, *FLAGS]
    server = Server(argv, env={**ENV, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    try:
        assert served_tokens(server.url, six_heads) == hf_greedy(six_heads, PROMPTS, [8] * 3)
        assert "ranks=2 processes (shared memory)" in server.output()
        (rank0,) = processes_named(psutil.Process(server.proc.pid),
                                   "vllm.entrypoints.openai.api_server")
        rank0.send_signal(signal.SIGTERM)
        server.proc.wait(EXIT_BOUND_S)
        assert server.proc.returncode == 0
        assert "rank 1: stopped by the leader" in server.output()
    finally:
        server.stop()
