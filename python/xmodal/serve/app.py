"""The HTTP API (FastAPI): collections, vectors, search, health and Prometheus metrics.

Paths and fields (clients depend on them; FastAPI serves the OpenAPI schema at ``/docs``):

    PUT    /collections/{name}                 {"dim", "metric", "index": "flat"|"ivf", "codec", "nlist", "nprobe"}
    GET    /collections                        {"collections": [{"name", "size", ...config}]}
    GET    /collections/{name}
    DELETE /collections/{name}
    POST   /collections/{name}/vectors         {"ids", "vectors", "payloads"?}: add or replace, durable when answered
    DELETE /collections/{name}/vectors         {"ids"}
    GET    /collections/{name}/vectors/{id}    {"id", "vector", "payload"}
    POST   /collections/{name}/search          {"vectors", "k", "ids"?, "filter"?, "with_payload"}
    POST   /collections/{name}/search/text     {"text", ...}            (with a model)
    POST   /collections/{name}/search/image    multipart: image, k, ...  (with a model)
    POST   /collections/{name}/search/composed multipart: image, text, k, ... (with a model)
    GET    /health, /ready, /metrics

Errors are JSON: 401 (API key), 404, 409, 413 (body too large), 422 ``{"detail": [{"field", "message",
"value"}]}``, 503 (loading, or search queue full: with Retry-After).
"""
from __future__ import annotations

import hmac
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..ops import METRICS
from .batcher import Closed, MicroBatcher, Overloaded
from .collection import Catalog, Collection

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class Limits:
    """What one request may ask for. ``max_body_bytes`` bounds every body (413 beyond it)."""
    max_body_bytes: int = 64 << 20
    max_k: int = 10_000
    max_queries: int = 1024        # query vectors per search request
    max_vectors: int = 100_000     # vectors per add request
    max_batch: int = 256           # queries per micro-batched search call (1: batching off)
    batch_wait: float = 0.002      # seconds a started batch keeps gathering while requests arrive together
    max_queue: int = 4096          # queries waiting per collection before 503


class Unprocessable(Exception):
    def __init__(self, field: str, message: str, value: Any = None):
        self.field, self.message, self.value = field, message, value


def _short(value: Any) -> Any:
    """A value small enough to echo in an error."""
    text = json.dumps(value, default=str)  # NaN and infinity spelled out, as JSON itself cannot
    if len(text) > 200:
        return text[:200] + "..."
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return text
    return value


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# -- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateCollection(_Body):
    dim: int = Field(description="vector dimension")
    metric: Literal[tuple(METRICS)] = "cosine"
    index: Literal["flat", "ivf"] = "flat"
    codec: Optional[Literal["int8", "binary"]] = None
    nlist: Optional[int] = Field(None, description="ivf: number of lists")
    nprobe: Optional[int] = Field(None, description="ivf: lists searched per query")


class AddVectors(_Body):
    ids: List[int]
    vectors: List[List[float]]
    payloads: Optional[List[Optional[Dict[str, Any]]]] = None


class DeleteVectors(_Body):
    ids: List[int]


class _SearchOptions(_Body):
    k: int = 10
    ids: Optional[List[int]] = Field(None, description="allow-list: only these ids may be answered")
    filter: Optional[Dict[str, Any]] = Field(None, description="payload match: {key: value or [values]}")
    with_payload: bool = False


class Search(_SearchOptions):
    vectors: List[List[float]]


class TextSearch(_SearchOptions):
    text: Union[str, List[str]]


# -- checks that name the field and the value
def _check_ids(ids: List[int], field: str = "ids") -> np.ndarray:
    for i, v in enumerate(ids):
        if not 0 <= v <= INT64_MAX:
            raise Unprocessable(f"{field}[{i}]", "ids must be non-negative int64 values (-1 marks a missing result)",
                                v)
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size != np.unique(arr).size:
        values, counts = np.unique(arr, return_counts=True)
        raise Unprocessable(field, "ids must be unique", values[counts > 1][:10].tolist())
    return arr


def _check_vectors(vectors: List[List[float]], dim: int, field: str, most: int) -> np.ndarray:
    if not vectors:
        raise Unprocessable(field, "at least one vector is needed", [])
    if len(vectors) > most:
        raise Unprocessable(field, f"at most {most} vectors per request", len(vectors))
    for i, v in enumerate(vectors):
        if len(v) != dim:
            raise Unprocessable(f"{field}[{i}]", f"every vector must have dimension {dim}", f"{len(v)} numbers")
    arr = np.asarray(vectors, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        raise Unprocessable(f"{field}[{row}][{col}]", "vectors must be finite numbers (no NaN or infinity)",
                            vectors[row][col])
    return arr


def _check_k(k: int, limits: Limits) -> int:
    if not 1 <= k <= limits.max_k:
        raise Unprocessable("k", f"k must be in [1, {limits.max_k}]", k)
    return k


def _check_filter(filter_: Optional[dict]) -> Optional[dict]:
    if filter_ is None:
        return None
    for key, value in filter_.items():
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, (dict, list)):
                raise Unprocessable(f"filter.{key}", "filter values must be scalars or lists of scalars", v)
    return filter_


# -- middleware (plain ASGI: they answer before any routing or body parsing)
class _Guard:
    """API key check (constant time) and body size limit, ahead of everything else."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await _error(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                    {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get(b"content-length")
        too_large = _error(413, f"request body larger than {self.max_body_bytes} bytes")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return await too_large(scope, receive, send)
            except ValueError:
                return await _error(400, "bad Content-Length")(scope, receive, send)
            return await self.app(scope, receive, send)
        # no length given (chunked): read up to the limit, then hand the body on
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _Metrics:
    def __init__(self, catalog_ref):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("xmodal_requests_total", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("xmodal_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        self.batch = Histogram("xmodal_search_batch_queries", "queries per index search call", ["collection"],
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))

        class _Vectors:
            def collect(self):
                g = GaugeMetricFamily("xmodal_collection_vectors", "vectors per collection", labels=["collection"])
                catalog = catalog_ref()
                if catalog is not None:
                    for name, col in list(catalog.collections.items()):
                        g.add_metric([name], len(col))
                yield g

        self.registry.register(_Vectors())


def create_app(folder: str, *, api_key: Optional[str] = None, encryption_key: Optional[bytes] = None,
               model_path: Optional[str] = None, limits: Optional[Limits] = None,
               snapshot_bytes: Optional[int] = None, load_in_background: bool = True):
    """The ASGI app serving the collections in ``folder``. Loading (snapshots + log replay) runs in a thread
    after start-up when ``load_in_background``: ``/health`` answers at once, ``/ready`` once loading is done."""
    limits = limits or Limits()
    options = {} if snapshot_bytes is None else {"snapshot_bytes": snapshot_bytes}
    catalog = Catalog(folder, encryption_key, **options)
    state = {"ready": False, "error": None, "model": None}
    batchers: Dict[int, MicroBatcher] = {}
    metrics = _Metrics(lambda: catalog)

    def load() -> None:
        try:
            if model_path is not None:
                from ..encoders import CrossModalModel

                state["model"] = CrossModalModel.load(model_path)
            catalog.open_all()
            state["ready"] = True
        except Exception as e:  # reported by /ready and on stderr; the service never serves a partial state
            state["error"] = f"{type(e).__name__}: {e}"
            print(f"xmodal serve: loading failed: {state['error']}", file=sys.stderr, flush=True)
            if not load_in_background:
                raise

    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=load, name="load", daemon=True).start()
        else:
            load()
        yield
        for b in batchers.values():
            b.close()
        catalog.close()

    app = FastAPI(title="xmodal", description="Cross-modal vector search over xmodal indexes", lifespan=lifespan)
    app.state.catalog = catalog
    app.state.status = state

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = []
        for err in exc.errors():
            loc = [p for p in err.get("loc", ()) if p != "body"]
            field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
            detail.append({"field": field or "body", "message": err.get("msg", ""),
                           "value": _short(err.get("input"))})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Unprocessable)
    async def _unprocessable(request: Request, exc: Unprocessable):
        return JSONResponse({"detail": [{"field": exc.field, "message": exc.message, "value": _short(exc.value)}]},
                            status_code=422)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    def collection(name: str) -> Collection:
        if not state["ready"]:
            raise _NotReady()
        try:
            return catalog.get(name)
        except KeyError:
            raise _NotFound(f"no collection {name!r}") from None

    @app.exception_handler(KeyError)
    async def _missing(request: Request, exc: KeyError):
        return _error(404, str(exc.args[0]) if exc.args else "not found")

    def batcher(col: Collection) -> MicroBatcher:
        b = batchers.get(id(col))
        if b is None:
            b = batchers[id(col)] = MicroBatcher(
                col.search, max_batch=limits.max_batch, max_wait=limits.batch_wait, max_queue=limits.max_queue,
                on_batch=metrics.batch.labels(col.name).observe)
        return b

    def describe(col: Collection) -> dict:
        return {"name": col.name, "size": len(col), **col.config}

    # -- collections
    @app.put("/collections/{name}", status_code=201)
    def create_collection(name: str, body: CreateCollection):
        if not state["ready"]:
            raise _NotReady()
        config = {k: v for k, v in body.model_dump().items() if v is not None}
        try:
            col = catalog.create(name, config)
        except FileExistsError as e:
            return _error(409, str(e))
        except ValueError as e:
            field = "name" if str(e).startswith("collection name") else str(e).split(" ")[0]
            raise Unprocessable(field, str(e), name if field == "name" else config.get(field)) from None
        return JSONResponse(describe(col), status_code=201)

    @app.get("/collections")
    def list_collections():
        if not state["ready"]:
            raise _NotReady()
        return {"collections": [describe(c) for _, c in sorted(catalog.collections.items())]}

    @app.get("/collections/{name}")
    def get_collection(name: str):
        return describe(collection(name))

    @app.delete("/collections/{name}")
    def delete_collection(name: str):
        col = collection(name)
        catalog.delete(name)
        b = batchers.pop(id(col), None)
        if b is not None:
            b.close()
        return {"deleted": name}

    # -- vectors
    @app.post("/collections/{name}/vectors")
    def add_vectors(name: str, body: AddVectors):
        col = collection(name)
        ids = _check_ids(body.ids)
        vectors = _check_vectors(body.vectors, col.config["dim"], "vectors", limits.max_vectors)
        if len(ids) != len(vectors):
            raise Unprocessable("ids", f"one id per vector: {len(vectors)} vectors", f"{len(ids)} ids")
        if body.payloads is not None and len(body.payloads) != len(ids):
            raise Unprocessable("payloads", f"one payload (or null) per vector: {len(ids)} vectors",
                                f"{len(body.payloads)} payloads")
        try:
            replaced = col.upsert(ids, vectors, body.payloads)
        except ValueError as e:  # what the index cannot take (e.g. too few rows to learn a codec from)
            raise Unprocessable("vectors", str(e), f"{len(vectors)} vectors") from None
        return {"upserted": len(ids), "replaced": replaced}

    @app.delete("/collections/{name}/vectors")
    def delete_vectors(name: str, body: DeleteVectors):
        col = collection(name)
        return {"deleted": col.delete(_check_ids(body.ids))}

    @app.get("/collections/{name}/vectors/{id}")
    def get_vector(name: str, id: int):
        col = collection(name)
        found = col.get(id)
        if found is None:
            return _error(404, f"no vector with id {id} in collection {name!r}")
        vector, payload = found
        return {"id": id, "vector": vector.tolist(), "payload": payload}

    # -- search
    async def answer(col: Collection, queries: np.ndarray, options: _SearchOptions) -> Response:
        k = _check_k(options.k, limits)
        allow = None if options.ids is None else _check_ids(options.ids).tolist()
        filter_ = _check_filter(options.filter)
        run_alone = None
        if allow is not None or filter_ is not None:
            def run_alone():
                metrics.batch.labels(col.name).observe(queries.shape[0])
                return col.search(queries, k, allow, filter_)
        try:
            scores, ids = await batcher(col).submit(queries, k, run_alone)
        except Overloaded as e:
            return _error(503, str(e), {"Retry-After": "1"})
        except Closed:
            return _error(404, f"collection {col.name!r} was deleted while the search waited")
        payloads = col.payloads.by_id if options.with_payload else None
        results = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
            hits = []
            for s, i in zip(row_scores, row_ids):
                if i < 0:  # padding: fewer than k candidates (stored ids are never negative)
                    continue
                hit = {"id": i, "score": s if math.isfinite(s) else None}
                if payloads is not None:
                    hit["payload"] = payloads.get(i)
                hits.append(hit)
            results.append(hits)
        return JSONResponse({"results": results})

    @app.post("/collections/{name}/search")
    async def search(name: str, body: Search):
        col = collection(name)
        queries = _check_vectors(body.vectors, col.config["dim"], "vectors", limits.max_queries)
        return await answer(col, queries, body)

    def model_for(col: Collection):
        model = state["model"]
        if model is None:
            raise _NotFound("this service has no model: start it with --model to search by text or image")
        if model.embed_dim != col.config["dim"]:
            raise Unprocessable("name", f"the model embeds into {model.embed_dim} dimensions, the collection holds "
                                        f"{col.config['dim']}", col.name)
        return model

    async def encode(fn, *args) -> np.ndarray:
        import torch

        def run():
            with torch.inference_mode():
                return fn(*args).float().numpy()

        return await run_in_threadpool(run)

    def image_tensor(data: bytes, field: str = "image"):
        import torch
        from PIL import Image, UnidentifiedImageError

        from ..data import IMAGE_SIZE

        try:
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise Unprocessable(field, f"not a readable image ({e})", f"{len(data)} bytes") from None
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return pixels.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).float().div(255).unsqueeze(0)

    @app.post("/collections/{name}/search/text")
    async def search_text(name: str, body: TextSearch):
        col = collection(name)
        model = model_for(col)
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts or len(texts) > limits.max_queries:
            raise Unprocessable("text", f"1 to {limits.max_queries} texts", len(texts))
        return await answer(col, await encode(model.encode_text, texts), body)

    def form_options(k: int, ids: Optional[str], filter: Optional[str], with_payload: bool) -> _SearchOptions:
        parsed = {}
        for field, text in (("ids", ids), ("filter", filter)):
            if text is not None:
                try:
                    parsed[field] = json.loads(text)
                except json.JSONDecodeError:
                    raise Unprocessable(field, "must be JSON", text) from None
        try:
            return _SearchOptions(k=k, with_payload=with_payload, **parsed)
        except ValueError as e:
            raise Unprocessable("form", str(e), parsed) from None

    @app.post("/collections/{name}/search/image")
    async def search_image(name: str, image: UploadFile = File(...), k: int = Form(10), ids: Optional[str] = Form(None),
                           filter: Optional[str] = Form(None), with_payload: bool = Form(False)):
        col = collection(name)
        model = model_for(col)
        options = form_options(k, ids, filter, with_payload)
        pixels = image_tensor(await image.read())
        return await answer(col, await encode(model.encode_image, pixels), options)

    @app.post("/collections/{name}/search/composed")
    async def search_composed(name: str, image: UploadFile = File(...), text: str = Form(...), k: int = Form(10),
                              ids: Optional[str] = Form(None), filter: Optional[str] = Form(None),
                              with_payload: bool = Form(False)):
        col = collection(name)
        model = model_for(col)
        options = form_options(k, ids, filter, with_payload)
        pixels = image_tensor(await image.read())
        return await answer(col, await encode(model.encode_composed, pixels, [text]), options)

    # -- operations
    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        if state["ready"]:
            return {"status": "ready", "collections": len(catalog.collections)}
        if state["error"]:
            return JSONResponse({"status": "failed", "error": state["error"]}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(_NotReady)
    async def _not_ready(request: Request, exc: "_NotReady"):
        return _error(503, "the service is loading its collections; see /ready", {"Retry-After": "1"})

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: "_NotFound"):
        return _error(404, str(exc))

    return _Guard(app, api_key, limits.max_body_bytes)


class _NotReady(Exception):
    pass


class _NotFound(Exception):
    pass
