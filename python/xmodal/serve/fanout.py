"""One REST API over several shards: the same paths, fields, errors, API key and limits as one ``xmodal serve``
(see :mod:`.app`), answered by shards that each serve a part of every collection.

A shard is anything that answers a request as the single service would (:mod:`.shards`: an app in this
process, a shard kept by several replicas; the Ray service: a deployment). Collections exist on every shard;
a vector lives on the shard its id hashes to (:func:`.shards.shard_of`, fixed, so a restarted service routes
alike). Writes are split by owner and acknowledged when every shard holding a part has made it durable; reads
of one id go to its owner; searches go to every shard and the best k of their answers are returned. While a
shard cannot answer, requests that need it get 503 with Retry-After, unless a search asks for
``"allow_partial": true``: then it is answered from the shards that can and names the ones that did not
(``"missing_shards"``).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from pydantic import ValidationError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..ops import SEARCH_METRICS
from .collection import learns
from .middleware import Guard, Metrics, count_requests
from .requests import (AddVectors, DeleteVectors, Limits, Search, TrainCollection, check_add, check_ids,
                       check_search_options, check_vectors, error)
from .shards import Answer, ShardCall, ShardUnavailable, shard_of

__all__ = ["create_fanout_app"]


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
        self.trained: Dict[str, set] = {}  # each collection's shards known to have learnt (see ensure_trained)
        self._training: Dict[str, asyncio.Lock] = {}
        self.turn = itertools.count()  # (which shard embeds the next search by the model)
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
                raise _Relayed(_relay(answer))
            self.configs[name] = json.loads(answer[2])
        return self.configs[name]

    def forget(self, name: str) -> None:
        """Drop what is known of collection ``name`` (it is being created or deleted)."""
        self.configs.pop(name, None)
        self.trained.pop(name, None)

    async def learnt(self, name: str, which: Sequence[int]) -> Dict[int, bool]:
        """Whether each shard in ``which`` has learnt its lists and codec (from training or rows)."""
        answers = await self.call(which, "GET", f"/collections/{name}")
        failed = _failure(answers)
        if failed is not None:
            raise _Relayed(failed)
        return {i: json.loads(a[2]).get("trained", True) for i, a in answers.items()}

    async def train(self, name: str, train_body: Optional[bytes], which: Sequence[int]) -> None:
        """Make the shards in ``which`` hold what shard 0 learnt, after shard 0 learnt from ``train_body`` (a
        train request; None when it has learnt already): every shard then searches with one index's lists and
        codec. _Relayed with the answer to give if a shard refused or could not answer."""
        async with self._training.setdefault(name, asyncio.Lock()):
            if train_body is not None:
                self._check((await self.call([0], "POST", f"/collections/{name}/train", train_body))[0], (200, 409))
            state = (await self.call([0], "GET", f"/collections/{name}/trained", b"", None))[0]
            self._check(state, (200,))
            rest = await self.call([s for s in which if s != 0], "PUT", f"/collections/{name}/trained", state[2],
                                   "application/octet-stream")
            failed = _failure(rest)
            if failed is not None:
                raise _Relayed(failed)
            self.trained.setdefault(name, set()).update([0, *which])

    async def ensure_trained(self, name: str, vectors: List[List[float]], which: Sequence[int]) -> None:
        """Before the shards in ``which`` take rows: any of them (or shard 0) that learnt nothing takes what shard
        0 learnt (:meth:`train`; shard 0 from ``vectors``, the whole add, if it too learnt nothing), so that no
        shard learns from its part alone."""
        known = self.trained.setdefault(name, set())
        needed = sorted({0, *which} - known)
        if not needed:
            return
        if not learns(await self.config(name)):
            known.update(range(len(self.shards)))
            return
        learnt = await self.learnt(name, needed)
        untrained = [i for i in needed if not learnt[i]]
        if untrained:
            await self.train(name, json.dumps({"vectors": vectors}).encode() if 0 in untrained else None, untrained)
        known.update(needed)

    @staticmethod
    def _check(answer: Optional[Answer], ok: Sequence[int]) -> None:
        if answer is None:
            raise _Relayed(_unavailable([0]))
        if answer[0] not in ok:
            raise _Relayed(_relay(answer))

    def owners(self, ids: np.ndarray) -> np.ndarray:
        return shard_of(ids, len(self.shards))


class _Relayed(Exception):
    """What to answer instead (a shard's error, or 503 for shards that could not answer)."""

    def __init__(self, response: Response):
        self.response = response


def _sum_sizes(descriptions: List[dict]) -> dict:
    """One collection's description over the shards': the sizes summed, trained when every shard is."""
    return {**descriptions[0], "size": sum(d["size"] for d in descriptions),
            "trained": all(d.get("trained", True) for d in descriptions)}


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
                      limits: Optional[Limits] = None, ui: bool = False):
    """The ASGI app answering the REST API of :mod:`.app` over ``shards`` (see the module's docstring).
    ``api_key`` and ``limits`` apply here, in front of the shards; ``ui``: serve the search page at ``/ui``
    (it calls only the API, which this app answers)."""
    from .routes import UI_ROUTER

    limits = limits or Limits()
    front = _Front(shards, limits)
    app = FastAPI(title="xmodal (sharded)", description="Cross-modal vector search over sharded xmodal indexes")
    _routes(app, front)
    if ui:
        app.include_router(UI_ROUTER)
    return Guard(app, api_key, limits.max_body_bytes, open_prefix="/ui" if ui else None)


def _routes(app: FastAPI, front: _Front) -> None:
    from .app import _add_error_handlers

    _add_error_handlers(app)
    count_requests(app, front.metrics)

    @app.exception_handler(_Relayed)
    async def _relayed(request: Request, exc: _Relayed):
        return exc.response

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
        front.forget(name)
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
        front.forget(name)
        answers, failed = await front.all("DELETE", f"/collections/{name}")
        # (200 and 404 together: a delete that had stopped part way, now done on every shard)
        if failed is not None and {a[0] for a in answers.values() if a is not None} != {200, 404}:
            return failed
        return {"deleted": name}

    @app.get("/collections/{name}/payload_keys")
    async def payload_keys(name: str):
        answers, failed = await front.all("GET", f"/collections/{name}/payload_keys")
        return failed or {"keys": _merge_keys([json.loads(a[2])["keys"] for a in answers.values()])}

    @app.post("/collections/{name}/train")
    async def train(name: str, body: TrainCollection):
        """Shard 0 learns from the rows, every other shard takes what it learnt (see :meth:`_Front.train`)."""
        config = await front.config(name)
        check_vectors(body.vectors, config["dim"], "vectors", front.limits.max_vectors)
        raw = json.dumps({"vectors": body.vectors}).encode()
        learnt = await front.learnt(name, range(len(front.shards)))
        if all(learnt.values()):  # (shard 0's 409, as one service's)
            answer = (await front.call([0], "POST", f"/collections/{name}/train", raw))[0]
            return _unavailable([0]) if answer is None else _relay(answer)
        await front.train(name, None if learnt[0] else raw, [s for s, done in learnt.items() if not done])
        return await describe(name)

    @app.get("/collections/{name}/trained")
    async def trained_state(name: str):
        answer = (await front.call([0], "GET", f"/collections/{name}/trained", b"", None))[0]
        return _unavailable([0]) if answer is None else _relay(answer)

    @app.put("/collections/{name}/trained")
    async def install_trained(name: str, request: Request):
        answers, failed = await front.all("PUT", f"/collections/{name}/trained", await request.body(),
                                          "application/octet-stream")
        return failed or _sum_sizes([json.loads(a[2]) for a in answers.values()])

    @app.post("/collections/{name}/vectors")
    async def add_vectors(name: str, body: AddVectors):
        config = await front.config(name)
        ids, _ = check_add(body, config["dim"], front.limits)
        owners = front.owners(ids)
        await front.ensure_trained(name, body.vectors, np.unique(owners).tolist())
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
        check_search_options(body, front.limits)
        return await fan_out(name, {**fields, "k": body.k}, config, allow_partial)

    @app.post("/collections/{name}/search/{by}")
    async def search_by_model(name: str, by: str, request: Request):
        """By text, image or image and text: one shard (each in turn) embeds the query and checks the request
        as one service would, then every shard searches with its vectors."""
        path = f"/collections/{name}/search/{by}?embed_only=true"
        raw, content_type = await request.body(), request.headers.get("content-type")
        first = next(front.turn) % len(front.shards)
        for s in [*range(first, len(front.shards)), *range(first)]:
            embedded = (await front.call([s], "POST", path, raw, content_type))[s]
            if embedded is not None:
                break
        else:
            return _unavailable(list(range(len(front.shards))))
        if embedded[0] != 200:
            return _relay(embedded)
        got = json.loads(embedded[2])
        fields = {"vectors": got["vectors"], **got["options"]}
        return await fan_out(name, fields, await front.config(name), False)

    @app.get("/collections/{name}/media/{path:path}")
    async def media(name: str, path: str, request: Request):
        query = f"?{request.url.query}" if request.url.query else ""
        answer = (await front.call([0], "GET", f"/collections/{name}/media/{path}{query}", b"", None))[0]
        return _unavailable([0]) if answer is None else _relay(answer)

    async def fan_out(name: str, fields: dict, config: dict, allow_partial: bool) -> Response:
        """Send every shard the search ``fields`` (an ``ids`` allow-list only to the shards that own them),
        then merge the k best of their results."""
        path, ids = f"/collections/{name}/search", fields.get("ids")
        if ids is None:
            bodies = dict.fromkeys(range(len(front.shards)), json.dumps(fields).encode())
        else:  # each shard is asked only for the ids it holds
            ids = np.asarray(ids, dtype=np.int64)
            owners = front.owners(ids)
            bodies = {s: json.dumps({**fields, "ids": ids[owners == s].tolist()}).encode()
                      for s in np.unique(owners).tolist() or [0]}
        answered = await front.call_each("POST", path, bodies)
        failed = _failure(answered, allow_missing=allow_partial)
        if failed is not None:
            return failed
        results = [json.loads(a[2])["results"] for a in answered.values() if a is not None]
        out = {"results": _merge_hits(results, fields["k"], config["metric"])}
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
