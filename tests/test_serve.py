"""xmodal serve: every endpoint and error path through FastAPI's TestClient, the write-ahead log and snapshots,
the micro-batcher, and the client. (A real server in a subprocess, killed and restarted: test_serve_process.py.)"""
import asyncio
import io
import json
import os
import struct
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import xmodal

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from xmodal.serve import Limits, create_app, write_collection  # noqa: E402
from xmodal.serve.batcher import MicroBatcher, Overloaded  # noqa: E402
from xmodal.serve.collection import Catalog, Collection  # noqa: E402
from xmodal.serve.storage import CorruptLogError, Record, WriteAheadLog  # noqa: E402

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


# -- collections
def test_collections_are_created_listed_described_and_deleted(tmp_path):
    with client(tmp_path) as c:
        r = c.put("/collections/images", json={"dim": 8, "metric": "l2"})
        assert r.status_code == 201
        assert r.json() == {"name": "images", "size": 0, "dim": 8, "metric": "l2", "index": "flat", "codec": None}
        assert c.put("/collections/codes", json={"dim": 8, "codec": "int8"}).status_code == 201
        assert c.put("/collections/images", json={"dim": 8}).status_code == 409
        add(c, "images", [1, 2], rows(2))
        listed = c.get("/collections").json()["collections"]
        assert [(x["name"], x["size"]) for x in listed] == [("codes", 0), ("images", 2)]
        assert c.get("/collections/images").json()["size"] == 2
        assert c.delete("/collections/images").json() == {"deleted": "images"}
        assert c.get("/collections/images").status_code == 404
        assert c.delete("/collections/images").status_code == 404
        assert [x["name"] for x in c.get("/collections").json()["collections"]] == ["codes"]
    assert sorted(os.listdir(tmp_path)) == ["codes"]


@pytest.mark.parametrize("name, body, field", [
    ("b@d", {"dim": 8}, "name"),
    ("x", {"dim": 0}, "dim"),
    ("x", {"dim": "eight"}, "dim"),
    ("x", {"dim": 8, "metric": "hamming"}, "metric"),
    ("x", {"dim": 8, "codec": "pq"}, "codec"),
    ("x", {"dim": 8, "index": "hnsw"}, "index"),
    ("x", {"dim": 8, "shards": 2}, "shards"),
    ("x", {"dim": 8, "index": "ivf", "nlist": 0}, "nlist"),
])
def test_bad_collection_options_are_422_naming_the_field(tmp_path, name, body, field):
    with client(tmp_path) as c:
        r = c.put(f"/collections/{name}", json=body)
        assert r.status_code == 422, r.text
        assert detail(r)[0]["field"] == field
        assert c.get("/collections").json()["collections"] == []


# -- vectors
def test_add_replace_get_and_delete_vectors(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 8, "metric": "ip"})
        x = rows(3)
        r = add(c, "v", [10, 11, 12], x, [{"colour": "red"}, None, {"colour": "blue", "tags": ["a", "b"]}])
        assert r.json() == {"upserted": 3, "replaced": 0}
        got = c.get("/collections/v/vectors/12").json()
        assert got["id"] == 12 and got["payload"] == {"colour": "blue", "tags": ["a", "b"]}
        np.testing.assert_allclose(got["vector"], x[2], rtol=1e-6)
        y = rows(2, seed=1)
        assert add(c, "v", [12, 13], y, [{"colour": "green"}, None]).json() == {"upserted": 2, "replaced": 1}
        got = c.get("/collections/v/vectors/12").json()
        np.testing.assert_allclose(got["vector"], y[0], rtol=1e-6)
        assert got["payload"] == {"colour": "green"}
        assert c.get("/collections/v").json()["size"] == 4
        assert c.request("DELETE", "/collections/v/vectors", json={"ids": [10, 99]}).json() == {"deleted": 1}
        assert c.get("/collections/v/vectors/10").status_code == 404
        assert c.get("/collections/v").json()["size"] == 3


@pytest.mark.parametrize("body, field", [
    ({"ids": [1, 2], "vectors": [[0.0] * 8]}, "ids"),
    ({"ids": [1, 1], "vectors": [[0.0] * 8] * 2}, "ids"),
    ({"ids": [2 ** 63], "vectors": [[0.0] * 8]}, "ids[0]"),
    ({"ids": [10, -2, 30], "vectors": [[1.0] * 8] * 3}, "ids[1]"),
    ({"ids": [-1], "vectors": [[1.0] * 8]}, "ids[0]"),
    ({"ids": [1], "vectors": [[0.0] * 7]}, "vectors[0]"),
    ({"ids": [1], "vectors": [[0.0] * 7 + ["x"]]}, "vectors[0][7]"),
    ({"ids": [1], "vectors": [[1.0] * 8], "payloads": [{}, {}]}, "payloads"),
    ({"ids": [1], "vectors": [[1.0] * 8], "payloads": ["red"]}, "payloads[0]"),
    ({"ids": [], "vectors": []}, "vectors"),
    ({"ids": [1], "vector": [[1.0] * 8]}, "vectors"),
])
def test_bad_adds_are_422_naming_the_field_and_change_nothing(tmp_path, body, field):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 8})
        r = c.post("/collections/v/vectors", json=body)
        assert r.status_code == 422, r.text
        assert [d["field"] for d in detail(r)][:1] == [field] or field in [d["field"] for d in detail(r)]
        assert c.get("/collections/v").json()["size"] == 0


def test_non_finite_vectors_are_422_with_the_position(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 3})
        for bad in ("NaN", "Infinity", "-Infinity"):
            r = c.post("/collections/v/vectors", content=f'{{"ids": [1, 2], "vectors": [[1, 2, 3], [1, {bad}, 3]]}}',
                       headers={"content-type": "application/json"})
            assert r.status_code == 422
            assert detail(r) == [{"field": "vectors[1][1]", "message": "vectors must be finite numbers (no NaN or "
                                  "infinity)", "value": bad}]
        c.put("/collections/kl", json={"dim": 3, "metric": "kl"})
        r = add(c, "kl", [1], [[0.5, -0.1, 0.6]])
        assert r.status_code == 422 and "non-negative" in detail(r)[0]["message"]
        assert c.get("/collections/kl").json()["size"] == 0


def test_a_codec_needs_enough_rows_to_learn_from(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/q", json={"dim": 8, "codec": "int8"})
        r = add(c, "q", [1], rows(1))
        assert r.status_code == 422 and "at least 2" in detail(r)[0]["message"]
        assert add(c, "q", range(50), rows(50)).status_code == 200
        assert add(c, "q", [99], rows(1, seed=3)).status_code == 200  # once learnt, any batch
        assert c.get("/collections/q").json()["size"] == 51


# -- search
def test_search_matches_the_in_process_index(tmp_path):
    x, q = rows(500, 16), rows(5, 16, seed=9)
    ids = np.arange(1000, 1500)
    for metric in ("cosine", "l2", "ip"):
        index = xmodal.FlatIndex(16, metric)
        index.add(torch.from_numpy(x), torch.from_numpy(ids))
        want_s, want_i = index.search(torch.from_numpy(q), 7)
        with client(tmp_path / metric) as c:
            c.put("/collections/v", json={"dim": 16, "metric": metric})
            add(c, "v", ids, x)
            results = c.post("/collections/v/search", json={"vectors": q.tolist(), "k": 7}).json()["results"]
        assert [[h["id"] for h in r] for r in results] == want_i.tolist()
        np.testing.assert_allclose([[h["score"] for h in r] for r in results], want_s.numpy(), rtol=1e-5, atol=1e-5)


def test_search_options_allow_list_filter_payload_and_padding(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 2, "metric": "ip"})
        vectors = [[1, 0], [0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0]]
        payloads = [{"colour": "red", "size": 1}, {"colour": "blue", "size": 2}, {"colour": "red", "size": 2},
                    {"tags": ["x", "y"]}, None]
        add(c, "v", [1, 2, 3, 4, 5], vectors, payloads)

        def ids(**options):
            r = c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 10, **options})
            assert r.status_code == 200, r.text
            return [h["id"] for h in r.json()["results"][0]]

        assert ids() == [1, 2, 3, 4, 5]  # k > N: the rows there are
        assert ids(ids=[5, 3, 42]) == [3, 5]
        assert ids(filter={"colour": "red"}) == [1, 3]
        assert ids(filter={"colour": ["blue", "red"]}) == [1, 2, 3]
        assert ids(filter={"colour": "red", "size": 2}) == [3]
        assert ids(filter={"tags": "y"}) == [4]
        assert ids(filter={"colour": "red"}, ids=[1, 2]) == [1]
        assert ids(filter={"colour": "green"}) == []
        r = c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 2, "with_payload": True}).json()
        assert r["results"][0] == [{"id": 1, "score": 1.0, "payload": {"colour": "red", "size": 1}},
                                   {"id": 2, "score": pytest.approx(0.9), "payload": {"colour": "blue", "size": 2}}]
        c.put("/collections/empty", json={"dim": 2})
        assert c.post("/collections/empty/search", json={"vectors": [[1, 0], [0, 1]]}).json() == {"results": [[], []]}


@pytest.mark.parametrize("body, field", [
    ({"vectors": [[1.0, 0.0]], "k": 0}, "k"),
    ({"vectors": [[1.0, 0.0]], "k": 10_001}, "k"),
    ({"vectors": [[1.0, 0.0, 3.0]]}, "vectors[0]"),
    ({"vectors": []}, "vectors"),
    ({"vectors": [[1.0, 0.0]] * 1025}, "vectors"),
    ({"vectors": [[1.0, 0.0]], "filter": {"colour": {"$in": ["red"]}}}, "filter.colour"),
    ({"vectors": [[1.0, 0.0]], "ids": [1, 1]}, "ids"),
    ({"vectors": [[1.0, 0.0]], "ids": [1, -5]}, "ids[1]"),
    ({"vectors": [[1.0, 0.0]], "limit": 3}, "limit"),
])
def test_bad_searches_are_422_naming_the_field(tmp_path, body, field):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1], [[1, 0]])
        r = c.post("/collections/v/search", json=body)
        assert r.status_code == 422, r.text
        assert detail(r)[0]["field"] == field


def test_missing_collections_and_ids_are_404(tmp_path):
    with client(tmp_path) as c:
        for method, path, body in (("GET", "/collections/nope", None), ("DELETE", "/collections/nope", None),
                                   ("POST", "/collections/nope/search", {"vectors": [[1.0]]}),
                                   ("POST", "/collections/nope/vectors", {"ids": [1], "vectors": [[1.0]]}),
                                   ("DELETE", "/collections/nope/vectors", {"ids": [1]}),
                                   ("GET", "/collections/nope/vectors/1", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 404 and "nope" in detail(r), (method, path, r.text)
        c.put("/collections/v", json={"dim": 1})
        assert c.get("/collections/v/vectors/7").status_code == 404


# -- security
def test_every_request_needs_the_api_key(tmp_path):
    with client(tmp_path, api_key=KEY) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY}x"}):
            for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/collections"),
                                 ("PUT", "/collections/v")):
                r = c.request(method, path, headers=headers, json={"dim": 2})
                assert r.status_code == 401, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/collections").status_code == 401
        assert c.put("/collections/v", json={"dim": 2}, headers=AUTH).status_code == 201
        assert c.get("/collections", headers=AUTH).json()["collections"][0]["name"] == "v"


def test_bodies_over_the_limit_are_413(tmp_path):
    with client(tmp_path, limits=Limits(max_body_bytes=1000)) as c:
        c.put("/collections/v", json={"dim": 8})
        r = add(c, "v", range(40), rows(40))
        assert r.status_code == 413
        # no Content-Length (chunked): counted as it arrives
        r = c.post("/collections/v/vectors", content=iter([b'{"ids": [1], "vectors": [[', b"1," * 600, b"1]]}"]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/collections/v/vectors", content=iter([b'{"ids": [1], ', b'"vectors": [[1,2,3,4,5,6,7,8]]}']),
                   headers={"content-type": "application/json"})
        assert r.status_code == 200
        assert c.get("/collections/v").json()["size"] == 1


def test_limits_on_vectors_per_add(tmp_path):
    with client(tmp_path, limits=Limits(max_vectors=10, max_queries=3)) as c:
        c.put("/collections/v", json={"dim": 8})
        assert add(c, "v", range(11), rows(11)).status_code == 422
        assert add(c, "v", range(10), rows(10)).status_code == 200
        r = c.post("/collections/v/search", json={"vectors": rows(4).tolist()})
        assert r.status_code == 422 and detail(r)[0]["field"] == "vectors"


def test_nothing_on_disk_is_pickled(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 8})
        add(c, "v", range(20), rows(20), [{"i": i} for i in range(20)])
        c.post("/collections/v/vectors", json={"ids": [99], "vectors": rows(1).tolist()})
        tmp_path_catalog = c.app  # noqa: F841
    Collection.open(str(tmp_path / "v")).snapshot()
    for name in os.listdir(tmp_path / "v"):
        with open(tmp_path / "v" / name, "rb") as f:
            head = f.read(2)
        assert head[:1] != b"\x80", name  # a pickle protocol header


# -- operations
def test_health_ready_and_metrics(tmp_path):
    with client(tmp_path) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json() == {"status": "ready", "collections": 0}
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1, 2, 3], [[1, 0], [0, 1], [1, 1]])
        for _ in range(3):
            c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 2})
        text = c.get("/metrics").text
    assert 'xmodal_collection_vectors{collection="v"} 3.0' in text
    assert 'xmodal_requests_total{method="POST",route="/collections/{name}/search",status="200"} 3.0' in text
    assert 'xmodal_request_seconds_count{route="/collections/{name}/search"} 3.0' in text
    assert 'xmodal_search_batch_queries_count{collection="v"} 3.0' in text


def test_ready_waits_for_loading_and_reports_a_failed_load(tmp_path):
    key = os.urandom(32)
    with client(tmp_path, encryption_key=key) as c:
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1], [[1, 0]])
    with TestClient(create_app(str(tmp_path), encryption_key=os.urandom(32))) as c:  # the wrong key
        deadline = time.monotonic() + 60
        while c.get("/ready").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "wrong encryption key" in r.json()["error"]
        assert c.get("/collections").status_code == 503
        assert c.get("/health").status_code == 200


# -- durability: log, snapshots, restarts (in-process; SIGKILL in test_serve_process.py)
def test_state_survives_restarts_through_log_and_snapshots(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for round_ in range(3):
        with client(tmp_path, snapshot_bytes=20_000) as c:  # a snapshot every few writes
            if round_ == 0:
                c.put("/collections/v", json={"dim": 4, "metric": "l2"})
            for _ in range(40):
                ids = rng.choice(60, size=rng.integers(1, 6), replace=False)
                if rng.random() < 0.3:
                    c.request("DELETE", "/collections/v/vectors", json={"ids": ids.tolist()})
                    for i in ids:
                        expected.pop(int(i), None)
                else:
                    x = rng.standard_normal((len(ids), 4)).astype(np.float32)
                    payloads = [{"round": round_, "i": int(i)} for i in ids]
                    assert add(c, "v", ids, x, payloads).status_code == 200
                    for i, v, p in zip(ids, x, payloads):
                        expected[int(i)] = (v, p)
            time.sleep(0.2)  # let a background snapshot finish (the next start would wait for nothing)
        col = Collection.open(str(tmp_path / "v"))
        assert sorted(col.index.ids.tolist()) == sorted(expected)
        for i, (v, p) in expected.items():
            got_v, got_p = col.get(i)
            np.testing.assert_array_equal(got_v, v)
            assert got_p == p
        col.close()
    names = os.listdir(tmp_path / "v")
    assert sum(n.endswith(".index") for n in names) == 1, names  # old snapshots are deleted
    assert len([n for n in names if n.startswith("wal-")]) <= 2, names  # and the log they hold


def test_a_torn_last_record_is_ignored_with_a_warning(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/v", json={"dim": 4})
        add(c, "v", [1, 2], rows(2, 4), [{"a": 1}, {"a": 2}])
        add(c, "v", [3], rows(1, 4, seed=5))
    log = [n for n in os.listdir(tmp_path / "v") if n.startswith("wal-")][0]
    path = tmp_path / "v" / log
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)  # the last record, cut short
    with pytest.warns(RuntimeWarning, match="torn last record"):
        col = Collection.open(str(tmp_path / "v"))
    assert sorted(col.index.ids.tolist()) == [1, 2]
    col.upsert(np.array([4]), rows(1, 4, seed=6))  # appends after the last whole record
    col.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        col = Collection.open(str(tmp_path / "v"))
    assert sorted(col.index.ids.tolist()) == [1, 2, 4]
    assert col.payloads.by_id == {1: {"a": 1}, 2: {"a": 2}}


def test_damage_before_the_last_record_refuses_to_start(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    log = WriteAheadLog(str(folder))
    for i in range(3):
        log.append(Record("upsert", np.array([i]), rows(1, 4, seed=i)))
    log.close()
    path = log.segments()[0]
    data = bytearray(open(path, "rb").read())
    data[40] ^= 0xFF  # inside the first record
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptLogError, match="corrupt at byte 0"):
        list(WriteAheadLog(str(folder)).replay())


def test_log_records_round_trip_and_are_sealed_with_a_key(tmp_path):
    key = os.urandom(32)
    log = WriteAheadLog(str(tmp_path), key)
    x = rows(3, 4)
    log.append(Record("upsert", np.array([5, 6, 7]), x, [{"secret": "alpha"}, None, {"b": [1, 2]}]))
    log.append(Record("delete", np.array([6])))
    log.close()
    raw = open(log.segments()[0], "rb").read()
    assert b"alpha" not in raw and x.tobytes()[:16] not in raw
    got = list(WriteAheadLog(str(tmp_path), key).replay())
    assert [r.op for r in got] == ["upsert", "delete"] and [r.seq for r in got] == [1, 2]
    np.testing.assert_array_equal(got[0].vectors, x)
    assert got[0].payloads == [{"secret": "alpha"}, None, {"b": [1, 2]}]
    with pytest.raises(ValueError, match="wrong encryption key"):
        list(WriteAheadLog(str(tmp_path), os.urandom(32)).replay())


def test_encryption_at_rest_covers_snapshots_and_log(tmp_path):
    key = os.urandom(32)
    with client(tmp_path, encryption_key=key, snapshot_bytes=1) as c:
        c.put("/collections/v", json={"dim": 4})
        add(c, "v", [1, 2], rows(2, 4), [{"name": "confidential-1"}, {"name": "confidential-2"}])
        time.sleep(0.3)
        add(c, "v", [3], rows(1, 4, seed=4), [{"name": "confidential-3"}])
        time.sleep(0.3)
    names = os.listdir(tmp_path / "v")
    assert any(n.endswith(".index") for n in names)
    for name in names:
        data = open(tmp_path / "v" / name, "rb").read()
        assert b"confidential" not in data, name
    with client(tmp_path, encryption_key=key) as c:
        assert c.get("/collections/v/vectors/3").json()["payload"] == {"name": "confidential-3"}
        assert c.get("/collections/v").json()["size"] == 3


def test_write_collection_serves_an_index_built_in_python(tmp_path):
    index = xmodal.FlatIndex(8, "cosine", codec="int8")
    x = rows(300)
    index.add(torch.from_numpy(x), torch.arange(300) * 2)
    write_collection(str(tmp_path), "prebuilt", index, {0: {"first": True}})
    with pytest.raises(FileExistsError):
        write_collection(str(tmp_path), "prebuilt", index)
    with client(tmp_path) as c:
        assert c.get("/collections/prebuilt").json() == {"name": "prebuilt", "size": 300, "dim": 8,
                                                         "metric": "cosine", "index": "flat", "codec": "int8"}
        hits = c.post("/collections/prebuilt/search", json={"vectors": x[:1].tolist(), "k": 1,
                                                            "with_payload": True}).json()["results"][0]
        assert hits[0]["id"] == 0 and hits[0]["payload"] == {"first": True}


def test_ivf_collections_learn_from_their_first_write(tmp_path):
    with client(tmp_path) as c:
        c.put("/collections/ivf", json={"dim": 8, "index": "ivf", "nlist": 4, "nprobe": 4})
        assert add(c, "ivf", [1, 2], rows(2)).status_code == 422  # fewer rows than lists
        x = rows(200)
        assert add(c, "ivf", range(200), x).status_code == 200
        assert add(c, "ivf", [500], rows(1, seed=2)).status_code == 200
        first = c.post("/collections/ivf/search", json={"vectors": x[:3].tolist(), "k": 5}).json()
    with client(tmp_path) as c:  # replay learns the same lists from the same first write
        assert c.post("/collections/ivf/search", json={"vectors": x[:3].tolist(), "k": 5}).json() == first


# -- micro-batching
def test_the_batcher_answers_concurrent_requests_with_one_search():
    calls = []

    def search(q, k):
        calls.append(q.shape[0])
        time.sleep(0.05)
        return q[:, :1].repeat(k, 1) * 1.0, np.tile(np.arange(k), (q.shape[0], 1))

    async def main():
        b = MicroBatcher(search, max_batch=64, max_wait=0.01)
        queries = [np.full((1, 4), i, np.float32) for i in range(20)]
        results = await asyncio.gather(*(b.submit(q, 3 + i % 2) for i, q in enumerate(queries)))
        b.close()
        return results

    results = asyncio.run(main())
    assert sum(calls) == 20 and len(calls) <= 3, calls  # the first alone, the rest gathered while it ran
    for i, (scores, ids) in enumerate(results):
        assert scores.shape == (1, 3 + i % 2) and float(scores[0, 0]) == i
        assert ids.tolist() == [list(range(3 + i % 2))]


def test_the_batcher_refuses_past_its_queue_and_runs_masked_searches_alone():
    calls = []
    release = threading.Event()

    def search(q, k):
        calls.append(q.shape[0])
        release.wait(5)
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search, max_batch=64, max_queue=5)
        first = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.05)  # the first is running; the next ones queue
        queued = [asyncio.ensure_future(b.submit(np.zeros((2, 2), np.float32), 1)) for _ in range(2)]
        masked = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1, run_alone=lambda: "alone"))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(np.zeros((1, 2), np.float32), 1)
        release.set()
        done = await asyncio.gather(first, *queued, masked)
        b.close()
        return done

    done = asyncio.run(main())
    assert calls == [1, 4] and done[-1] == "alone"


def test_search_errors_reach_the_caller_and_the_batcher_goes_on():
    def search(q, k):
        if q[0, 0] < 0:
            raise RuntimeError("boom")
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(-np.ones((1, 2), np.float32), 1)
        result = await b.submit(np.ones((1, 2), np.float32), 2)
        b.close()
        return result

    assert asyncio.run(main())[1].shape == (1, 2)


def test_a_full_queue_is_503_with_retry_after(tmp_path, monkeypatch):
    release = threading.Event()
    original = Collection.search

    def slow_search(self, queries, k, allow_ids=None, filter_=None):
        release.wait(10)  # holds the first search while the others arrive
        return original(self, queries, k, allow_ids, filter_)

    monkeypatch.setattr(Collection, "search", slow_search)
    app = create_app(str(tmp_path), load_in_background=False, limits=Limits(max_queue=2))
    with TestClient(app) as c:
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1], [[1, 0]])
        answers = []

        def search():
            answers.append(c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 1}))

        threads = [threading.Thread(target=search) for _ in range(5)]
        for t in threads:  # one runs, two queue, two are refused
            t.start()
            time.sleep(0.2)
        release.set()
        for t in threads:
            t.join(30)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 503, 503], codes
    refused = [r for r in answers if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue full" in r.json()["detail"] for r in refused)


# -- searching by text and image with the demo model
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from xmodal.train import build_model

    folder = str(tmp_path_factory.mktemp("model") / "model")
    build_model(0).save(folder)
    return folder


def png(colour=(255, 0, 0)):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_by_text_image_and_both_with_a_model(tmp_path, model_folder):
    from xmodal.encoders import CrossModalModel
    from xmodal.data import IMAGE_SIZE

    model = CrossModalModel.load(model_folder)
    with torch.inference_mode():
        gallery = model.encode_image(torch.rand(30, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
        want_text = model.encode_text(["a red circle"])
    with client(tmp_path, model_path=model_folder) as c:
        c.put("/collections/g", json={"dim": model.embed_dim})
        add(c, "g", range(30), gallery.numpy())
        r = c.post("/collections/g/search/text", json={"text": "a red circle", "k": 5})
        assert r.status_code == 200, r.text
        expect = xmodal.topk_search(want_text, gallery, 5, "cosine")[1][0].tolist()
        assert [h["id"] for h in r.json()["results"][0]] == expect
        r = c.post("/collections/g/search/text", json={"text": ["red", "blue"], "k": 3})
        assert [len(x) for x in r.json()["results"]] == [3, 3]
        r = c.post("/collections/g/search/image", files={"image": ("a.png", png())}, data={"k": "4"})
        assert r.status_code == 200 and len(r.json()["results"][0]) == 4
        r = c.post("/collections/g/search/composed", files={"image": ("a.png", png())},
                   data={"text": "make it blue", "k": "4", "filter": "{}"})
        assert r.status_code == 200 and len(r.json()["results"][0]) == 4
        r = c.post("/collections/g/search/image", files={"image": ("a.png", b"not an image")})
        assert r.status_code == 422 and detail(r)[0]["field"] == "image"
        c.put("/collections/other", json={"dim": 3})
        r = c.post("/collections/other/search/text", json={"text": "red"})
        assert r.status_code == 422 and "dimensions" in detail(r)[0]["message"]
    with client(tmp_path) as c:
        r = c.post("/collections/g/search/text", json={"text": "red"})
        assert r.status_code == 404 and "--model" in detail(r)


# -- the client, against the app in-process
def test_the_client_speaks_the_api(tmp_path, monkeypatch):
    from xmodal.client import Client, ServiceError

    with client(tmp_path, api_key=KEY) as tc:
        c = Client("http://testserver", api_key=KEY)
        c._http = tc  # the TestClient is an httpx.Client bound to the app
        tc.headers.update(AUTH)
        assert c.health() and c.ready()
        c.create_collection("v", 4, "l2")
        x = rows(20, 4)
        assert c.add("v", x, ids=range(20), payloads=[{"i": i} for i in range(20)]) == {"upserted": 20, "replaced": 0}
        scores, ids = c.search("v", x[:2], k=3)
        assert isinstance(ids, np.ndarray) and ids[:, 0].tolist() == [0, 1]
        scores_t, ids_t = c.search("v", torch.from_numpy(x[0]), k=25)
        assert isinstance(ids_t, torch.Tensor) and ids_t.shape == (25,)
        assert ids_t[20:].tolist() == [-1] * 5 and torch.isinf(scores_t[20:]).all()
        _, ids, payloads = c.search("v", x[:1], k=2, filter={"i": [3, 4]}, with_payload=True)
        assert sorted(ids[0].tolist()) == [3, 4] and payloads[0] == [{"i": int(i)} for i in ids[0]]
        vector, payload = c.get("v", 5)
        np.testing.assert_array_equal(vector, x[5])
        assert payload == {"i": 5}
        assert c.remove("v", [5, 6, 100]) == 2
        with pytest.raises(ServiceError) as e:
            c.get("v", 5)
        assert e.value.status == 404
        assert [x["name"] for x in c.collections()] == ["v"]
        with pytest.raises(ServiceError) as e:
            c.search("v", np.zeros((1, 3)), k=2)
        assert e.value.status == 422 and e.value.detail[0]["field"] == "vectors[0]"
        c.delete_collection("v")
        assert c.collections() == []


def test_closing_the_batcher_answers_every_waiting_search():
    from xmodal.serve.batcher import Closed

    release = threading.Event()

    def search(q, k):
        release.wait(5)
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search)
        running = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.01)
        b.close()
        release.set()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(Closed):
            await b.submit(np.zeros((1, 2), np.float32), 1)
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(o, Closed) for o in outcomes), outcomes
