"""``xmodal.client.Client``: the Python client of ``xmodal serve`` (httpx), with the verbs of the in-process
indexes. Searches answer in the queries' array type (NumPy in, NumPy out; torch in, torch out), as
``FlatIndex.search`` does.

    from xmodal.client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    c.create_collection("images", dim=256, metric="cosine")
    c.add("images", vectors, ids=[...], payloads=[{"colour": "red"}, ...])
    scores, ids = c.search("images", queries, k=10)
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


class ServiceError(RuntimeError):
    """The service answered with an error: ``status`` (HTTP) and ``detail`` (its JSON explanation)."""

    def __init__(self, status: int, detail: Any, method: str, path: str):
        self.status, self.detail = status, detail
        super().__init__(f"{method} {path} -> {status}: {detail}")


def _rows(x, name: str) -> Tuple[list, str, bool]:
    """(list of lists of floats, array kind, was 1-D) from a NumPy array, torch tensor or nested sequence."""
    kind = "numpy"
    if type(x).__module__.split(".")[0] == "torch":
        kind = "torch"
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    return arr.tolist(), kind, squeeze


def _ids(ids) -> List[int]:
    return [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]


class Client:
    """A connection to ``xmodal serve`` at ``url``; ``api_key`` for a service started with ``--api-key-file``.
    Use it as a context manager, or call :meth:`close`."""

    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except (ValueError, AttributeError):
                detail = response.text
            raise ServiceError(response.status_code, detail, method, path)
        return response.json()

    # -- service
    def health(self) -> bool:
        return self._call("GET", "/health").get("status") == "ok"

    def ready(self) -> bool:
        """Whether the service is up and has loaded its collections (False while it starts or loads)."""
        import httpx

        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:  # not listening yet
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until :meth:`ready`; TimeoutError after ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service was not ready within {timeout} s")
            time.sleep(0.1)

    # -- collections
    def create_collection(self, name: str, dim: int, metric: str = "cosine", *, index: str = "flat",
                          codec: Optional[str] = None, nlist: Optional[int] = None,
                          nprobe: Optional[int] = None) -> dict:
        body = {"dim": dim, "metric": metric, "index": index, "codec": codec, "nlist": nlist, "nprobe": nprobe}
        return self._call("PUT", f"/collections/{name}", json={k: v for k, v in body.items() if v is not None})

    def collections(self) -> List[dict]:
        return self._call("GET", "/collections")["collections"]

    def collection(self, name: str) -> dict:
        return self._call("GET", f"/collections/{name}")

    def delete_collection(self, name: str) -> None:
        self._call("DELETE", f"/collections/{name}")

    # -- vectors
    def add(self, name: str, vectors, ids, payloads: Optional[Sequence[Optional[dict]]] = None) -> dict:
        """Add or replace rows (durable when this returns): ``{"upserted": n, "replaced": r}``."""
        rows, _, _ = _rows(vectors, "vectors")
        body: Dict[str, Any] = {"ids": _ids(ids), "vectors": rows}
        if payloads is not None:
            body["payloads"] = list(payloads)
        return self._call("POST", f"/collections/{name}/vectors", json=body)

    def remove(self, name: str, ids) -> int:
        """Remove rows (absent ids are ignored); returns how many were removed."""
        return self._call("DELETE", f"/collections/{name}/vectors", json={"ids": _ids(ids)})["deleted"]

    def get(self, name: str, id: int) -> Tuple[np.ndarray, Optional[dict]]:
        """(stored vector, payload) of one id; ServiceError 404 if absent."""
        found = self._call("GET", f"/collections/{name}/vectors/{int(id)}")
        return np.asarray(found["vector"], dtype=np.float32), found["payload"]

    # -- search
    def search(self, name: str, queries, k: int = 10, *, ids=None, filter: Optional[dict] = None,
               with_payload: bool = False):
        """``(scores, ids)`` like ``FlatIndex.search`` (``[Q, k]``, padded with id -1; ``[k]`` for a 1-D
        query), plus the payloads (a list of lists) when ``with_payload``."""
        rows, kind, squeeze = _rows(queries, "queries")
        body = self._options(k, ids, filter, with_payload)
        body["vectors"] = rows
        results = self._call("POST", f"/collections/{name}/search", json=body)["results"]
        return self._arrays(results, k, kind, squeeze, with_payload, name)

    def search_text(self, name: str, text, k: int = 10, *, ids=None, filter: Optional[dict] = None,
                    with_payload: bool = False):
        """Search by text (a service started with ``--model``); one query per string."""
        body = self._options(k, ids, filter, with_payload)
        body["text"] = text
        results = self._call("POST", f"/collections/{name}/search/text", json=body)["results"]
        return self._arrays(results, k, "numpy", isinstance(text, str), with_payload, name)

    def search_image(self, name: str, image: bytes, k: int = 10, *, text: Optional[str] = None, ids=None,
                     filter: Optional[dict] = None, with_payload: bool = False):
        """Search by an image file's bytes (PNG, JPEG, ...), or by image + ``text`` (a composed query)."""
        form = {"k": str(k), "with_payload": "true" if with_payload else "false"}
        if ids is not None:
            form["ids"] = json.dumps(_ids(ids))
        if filter is not None:
            form["filter"] = json.dumps(filter)
        path = f"/collections/{name}/search/image"
        if text is not None:
            form["text"] = text
            path = f"/collections/{name}/search/composed"
        results = self._call("POST", path, data=form, files={"image": ("image", image)})["results"]
        return self._arrays(results, k, "numpy", True, with_payload, name)

    @staticmethod
    def _options(k, ids, filter, with_payload) -> dict:
        body: Dict[str, Any] = {"k": int(k), "with_payload": bool(with_payload)}
        if ids is not None:
            body["ids"] = _ids(ids)
        if filter is not None:
            body["filter"] = filter
        return body

    def _arrays(self, results, k, kind, squeeze, with_payload, name):
        metric = None
        scores = np.full((len(results), k), np.nan, dtype=np.float32)
        ids = np.full((len(results), k), -1, dtype=np.int64)
        payloads = []
        for row, hits in enumerate(results):
            for col, hit in enumerate(hits):
                scores[row, col] = np.nan if hit["score"] is None else hit["score"]
                ids[row, col] = hit["id"]
            payloads.append([hit.get("payload") for hit in hits])
            if len(hits) < k:  # padding as the indexes pad: -inf for similarities, +inf for distances
                if metric is None:
                    metric = self.collection(name)["metric"]
                scores[row, len(hits):] = -np.inf if metric in ("ip", "cosine") else np.inf
        if squeeze:
            scores, ids, payloads = scores[0], ids[0], payloads[0]
        if kind == "torch":
            import torch

            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        return (scores, ids, payloads) if with_payload else (scores, ids)
