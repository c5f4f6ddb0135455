"""The HTTP API (FastAPI): :func:`create_app` wires the service state, error handlers, metrics and the routers
of :mod:`.routes` (collections, vectors, search, health and Prometheus metrics).

Paths and fields (clients depend on them; FastAPI serves the OpenAPI schema at ``/docs``):

    PUT    /collections/{name}                 {"dim", "metric", "index": "flat"|"ivf"|"graph", "codec", "nlist",
                                                "nprobe", "degree", "ef"}
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
    GET    /collections/{name}/payload_keys     {"keys": [{"key", "types", "distinct", "values", "counts"}]}
    GET    /collections/{name}/media/{path}    an image a payload names; ?size=N: a PNG thumbnail
    GET    /health, /ready, /metrics
    GET    /ui/                                the search page (with ui=True; no API key needed for the page)

Errors are JSON: 401 (API key), 404, 409, 413 (body too large), 422 ``{"detail": [{"field", "message",
"value"}]}``, 503 (loading, or search queue full: with Retry-After).
"""
from __future__ import annotations

import threading
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .catalog import Catalog
from .media import Media
from .middleware import Guard, count_requests
from .requests import Limits, NotFound, NotReady, Unprocessable, error, short
from .routes import ROUTERS, UI_ROUTER
from .service import Service

__all__ = ["Limits", "create_app"]


def create_app(folder: str, *, api_key: Optional[str] = None, encryption_key: Optional[bytes] = None,
               model_path: Optional[str] = None, limits: Optional[Limits] = None,
               snapshot_bytes: Optional[int] = None, load_in_background: bool = True, ui: bool = False,
               media: Optional[str] = None):
    """The ASGI app serving the collections in ``folder``. Loading (snapshots + log replay) runs in a thread
    after start-up when ``load_in_background``: ``/health`` answers at once, ``/ready`` once loading is done.
    ``ui``: serve the search page at ``/ui/``. ``media``: the folder payloads' image paths are relative to, for
    collections without a ``media/`` folder of their own."""
    limits = limits or Limits()
    options = {} if snapshot_bytes is None else {"snapshot_bytes": snapshot_bytes}
    svc = Service(Catalog(folder, encryption_key, **options), limits, model_path, Media(media))

    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=svc.load, args=(False,), name="load", daemon=True).start()
        else:
            svc.load(raise_errors=True)
        yield
        svc.close()

    app = FastAPI(title="xmodal", description="Cross-modal vector search over xmodal indexes", lifespan=lifespan)
    app.state.service = svc
    app.state.catalog = svc.catalog
    app.state.status = svc.status
    _add_error_handlers(app)

    count_requests(app, svc.metrics)
    for router in ROUTERS + ((UI_ROUTER,) if ui else ()):
        app.include_router(router)
    return Guard(app, api_key, limits.max_body_bytes, open_prefix="/ui" if ui else None)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON: 422 with ``[{"field", "message", "value"}]``, 404 and 503 with ``detail``."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = []
        for err in exc.errors():
            loc = [p for p in err.get("loc", ()) if p != "body"]
            field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
            detail.append({"field": field or "body", "message": err.get("msg", ""),
                           "value": short(err.get("input"))})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Unprocessable)
    async def _unprocessable(request: Request, exc: Unprocessable):
        return JSONResponse({"detail": [{"field": exc.field, "message": exc.message, "value": short(exc.value)}]},
                            status_code=422)

    @app.exception_handler(KeyError)
    async def _missing(request: Request, exc: KeyError):
        return error(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady):
        return error(503, "the service is loading its collections; see /ready", {"Retry-After": "1"})

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error(404, str(exc))
