"""xmodal serve's durability: the write-ahead log, snapshots and restarts (in-process; a real server
killed with SIGKILL: test_serve_process.py), encryption at rest, and folders written from Python."""
import os
import time
import warnings

import numpy as np
import pytest
import torch

import xmodal

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from xmodal.serve import write_collection  # noqa: E402
from xmodal.serve.collection import Collection  # noqa: E402
from xmodal.serve.storage import CorruptLogError, Record, WriteAheadLog  # noqa: E402

from serve_helpers import add, client, rows  # noqa: E402


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
                                                         "metric": "cosine", "index": "flat", "codec": "int8",
                                                         "trained": True}
        hits = c.post("/collections/prebuilt/search", json={"vectors": x[:1].tolist(), "k": 1,
                                                            "with_payload": True}).json()["results"][0]
        assert hits[0]["id"] == 0 and hits[0]["payload"] == {"first": True}
    graph = xmodal.GraphIndex(8, "l2", degree=8, ef=20)
    graph.add(torch.from_numpy(x), torch.arange(300) + 7)
    write_collection(str(tmp_path), "graph", graph)
    with client(tmp_path) as c:
        assert c.get("/collections/graph").json() == {"name": "graph", "size": 300, "dim": 8, "metric": "l2",
                                                      "index": "graph", "codec": None, "degree": 8, "ef": 20,
                                                      "trained": True}
        hits = c.post("/collections/graph/search", json={"vectors": x[5:6].tolist(), "k": 1}).json()["results"][0]
        assert hits[0]["id"] == 12


def test_graph_collections_search_filter_delete_and_survive_restarts(tmp_path):
    x = rows(600, 16)
    colours = ["red" if i % 20 == 0 else "blue" for i in range(600)]
    q = rows(20, 16, seed=3)

    def exact(ids, k=10):
        kept = torch.from_numpy(x[ids])
        kept = kept / kept.norm(dim=1, keepdim=True)
        qn = torch.from_numpy(q) / torch.from_numpy(q).norm(dim=1, keepdim=True)
        return [set(np.asarray(ids)[row].tolist()) for row in (qn @ kept.T).topk(k, dim=1).indices.numpy()]

    def found(c, **options):
        r = c.post("/collections/g/search", json={"vectors": q.tolist(), "k": 10, **options})
        assert r.status_code == 200, r.text
        return [{hit["id"] for hit in hits} for hits in r.json()["results"]]

    def recall(got, want):
        return np.mean([len(g & w) / len(w) for g, w in zip(got, want)])

    with client(tmp_path, snapshot_bytes=40_000) as c:
        r = c.put("/collections/g", json={"dim": 16, "index": "graph", "degree": 12, "ef": 48})
        assert r.json() == {"name": "g", "size": 0, "dim": 16, "metric": "cosine", "index": "graph",
                            "codec": None, "degree": 12, "ef": 48, "trained": True}
        for start in range(0, 600, 100):
            ids = range(start, start + 100)
            assert add(c, "g", ids, x[start: start + 100], [{"colour": colours[i]} for i in ids]).status_code == 200
        assert recall(found(c), exact(np.arange(600))) >= 0.9
        red = np.flatnonzero(np.array(colours) == "red")  # 5%: a filter inside the walk or an exact scan
        assert recall(found(c, filter={"colour": "red"}), exact(red)) >= 0.9
        gone = np.arange(0, 600, 3)
        assert c.request("DELETE", "/collections/g/vectors", json={"ids": gone.tolist()}).json() == {"deleted": 200}
        kept = np.setdiff1d(np.arange(600), gone)
        before = found(c)
        assert recall(before, exact(kept)) >= 0.9 and not set().union(*before) & set(gone.tolist())
        time.sleep(0.2)  # (a background snapshot)
    assert any(n.endswith(".index") for n in os.listdir(tmp_path / "g"))
    with client(tmp_path) as c:  # the snapshot plus the log after it (replayed in one pass: links may differ)
        assert c.get("/collections/g").json()["size"] == 400
        assert sorted(c.post("/collections/g/search", json={"vectors": x[kept].tolist(), "k": 1}).json()[
            "results"][i][0]["id"] for i in range(400)) == kept.tolist()
        assert recall(found(c), exact(kept)) >= 0.9
        assert add(c, "g", [1000], q[:1]).status_code == 200  # an add after the restart joins the graph
        assert all(1000 in hits for hits in found(c)[:1])


@pytest.mark.parametrize("body, field", [
    ({"dim": 8, "index": "graph", "metric": "kl"}, "metric"),
    ({"dim": 8, "index": "graph", "codec": "int8"}, "codec"),
    ({"dim": 8, "index": "graph", "degree": 0}, "degree"),
    ({"dim": 8, "index": "graph", "nlist": 4}, "nlist"),
    ({"dim": 8, "index": "flat", "ef": 4}, "ef"),
])
def test_bad_graph_collection_options_are_422_naming_the_field(tmp_path, body, field):
    with client(tmp_path) as c:
        r = c.put("/collections/x", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text


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
