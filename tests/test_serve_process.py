"""A real ``xmodal serve`` in a subprocess on 127.0.0.1: concurrent clients, SIGKILL during a stream of writes
and restart, a torn log tail, the API key, a sharded folder served whole. Every loop here is bounded in count
and time."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import Server  # noqa: E402
from xmodal.client import Client, ServiceError  # noqa: E402

DIM = 16


@pytest.fixture
def servers():
    started = []

    def start(folder, *args, headers=None):
        server = Server(folder, *args)
        started.append(server)
        server.wait_ready(headers)
        return server

    yield start
    for server in started:
        server.stop()


def vector_of(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path, servers):
    folder = tmp_path / "data"
    server = servers(folder, "--snapshot-mb", "0.02")  # snapshots happen during the stream too
    with Client(server.url) as c:
        c.create_collection("v", DIM, "l2")
    acknowledged, attempted = [], []
    stop = threading.Event()

    def writer():
        with Client(server.url, timeout=10) as c:
            for batch in range(100_000):
                if stop.is_set():
                    return
                ids = [batch * 3 + j for j in range(3)]
                attempted.append(ids)
                try:
                    c.add("v", np.stack([vector_of(i) for i in ids]), ids, [{"id": i} for i in ids])
                except (httpx.HTTPError, ServiceError):
                    return
                acknowledged.extend(ids)

    threads = [threading.Thread(target=writer)]
    threads[0].start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    threads[0].join(30)
    assert len(acknowledged) >= 300, "the writer was too slow to test anything"

    server = servers(folder)
    with Client(server.url) as c:
        for i in acknowledged:
            vector, payload = c.get("v", i)
            np.testing.assert_array_equal(vector, vector_of(i))
            assert payload == {"id": i}
        size = c.collection("v")["size"]
        unacknowledged = [ids for ids in attempted if ids[0] not in set(acknowledged)]
        present = 0
        for ids in unacknowledged:  # the write in flight when killed: all of it or none of it
            found = []
            for i in ids:
                try:
                    found.append(c.get("v", i))
                except ServiceError as e:
                    assert e.status == 404
            assert len(found) in (0, len(ids)), (ids, found)
            for i, (vector, payload) in zip(ids, found):
                np.testing.assert_array_equal(vector, vector_of(i))
                assert payload == {"id": i}
            present += len(found)
        assert size == len(acknowledged) + present

        # concurrent searches against the restarted service are answered right
        errors = []

        def searcher(seed):
            try:
                with Client(server.url) as cc:
                    rng = np.random.default_rng(seed)
                    for _ in range(15):
                        i = int(rng.choice(acknowledged))
                        _, ids = cc.search("v", vector_of(i), k=3)
                        assert int(ids[0]) == i
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=searcher, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        metrics = httpx.get(server.url + "/metrics").text
        assert 'xmodal_requests_total{method="POST",route="/collections/{name}/search",status="200"} 120.0' in metrics


def test_a_torn_log_tail_is_ignored_and_the_api_key_is_required(tmp_path, servers):
    folder = tmp_path / "data"
    key_file = tmp_path / "api-key"
    key_file.write_text("a-long-enough-api-key-42\n")
    auth = {"Authorization": "Bearer a-long-enough-api-key-42"}
    server = servers(folder, "--api-key-file", str(key_file), headers=auth)
    assert httpx.get(server.url + "/collections").status_code == 401
    assert httpx.get(server.url + "/collections", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with Client(server.url, api_key="a-long-enough-api-key-42") as c:
        c.create_collection("v", DIM, "l2")
        c.add("v", np.stack([vector_of(i) for i in range(10)]), range(10))
    server.kill()
    log = sorted(n for n in os.listdir(folder / "v") if n.startswith("wal-"))[-1]
    with open(folder / "v" / log, "ab") as f:
        f.write(b"XWAL\x00\x10\x00\x00partial")  # a record whose write was cut off
    server = servers(folder, "--api-key-file", str(key_file), headers=auth)
    with Client(server.url, api_key="a-long-enough-api-key-42") as c:
        assert c.collection("v")["size"] == 10
        c.add("v", vector_of(10)[None], [10])
    assert "torn last record" in server.errors()
    server.kill()
    server = servers(folder, "--api-key-file", str(key_file), headers=auth)
    with Client(server.url, api_key="a-long-enough-api-key-42") as c:
        assert c.collection("v")["size"] == 11
    assert "torn" not in server.errors()


def test_bad_service_arguments_are_clear_errors(tmp_path):
    short = tmp_path / "short-key"
    short.write_text("abc")
    for args, message in ((["--api-key-file", str(short)], "16 or more"),
                          (["--api-key-file", str(tmp_path / "missing")], "cannot read the API key file"),
                          (["--encryption-key-file", str(short)], "32 raw bytes"),
                          (["--port", "70000"], "port number")):
        r = subprocess.run([sys.executable, "-m", "xmodal", "serve", str(tmp_path / "d"), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_a_sharded_folder_is_served_whole_by_one_process(tmp_path, servers):
    # what build_collection or the Ray service wrote, served by one `xmodal serve` through the same front
    from fastapi.testclient import TestClient

    from xmodal.serve import create_app
    from xmodal.serve.fanout import create_fanout_app
    from xmodal.serve.shards import LocalShard, replica_folders, written_layout

    folder = tmp_path / "sharded"
    x = np.stack([vector_of(i) for i in range(300)])
    body = {"vectors": x[:3].tolist(), "k": 5}
    shards = [LocalShard(paths[0]) for paths in replica_folders(str(folder), 3, 2)]
    try:
        with TestClient(create_fanout_app(shards)) as c:
            c.put("/collections/v", json={"dim": DIM, "metric": "l2", "index": "ivf", "nlist": 4, "nprobe": 4})
            r = c.post("/collections/v/vectors", json={"ids": list(range(300)), "vectors": x.tolist()})
            assert r.status_code == 200
            want = c.post("/collections/v/search", json=body).json()
    finally:
        for s in shards:
            s.close()
    server = servers(folder)
    with Client(server.url) as c:
        assert c.collection("v")["size"] == 300
        assert c._http.post("/collections/v/search", json=body).json() == want
    assert written_layout(str(folder)) == {"shards": 3, "replicas": 1}  # (replicas served later: copied afresh)
    with pytest.raises(ValueError, match="holds the shards of a sharded service"):
        with TestClient(create_app(str(folder), load_in_background=False)):
            pass
