"""`vllm serve <model>` takes the same Neuron flags as the api_server module."""

from __future__ import annotations

import os
import sys

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
    finally:
        server.stop()
