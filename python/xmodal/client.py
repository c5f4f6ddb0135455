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

from .ops import SEARCH_METRICS


class ServiceError(RuntimeError):
    """The service answered with an error: ``status`` (HTTP) and ``detail`` (its JSON explanation)."""

    def __init__(self, status: int, detail: Any, method: str, path: str, hint: Optional[str] = None):
        self.status, self.detail = status, detail
        super().__init__(f"{method} {path} -> {status}: {detail}" + (f"; {hint}" if hint else ""))


def _rows(x, name: str) -> Tuple[list, str, bool]:
    """(list of lists of floats, array kind, was 1-D) from a NumPy array, torch tensor or nested sequence.
    ValueError naming ``name`` for another shape, or for NaN or infinity (JSON cannot carry them)."""
    kind = "numpy"
    if type(x).__module__.split(".")[0] == "torch":
        kind = "torch"
        import torch

        x = x.detach().cpu()
        x = (x.double() if x.dtype == torch.float64 else x.float()).numpy()  # float64: its value in errors
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: reported below
            arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D or 2-D array of numbers, got {type(x).__name__} ({e})") from None
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        value = float(np.asarray(x, dtype=np.float64).reshape(arr.shape)[row, col])
        where = f"at position {col}" if squeeze else f"in row {row} (column {col})"
        bad_rows = int((~finite.all(axis=1)).sum())
        more = f", and {bad_rows - 1} more row(s) hold such values" if bad_rows > 1 else ""
        beyond = " (beyond float32's range)" if np.isfinite(value) else ""
        raise ValueError(f"{name} must hold finite float32 numbers (JSON carries no NaN or infinity), got "
                         f"{value!r}{beyond} {where}{more}")
    return arr.tolist(), kind, squeeze


def _payloads(payloads) -> list:
    """The payloads as a list, each one a JSON object or None; ValueError naming the first one that is not."""
    out = list(payloads)
    for i, p in enumerate(out):
        if p is None:
            continue
        if not isinstance(p, dict):
            raise ValueError(f"payloads[{i}] must be a dict or None, got {type(p).__name__}")
        try:
            json.dumps(p, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"payloads[{i}] must be JSON (str keys; str, number, bool, None, list and dict values; "
                             f"no NaN or infinity), got {p!r} ({e})") from None
    return out


def _auth_hint(status: int, has_key: bool) -> Optional[str]:
    """What a 401 / 403 means for this client: no key given, or the one given is not the service's."""
    if status not in (401, 403):
        return None
    if has_key:
        return ("the service refused this Client's api_key: it is not the key in the file the service was "
                "started with (--api-key-file)")
    return ("the service needs an API key (it was started with --api-key-file) and this Client has none: "
            "pass Client(url, api_key=...)")


def _ids(ids) -> List[int]:
    return [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]


class Client:
    """A connection to ``xmodal serve`` at ``url``; ``api_key`` for a service started with ``--api-key-file``.
    Use it as a context manager, or call :meth:`close`."""

    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._has_key = bool(api_key)
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
            raise self._error(response, method, path)
        return response.json()

    def _error(self, response, method: str, path: str) -> ServiceError:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text
        return ServiceError(response.status_code, detail, method, path, _auth_hint(response.status_code, self._has_key))

    # -- service
    def health(self) -> bool:
        return self._call("GET", "/health").get("status") == "ok"

    def ready(self) -> bool:
        """Whether the service is up and has loaded its collections (False while it starts or loads).
        ServiceError if it refuses this client's API key (401 / 403) or failed to load its collections."""
        import httpx

        try:
            response = self._http.get("/ready")
        except httpx.TransportError:  # not listening yet
            return False
        if response.status_code == 200:
            return True
        if response.status_code in (401, 403):
            raise self._error(response, "GET", "/ready")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("status") == "failed":
            raise ServiceError(response.status_code, answer.get("error"), "GET", "/ready",
                               "the service failed to load its collections (its stderr says more)")
        return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until :meth:`ready`; TimeoutError after ``timeout`` seconds. A refused API key or a failed
        load raises ServiceError at once (see :meth:`ready`)."""
        import time

        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service was not ready within {timeout} s")
            time.sleep(0.1)

    # -- collections
    def create_collection(self, name: str, dim: int, metric: str = "cosine", *, index: str = "flat",
                          codec: Optional[str] = None, nlist: Optional[int] = None,
                          nprobe: Optional[int] = None, degree: Optional[int] = None, ef: Optional[int] = None,
                          exist_ok: bool = False) -> dict:
        """Create a collection and return its description. ``index``: ``"flat"``, ``"ivf"`` (options ``nlist``,
        ``nprobe``) or ``"graph"`` (options ``degree``, ``ef``). A collection of that name that exists already is
        ServiceError 409, or with ``exist_ok=True`` is returned as it is when it has the settings asked for
        (an index's options compared only where given); one with other settings is still 409."""
        options = {"nlist": nlist, "nprobe": nprobe, "degree": degree, "ef": ef}
        body = {"dim": dim, "metric": metric, "index": index, "codec": codec, **options}
        try:
            return self._call("PUT", f"/collections/{name}", json={k: v for k, v in body.items() if v is not None})
        except ServiceError as e:
            if not (exist_ok and e.status == 409):
                raise
        found = self.collection(name)
        asked = {k: v for k, v in body.items() if k not in options or v is not None}
        differ = {k: v for k, v in asked.items() if found.get(k) != v}
        if differ:
            have = ", ".join(f"{k} {found.get(k)!r}" for k in differ)
            want = ", ".join(f"{k} {v!r}" for k, v in differ.items())
            raise ServiceError(409, f"collection {name!r} exists with {have}", "PUT", f"/collections/{name}",
                               f"exist_ok=True accepts it only with the settings asked for, got {want}")
        return found

    def collections(self) -> List[dict]:
        return self._call("GET", "/collections")["collections"]

    def collection(self, name: str) -> dict:
        return self._call("GET", f"/collections/{name}")

    def delete_collection(self, name: str) -> None:
        self._call("DELETE", f"/collections/{name}")

    def train(self, name: str, vectors) -> dict:
        """Have an IVF or codec collection learn its lists and codec from ``vectors`` (not stored) rather than
        from its first add; returns its description. ServiceError 409 once it has learnt."""
        rows, _, _ = _rows(vectors, "vectors")
        return self._call("POST", f"/collections/{name}/train", json={"vectors": rows})

    # -- vectors
    def add(self, name: str, vectors, ids, payloads: Optional[Sequence[Optional[dict]]] = None) -> dict:
        """Add or replace rows (durable when this returns): ``{"upserted": n, "replaced": r}``."""
        rows, _, _ = _rows(vectors, "vectors")
        body: Dict[str, Any] = {"ids": _ids(ids), "vectors": rows}
        if payloads is not None:
            body["payloads"] = _payloads(payloads)
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
                scores[row, len(hits):] = -np.inf if SEARCH_METRICS[metric] else np.inf
        if squeeze:
            scores, ids, payloads = scores[0], ids[0], payloads[0]
        if kind == "torch":
            import torch

            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        return (scores, ids, payloads) if with_payload else (scores, ids)
