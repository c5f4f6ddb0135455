"""Search: by vectors, and with a model by text, image, or image and text composed; every form answers
through the collection's micro-batcher, alone when an allow-list or filter makes its mask its own.

A search by the model with ``?embed_only=true`` answers ``{"vectors", "options"}`` (the query vectors and the
checked search options) instead of searching: the sharded front (:mod:`..fanout`) embeds a query once this way
and sends its shards a search by vectors."""
from __future__ import annotations

import io
import json
import math
from typing import Optional

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..batcher import Closed, Overloaded
from ..collection import Collection
from ..requests import (NotFound, Search, SearchOptions, TextSearch, Unprocessable, check_search_options,
                        check_vectors, error)
from ..service import Service, service

router = APIRouter()


async def answer(svc: Service, col: Collection, queries: np.ndarray, options: SearchOptions) -> Response:
    k, allow, filter_ = check_search_options(options, svc.limits)
    allow = None if allow is None else allow.tolist()
    run_alone = None
    if allow is not None or filter_ is not None:
        def run_alone():
            svc.metrics.batch.labels(col.name).observe(queries.shape[0])
            return col.search(queries, k, allow, filter_)
    try:
        scores, ids = await svc.batcher(col).submit(queries, k, run_alone)
    except Overloaded as e:
        return error(503, str(e), {"Retry-After": "1"})
    except Closed:
        return error(404, f"collection {col.name!r} was deleted while the search waited")
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


async def answer_or_embed(svc: Service, col: Collection, queries: np.ndarray, options: SearchOptions,
                          embed_only: bool):
    if not embed_only:
        return await answer(svc, col, queries, options)
    k, allow, filter_ = check_search_options(options, svc.limits)
    return {"vectors": queries.tolist(), "options": {"k": k, "ids": None if allow is None else allow.tolist(),
                                                     "filter": filter_, "with_payload": options.with_payload}}


@router.post("/collections/{name}/search")
async def search(name: str, body: Search, svc: Service = Depends(service)):
    col = svc.collection(name)
    queries = check_vectors(body.vectors, col.config["dim"], "vectors", svc.limits.max_queries)
    return await answer(svc, col, queries, body)


def model_for(svc: Service, col: Collection):
    model = svc.status["model"]
    if model is None:
        raise NotFound("this service has no model: start it with --model to search by text or image")
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

    from ...data import IMAGE_SIZE

    try:
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        # (PIL's own message for an unknown format names a Python object's address: not for a client)
        reason = "not an image format this service reads" if isinstance(e, UnidentifiedImageError) else str(e)
        raise Unprocessable(field, f"not a readable image ({reason})", f"{len(data)} bytes") from None
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return pixels.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).float().div(255).unsqueeze(0)


@router.post("/collections/{name}/search/text")
async def search_text(name: str, body: TextSearch, embed_only: bool = False, svc: Service = Depends(service)):
    col = svc.collection(name)
    model = model_for(svc, col)
    texts = [body.text] if isinstance(body.text, str) else body.text
    if not texts or len(texts) > svc.limits.max_queries:
        raise Unprocessable("text", f"1 to {svc.limits.max_queries} texts", len(texts))
    return await answer_or_embed(svc, col, await encode(model.encode_text, texts), body, embed_only)


def form_options(k: int, ids: Optional[str], filter: Optional[str], with_payload: bool) -> SearchOptions:
    parsed = {}
    for field, text in (("ids", ids), ("filter", filter)):
        if text is not None:
            try:
                parsed[field] = json.loads(text)
            except json.JSONDecodeError:
                raise Unprocessable(field, "must be JSON", text) from None
    try:
        return SearchOptions(k=k, with_payload=with_payload, **parsed)
    except ValueError as e:
        raise Unprocessable("form", str(e), parsed) from None


@router.post("/collections/{name}/search/image")
async def search_image(name: str, image: UploadFile = File(...), k: int = Form(10), ids: Optional[str] = Form(None),
                       filter: Optional[str] = Form(None), with_payload: bool = Form(False),
                       embed_only: bool = False, svc: Service = Depends(service)):
    col = svc.collection(name)
    model = model_for(svc, col)
    options = form_options(k, ids, filter, with_payload)
    pixels = image_tensor(await image.read())
    return await answer_or_embed(svc, col, await encode(model.encode_image, pixels), options, embed_only)


@router.post("/collections/{name}/search/composed")
async def search_composed(name: str, image: UploadFile = File(...), text: str = Form(...), k: int = Form(10),
                          ids: Optional[str] = Form(None), filter: Optional[str] = Form(None),
                          with_payload: bool = Form(False), embed_only: bool = False,
                          svc: Service = Depends(service)):
    col = svc.collection(name)
    model = model_for(svc, col)
    options = form_options(k, ids, filter, with_payload)
    pixels = image_tensor(await image.read())
    return await answer_or_embed(svc, col, await encode(model.encode_composed, pixels, [text]), options,
                                 embed_only)
