"""Collections: create, list, describe, train and delete (``/collections``, ``/collections/{name}``)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..requests import CreateCollection, TrainCollection, Unprocessable, check_vectors, error
from ..service import Service, service

router = APIRouter()


@router.put("/collections/{name}", status_code=201)
def create_collection(name: str, body: CreateCollection, svc: Service = Depends(service)):
    svc.check_ready()
    config = {k: v for k, v in body.model_dump().items() if v is not None}
    try:
        col = svc.catalog.create(name, config)
    except FileExistsError as e:
        return error(409, str(e))
    except ValueError as e:
        field = "name" if str(e).startswith("collection name") else str(e).split(" ")[0]
        raise Unprocessable(field, str(e), name if field == "name" else config.get(field)) from None
    return JSONResponse(svc.describe(col), status_code=201)


@router.get("/collections")
def list_collections(svc: Service = Depends(service)):
    svc.check_ready()
    return {"collections": [svc.describe(c) for _, c in sorted(svc.catalog.collections.items())]}


@router.get("/collections/{name}")
def get_collection(name: str, svc: Service = Depends(service)):
    return svc.describe(svc.collection(name))


@router.get("/collections/{name}/payload_keys")
def payload_keys(name: str, svc: Service = Depends(service)):
    """The payload keys of a collection with their value types and values (the most common first; ``null``
    where a key has more distinct values than are listed), what the search page builds its filters from."""
    col = svc.collection(name)
    with col.lock.read():  # a write changes the postings while they are read
        return {"keys": col.payloads.key_summaries()}


@router.delete("/collections/{name}")
def delete_collection(name: str, svc: Service = Depends(service)):
    col = svc.collection(name)
    svc.catalog.delete(name)
    svc.drop_batcher(col)
    return {"deleted": name}


@router.post("/collections/{name}/train")
def train(name: str, body: TrainCollection, svc: Service = Depends(service)):
    """Learn an IVF index's lists (and a codec) from these rows, which are not stored; without it the first
    rows added are learnt from. Once per collection (409 after)."""
    col = svc.collection(name)
    vectors = check_vectors(body.vectors, col.config["dim"], "vectors", svc.limits.max_vectors)
    try:
        col.train(vectors)
    except FileExistsError as e:
        return error(409, str(e))
    except ValueError as e:
        raise Unprocessable("vectors", str(e), f"{len(vectors)} vectors") from None
    return svc.describe(col)


@router.get("/collections/{name}/trained")
def trained_state(name: str, svc: Service = Depends(service)):
    """What the collection learnt, as an empty index file (what ``PUT`` takes, e.g. on another shard), sealed
    under the service's encryption key when it has one."""
    col = svc.collection(name)
    try:
        return Response(col.trained_state(), media_type="application/octet-stream")
    except ValueError as e:
        return error(409, str(e))


@router.put("/collections/{name}/trained")
async def install_trained(name: str, request: Request, svc: Service = Depends(service)):
    """Take what another collection learnt (its ``GET .../trained``) before any row is added; the same state
    again is a no-op (200), another one 409."""
    col = svc.collection(name)
    state = await request.body()
    try:
        await asyncio.to_thread(col.install_trained, state)
    except FileExistsError as e:
        return error(409, str(e))
    except ValueError as e:
        raise Unprocessable("body", str(e), f"{len(state)} bytes") from None
    return svc.describe(col)
