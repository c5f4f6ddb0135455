"""The client's errors name the problem: a refused API key (at once, not as a time-out), a failed load,
NaN / infinity in what it would send (before sending), payloads JSON cannot carry; and
``create_collection(..., exist_ok=True)`` for scripts that run again. Every loop here is bounded."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from xmodal.client import Client, ServiceError  # noqa: E402
from xmodal.serve import create_app  # noqa: E402

KEY = "client-test-key-0123456789"
NOWHERE = "http://127.0.0.1:9"  # nothing listens there: a check that sends first gets a connection error


def in_process(folder, api_key=None, **app_options):
    """A Client whose requests go to an app in this process (the TestClient is an httpx.Client)."""
    app_options.setdefault("load_in_background", False)
    tc = TestClient(create_app(str(folder), api_key=KEY, **app_options))
    c = Client("http://testserver", api_key=api_key)
    tc.headers.update(c._http.headers)
    c._http.close()
    c._http = tc
    return tc, c


# -- the API key
@pytest.mark.parametrize("api_key, says", [(None, "has none: pass Client(url, api_key=...)"),
                                           ("not-the-key-0123456789", "refused this Client's api_key")])
def test_a_refused_api_key_is_an_error_at_once(tmp_path, api_key, says):
    tc, c = in_process(tmp_path, api_key)
    with tc:
        start = time.monotonic()
        with pytest.raises(ServiceError, match="401") as e:
            c.wait_ready(timeout=30)
        assert time.monotonic() - start < 5, "wait_ready waited instead of reporting the refused key"
        assert e.value.status == 401 and says in str(e.value) and "--api-key-file" in str(e.value)
        with pytest.raises(ServiceError, match=says.split(":")[0]) as e:
            c.collections()  # every call says what a 401 means
        assert e.value.status == 401


def test_the_right_api_key_is_ready(tmp_path):
    tc, c = in_process(tmp_path, KEY)
    with tc:
        c.wait_ready(timeout=30)
        assert c.ready() and c.collections() == []


def test_wait_ready_reports_a_failed_load_at_once(tmp_path):
    tc, c = in_process(tmp_path, KEY, encryption_key=os.urandom(32))
    with tc:
        c.create_collection("v", 2)
        c.add("v", [[1.0, 0.0]], ids=[1])
    tc, c = in_process(tmp_path, KEY, encryption_key=os.urandom(32), load_in_background=True)  # the wrong key
    with tc:
        with pytest.raises(ServiceError, match="failed to load") as e:
            c.wait_ready(timeout=30)
        assert e.value.status == 503 and "encryption key" in str(e.value.detail)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_ready_on_a_real_server_with_a_key(tmp_path):
    """As a user meets it: the client waits while the server starts, then reports the 401 at once."""
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY + "\n")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(tmp_path / "collections"), "--port",
                               str(port), "--api-key-file", str(key_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            with pytest.raises(ServiceError, match="needs an API key") as e:
                c.wait_ready(timeout=120)  # raises as soon as the server answers
            assert e.value.status == 401
        with Client(f"http://127.0.0.1:{port}", api_key=KEY) as c:
            c.wait_ready(timeout=30)
    finally:
        server.terminate()
        server.wait(30)


# -- what the client sends
@pytest.mark.parametrize("queries, says", [
    ([[0.0, 1.0], [float("nan"), 1.0]], r"queries must hold finite float32 numbers .*, got nan in row 1 \(column 0\)"),
    (np.array([[0.0, np.inf], [np.nan, 1.0], [-np.inf, 0.0]]), r"got inf in row 0 \(column 1\), and 2 more row"),
    ([1.0, float("nan")], r"got nan at position 1"),
    (torch.tensor([[0.0, 1.0], [1.0, float("-inf")]]), r"got -inf in row 1 \(column 1\)"),
    (np.array([[1e39, 0.0]]), r"got 1e\+39 \(beyond float32's range\) in row 0 \(column 0\)"),
])
def test_non_finite_queries_are_a_value_error_before_sending(queries, says):
    with Client(NOWHERE) as c, pytest.raises(ValueError, match=says):
        c.search("c", queries, k=3)


def test_non_finite_vectors_and_bad_payloads_are_a_value_error_before_sending():
    with Client(NOWHERE) as c:
        with pytest.raises(ValueError, match=r"vectors must hold finite .*, got nan in row 2 \(column 1\)"):
            c.add("c", [[0.0, 1.0], [1.0, 0.0], [0.5, float("nan")]], ids=[1, 2, 3])
        with pytest.raises(ValueError, match=r"payloads\[1\] must be JSON .*no NaN"):
            c.add("c", [[0.0, 1.0], [1.0, 0.0]], ids=[1, 2], payloads=[{"a": 1}, {"score": float("nan")}])
        with pytest.raises(ValueError, match=r"payloads\[0\] must be a dict or None, got str"):
            c.add("c", [[0.0, 1.0]], ids=[1], payloads=["red"])
        with pytest.raises(ValueError, match=r"vectors must be a 1-D or 2-D array of numbers"):
            c.add("c", [[0.0, 1.0], [1.0]], ids=[1, 2])
        with pytest.raises(ValueError, match=r"queries must be 1-D or 2-D, got shape \(1, 1, 2\)"):
            c.search("c", [[[0.0, 1.0]]])


def test_finite_values_still_reach_the_service(tmp_path):
    tc, c = in_process(tmp_path, KEY)
    with tc:
        c.create_collection("v", 2, "ip")
        assert c.add("v", np.array([[1.0, 0.0], [0.0, 1.0]]), ids=[1, 2], payloads=[None, {"x": 1.5}])["upserted"] == 2
        scores, ids = c.search("v", torch.tensor([1.0, 0.0], dtype=torch.float64), k=1)
        assert ids.tolist() == [1] and scores.tolist() == [1.0]


# -- creating a collection again
def test_create_collection_exist_ok(tmp_path):
    tc, c = in_process(tmp_path, KEY)
    with tc:
        made = c.create_collection("v", 4, "l2")
        with pytest.raises(ServiceError) as e:
            c.create_collection("v", 4, "l2")
        assert e.value.status == 409
        assert c.create_collection("v", 4, "l2", exist_ok=True) == made
        with pytest.raises(ServiceError, match=r"exists with dim 4, metric 'l2'.*got dim 8, metric 'cosine'") as e:
            c.create_collection("v", 8, exist_ok=True)
        assert e.value.status == 409
        ivf = c.create_collection("w", 4, index="ivf", nlist=2, exist_ok=True)  # absent: created
        assert c.create_collection("w", 4, index="ivf", exist_ok=True) == ivf  # nlist not asked: not compared
        with pytest.raises(ServiceError, match="nlist 2"):
            c.create_collection("w", 4, index="ivf", nlist=3, exist_ok=True)
        graph = c.create_collection("g", 4, index="graph", degree=8, exist_ok=True)
        assert graph["degree"] == 8 and graph["ef"] == 64
        assert c.create_collection("g", 4, index="graph", ef=64, exist_ok=True) == graph
        with pytest.raises(ServiceError, match="degree 8"):
            c.create_collection("g", 4, index="graph", degree=16, exist_ok=True)


def test_train_before_the_first_add(tmp_path):
    tc, c = in_process(tmp_path, KEY)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    with tc:
        assert c.create_collection("w", 4, index="ivf", nlist=4)["trained"] is False
        assert c.train("w", x)["trained"] is True
        with pytest.raises(ServiceError, match="has learnt already") as e:
            c.train("w", x)
        assert e.value.status == 409
        with pytest.raises(ValueError, match="vectors"):
            c.train("w", x.masked_fill(x > 1, float("nan")))
        c.add("w", x[:10], range(10))
        assert c.search("w", x[:1], k=1)[1].tolist() == [[0]]
