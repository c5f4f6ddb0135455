"""What every re-ranking method shares: the database as rows to compute with (:class:`Rows`, a tensor or an
index's stored vectors, in the caller's ids), argument checks, and score-to-affinity weights."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..index.base import Index
from .knn import check_rows

#: metrics whose scores are similarities, usable as affinities
SIMILARITY_METRICS = ("cosine", "ip")


def real(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_metric(metric) -> str:
    if metric not in SIMILARITY_METRICS:
        raise ValueError(f"metric must be one of {list(SIMILARITY_METRICS)} (re-ranking weights neighbours by "
                         f"similarity), got {metric!r}")
    return metric


class Rows:
    """The database as rows to compute with: ``rows`` (unit-normalised for cosine, in a dtype of at least
    float32 precision so sums of many weighted rows do not lose it), the ``metric`` in force, and the index
    (or None) whose ids the results are reported in."""

    def __init__(self, database, metric: Optional[str], name: str = "database"):
        if isinstance(database, Index):
            if database.reduce_to is not None:
                raise ValueError(f"{name} must be an index without reduce_to (its vectors live in the reduced "
                                 f"space, the queries do not), got reduce_to={database.reduce_to}")
            if metric is not None and metric != database.metric:
                raise ValueError(f"metric {metric!r} differs from the index's metric {database.metric!r}")
            self.metric = check_metric(database.metric)
            if len(database) == 0:
                raise ValueError(f"{name} is an empty index")
            rows = database.vectors
            self.index = database
        else:
            self.metric = check_metric("cosine" if metric is None else metric)
            check_rows(database, name)
            rows = database
            self.index = None
        self.dtype = rows.dtype
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        self.rows = F.normalize(rows, dim=1) if self.metric == "cosine" else rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def check_queries(self, queries) -> Tensor:
        check_rows(queries, "queries")
        if queries.shape[1] != self.rows.shape[1]:
            raise ValueError(f"queries must have the database's {self.rows.shape[1]} columns, got shape "
                             f"{tuple(queries.shape)}")
        q = queries.to(self.rows.device, self.rows.dtype)
        return F.normalize(q, dim=1) if self.metric == "cosine" else q

    def ids(self, positions: Tensor) -> Tensor:
        """Row positions (-1 = none) as the caller's indices: the positions themselves for a tensor, the
        index's ids for an index."""
        if self.index is None:
            return positions
        ids = self.index.ids.to(positions.device)
        return torch.where(positions >= 0, ids[positions.clamp(min=0)], torch.full_like(positions, -1))


def affinity(scores: Tensor, positions: Tensor, power: float) -> Tensor:
    """``max(score, 0) ** power`` where a neighbour exists, 0 for padding (so that 0 ** 0 = 1 never gives
    weight to a missing neighbour)."""
    w = scores.clamp(min=0).pow(power)
    return torch.where(positions >= 0, w, torch.zeros_like(w))

