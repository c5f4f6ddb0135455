"""What the service tests share: an in-process app behind FastAPI's TestClient, a real ``xmodal serve`` in a
subprocess on 127.0.0.1 (:class:`Server`), random rows, and the requests most tests make."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import unquote

import httpx
import numpy as np
import torch
from fastapi.testclient import TestClient

from xmodal.serve import create_app

KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def client(folder, **kwargs):
    kwargs.setdefault("load_in_background", False)
    return TestClient(create_app(str(folder), **kwargs))


def rows(n, dim=8, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).numpy()


def add(c, name, ids, vectors, payloads=None, headers=None):
    body = {"ids": list(map(int, ids)), "vectors": np.asarray(vectors).tolist()}
    if payloads is not None:
        body["payloads"] = payloads
    return c.post(f"/collections/{name}/vectors", json=body, headers=headers)


def detail(response):
    return response.json()["detail"]


def raw_get(c, path, headers=None):
    """(status, JSON body or bytes) of a GET of ``path`` exactly as given, straight into the app of a running
    TestClient ``c``: httpx resolves ``..`` segments before sending, a browser or curl need not."""
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(path), "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    c.portal.call(c.app, scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


READY_TIMEOUT = 180  # seconds; start-up takes a few (importing torch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = os.path.join(os.path.dirname(str(folder)), f"server-{self.port}.err")
        self.stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(folder), "--port", str(self.port),
                                      *args], stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)

    def wait_ready(self, headers=None):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.errors()}")
            try:
                if httpx.get(self.url + "/ready", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {READY_TIMEOUT} s: {self.errors()}")

    def errors(self) -> str:
        self.stderr.flush()
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.stderr.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self.stderr.closed:
            self.stderr.close()
