"""What the search page stands on, through the HTTP API: its own files (with a Content-Security-Policy, without
the API key), media served read-only with thumbnails (path traversal refused), payload keys for the filters,
and the demo's collection. The page itself is driven in a browser in test_search_page.py."""
import io
import os

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from serve_helpers import AUTH, KEY, add, client, detail, raw_get, rows  # noqa: E402
from xmodal import FlatIndex  # noqa: E402
from xmodal.serve import media as media_module  # noqa: E402
from xmodal.serve import write_collection  # noqa: E402


def png_file(path, colour=(200, 30, 30), size=(64, 48)):
    Image.new("RGB", size, colour).save(path)


def collection_with_media(tmp_path, media=True):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    png_file(images / "a.png")
    png_file(images / "sub" / "b.png", (10, 200, 10))
    index = FlatIndex(8, "cosine")
    index.add(torch.from_numpy(rows(3)), ids=torch.tensor([0, 1, 2]))
    payloads = {0: {"image": "a.png", "caption": "red", "colour": "red"},
                1: {"image": "sub/b.png", "caption": "green", "colour": "green", "tags": ["x", "y"]},
                2: {"caption": "<script>alert(1)</script>", "colour": "red", "n": 3}}
    write_collection(str(tmp_path / "d"), "pics", index, payloads, media=str(images) if media else None)
    return tmp_path / "d"


def test_the_page_is_served_with_a_policy_and_without_the_key(tmp_path):
    with client(tmp_path, api_key=KEY, ui=True) as c:
        page = c.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert c.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/style.css").status_code == 200
        assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
        status, body = raw_get(c, "/ui/../collections")  # the open prefix is a path, not a door
        assert status == 404 and "page file" in body["detail"]
        assert c.get("/ui/secret.txt").status_code == 404
        # everything else still needs the key
        assert c.get("/collections").status_code == 401
        assert c.get("/ready", headers=AUTH).json()["model"] is False
    with client(tmp_path) as c:  # no --ui: no page
        assert c.get("/ui/").status_code == 404


def test_media_files_and_thumbnails(tmp_path):
    folder = collection_with_media(tmp_path)
    with client(folder, api_key=KEY) as c:
        assert c.get("/collections/pics/media/a.png").status_code == 401
        r = c.get("/collections/pics/media/sub/b.png", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert "sandbox" in r.headers["content-security-policy"] and r.headers["x-content-type-options"] == "nosniff"
        assert Image.open(io.BytesIO(r.content)).size == (64, 48)
        thumb = c.get("/collections/pics/media/a.png?size=32", headers=AUTH)
        assert Image.open(io.BytesIO(thumb.content)).size == (32, 24)
        made = []
        real = media_module._scaled_png
        media_module._scaled_png = lambda *a: made.append(a) or real(*a)
        try:  # a second ask is answered from the cache, without decoding again
            assert c.get("/collections/pics/media/a.png?size=32", headers=AUTH).content == thumb.content
            assert made == []
            c.get("/collections/pics/media/sub/b.png?size=32", headers=AUTH)
            assert len(made) == 1
        finally:
            media_module._scaled_png = real
        big = c.get("/collections/pics/media/a.png?size=512", headers=AUTH)  # never enlarged
        assert Image.open(io.BytesIO(big.content)).size == (64, 48)
        r = c.get("/collections/pics/media/a.png?size=5", headers=AUTH)
        assert r.status_code == 422 and detail(r)[0]["field"] == "size"
        assert c.get("/collections/pics/media/missing.png", headers=AUTH).status_code == 404
        assert c.get("/collections/nope/media/a.png", headers=AUTH).status_code == 404


@pytest.mark.parametrize("path, refused", [
    ("../config.json", "without '..'"), ("sub/../../config.json", "without '..'"), ("..%2Fconfig.json", "without '..'"),
    ("%2Fetc%2Fpasswd", "without '..'"), ("sub/..%2F..%2Fconfig.json", "without '..'"),
    ("a.png%00.txt", "without '..'"), ("link/config.json", "leads outside")])
def test_media_paths_cannot_leave_the_media_folder(tmp_path, path, refused):
    folder = collection_with_media(tmp_path)
    os.symlink(folder / "pics", folder / "pics" / "media" / "link")  # a link out of the media folder
    with client(folder, api_key=KEY) as c:
        status, body = raw_get(c, f"/collections/pics/media/{path}", AUTH)  # as sent, dot segments and all
        assert status == 422, (path, status, body)
        assert body["detail"][0]["field"] == "path" and refused in body["detail"][0]["message"]


def test_thumbnails_refuse_pictures_too_large_to_decode(tmp_path, monkeypatch):
    folder = collection_with_media(tmp_path)
    monkeypatch.setattr(media_module, "MAX_PIXELS", 64 * 48 - 1)
    with client(folder) as c:
        r = c.get("/collections/pics/media/a.png?size=32")
        assert r.status_code == 422 and "64 x 48" in str(detail(r)) and detail(r)[0]["field"] == "path"
        assert c.get("/collections/pics/media/a.png").status_code == 200  # the file itself is still served


def test_the_service_media_folder_serves_collections_without_their_own(tmp_path):
    folder = collection_with_media(tmp_path, media=False)
    with client(folder) as c:
        r = c.get("/collections/pics/media/a.png")
        assert r.status_code == 404 and "media" in detail(r)
    with client(folder, media=str(tmp_path / "images")) as c:
        assert c.get("/collections/pics/media/sub/b.png").status_code == 200
    with pytest.raises(ValueError, match="media folder"):
        client(folder, media=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="media must be a folder"):
        write_collection(str(tmp_path / "e"), "x", FlatIndex(8), media=str(tmp_path / "nowhere"))


def test_payload_keys_list_values_for_filters(tmp_path):
    folder = collection_with_media(tmp_path)
    with client(folder) as c:
        keys = {k["key"]: k for k in c.get("/collections/pics/payload_keys").json()["keys"]}
        assert keys["colour"] == {"key": "colour", "types": ["string"], "distinct": 2,
                                  "values": ["red", "green"], "counts": [2, 1]}  # most common first
        assert keys["tags"]["values"] == ["x", "y"] and keys["n"]["values"] == [3] and keys["n"]["types"] == ["number"]
        # a whole number is one value whether written 3 or 3.0
        hits = c.post("/collections/pics/search", json={"vectors": rows(1).tolist(), "k": 3,
                                                        "filter": {"n": 3.0}}).json()["results"][0]
        assert [h["id"] for h in hits] == [2]
        assert set(keys) == {"caption", "colour", "image", "n", "tags"}
        add(c, "pics", [10 + i for i in range(60)], rows(60, seed=1), [{"serial": i} for i in range(60)])
        serial = next(k for k in c.get("/collections/pics/payload_keys").json()["keys"] if k["key"] == "serial")
        assert serial == {"key": "serial", "types": ["number"], "distinct": 60, "values": None,
                          "counts": None}  # too many to list


def test_the_demo_writes_a_collection_the_page_can_show(tmp_path):
    from xmodal.demo import ShapesDataset, build_model, write_gallery_collection

    gallery = ShapesDataset(None, seed=7)
    model = build_model(0)
    folder = write_gallery_collection(model, gallery, str(tmp_path / "collections"))
    write_gallery_collection(model, gallery, str(tmp_path / "collections"))  # a second run replaces it
    assert sorted(os.listdir(os.path.join(folder, "media")))[:2] == ["000.png", "001.png"]
    with client(tmp_path / "collections") as c:
        assert c.get("/collections/shapes").json()["size"] == len(gallery) == 192
        hit = c.post("/collections/shapes/search", json={"vectors": [[1.0] * model.embed_dim], "k": 1,
                                                        "with_payload": True}).json()["results"][0][0]
        attrs = gallery.attributes[hit["id"]]
        assert hit["payload"]["colour"] == attrs.colour and hit["payload"]["image"] == f"{hit['id']:03d}.png"
        image = c.get(f"/collections/shapes/media/{hit['payload']['image']}").content
        pixels = torch.tensor(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), dtype=torch.float32).reshape(-1, 3)
        want = gallery.images[hit["id"]].permute(1, 2, 0).reshape(-1, 3) * 255
        assert (pixels - want).abs().max() <= 0.5
