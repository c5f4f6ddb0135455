"""One REST API over several shards: the same paths, fields, errors, API key and limits as one ``xmodal serve``
(see :mod:`.app`), answered by shards that each serve a part of every collection.

A shard is anything that answers a request as the single service would (:class:`LocalShard`: an app in this
process; the Ray service: a deployment). Collections exist on every shard; a vector lives on the shard its id
hashes to (:func:`shard_of`, fixed, so a restarted service routes alike). Writes are split by owner and
acknowledged when every shard holding a part has made it durable; reads of one id go to its owner; searches go
to every shard and the best k of their answers are returned. While a shard cannot answer, requests that need
it get 503 with Retry-After, unless a search asks for ``"allow_partial": true``: then it is answered from the
shards that can and names the ones that did not (``"missing_shards"``).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pydantic import ValidationError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..ops import SEARCH_METRICS
from .middleware import Guard, Metrics, count_requests
from .requests import (AddVectors, DeleteVectors, Limits, Search, check_add, check_ids, check_search_options,
                       check_vectors, error)

__all__ = ["LocalShard", "ShardUnavailable", "create_fanout_app", "shard_of", "shard_folders", "written_shards"]

#: (status, headers, body) of one shard's answer
Answer = Tuple[int, Dict[str, str], bytes]
#: a shard: (method, path with query, body, content type) -> its answer; raises ShardUnavailable when it cannot
ShardCall = Callable[[str, str, bytes, Optional[str]], Awaitable[Answer]]



class ShardUnavailable(Exception):
    """A shard did not answer (down, restarting or unreachable)."""


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard that owns each id: splitmix64 of the id, modulo ``shards``. Fixed forever: files written by one
    version are routed alike by every later one."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def written_shards(folder: str) -> Optional[int]:
    """The shard count ``folder`` was written with (its ``shards.json``), or None for a folder without one."""
    path = os.path.join(folder, "shards.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("shards")


def shard_folders(folder: str, shards: int) -> List[str]:
    """The shards' folders under ``folder`` (created if missing), after checking that ``folder`` was not written
    with another shard count (ids would then be looked for on the wrong shards)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    os.makedirs(folder, exist_ok=True)
    written = written_shards(folder)
    if written is None:
        from .storage import write_file

        write_file(os.path.join(folder, "shards.json"),
                   json.dumps({"shards": shards, "routing": "splitmix64(id) % shards"}).encode())
    elif written != shards:
        raise ValueError(f"{folder!r} holds {written} shards, got shards={shards} (ids are routed by the count)")
    return [os.path.join(folder, f"shard-{i:03d}") for i in range(shards)]


class LocalShard:
    """A shard served in this process: an ``xmodal serve`` app over ``folder``, called without an HTTP hop.
    ``options``: :func:`.app.create_app`'s keyword arguments."""

    def __init__(self, folder: str, **options):
        import httpx

        from .app import create_app

        guarded = create_app(folder, load_in_background=False, **options)
        self.service = guarded.app.state.service
        self.service.load(raise_errors=True)
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://shard")

    async def __call__(self, method: str, path: str, body: bytes = b"", content_type: Optional[str] = None) -> Answer:
        headers = {"content-type": content_type} if content_type else {}
        r = await self._client.request(method, path, content=body, headers=headers)
        return r.status_code, {k: v for k, v in r.headers.items() if k in ("retry-after", "content-type")}, r.content

    def close(self) -> None:
        self.service.close()


def _relay(answer: Answer) -> Response:
    status, headers, body = answer
    return Response(body, status_code=status, headers={k: v for k, v in headers.items() if k == "retry-after"},
                    media_type=headers.get("content-type", "application/json"))


def _unavailable(missing: List[int]) -> Response:
    return error(503, f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} cannot answer now",
                 {"Retry-After": "1"})


def _failure(answers: Dict[int, Optional[Answer]], allow_missing: bool = False) -> Optional[Response]:
    """What to answer instead of merging the shards' answers, or None: 503 naming the shards that could not
    answer (unless ``allow_missing`` and some did), else the first answer of 400 or more."""
    missing = sorted(s for s, a in answers.items() if a is None)
    if missing and (not allow_missing or len(missing) == len(answers)):
        return _unavailable(missing)
    for a in answers.values():
        if a is not None and a[0] >= 400:
            return _relay(a)
    return None


class _Front:
    """The shards and what the routes share: calling some or all of them, and each collection's config."""

    def __init__(self, shards: Sequence[ShardCall], limits: Limits):
        from prometheus_client import Counter

        self.shards = list(shards)
        self.limits = limits
        self.configs: Dict[str, dict] = {}
        self.metrics = Metrics(lambda: None)  # (the shards count their own collections)
        self.unavailable = Counter("xmodal_shard_unavailable_total", "shard calls that got no answer", ["shard"],
                                   registry=self.metrics.registry)

    async def call_each(self, method: str, path: str, bodies: Dict[int, bytes],
                        content_type: Optional[str] = "application/json") -> Dict[int, Optional[Answer]]:
        """Each shard in ``bodies`` sent its body at once: its answer, None where it could not answer."""
        async def one(i):
            try:
                return await self.shards[i](method, path, bodies[i], content_type)
            except ShardUnavailable:
                self.unavailable.labels(str(i)).inc()
                return None

        answers = await asyncio.gather(*(one(i) for i in bodies))
        return dict(zip(bodies, answers))

    async def call(self, which: Sequence[int], method: str, path: str, body: bytes = b"",
                   content_type: Optional[str] = "application/json") -> Dict[int, Optional[Answer]]:
        """The shards in ``which`` sent the same body (see :meth:`call_each`)."""
        return await self.call_each(method, path, dict.fromkeys(which, body), content_type)

    async def all(self, method: str, path: str, body: bytes = b"", content_type: Optional[str] = "application/json"):
        """(every shard's answer, :func:`_failure` of them)."""
        answers = await self.call(range(len(self.shards)), method, path, body, content_type)
        return answers, _failure(answers)

    async def config(self, name: str) -> dict:
        """The collection's config (dim, metric, ...), asked of shard 0 once; KeyError (404) if there is none."""
        if name not in self.configs:
            answer = (await self.call([0], "GET", f"/collections/{name}"))[0]
            if answer is None:
                raise ShardUnavailable()
            if answer[0] != 200:
                raise _Relayed(answer)
            self.configs[name] = json.loads(answer[2])
        return self.configs[name]

    def owners(self, ids: np.ndarray) -> np.ndarray:
        return shard_of(ids, len(self.shards))


class _Relayed(Exception):
    """A shard's error answer, passed on as it is."""

    def __init__(self, answer: Answer):
        self.answer = answer


def _sum_sizes(descriptions: List[dict]) -> dict:
    return {**descriptions[0], "size": sum(d["size"] for d in descriptions)}


def _merge_hits(shard_results: List[List[List[dict]]], k: int, metric: str) -> List[List[dict]]:
    """The k best hits of each query over the shards' answers (a missing score ranks last)."""
    larger = SEARCH_METRICS[metric]
    worst = -math.inf if larger else math.inf
    merged = []
    for per_query in zip(*shard_results):
        hits = [h for part in per_query for h in part]
        hits.sort(key=lambda h: (worst if h["score"] is None else h["score"]), reverse=larger)
        merged.append(hits[:k])
    return merged


def _merge_keys(parts: List[List[dict]]) -> List[dict]:
    """payload_keys over the shards: where every shard lists a key's values, the counts summed and summarised as
    one service does (:func:`.payloads.key_summary`); else ``values`` and ``counts`` are null and ``distinct`` is
    the largest shard's count (a lower bound: the shards' value sets are not sent)."""
    from .payloads import _filter_key, key_summary

    keys: Dict[str, List[dict]] = {}
    for part in parts:
        for entry in part:
            keys.setdefault(entry["key"], []).append(entry)
    out = []
    for key in sorted(keys):
        entries = keys[key]
        if all(e["values"] is not None for e in entries):
            counts: Dict[str, int] = {}
            for e in entries:
                for v, n in zip(e["values"], e["counts"]):
                    counts[_filter_key(v)] = counts.get(_filter_key(v), 0) + n
            out.append(key_summary(key, counts))
        else:
            out.append({"key": key, "types": sorted({t for e in entries for t in e["types"]}),
                        "distinct": max(e["distinct"] for e in entries), "values": None, "counts": None})
    return out


def create_fanout_app(shards: Sequence[ShardCall], *, api_key: Optional[str] = None,
                      limits: Optional[Limits] = None):
    """The ASGI app answering the REST API of :mod:`.app` over ``shards`` (see the module's docstring).
    ``api_key`` and ``limits`` apply here, in front of the shards."""
    limits = limits or Limits()
    front = _Front(shards, limits)
    app = FastAPI(title="xmodal (sharded)", description="Cross-modal vector search over sharded xmodal indexes")
    _routes(app, front)
    return Guard(app, api_key, limits.max_body_bytes)


def _routes(app: FastAPI, front: _Front) -> None:
    from .app import _add_error_handlers

    _add_error_handlers(app)
    count_requests(app, front.metrics)

    @app.exception_handler(_Relayed)
    async def _relayed(request: Request, exc: _Relayed):
        return _relay(exc.answer)

    @app.exception_handler(ShardUnavailable)
    async def _down(request: Request, exc: ShardUnavailable):
        return _unavailable([0])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        """The front's own: requests, latency, shard calls that got no answer (each shard counts its own)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/ready")
    async def ready():
        answers = await front.call(range(len(front.shards)), "GET", "/ready")
        waiting = [i for i, a in answers.items() if a is None or a[0] != 200]
        if waiting:
            return JSONResponse({"status": "loading", "shards_not_ready": waiting}, status_code=503)
        first = json.loads(answers[0][2])
        return {**first, "shards": len(front.shards)}

    @app.put("/collections/{name}", status_code=201)
    async def create(name: str, request: Request):
        front.configs.pop(name, None)
        answers, failed = await front.all("PUT", f"/collections/{name}", await request.body())
        if failed is not None:
            if {a[0] for a in answers.values() if a is not None} != {201, 409}:
                return failed
            # a create that had stopped part way (a shard was down), now done on every shard
            answers, failed = await front.all("GET", f"/collections/{name}")
            if failed is not None:
                return failed
        return JSONResponse(_sum_sizes([json.loads(a[2]) for a in answers.values()]), status_code=201)

    @app.get("/collections")
    async def list_collections():
        answers, failed = await front.all("GET", "/collections")
        if failed is not None:
            return failed
        by_name: Dict[str, List[dict]] = {}
        for a in answers.values():
            for d in json.loads(a[2])["collections"]:
                by_name.setdefault(d["name"], []).append(d)
        return {"collections": [_sum_sizes(by_name[n]) for n in sorted(by_name)]}

    @app.get("/collections/{name}")
    async def describe(name: str):
        answers, failed = await front.all("GET", f"/collections/{name}")
        return failed or _sum_sizes([json.loads(a[2]) for a in answers.values()])

    @app.delete("/collections/{name}")
    async def delete_collection(name: str):
        front.configs.pop(name, None)
        answers, failed = await front.all("DELETE", f"/collections/{name}")
        # (200 and 404 together: a delete that had stopped part way, now done on every shard)
        if failed is not None and {a[0] for a in answers.values() if a is not None} != {200, 404}:
            return failed
        return {"deleted": name}

    @app.get("/collections/{name}/payload_keys")
    async def payload_keys(name: str):
        answers, failed = await front.all("GET", f"/collections/{name}/payload_keys")
        return failed or {"keys": _merge_keys([json.loads(a[2])["keys"] for a in answers.values()])}

    @app.post("/collections/{name}/vectors")
    async def add_vectors(name: str, body: AddVectors):
        config = await front.config(name)
        ids, _ = check_add(body, config["dim"], front.limits)
        owners = front.owners(ids)
        parts = {}
        for s in np.unique(owners).tolist():
            rows = np.flatnonzero(owners == s)
            part = {"ids": ids[rows].tolist(), "vectors": [body.vectors[r] for r in rows]}
            if body.payloads is not None:
                part["payloads"] = [body.payloads[r] for r in rows]
            parts[s] = json.dumps(part).encode()
        return _summed(await front.call_each("POST", f"/collections/{name}/vectors", parts), ("upserted", "replaced"))

    @app.delete("/collections/{name}/vectors")
    async def delete_vectors(name: str, body: DeleteVectors):
        await front.config(name)  # (404 for a missing collection even when no shard is asked)
        ids = check_ids(body.ids)
        owners = front.owners(ids)
        parts = {s: json.dumps({"ids": ids[owners == s].tolist()}).encode() for s in np.unique(owners).tolist()}
        return _summed(await front.call_each("DELETE", f"/collections/{name}/vectors", parts), ("deleted",))

    @app.get("/collections/{name}/vectors/{id}")
    async def get_vector(name: str, id: int):
        owner = int(front.owners(np.array([id]))[0]) if id >= 0 else 0
        answer = (await front.call([owner], "GET", f"/collections/{name}/vectors/{id}"))[owner]
        return _unavailable([owner]) if answer is None else _relay(answer)

    @app.post("/collections/{name}/search")
    async def search(name: str, request: Request):
        raw = await request.body()
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError:
            fields = None
        allow_partial = isinstance(fields, dict) and bool(fields.pop("allow_partial", False))
        try:  # (the checks and their order as one service's, so the same request gets the same 422)
            body = Search.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        config = await front.config(name)
        check_vectors(body.vectors, config["dim"], "vectors", front.limits.max_queries)
        _, ids, _ = check_search_options(body, front.limits)
        which = list(range(len(front.shards)))
        bodies = {s: json.dumps(fields).encode() for s in which}
        if ids is not None:  # each shard is asked only for the ids it holds
            owners = front.owners(ids)
            which = np.unique(owners).tolist() or [0]
            bodies = {s: json.dumps({**fields, "ids": ids[owners == s].tolist()}).encode() for s in which}
        return await fan_out(f"/collections/{name}/search", bodies, "application/json", body.k, config["metric"],
                             allow_partial)

    @app.post("/collections/{name}/search/{by}")
    async def search_by_model(name: str, by: str, request: Request):
        """By text, image or image and text: every shard embeds the query (with the same model) and searches."""
        raw = await request.body()
        content_type = request.headers.get("content-type")
        k = 10
        try:  # (only to merge: each shard checks the request itself)
            if content_type and content_type.startswith("multipart/"):
                k = int((await request.form()).get("k", 10))
            else:
                k = int(json.loads(raw).get("k", 10))
        except (ValueError, TypeError, AttributeError):
            pass
        config = await front.config(name)
        bodies = dict.fromkeys(range(len(front.shards)), raw)
        return await fan_out(f"/collections/{name}/search/{by}", bodies, content_type, k, config["metric"], False)

    @app.get("/collections/{name}/media/{path:path}")
    async def media(name: str, path: str, request: Request):
        query = f"?{request.url.query}" if request.url.query else ""
        answer = (await front.call([0], "GET", f"/collections/{name}/media/{path}{query}", b"", None))[0]
        return _unavailable([0]) if answer is None else _relay(answer)

    async def fan_out(path: str, bodies: Dict[int, bytes], content_type: Optional[str], k: int, metric: str,
                      allow_partial: bool) -> Response:
        """Send each shard in ``bodies`` its body, then merge the k best of their results."""
        answered = await front.call_each("POST", path, bodies, content_type)
        failed = _failure(answered, allow_missing=allow_partial)
        if failed is not None:
            return failed
        results = [json.loads(a[2])["results"] for a in answered.values() if a is not None]
        out = {"results": _merge_hits(results, k, metric)}
        if allow_partial:
            out["missing_shards"] = sorted(s for s, a in answered.items() if a is None)
        return out


def _summed(answers: Dict[int, Optional[Answer]], fields: Sequence[str]) -> Response:
    """The counts of a write split over shards, summed; the first failure instead if one failed (the parts
    other shards acknowledged are durable there; the whole request may be sent again)."""
    failed = _failure(answers)
    if failed is not None:
        return failed
    parts = [json.loads(a[2]) for a in answers.values()]
    return JSONResponse({f: sum(p[f] for p in parts) for f in fields})
