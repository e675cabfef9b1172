"""Start and stop an OpenAI-compatible server of ours on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
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
        """The server's log so far. Read through a handle of its own: the server writes
        at the offset it shares with ``self.log``, which a seek here would move back."""
        with open(self.log.name, errors="replace") as f:
            return f.read()

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


def engine_core(process: subprocess.Popen | psutil.Process,
                timeout: float = 60.0) -> psutil.Process:
    """The engine-core process under an API server (vLLM titles it ``VLLM::EngineCore``)."""
    parent = psutil.Process(process.pid)
    found: list[psutil.Process] = []

    def present() -> bool:
        try:
            found[:] = [c for c in parent.children(recursive=True)
                        if c.name().startswith("VLLM::EngineCore")]
        except psutil.NoSuchProcess:
            return True
        return bool(found)

    assert wait_until(present, timeout) and found, "no engine-core process"
    return found[0]


def suspend(process: psutil.Process, timeout: float = 30.0) -> None:
    """SIGSTOP ``process`` and return once every thread of it has stopped (the signal
    is delivered asynchronously)."""

    def stopped() -> bool:
        try:
            states = []
            for task in os.listdir(f"/proc/{process.pid}/task"):
                with open(f"/proc/{process.pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            return not process.is_running()
        return all(state in "Tt" for state in states)

    process.suspend()
    if not wait_until(stopped, timeout):
        process.resume()
        raise AssertionError(f"{process} did not stop in {timeout} s")


@contextlib.contextmanager
def frozen(process: psutil.Process):
    """SIGSTOP ``process`` for the block (SIGCONT after): an engine core takes no step
    meanwhile, so what a test observes before a signal stays so until it lets go. It is
    what a long step (a compile, a big batch on the device) looks like from outside."""
    suspend(process)
    try:
        yield process
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()


def signal_pending(process: psutil.Process, sig: int = signal.SIGTERM) -> bool:
    """Whether ``sig`` was sent to ``process`` and not yet handled (a stopped process
    holds it until it continues)."""
    try:
        with open(f"/proc/{process.pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f
                     if line.startswith(("ShdPnd:", "SigPnd:"))]
    except FileNotFoundError:
        return False
    return any(mask >> (sig - 1) & 1 for mask in masks)


def wait_for_log(server: Server, text: str, count: int = 1, timeout: float = 60.0) -> bool:
    """Wait until the server's log holds ``text`` at least ``count`` times."""
    return wait_until(lambda: server.output().count(text) >= count, timeout)


def first_chunk(r: requests.Response) -> tuple:
    """Read a stream up to its first token: (its lines iterator, the text so far)."""
    lines = r.iter_lines()
    for line in lines:
        if line.startswith(b"data: {"):
            choice = json.loads(line.removeprefix(b"data: "))["choices"][0]
            assert choice["finish_reason"] is None, choice
            return lines, choice["text"]
    raise AssertionError("the stream ended before its first token")
