"""What every route shares: the request limits, the request bodies (pydantic models), the checks that name
the offending field and value, and the errors routes raise (answered by :func:`.app.create_app`'s handlers)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..index.codecs import CODECS
from ..ops import SEARCH_METRICS

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
    """A field the service cannot take (422 naming the field, the reason and the value given)."""

    def __init__(self, field: str, message: str, value: Any = None):
        self.field, self.message, self.value = field, message, value


def short(value: Any) -> Any:
    """A value small enough to echo in an error."""
    text = json.dumps(value, default=str)  # NaN and infinity spelled out, as JSON itself cannot
    if len(text) > 200:
        return text[:200] + "..."
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return text
    return value


def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# -- request bodies
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateCollection(Body):
    dim: int = Field(description="vector dimension")
    metric: Literal[tuple(SEARCH_METRICS)] = "cosine"
    index: Literal["flat", "ivf", "graph"] = "flat"
    codec: Optional[Literal[tuple(CODECS)]] = None
    nlist: Optional[int] = Field(None, description="ivf: number of lists")
    nprobe: Optional[int] = Field(None, description="ivf: lists searched per query")
    degree: Optional[int] = Field(None, description="graph: neighbours per row")
    ef: Optional[int] = Field(None, description="graph: rows a search walk keeps (more: higher recall, slower)")


class AddVectors(Body):
    ids: List[int]
    vectors: List[List[float]]
    payloads: Optional[List[Optional[Dict[str, Any]]]] = None


class TrainCollection(Body):
    vectors: List[List[float]] = Field(description="rows to learn the lists and codec from (not stored)")


class DeleteVectors(Body):
    ids: List[int]


class SearchOptions(Body):
    k: int = 10
    ids: Optional[List[int]] = Field(None, description="allow-list: only these ids may be answered")
    filter: Optional[Dict[str, Any]] = Field(None, description="payload match: {key: value or [values]}")
    with_payload: bool = False


class Search(SearchOptions):
    vectors: List[List[float]]


class TextSearch(SearchOptions):
    text: Union[str, List[str]]


# -- checks that name the field and the value
def check_ids(ids: List[int], field: str = "ids") -> np.ndarray:
    for i, v in enumerate(ids):
        if not 0 <= v <= INT64_MAX:
            raise Unprocessable(f"{field}[{i}]", "ids must be non-negative int64 values (-1 marks a missing result)",
                                v)
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size != np.unique(arr).size:
        values, counts = np.unique(arr, return_counts=True)
        raise Unprocessable(field, "ids must be unique", values[counts > 1][:10].tolist())
    return arr


def check_vectors(vectors: List[List[float]], dim: int, field: str, most: int) -> np.ndarray:
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


def check_k(k: int, limits: Limits) -> int:
    if not 1 <= k <= limits.max_k:
        raise Unprocessable("k", f"k must be in [1, {limits.max_k}]", k)
    return k


def check_add(body: AddVectors, dim: int, limits: Limits) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of an add request, checked: unique ids, one per vector, one payload (or null) per vector."""
    ids = check_ids(body.ids)
    vectors = check_vectors(body.vectors, dim, "vectors", limits.max_vectors)
    if len(ids) != len(vectors):
        raise Unprocessable("ids", f"one id per vector: {len(vectors)} vectors", f"{len(ids)} ids")
    if body.payloads is not None and len(body.payloads) != len(ids):
        raise Unprocessable("payloads", f"one payload (or null) per vector: {len(ids)} vectors",
                            f"{len(body.payloads)} payloads")
    return ids, vectors


def check_search_options(options: SearchOptions, limits: Limits) -> Tuple[int, Optional[np.ndarray], Optional[dict]]:
    """(k, allow-list ids or None, filter or None) of a search, checked in that order."""
    k = check_k(options.k, limits)
    allow = None if options.ids is None else check_ids(options.ids)
    return k, allow, check_filter(options.filter)


def check_filter(filter_: Optional[dict]) -> Optional[dict]:
    if filter_ is None:
        return None
    for key, value in filter_.items():
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, (dict, list)):
                raise Unprocessable(f"filter.{key}", "filter values must be scalars or lists of scalars", v)
    return filter_


class NotReady(Exception):
    """The collections are still loading (503)."""


class NotFound(Exception):
    """No such collection, or no model to search with (404)."""
