"""The sharded service on Ray Serve (xmodal.serve.ray_app) on a local Ray cluster bound to 127.0.0.1 with a fixed
CPU count: answers equal to one FlatIndex, writes routed and durable, and a shard replica killed in the middle
of a stream of writes: Ray restarts it, it recovers from its snapshot and log, no acknowledged write is lost,
and searches go on from its other replica meanwhile.
The routing and merging themselves are tested without Ray in test_serve_fanout.py."""
import functools
import socket
import time

import numpy as np
import pytest
import torch

import xmodal

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'xmodal[ray]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from xmodal.serve.shards import shard_of  # noqa: E402

from serve_helpers import rows  # noqa: E402

SHARDS = 2
REPLICAS = 2  # (each shard kept twice: searches go on while one replica is down)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from xmodal.serve.ray_app import build_app

    folder = tmp_path_factory.mktemp("ray-service")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # snapshots every few writes, so that a restarted shard has a snapshot and a log to recover from
        serve.run(build_app(str(folder), SHARDS, replicas=REPLICAS, shard_cpus=0, snapshot_bytes=4096,
                            shard_timeout=5.0),
                  name="xmodal", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 60
            while c.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "the Ray service did not get ready in 60 s"
                time.sleep(0.2)
            yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def test_answers_equal_one_flat_index_and_sizes_follow_the_owners(service):
    x, q = rows(500, dim=16, seed=5), rows(6, dim=16, seed=6)
    assert service.put("/collections/c", json={"dim": 16, "metric": "cosine"}).status_code == 201
    r = service.post("/collections/c/vectors", json={"ids": list(range(500)), "vectors": x.tolist()})
    assert r.json() == {"upserted": 500, "replaced": 0}
    flat = xmodal.FlatIndex(16, "cosine")
    flat.add(torch.from_numpy(x))
    want_scores, want_ids = flat.search(torch.from_numpy(q), 10)
    got = service.post("/collections/c/search", json={"vectors": q.tolist(), "k": 10}).json()["results"]
    assert [[h["id"] for h in hits] for hits in got] == want_ids.tolist()
    assert np.allclose([[h["score"] for h in hits] for hits in got], want_scores.numpy(), atol=1e-5)
    assert service.get("/collections/c").json()["size"] == 500
    assert service.get("/collections/c/vectors/123").json()["id"] == 123


def test_an_ivf_collection_made_through_the_api_answers_as_one_ivf_index(service):
    # shard 0 learns from the whole first add, the others take what it learnt (through the Ray handles)
    x, q = rows(600, dim=16, seed=8), rows(5, dim=16, seed=9)
    config = {"dim": 16, "metric": "l2", "index": "ivf", "nlist": 8, "nprobe": 3, "codec": "int8"}
    assert service.put("/collections/ivf", json=config).status_code == 201
    for part in (slice(0, 350), slice(350, 600)):
        ids = list(range(600))[part]
        r = service.post("/collections/ivf/vectors", json={"ids": ids, "vectors": x[part].tolist()})
        assert r.status_code == 200, r.text
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (as the shards learn: one thread each)
    try:
        one = xmodal.IVFIndex(16, 8, "l2", nprobe=3, codec="int8")
        one.train(torch.from_numpy(x[:350]))
    finally:
        torch.set_num_threads(threads)
    one.add(torch.from_numpy(x), torch.arange(600))
    want_scores, want_ids = one.search(torch.from_numpy(q), 10)
    got = service.post("/collections/ivf/search", json={"vectors": q.tolist(), "k": 10}).json()["results"]
    assert [[h["id"] for h in hits] for hits in got] == want_ids.tolist()
    assert np.allclose([[h["score"] for h in hits] for hits in got], want_scores.numpy(), atol=1e-5)


def _shard_replica(i):
    """(name, actor) of shard i's first replica's live Ray actor."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and f"#shard-{i}#" in actor["name"]:
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            except ValueError:  # (dead, not yet forgotten)
                continue
            return actor["name"], handle
    raise AssertionError(f"no replica of shard-{i} among {ray.util.list_named_actors(all_namespaces=True)}")


def test_a_killed_shard_restarts_from_its_snapshot_and_log_without_losing_acknowledged_writes(service):
    assert service.put("/collections/k", json={"dim": 8, "metric": "l2"}).status_code == 201
    x = rows(4000, seed=7)
    acknowledged, refused, after_kill, step = set(), 0, 0, 0
    deadline = time.monotonic() + 90
    # writes of 20 rows (both shards own some of each): 30 before the kill, then on until 30 more went through
    while after_kill < 30:
        assert time.monotonic() < deadline, f"the killed shard did not come back in 90 s ({refused} refused)"
        if step == 30:
            killed, actor = _shard_replica(1)
            ray.kill(actor, no_restart=True)
        ids = np.arange(step * 20, step * 20 + 20)
        r = service.post("/collections/k/vectors", json={"ids": ids.tolist(), "vectors": x[ids % len(x)].tolist()})
        if r.status_code == 200:
            acknowledged |= set(ids.tolist())
            after_kill += step > 30
        else:
            assert r.status_code == 503 and "retry-after" in r.headers, (r.status_code, r.text)
            refused += 1
            # searches go on: shard 1's other replica answers them
            found = service.post("/collections/k/search", json={"vectors": x[:1].tolist(), "k": 5})
            assert found.status_code == 200 and len(found.json()["results"][0]) == 5, found.text
            time.sleep(0.2)
        step += 1
    assert service.get("/ready").status_code == 200
    assert _shard_replica(1)[0] != killed  # (Ray Serve started a new replica)
    assert refused >= 1  # (the writes routed to the dead replica were refused, not lost)
    got = service.post("/collections/k/search", json={"vectors": x[:1].tolist(), "k": 10_000}).json()["results"][0]
    stored = {h["id"] for h in got}
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    owned_by_1 = [i for i in sorted(acknowledged) if shard_of(np.array([i]), SHARDS)[0] == 1]
    assert owned_by_1 and all(service.get(f"/collections/k/vectors/{i}").status_code == 200 for i in owned_by_1[:20])


def test_a_dataset_embedded_and_indexed_into_shards_answers_as_one_ivf_index(service, tmp_path):
    from fastapi.testclient import TestClient

    from xmodal.serve.fanout import create_fanout_app
    from xmodal.serve.shards import LocalShard, shard_folders
    from xmodal.serve.ray_build import build_collection

    x, q = rows(3000, dim=16, seed=8), rows(5, dim=16, seed=9)
    colours = ["red", "green", "blue"]
    dataset = ray.data.from_items([{"id": i, "text": x[i], "colour": colours[i % 3]} for i in range(3000)])
    index = xmodal.IVFIndex(16, 32, "cosine", nprobe=4, codec="int8")
    double = functools.partial(np.multiply, 2.0)  # the stand-in for a model (importable where Ray runs it)
    built = build_collection(dataset, str(tmp_path), "b", SHARDS, index, embed=double, payload_columns=("colour",),
                             batch_size=500, sample_rows=2000, writer_cpus=0, progress=False)
    owners = shard_of(np.arange(3000), SHARDS)
    assert built["rows"] == np.bincount(owners, minlength=SHARDS).tolist()
    # one index with the same quantizer and codec, holding every row, is the reference
    reference = xmodal.IVFIndex.load(built["trained"])
    reference.add(torch.from_numpy(2 * x))
    red = torch.isin(reference.ids, torch.arange(0, 3000, 3))  # (a mask follows the index's row order)
    shards = [LocalShard(path) for path in shard_folders(str(tmp_path), SHARDS)]
    try:
        c = TestClient(create_fanout_app(shards))
        for body, mask in (({"k": 10}, None), ({"k": 5, "filter": {"colour": "red"}}, red)):
            want_scores, want_ids = reference.search(torch.from_numpy(q), body["k"], mask)
            got = c.post("/collections/b/search", json={**body, "vectors": q.tolist()}).json()["results"]
            assert [[h["id"] for h in hits] for hits in got] == want_ids.tolist(), body
            assert np.allclose([[h["score"] for h in hits] for hits in got], want_scores.numpy(), atol=1e-5)
        assert c.get("/collections/b/vectors/4").json()["payload"] == {"colour": "green"}
    finally:
        for s in shards:
            s.close()
    with pytest.raises(FileExistsError, match="already exists"):
        build_collection(dataset, str(tmp_path), "b", SHARDS, xmodal.IVFIndex(16, 32, "cosine"), embed=double)
