"""Collections: create, list, describe and delete (``/collections``, ``/collections/{name}``)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..requests import CreateCollection, Unprocessable, error
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
