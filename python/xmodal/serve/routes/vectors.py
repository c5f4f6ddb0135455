"""Vectors of a collection: add or replace (durable when answered), delete, and read one back."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..requests import AddVectors, DeleteVectors, Unprocessable, check_add, check_ids, error
from ..service import Service, service

router = APIRouter()


@router.post("/collections/{name}/vectors")
def add_vectors(name: str, body: AddVectors, svc: Service = Depends(service)):
    col = svc.collection(name)
    ids, vectors = check_add(body, col.config["dim"], svc.limits)
    try:
        replaced = col.upsert(ids, vectors, body.payloads)
    except ValueError as e:  # what the index cannot take (e.g. too few rows to learn a codec from)
        raise Unprocessable("vectors", str(e), f"{len(vectors)} vectors") from None
    return {"upserted": len(ids), "replaced": replaced}


@router.delete("/collections/{name}/vectors")
def delete_vectors(name: str, body: DeleteVectors, svc: Service = Depends(service)):
    col = svc.collection(name)
    return {"deleted": col.delete(check_ids(body.ids))}


@router.get("/collections/{name}/vectors/{id}")
def get_vector(name: str, id: int, svc: Service = Depends(service)):
    col = svc.collection(name)
    found = col.get(id)
    if found is None:
        return error(404, f"no vector with id {id} in collection {name!r}")
    vector, payload = found
    return {"id": id, "vector": vector.tolist(), "payload": payload}
