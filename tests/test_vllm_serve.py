"""`vllm serve <model>` takes the same Neuron flags as the api_server module."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import requests

from tests.server_utils import Server
from vllm_neuronx.default_model import default_model_path


def test_vllm_serve_with_the_guide_flags():
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    server = Server([
        vllm, "serve", default_model_path(), "--max-num-seqs", "2", "--max-model-len", "128",
        "--tensor-parallel-size", "8", "--device", "neuron",
        "--override-neuron-config", '{"on_device_sampling_config": {"global_topk": 64}}',
    ])
    try:
        r = requests.post(server.url + "/v1/completions", timeout=60, json={
            "model": default_model_path(), "prompt": "The capital of France is",
            "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
        r = requests.post(server.url + "/v1/completions", timeout=60, json={
            "model": default_model_path(), "prompt": "hi", "max_tokens": 4, "top_k": 100})
        assert r.status_code == 400 and "global_topk=64" in r.json()["error"]["message"]
        ready = [ln for ln in server.output().splitlines() if "Neuron ready:" in ln]
        assert len(ready) == 1 and "KV lines=2 x 128" in ready[0]
        # The engine core was forked (prefer_fork), not spawned: a spawned one imports
        # vLLM and torch again, half of a warm start. (Its title hides its command line;
        # but starting a process by spawn also starts multiprocessing's resource tracker.)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert any(c.name().startswith("VLLM::EngineCore") for c in children)
        assert not any("resource_tracker" in " ".join(c.cmdline()) for c in children)
    finally:
        server.stop()


def test_the_users_multiprocessing_method_wins(monkeypatch):
    import vllm_neuronx

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    vllm_neuronx.prefer_fork()
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    vllm_neuronx.prefer_fork()
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


FORK_AFTER_TORCH = """
import os, signal, sys, time, torch
import vllm_neuronx
vllm_neuronx.prefer_fork()
torch.set_num_threads(2)
x = torch.randn(256, 256)
for _ in range(3):
    (x @ x).sum()  # the parent's OpenMP pool now exists
pid = os.fork()
if pid == 0:
    (x @ x).sum()
    os._exit(0)
for _ in range(200):
    if os.waitpid(pid, os.WNOHANG)[0]:
        print("child finished")
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    print("child hung")
"""


def test_a_child_forked_after_parallel_torch_work_does_not_hang():
    """GNU libgomp's pool does not survive fork; the plugin frees it before each fork."""
    out = subprocess.run([sys.executable, "-c", FORK_AFTER_TORCH], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "child finished", out.stdout + out.stderr
