"""Start and stop an OpenAI-compatible server of ours on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], *, env: dict | None = None, timeout: float = 240) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.log = open(f"/tmp/vllm-neuronx-test-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not start in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def api_server_argv(model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *extra]


def kv_lines_in_use(server: Server, api_key: str | None = None) -> int:
    """The runner's KV lines in use, read through /collective_rpc (VLLM_SERVER_DEV_MODE=1)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = requests.post(server.url + "/collective_rpc", json={"method": "kv_lines_in_use"},
                      headers=headers, timeout=30)
    r.raise_for_status()
    return int(r.json()["results"][0])


def wait_until(condition, timeout: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
