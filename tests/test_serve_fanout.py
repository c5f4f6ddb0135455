"""The sharded front (xmodal.serve.fanout) over shards in this process: the same answers as one service and one
FlatIndex, writes routed by id and durable, the same errors, and what a shard that cannot answer does. The Ray
deployment of the same front: test_serve_ray.py."""

import numpy as np
import pytest
import torch

import xmodal

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from xmodal.serve.fanout import create_fanout_app  # noqa: E402
from xmodal.serve.shards import (LocalShard, Replicas, ShardUnavailable, replica_folders, shard_folders,  # noqa: E402
                                 shard_of)

from serve_helpers import AUTH, KEY, add, client, rows  # noqa: E402


def sharded(folder, shards=3, down=(), **kwargs):
    """A TestClient over the front and its LocalShards; shards in ``down`` raise ShardUnavailable."""
    return sharded_over([LocalShard(path) for path in shard_folders(str(folder), shards)], down, **kwargs)


def sharded_over(locals_, down=(), **kwargs):
    """A TestClient over the front and these LocalShards."""
    shards = len(locals_)

    def caller(i):
        async def call(method, path, body, content_type):
            if i in down:
                raise ShardUnavailable(f"shard {i} is down")
            return await locals_[i](method, path, body, content_type)
        return call

    c = TestClient(create_fanout_app([caller(i) for i in range(shards)], **kwargs))
    c.shards = locals_
    return c


def close(*clients):
    for c in clients:
        if hasattr(c, "shards"):
            for s in c.shards:
                s.close()
        else:
            c.__exit__(None, None, None)


def test_shard_of_is_fixed_and_spreads_ids():
    # (fixed forever: a restarted service, or a later version, must look for an id where it was written)
    assert shard_of(np.array([0, 1, 2, 3, 4, 5, 1 << 40]), 4).tolist() == shard_of(
        np.array([0, 1, 2, 3, 4, 5, 1 << 40]), 4).tolist()
    counts = np.bincount(shard_of(np.arange(100_000), 4), minlength=4)
    assert counts.min() > 24_000, counts
    assert set(shard_of(np.arange(1000), 1).tolist()) == {0}


def test_the_shard_count_of_a_folder_is_kept(tmp_path):
    shard_folders(str(tmp_path), 3)
    with pytest.raises(ValueError, match="holds 3 shards, got shards=2"):
        shard_folders(str(tmp_path), 2)
    with pytest.raises(ValueError, match="at least 1"):
        shard_folders(str(tmp_path / "b"), 0)


@pytest.mark.parametrize("config", [{"dim": 8, "metric": "cosine"}, {"dim": 8, "metric": "l2"},
                                    {"dim": 8, "metric": "ip"}])
def test_answers_equal_one_service_and_one_flat_index(tmp_path, config):
    x, q = rows(600, seed=1), rows(7, seed=2)
    payloads = [{"colour": ["red", "green", "blue"][i % 3], "i": i} for i in range(600)]
    single, fan = client(tmp_path / "one").__enter__(), sharded(tmp_path / "many")
    try:
        for c in (single, fan):
            assert c.put("/collections/v", json=config).status_code == 201
            for part in (slice(0, 350), slice(350, 600)):
                ids = np.arange(600)[part]
                assert add(c, "v", ids, x[part], payloads[part]).status_code == 200
        for body in ({"k": 10}, {"k": 5, "filter": {"colour": "red"}}, {"k": 4, "ids": [3, 99, 140, 512, 7, 8]},
                     {"k": 3, "with_payload": True}, {"k": 2000}):
            body = {**body, "vectors": q.tolist()}
            one, many = (c.post("/collections/v/search", json=body).json()["results"] for c in (single, fan))
            assert [[h["id"] for h in r] for r in one] == [[h["id"] for h in r] for r in many], body
            for a, b in zip(one, many):
                assert np.allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)
                assert [h.get("payload") for h in a] == [h.get("payload") for h in b]
        flat = xmodal.FlatIndex(8, config["metric"])
        flat.add(torch.from_numpy(x))
        want = flat.search(torch.from_numpy(q), 10)[1].tolist()
        got = fan.post("/collections/v/search", json={"vectors": q.tolist(), "k": 10}).json()["results"]
        assert [[h["id"] for h in r] for r in got] == want
        assert fan.get("/collections/v").json() == single.get("/collections/v").json()
        assert fan.get("/collections").json() == single.get("/collections").json()
        one, many = (c.get("/collections/v/payload_keys").json()["keys"] for c in (single, fan))
        assert many[0] == one[0] and one[0]["counts"] == [200, 200, 200]  # colour: every value listed
        assert many[1]["values"] is None and 200 <= many[1]["distinct"] <= one[1]["distinct"] == 600  # i: too many
        assert fan.get("/collections/v/vectors/77").json() == single.get("/collections/v/vectors/77").json()
    finally:
        close(fan, single)


def test_writes_go_to_the_owner_and_survive_a_restart(tmp_path):
    x = rows(400, seed=3)
    c = sharded(tmp_path, shards=3)
    try:
        c.put("/collections/v", json={"dim": 8, "metric": "l2"})
        assert add(c, "v", np.arange(400), x).json() == {"upserted": 400, "replaced": 0}
        assert add(c, "v", [5, 6, 1000], x[:3]).json() == {"upserted": 3, "replaced": 2}
        assert c.request("DELETE", "/collections/v/vectors", json={"ids": [1, 2, 3, 5000]}).json() == {"deleted": 3}
        owners = shard_of(np.array(sorted(set(range(400)) - {1, 2, 3} | {1000})), 3)
        sizes = [len(s.service.catalog.get("v")) for s in c.shards]
        assert sizes == np.bincount(owners, minlength=3).tolist()
        assert c.get("/collections/v").json()["size"] == 398
        before = c.post("/collections/v/search", json={"vectors": x[:5].tolist(), "k": 8}).json()
    finally:
        close(c)
    c = sharded(tmp_path, shards=3)
    try:
        assert c.get("/collections/v").json()["size"] == 398
        assert c.post("/collections/v/search", json={"vectors": x[:5].tolist(), "k": 8}).json() == before
        assert np.allclose(c.get("/collections/v/vectors/1000").json()["vector"], x[2])
        assert c.get("/collections/v/vectors/2").status_code == 404
    finally:
        close(c)


def test_errors_are_those_of_one_service(tmp_path):
    single, fan = client(tmp_path / "one", api_key=KEY).__enter__(), sharded(tmp_path / "many", api_key=KEY)
    try:
        for c in (single, fan):
            assert c.put("/collections/v", json={"dim": 4}, headers=AUTH).status_code == 201
        requests = [("PUT", "/collections/v", {"dim": 4}), ("PUT", "/collections/w", {"dim": 0}),
                    ("PUT", "/collections/w", {"dim": 4, "index": "tree"}),
                    ("POST", "/collections/v/vectors", {"ids": [1, 1], "vectors": [[0] * 4, [1] * 4]}),
                    ("POST", "/collections/v/vectors", {"ids": [1], "vectors": [[0] * 3]}),
                    ("POST", "/collections/v/vectors", {"ids": [1, 2], "vectors": [[0] * 4]}),
                    ("POST", "/collections/nope/vectors", {"ids": [1], "vectors": [[0] * 4]}),
                    ("POST", "/collections/v/search", {"vectors": [[0] * 4], "k": 0}),
                    ("POST", "/collections/v/search", {"vectors": [[0] * 5], "k": 3}),
                    ("POST", "/collections/v/search", {"vectors": [[0] * 4], "k": 3, "filter": {"a": {"b": 1}}}),
                    ("POST", "/collections/v/search", {"vectors": [[0] * 4], "colour": "red"}),
                    ("POST", "/collections/nope/search", {"vectors": [[0] * 4]}),
                    ("GET", "/collections/nope", None), ("DELETE", "/collections/nope", None)]
        for method, path, body in requests:
            one, many = (c.request(method, path, json=body, headers=AUTH) for c in (single, fan))
            assert (one.status_code, one.json()) == (many.status_code, many.json()), (method, path, body)
            assert one.status_code >= 400
        for c in (single, fan):
            assert c.get("/collections").status_code == 401
    finally:
        close(fan, single)


def test_a_shard_that_cannot_answer_gives_503_unless_a_partial_answer_is_asked_for(tmp_path):
    x = rows(300, seed=4)
    c = sharded(tmp_path, shards=3)
    try:
        c.put("/collections/v", json={"dim": 8})
        add(c, "v", np.arange(300), x)
    finally:
        close(c)
    c = sharded(tmp_path, shards=3, down={1})
    try:
        r = c.post("/collections/v/search", json={"vectors": x[:2].tolist(), "k": 5})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "shard 1" in r.json()["detail"]
        r = c.post("/collections/v/search", json={"vectors": x[:2].tolist(), "k": 5, "allow_partial": True})
        assert r.status_code == 200 and r.json()["missing_shards"] == [1]
        got = {h["id"] for hits in r.json()["results"] for h in hits}
        assert got and not set(shard_of(np.array(sorted(got)), 3).tolist()) & {1}
        owned_by_1 = [i for i in range(300, 400) if shard_of(np.array([i]), 3)[0] == 1][:2]
        owned_by_0 = [i for i in range(300, 400) if shard_of(np.array([i]), 3)[0] == 0][:2]
        assert add(c, "v", owned_by_1, x[:2]).status_code == 503
        assert add(c, "v", owned_by_0, x[:2]).status_code == 200
        assert c.get("/ready").status_code == 503
        assert c.get(f"/collections/v/vectors/{owned_by_1[0]}").status_code == 503
        metrics = c.get("/metrics").text
        assert 'xmodal_shard_unavailable_total{shard="1"}' in metrics and "xmodal_requests_total" in metrics
        assert c.delete("/collections/v").status_code == 503  # (done on shards 0 and 2 only)
    finally:
        close(c)
    c = sharded(tmp_path, shards=3)
    try:  # sent again once every shard answers, the delete completes
        assert c.delete("/collections/v").json() == {"deleted": "v"}
        assert c.get("/collections/v").status_code == 404
    finally:
        close(c)


def test_the_command_line_asks_for_ray_before_sharding(tmp_path, capsys):
    from xmodal.cli import main

    with pytest.raises(SystemExit, match="--shards needs --ray"):
        main(["serve", str(tmp_path), "--shards", "2"])
    with pytest.raises(SystemExit, match="--replicas needs --ray"):
        main(["serve", str(tmp_path), "--replicas", "2"])


def test_search_by_text_and_image_answers_as_one_service(tmp_path, monkeypatch):
    import io

    from xmodal.serve.routes import search as search_routes

    from PIL import Image

    from xmodal.data import IMAGE_SIZE
    from xmodal.demo.training import build_model

    model_folder = str(tmp_path / "model")
    model = build_model(0)
    model.save(model_folder)
    with torch.inference_mode():
        gallery = model.encode_image(torch.rand(40, 3, IMAGE_SIZE, IMAGE_SIZE,
                                                generator=torch.Generator().manual_seed(1))).numpy()
    picture = io.BytesIO()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(picture, format="PNG")
    single = client(tmp_path / "one", model_path=model_folder).__enter__()
    fan = sharded_over([LocalShard(path, model_path=model_folder) for path in shard_folders(str(tmp_path / "many"), 2)])
    try:
        for c in (single, fan):
            c.put("/collections/g", json={"dim": model.embed_dim})
            add(c, "g", range(40), gallery, [{"n": i % 4} for i in range(40)])
        requests = [("text", {"json": {"text": ["a red circle", "blue"], "k": 5}}),
                    ("text", {"json": {"text": "red", "k": 3, "filter": {"n": 1}}}),
                    ("image", {"files": {"image": ("a.png", picture.getvalue())}, "data": {"k": "4"}}),
                    ("composed", {"files": {"image": ("a.png", picture.getvalue())},
                                  "data": {"text": "make it blue", "k": "6", "ids": "[1, 2, 3, 30, 31]"}}),
                    ("image", {"files": {"image": ("a.png", b"not an image")}})]
        encoded = []  # (the model runs once per search through the front, not once per shard)
        encode = search_routes.encode
        monkeypatch.setattr(search_routes, "encode", lambda *args: encoded.append(1) or encode(*args))
        for by, kwargs in requests:
            one = single.post(f"/collections/g/search/{by}", **kwargs)
            before = len(encoded)
            many = fan.post(f"/collections/g/search/{by}", **kwargs)
            assert len(encoded) - before == (one.status_code == 200), by
            assert one.status_code == many.status_code, (by, one.text, many.text)
            if one.status_code != 200:
                assert one.json() == many.json()
                continue
            for a, b in zip(one.json()["results"], many.json()["results"]):
                assert [h["id"] for h in a] == [h["id"] for h in b], by
                assert np.allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)
        embedded = single.post("/collections/g/search/text?embed_only=true", json={"text": "red", "k": 3}).json()
        assert embedded["options"] == {"k": 3, "ids": None, "filter": None, "with_payload": False}
        with torch.inference_mode():
            assert np.allclose(embedded["vectors"], model.encode_text(["red"]).numpy(), atol=1e-6)
    finally:
        close(fan, single)


@pytest.mark.parametrize("config", [{"dim": 8, "metric": "l2", "index": "ivf", "nlist": 8, "nprobe": 3,
                                     "codec": "int8"},
                                    {"dim": 8, "metric": "cosine", "index": "ivf", "nlist": 6, "nprobe": 2},
                                    {"dim": 8, "metric": "ip", "codec": "int8"}])
def test_collections_that_learn_answer_as_one_service(tmp_path, config):
    # every shard takes what shard 0 learnt from the whole first add (not its own part of it), so the sharded
    # service searches with one index's lists and codec: the same answers as one service, scores included
    x, q = rows(500, seed=11), rows(6, seed=12)
    single, fan = client(tmp_path / "one").__enter__(), sharded(tmp_path / "many", shards=3)
    try:
        for c in (single, fan):
            assert c.put("/collections/v", json=config).json()["trained"] is False
            assert c.get("/collections/v/trained").status_code == 409
            assert add(c, "v", np.arange(300), x[:300]).status_code == 200
            assert add(c, "v", np.arange(300, 500), x[300:]).status_code == 200
        state = single.get("/collections/v/trained").content
        assert fan.get("/collections/v/trained").content == state
        assert all(s.service.catalog.get("v").trained_state() == state for s in fan.shards)
        body = {"vectors": q.tolist(), "k": 9}
        one = single.post("/collections/v/search", json=body).json()
        assert fan.post("/collections/v/search", json=body).json() == one
        assert fan.get("/collections/v").json() == single.get("/collections/v").json()
        r = fan.post("/collections/v/train", json={"vectors": x[:50].tolist()})
        assert r.status_code == 409 and r.json() == single.post("/collections/v/train",
                                                                json={"vectors": x[:50].tolist()}).json()
    finally:
        close(fan, single)
    fan = sharded(tmp_path / "many", shards=3)
    try:  # (what the shards learnt is in their snapshots)
        assert fan.post("/collections/v/search", json=body).json() == one
    finally:
        close(fan)


def test_training_through_the_front_reaches_every_shard_and_completes_when_sent_again(tmp_path):
    x = rows(400, seed=13)
    config = {"dim": 8, "metric": "l2", "index": "ivf", "nlist": 4, "nprobe": 4}
    c = sharded(tmp_path, shards=3, down={2})
    try:
        c.put("/collections/v", json=config)  # (shard 2 is down: created on 0 and 1, 503)
        assert c.post("/collections/v/train", json={"vectors": x[:3].tolist()}).status_code == 503
    finally:
        close(c)
    c = sharded(tmp_path, shards=3)
    try:
        assert c.put("/collections/v", json=config).status_code == 201
        r = c.post("/collections/v/train", json={"vectors": x[:3].tolist()})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "vectors"  # (fewer rows than lists)
        assert c.put("/collections/v/trained", content=b"not an index").json()["detail"][0]["field"] == "body"
        assert c.post("/collections/v/train", json={"vectors": x[:100].tolist()}).json()["trained"] is True
        states = {s.service.catalog.get("v").trained_state() for s in c.shards}
        assert len(states) == 1
        other = xmodal.IVFIndex(8, 5, "l2")
        other.train(torch.from_numpy(x[:100]))
        other.save(str(tmp_path / "other.xmodal"))
        r = c.put("/collections/v/trained", content=(tmp_path / "other.xmodal").read_bytes())
        assert r.status_code == 422 and "nlist 5" in r.json()["detail"][0]["message"]
        assert add(c, "v", np.arange(400), x).json() == {"upserted": 400, "replaced": 0}
        assert {s.service.catalog.get("v").trained_state() for s in c.shards} == states
    finally:
        close(c)


def replicated(folder, shards, replicas, down):
    """A TestClient over the front and ``shards`` x ``replicas`` LocalShards; a (shard, replica) in the set
    ``down`` (which the test changes as it goes) raises ShardUnavailable."""
    locals_ = [[LocalShard(path) for path in paths] for paths in replica_folders(str(folder), shards, replicas)]

    def caller(i, j):
        async def call(method, path, body, content_type):
            if (i, j) in down:
                raise ShardUnavailable(f"replica {j} of shard {i} is down")
            return await locals_[i][j](method, path, body, content_type)
        return call

    c = TestClient(create_fanout_app([Replicas([caller(i, j) for j in range(replicas)]) for i in range(shards)]))
    c.shards = [s for row in locals_ for s in row]
    return c


def test_replicas_share_searches_answer_while_one_is_down_and_take_every_write(tmp_path):
    x, q = rows(300, seed=14), rows(5, seed=15)
    down = set()
    c = replicated(tmp_path, 2, 2, down)
    try:
        c.put("/collections/v", json={"dim": 8, "metric": "l2"})
        add(c, "v", np.arange(200), x[:200])
        exact = xmodal.FlatIndex(8, "l2")
        exact.add(torch.from_numpy(x[:200]), torch.arange(200))
        scores, ids = exact.search(torch.from_numpy(q), 7)
        body = {"vectors": q.tolist(), "k": 7}
        down.update({(0, 1), (1, 0)})  # (one replica of each shard)
        for _ in range(3):  # (each search starts at the next replica, and skips the one that is down)
            got = c.post("/collections/v/search", json=body).json()["results"]
            assert [[h["id"] for h in hits] for hits in got] == ids.tolist()
        r = add(c, "v", np.arange(200, 300), x[200:])
        assert r.status_code == 503  # (no replica may miss an acknowledged write)
        down.clear()
        assert add(c, "v", np.arange(200, 300), x[200:]).json()["upserted"] == 100  # (sent again: now on all)
        sizes = [len(s.service.catalog.get("v")) for s in c.shards]
        assert sizes[0] == sizes[1] and sizes[2] == sizes[3] and sizes[0] + sizes[2] == 300
        assert c.get("/ui/").status_code == 404  # (the page only when asked for)
    finally:
        close(c)
    for alone in (0, 1):  # each replica, alone, answers as all rows would
        down = {(0, 1 - alone), (1, 1 - alone)}
        c = replicated(tmp_path, 2, 2, down)
        try:
            exact.add(torch.from_numpy(x[200:]), torch.arange(200, 300)) if alone == 0 else None
            _, ids = exact.search(torch.from_numpy(q), 7)
            got = c.post("/collections/v/search", json=body).json()["results"]
            assert [[h["id"] for h in hits] for hits in got] == ids.tolist()
        finally:
            close(c)


def test_a_new_replica_starts_as_a_copy_of_the_first(tmp_path):
    x = rows(100, seed=16)
    c = replicated(tmp_path, 1, 1, set())
    try:
        c.put("/collections/v", json={"dim": 8})
        add(c, "v", np.arange(50), x[:50])
    finally:
        close(c)
    c = replicated(tmp_path, 1, 2, set())  # (replica 1 copied from replica 0)
    try:
        assert [len(s.service.catalog.get("v")) for s in c.shards] == [50, 50]
    finally:
        close(c)
    c = replicated(tmp_path, 1, 1, set())
    try:
        add(c, "v", np.arange(50, 100), x[50:])
    finally:
        close(c)
    c = replicated(tmp_path, 1, 2, set())  # (replica 1 missed those writes: copied afresh, not served stale)
    try:
        assert [len(s.service.catalog.get("v")) for s in c.shards] == [100, 100]
    finally:
        close(c)
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        replica_folders(str(tmp_path), 1, 0)


def test_the_front_serves_the_search_page_when_asked(tmp_path):
    c = sharded(tmp_path, shards=2, api_key=KEY, ui=True)
    try:
        r = c.get("/ui/")  # (the page's files hold no data: no key needed)
        assert r.status_code == 200 and "Content-Security-Policy" in r.headers and "<html" in r.text.lower()
        assert c.get("/collections").status_code == 401
    finally:
        close(c)


def test_encrypted_shards_hand_on_what_they_learnt_sealed(tmp_path):
    import os

    from xmodal.encryption import is_sealed

    key = os.urandom(32)
    x, q = rows(300, seed=17), rows(4, seed=18)
    c = sharded_over([LocalShard(p, encryption_key=key) for p in shard_folders(str(tmp_path / "sealed"), 2)])
    try:
        c.put("/collections/v", json={"dim": 8, "metric": "l2", "index": "ivf", "nlist": 4, "nprobe": 4,
                                      "codec": "int8"})
        assert add(c, "v", np.arange(300), x).status_code == 200
        state = c.get("/collections/v/trained").content
        assert is_sealed(state)  # (what the shards learnt is never in the clear, on a disk or the wire)
        assert c.put("/collections/v/trained", content=state).status_code == 200  # (the same: nothing to do)
        exact = xmodal.IVFIndex(8, 4, "l2", nprobe=4, codec="int8")
        exact.train(torch.from_numpy(x))
        exact.add(torch.from_numpy(x), torch.arange(300))
        _, want = exact.search(torch.from_numpy(q), 5)
        got = c.post("/collections/v/search", json={"vectors": q.tolist(), "k": 5}).json()["results"]
        assert [[h["id"] for h in hits] for hits in got] == want.tolist()
        exact.reset()
        exact.save(str(tmp_path / "plain.xmodal"))
        r = c.put("/collections/v/trained", content=(tmp_path / "plain.xmodal").read_bytes())
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
    finally:
        close(c)
