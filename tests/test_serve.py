"""xmodal serve through FastAPI's TestClient: every endpoint and error path, search by text and image, and the
client. (The log and snapshots: test_serve_storage.py; micro-batching: test_serve_batching.py; a real server
in a subprocess, killed and restarted: test_serve_process.py.)"""
import io
import os
import time

import numpy as np
import pytest
import torch

import xmodal

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from xmodal.serve import Limits, create_app  # noqa: E402
from xmodal.serve.collection import Collection  # noqa: E402

from serve_helpers import AUTH, KEY, add, client, detail, rows  # noqa: E402


# -- collections
def test_collections_are_created_listed_described_and_deleted(tmp_path):
    with client(tmp_path) as c:
        r = c.put("/collections/images", json={"dim": 8, "metric": "l2"})
        assert r.status_code == 201
        assert r.json() == {"name": "images", "size": 0, "dim": 8, "metric": "l2", "index": "flat", "codec": None,
                            "trained": True}
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
        assert c.get("/ready").json() == {"status": "ready", "collections": 0, "model": False}
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1, 2, 3], [[1, 0], [0, 1], [1, 1]])
        for _ in range(3):
            c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 2})
        assert c.post("/collections/nope/search", json={"vectors": [[1, 0]], "k": 2}).status_code == 404
        assert c.get("/no/such/route").status_code == 404
        text = c.get("/metrics").text
    assert 'xmodal_collection_vectors{collection="v"} 3.0' in text
    assert 'xmodal_requests_total{method="POST",route="/collections/{name}/search",status="200"} 3.0' in text
    assert 'xmodal_requests_total{method="POST",route="/collections/{name}/search",status="404"} 1.0' in text
    assert 'xmodal_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'xmodal_request_seconds_count{route="/collections/{name}/search"} 4.0' in text
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



# -- searching by text and image with the demo model
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from xmodal.demo.training import build_model

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
