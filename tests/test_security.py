"""Security basics of the server on our platform: the API key on every /v1 route,
compared in constant time (upstream's middleware), and no socket beyond the host given.

Where files go (umask, nothing outside the artifact folder) is tested with the
artifact cache, in tests/test_artifacts.py.
"""

from __future__ import annotations

import secrets
import tempfile
from socket import SOCK_DGRAM

import psutil
import pytest
import requests
from starlette.datastructures import Headers

API_KEY = "sk-test-0123456789"
HOST = "127.0.0.1"  # what Server passes as --host


@pytest.fixture(scope="module")
def model(tiny_chat):
    return tiny_chat


@pytest.fixture(scope="module")
def server(tiny_chat_server):
    return tiny_chat_server("--max-num-seqs=2", "--max-model-len=64", "--dtype=float32",
                            "--api-key", API_KEY)


def v1_routes(server) -> list[tuple[str, str]]:
    """(method, path) of every /v1 operation the server documents."""
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    return sorted((method.upper(), path) for path, operations in spec["paths"].items()
                  if path.startswith("/v1") for method in operations)


WRONG_CREDENTIALS = {
    "none": {},
    "wrong key": {"Authorization": "Bearer wrong"},
    "empty key": {"Authorization": "Bearer "},
    "key prefix": {"Authorization": f"Bearer {API_KEY[:-1]}"},
    "key plus more": {"Authorization": f"Bearer {API_KEY}0"},
    "other scheme": {"Authorization": f"Basic {API_KEY}"},
    "other header": {"X-API-Key": API_KEY},
}


def test_every_v1_route_refuses_a_missing_or_wrong_key(server, model):
    routes = v1_routes(server)
    for expected in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                     ("GET", "/v1/models")):
        assert expected in routes
    refused = []
    for method, path in routes:
        url = server.url + path.replace("{", "").replace("}", "")  # path parameters: any value
        for name, headers in WRONG_CREDENTIALS.items():
            body = {"model": model, "prompt": "hi", "max_tokens": 1}
            r = requests.request(method, url, headers=headers, json=body, timeout=10)
            if r.status_code != 401:
                refused.append((method, path, name, r.status_code))
    assert refused == [], f"not refused with 401: {refused}"
    ok = requests.get(server.url + "/v1/models", timeout=10,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == model


def test_the_key_is_compared_in_constant_time(tiny_llama, monkeypatch):
    """--api-key installs upstream's middleware, which compares SHA-256 digests of the
    presented and every configured key with secrets.compare_digest, without stopping
    at the first match: time depends on neither the key's length nor its content."""
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.entrypoints.openai.server_utils import AuthenticationMiddleware
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", tiny_llama, "--api-key", API_KEY, "second-key"])
    app = build_app(args, ("generate",))
    [installed] = [m for m in app.user_middleware if m.cls is AuthenticationMiddleware]
    middleware = AuthenticationMiddleware(app, *installed.args, **installed.kwargs)

    compared = []
    compare_digest = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest",
                        lambda a, b: compared.append((a, b)) or compare_digest(a, b))
    for presented, accepted in ((API_KEY, True), ("second-key", True), ("wrong", False),
                                (API_KEY[:-1], False), (API_KEY + "0", False), ("", False)):
        compared.clear()
        headers = Headers({"authorization": f"Bearer {presented}"})
        assert middleware.verify_token(headers) is accepted, presented
        assert len(compared) == 2  # every configured key, match or not
        assert all(len(a) == len(b) == 32 for a, b in compared)  # digests, not the keys


def test_nothing_listens_beyond_the_given_host(server):
    api = psutil.Process(server.proc.pid)
    processes = [api, *api.children(recursive=True)]
    assert len(processes) >= 2  # the API server and the engine core
    listening, unix_paths = [], []
    for process in processes:
        for conn in process.net_connections(kind="inet"):
            if conn.laddr and (conn.status == psutil.CONN_LISTEN or conn.type == SOCK_DGRAM):
                listening.append((process.pid, conn.laddr.ip, conn.laddr.port))
        unix_paths += [c.laddr for c in process.net_connections(kind="unix") if c.laddr]
    assert (server.proc.pid, HOST, server.port) in listening
    assert {ip for _, ip, _ in listening} == {HOST}, listening
    # The engine core talks to the API server over ZMQ ipc:// sockets in the temporary
    # folder, never over TCP.
    assert all(path.startswith(tempfile.gettempdir()) for path in unix_paths), unix_paths
