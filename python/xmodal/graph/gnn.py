"""Training-free message-passing re-ranking (after Zhang et al., 2020): :class:`GNNRerank` builds the
database's graph and propagated sparse features once; :func:`gnn_rerank` is the one-call form of it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import topk_search
from .._checks import check_int
from ._rows import Rows, affinity

__all__ = ["GNNRerank", "gnn_rerank"]

#: elements per [queries, N] block of dense scores in a search
SCORE_BLOCK_ELEMENTS = 1 << 22

#: rows whose candidate entries (``(graph_k + 1) * feature_k`` each) one block of GNNRerank handles at once
GNN_BLOCK_ENTRIES = 1 << 22


def _sparse_rows_sum(cols: Tensor, vals: Tensor, keep: int) -> Tuple[Tensor, Tensor]:
    """Rows given as ``[R, W]`` (column, value) entries, duplicates summed, each row's ``keep`` largest
    entries unit-normalised: ``([R, keep], [R, keep])``. Unused slots are (column 0, value 0). Work and
    memory are O(R W log W), whatever the number of columns."""
    cols, order = torch.sort(cols, dim=1)
    vals = vals.gather(1, order)
    starts = torch.ones_like(cols, dtype=torch.bool)
    starts[:, 1:] = cols[:, 1:] != cols[:, :-1]
    segment = starts.cumsum(1) - 1  # the slot of each entry's column within its row
    summed = torch.zeros_like(vals).scatter_add_(1, segment, vals)
    seg_cols = torch.zeros_like(cols).scatter_(1, segment, cols)
    best_v, best = torch.topk(summed, min(keep, summed.shape[1]), dim=1)
    best_c = seg_cols.gather(1, best)
    best_v = best_v.clamp(min=0)
    best_v = best_v / best_v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(best_v.dtype).tiny)
    return torch.where(best_v > 0, best_c, torch.zeros_like(best_c)), best_v


def _propagate(cols: Tensor, vals: Tensor, neighbours: Tensor, weights: Tensor, prev_cols: Tensor,
               prev_vals: Tensor, keep: int) -> Tuple[Tensor, Tensor]:
    """One round of message passing on sparse features: row i becomes ``x_i + sum_j w_ij x'_j`` over its
    neighbours j (``x'``: the database's features of the previous round), truncated to ``keep`` entries."""
    rows, width = neighbours.shape[0], (neighbours.shape[1] + 1) * prev_cols.shape[1]
    block = max(1, GNN_BLOCK_ENTRIES // width)
    out_c, out_v = [], []
    for start in range(0, rows, block):
        part = slice(start, start + block)
        nb, w = neighbours[part], weights[part]
        c = torch.cat([cols[part], prev_cols[nb].flatten(1)], dim=1)
        v = torch.cat([vals[part], (prev_vals[nb] * w[:, :, None]).flatten(1)], dim=1)
        c, v = _sparse_rows_sum(c, v, keep)
        out_c.append(c)
        out_v.append(v)
    return torch.cat(out_c), torch.cat(out_v)


class GNNRerank:
    """Training-free message-passing re-ranking (after Zhang et al., 2020, "Understanding image retrieval
    re-ranking: a graph neural network perspective"), with the database's graph built once.

    The database rows form a ``graph_k``-nearest-neighbour graph (a row is its own first neighbour) with
    affinities ``a_ij = max(s_ij, 0)``. As in Zhang et al., a row's *feature* is not its embedding but its
    row of affinities (which rows it is close to), unit-normalised and sparse; ``layers`` rounds replace it
    with ``normalise(x_i + sum_j a_ij x_j)``, keeping the ``feature_k`` largest entries so that memory stays
    ``O(N feature_k)`` per round. A query joins the graph through its own ``graph_k`` nearest rows and goes
    through the same rounds against the database's features; database rows are then ranked by the inner
    product of features (rows whose propagated neighbourhoods overlap the query's, which follows the data's
    manifold where the raw metric cuts across it), ties and rows outside every neighbourhood by the raw
    similarity. Queries do not become neighbours of database rows, so one graph serves every query batch.

    Args:
        database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex (without ``reduce_to``) whose ``vectors``
            are used; results are then its ids.
        metric: ``"cosine"`` or ``"ip"`` (default ``"cosine"``; an index's own). graph_k: 1 <= graph_k <= N.
        layers: rounds of message passing (>= 0). feature_k: entries kept per feature (>= graph_k).

    Build: one ``graph_k`` self-search plus ``layers`` rounds of ``O(N graph_k feature_k log)`` work.
    """

    def __init__(self, database, *, metric: Optional[str] = None, graph_k: int = 20, layers: int = 2,
                 feature_k: int = 64):
        self._rows = Rows(database, metric)
        n = len(self._rows)
        self.graph_k = check_int(graph_k, "graph_k", 1)
        if self.graph_k > n:
            raise ValueError(f"graph_k must be <= the {n} rows of database, got {graph_k}")
        self.layers = check_int(layers, "layers", 0)
        self.feature_k = check_int(feature_k, "feature_k", 1)
        if self.feature_k < self.graph_k:
            raise ValueError(f"feature_k must be >= graph_k = {self.graph_k}, got {feature_k}")
        rows = self._rows.rows
        self._neighbours, self._weights, cols, vals = self._first_features(rows)
        self._features = [(cols, vals)]
        for _ in range(self.layers):
            cols, vals = _propagate(cols, vals, self._neighbours, self._weights, cols, vals, self.feature_k)
            self._features.append((cols, vals))
        # the last round's features by column: which database rows hold column c, with what value
        keep = vals.reshape(-1) > 0
        holder = torch.arange(n, device=rows.device).repeat_interleave(cols.shape[1])[keep]
        col, val = cols.reshape(-1)[keep], vals.reshape(-1)[keep]
        order = torch.argsort(col, stable=True)
        self._holders, self._holder_vals = holder[order], val[order]
        self._starts = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        self._starts[1:] = torch.bincount(col, minlength=n).cumsum(0)

    def __len__(self) -> int:
        return len(self._rows)

    def _first_features(self, x: Tensor):
        scores, neighbours = topk_search(x, self._rows.rows, self.graph_k, self._rows.metric)
        weights = affinity(scores, neighbours, 1.0)
        neighbours = neighbours.clamp(min=0)
        vals = weights / weights.norm(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return neighbours, weights, neighbours, vals

    def search(self, queries: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """``(scores, indices)`` ``[Q, k]``, best first; scores are the features' inner products (in [0, 1]),
        in the database's dtype."""
        q = self._rows.check_queries(queries)
        n = len(self._rows)
        k = check_int(k, "k", 1)
        if k > n:
            raise ValueError(f"k = {k} is larger than the {n} rows of database")
        neighbours, weights, cols, vals = self._first_features(q)
        for prev_cols, prev_vals in self._features[:-1]:
            cols, vals = _propagate(cols, vals, neighbours, weights, prev_cols, prev_vals, self.feature_k)
        block = max(1, SCORE_BLOCK_ELEMENTS // n)
        out_v, out_i = [], []
        for start in range(0, q.shape[0], block):
            part = slice(start, start + block)
            scores = self._scores(cols[part], vals[part])
            # rows outside every overlap, and ties, in raw-similarity order (a weight far below any overlap)
            raw = q[part] @ self._rows.rows.T
            scores += 1e-6 * (raw - raw.min(dim=1, keepdim=True).values) / (raw.max() - raw.min()).clamp(min=1e-30)
            v, i = torch.topk(scores, k, dim=1)
            out_v.append(v)
            out_i.append(i)
        return torch.cat(out_v).to(self._rows.dtype), self._rows.ids(torch.cat(out_i))

    def _scores(self, cols: Tensor, vals: Tensor) -> Tensor:
        """``[B, N]`` inner products of B sparse query features with every database feature, visiting only
        the database rows that share a column with the query."""
        b = cols.shape[0]
        flat_c, flat_v = cols.reshape(-1), vals.reshape(-1)
        which = torch.arange(b, device=cols.device).repeat_interleave(cols.shape[1])
        used = flat_v > 0
        flat_c, flat_v, which = flat_c[used], flat_v[used], which[used]
        first, counts = self._starts[flat_c], self._starts[flat_c + 1] - self._starts[flat_c]
        entry = torch.repeat_interleave(torch.arange(flat_c.numel(), device=cols.device), counts)
        offset = torch.arange(entry.numel(), device=cols.device) - (counts.cumsum(0) - counts)[entry]
        at = first[entry] + offset
        scores = torch.zeros(b, len(self._rows), dtype=vals.dtype, device=vals.device)
        scores.index_put_((which[entry], self._holders[at]), self._holder_vals[at] * flat_v[entry], accumulate=True)
        return scores


def gnn_rerank(queries: Tensor, database, k: int, *, graph_k: int = 20, layers: int = 2,
               metric: Optional[str] = None, feature_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``GNNRerank(database, ...).search(queries, k)`` in one call: the graph is built on every call, so
    hold a :class:`GNNRerank` to search more than one batch. ``feature_k`` defaults to ``max(64, graph_k)``;
    the other arguments, the result and the memory are :class:`GNNRerank`'s."""
    if feature_k is None:
        feature_k = max(64, check_int(graph_k, "graph_k", 1))
    reranker = GNNRerank(database, metric=metric, graph_k=graph_k, layers=layers, feature_k=feature_k)
    return reranker.search(queries, k)
