"""Query expansion and database augmentation (alpha-QE and alpha-DBA, Radenovic et al.): each query, or each
database row, replaced by a weighted mean of itself and its nearest database rows before searching."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import topk_search
from .._checks import check_int
from ._rows import Rows, affinity, real
from .knn import knn_graph

__all__ = ["query_expansion", "database_augmentation"]


def query_expansion(queries: Tensor, database, k: int, *, n: int = 10, alpha: float = 3.0,
                    metric: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """alpha-query expansion (Radenovic et al.): search the ``n`` best database rows of each query, replace
    the query by ``normalise(q + sum_j max(s_j, 0) ** alpha * x_j)`` (the query itself with weight 1; for
    cosine, ``q`` and ``x_j`` unit-normalised), and search again.

    Args:
        queries: ``[Q, D]`` float tensor.
        database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex (searched with its own ``search``, so an
            IVF index answers approximately; its stored vectors give the expansion).
        k: results per query.
        n: neighbours averaged into each query (>= 1). ``alpha``: weight exponent (>= 0; 0 = plain average).
        metric: ``"cosine"`` or ``"ip"``; default ``"cosine"`` for a tensor, the index's own for an index
            (a different one raises).

    Returns:
        ``(scores, indices)`` ``[Q, k]`` of the expanded queries, best first: scores in the metric's units for
        the (unit-norm) expanded query; indices are rows of the tensor, or ids of the index; padded with -1.

    Memory: ``O(Q (n + k + D))`` beyond the database; nothing ``Q x N``.
    """
    rows = Rows(database, metric)
    q = rows.check_queries(queries)
    k = check_int(k, "k", 1)
    n = check_int(n, "n", 1)
    alpha = real(alpha, "alpha")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    scores, positions = _search(rows, q, n)
    expanded = F.normalize(_weighted_neighbour_sum(rows.rows, q, positions, affinity(scores, positions, alpha)),
                           dim=1)
    scores, positions = _search(rows, expanded, k)
    return scores.to(rows.dtype), rows.ids(positions)


def _search(rows: Rows, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best rows of the database for q as (scores, row positions): the index's own search for an
    index (mapped from ids back to positions), topk_search for a tensor."""
    if rows.index is None:
        return topk_search(q, rows.rows, k, rows.metric)
    scores, ids = rows.index.search(q.to(rows.index.dtype), k)
    stored = rows.index.ids.to(ids.device)
    order = torch.argsort(stored)
    where = torch.searchsorted(stored[order], ids.clamp(min=0))
    positions = order[where.clamp(max=stored.numel() - 1)]
    positions = torch.where(ids >= 0, positions, torch.full_like(positions, -1))
    return scores.to(q.dtype), positions


def database_augmentation(database, *, n: int = 10, alpha: float = 3.0, metric: Optional[str] = None) -> Tensor:
    """alpha-database-side augmentation (alpha-DBA): each database row replaced by
    ``normalise(x_i + sum_j max(s_ij, 0) ** alpha * x_j)`` over its ``n - 1`` nearest other rows ``j`` (the row
    itself with weight 1, as in :func:`query_expansion`; for cosine, rows unit-normalised first). Search
    the result (e.g. with the same metric) in place of the database, queries unchanged or expanded.

    Args:
        database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex whose stored ``vectors`` are augmented
            (the neighbours are found exactly among them, with :func:`xmodal.graph.knn_graph`).
        n: rows averaged, the row itself included (1 <= n <= N). ``alpha`` >= 0. ``metric``: as
            :func:`query_expansion`.

    Returns:
        ``[N, D]`` unit-norm rows in the database's dtype, aligned with the tensor's rows or with
        ``index.ids`` (rebuild an index with ``add(augmented, ids=index.ids)``).

    Memory: ``O(N (n + D))``: the neighbour graph and the output.
    """
    rows = Rows(database, metric)
    n = check_int(n, "n", 1)
    alpha = real(alpha, "alpha")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if n > len(rows):
        raise ValueError(f"n = {n} is larger than the {len(rows)} rows of database")
    x = rows.rows
    if n == 1:
        return F.normalize(x, dim=1).to(rows.dtype)
    # loop=False excludes exactly the row itself, which takes part with weight 1 instead
    edge_index, weight = knn_graph(x, n - 1, rows.metric)
    neighbours = edge_index[0].reshape(len(rows), n - 1)
    weights = affinity(weight.reshape(len(rows), n - 1), neighbours, alpha)
    return F.normalize(_weighted_neighbour_sum(x, x, neighbours, weights), dim=1).to(rows.dtype)



def _weighted_neighbour_sum(rows: Tensor, base: Tensor, neighbours: Tensor, weights: Tensor) -> Tensor:
    """``base + sum_j weights[:, j] * rows[neighbours[:, j]]``, one neighbour rank at a time so that only
    ``[M, D]`` is ever gathered, never ``[M, n, D]``. ``neighbours`` -1 must carry weight 0."""
    out = base.clone()
    for j in range(neighbours.shape[1]):
        out.addcmul_(weights[:, j:j + 1], rows[neighbours[:, j].clamp(min=0)])
    return out
