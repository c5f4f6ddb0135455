"""Re-ranking after a first search: query expansion, database augmentation, diffusion and graph message
passing. All are training-free and work for similarity metrics (``"cosine"`` and ``"ip"``), whose scores
can serve as non-negative affinities once clamped at 0.

``database`` may be a ``[N, D]`` float tensor or an :class:`xmodal.FlatIndex` / :class:`xmodal.IVFIndex`
(without ``reduce_to``: re-ranking mixes the stored vectors with the queries, so both must live in the same
space). With a tensor, results index its rows; with an index, results are the index's ids.

Every function works on a copy of the database rows in at least float32 precision (unit-normalised for
cosine; for an index, its decoded ``vectors``): ``O(N D)`` memory besides what each function lists.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import check_rows, knn_graph
from .index.base import Index
from .index.kmeans import assign, kmeans
from .ops import topk_search

#: metrics whose scores are similarities, usable as affinities
SIMILARITY_METRICS = ("cosine", "ip")

#: elements per [N, queries] block of diffusion's conjugate gradient (it keeps four such blocks)
DIFFUSION_BLOCK_ELEMENTS = 1 << 22


# -- argument checks ----------------------------------------------------------------------------------

def _int_at_least(value, name: str, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_metric(metric) -> str:
    if metric not in SIMILARITY_METRICS:
        raise ValueError(f"metric must be one of {list(SIMILARITY_METRICS)} (re-ranking weights neighbours by "
                         f"similarity), got {metric!r}")
    return metric


class _Rows:
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
            self.metric = _check_metric(database.metric)
            if len(database) == 0:
                raise ValueError(f"{name} is an empty index")
            rows = database.vectors
            self.index = database
        else:
            self.metric = _check_metric("cosine" if metric is None else metric)
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


def _weighted_neighbour_sum(rows: Tensor, base: Tensor, neighbours: Tensor, weights: Tensor) -> Tensor:
    """``base + sum_j weights[:, j] * rows[neighbours[:, j]]``, one neighbour rank at a time so that only
    ``[M, D]`` is ever gathered, never ``[M, n, D]``. ``neighbours`` -1 must carry weight 0."""
    out = base.clone()
    for j in range(neighbours.shape[1]):
        out.addcmul_(weights[:, j:j + 1], rows[neighbours[:, j].clamp(min=0)])
    return out


def _affinity(scores: Tensor, positions: Tensor, power: float) -> Tensor:
    """``max(score, 0) ** power`` where a neighbour exists, 0 for padding (so that 0 ** 0 = 1 never gives
    weight to a missing neighbour)."""
    w = scores.clamp(min=0).pow(power)
    return torch.where(positions >= 0, w, torch.zeros_like(w))


# -- query expansion and database augmentation ------------------------------------------------------

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
    rows = _Rows(database, metric)
    q = rows.check_queries(queries)
    k = _int_at_least(k, "k", 1)
    n = _int_at_least(n, "n", 1)
    alpha = _real(alpha, "alpha")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    scores, positions = _search(rows, q, n)
    expanded = F.normalize(_weighted_neighbour_sum(rows.rows, q, positions, _affinity(scores, positions, alpha)),
                           dim=1)
    scores, positions = _search(rows, expanded, k)
    return scores.to(rows.dtype), rows.ids(positions)


def _search(rows: _Rows, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
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
    rows = _Rows(database, metric)
    n = _int_at_least(n, "n", 1)
    alpha = _real(alpha, "alpha")
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
    weights = _affinity(weight.reshape(len(rows), n - 1), neighbours, alpha)
    return F.normalize(_weighted_neighbour_sum(x, x, neighbours, weights), dim=1).to(rows.dtype)


# -- diffusion ------------------------------------------------------------------------------------------

def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *, max_iter: int = 20,
                       tol: float = 1e-6) -> Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec(v) = A v``, for every
    column of ``b`` ``[N, B]`` at once (each column has its own step sizes). Starts from 0; stops after
    ``max_iter`` steps or when every column's residual norm is at most ``tol`` times its ``b``'s norm.
    ``matvec`` may return the same buffer on every call (its result is read before the next call).
    Memory: five ``[N, B]`` tensors (b and the solution among them) besides what ``matvec`` needs."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    # every step works in place on these buffers: a fresh [N, B] tensor per operation costs more in page
    # faults than the arithmetic (10 ms against 1.5 ms for 100,000 x 100 float32)
    product = torch.empty_like(b)
    ones = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)

    def column_dots(u: Tensor, v: Tensor) -> Tensor:
        # a matrix-vector product sums the columns about 3x faster than .sum(0)
        return torch.mv(torch.mul(u, v, out=product).T, ones)

    rs = column_dots(r, r)
    stop = (tol * b.norm(dim=0)) ** 2
    for _ in range(max_iter):
        if bool((rs <= stop).all()):
            break
        ap = matvec(p)
        pap = column_dots(p, ap)
        # a converged column (r = 0, hence p = 0) has pAp = 0: it takes no step instead of dividing by 0
        step = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x.addcmul_(p, step)
        r.addcmul_(ap, step, value=-1)
        rs_new = column_dots(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p.mul_(beta).add_(r)
        rs = rs_new
    return x


class Diffusion:
    """Manifold diffusion re-ranking (Iscen et al., CVPR 2017).

    Built once per database: the reciprocal (mutual) ``graph_k``-nearest-neighbour graph of the database
    rows, with affinities ``W_ij = max(s_ij, 0) ** gamma`` (``s`` the cosine or inner-product similarity;
    symmetrised as the mean of ``s_ij`` and ``s_ji``, which differ only by rounding), and its symmetric
    normalisation ``S = D^-1/2 W D^-1/2`` (``D`` the row sums; a row with no reciprocal neighbour keeps a
    zero row), stored as a sparse CSR matrix ``S`` over the rows taken in the order ``order`` (``S[i, j]``
    relates rows ``order[i]`` and ``order[j]``; rows are grouped by k-means cluster, for cache locality).

    :meth:`search` then diffuses each query's seeds through the graph: ``y`` holds ``s ** gamma`` for the
    query's ``seeds`` best database rows (0 elsewhere), ``f`` solves ``(I - alpha S) f = y`` by
    :func:`conjugate_gradient`, and the database is ranked by ``f``.

    Args:
        database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex whose stored ``vectors`` form the graph
            (results are then its ids).
        metric: ``"cosine"`` or ``"ip"`` (default ``"cosine"`` for a tensor, the index's for an index).
        graph_k: neighbours per row when building the graph (1 <= graph_k < N).
        gamma: affinity exponent (> 0). ``alpha``: diffusion weight, in (0, 1).
        max_iter, tol: conjugate-gradient limits per search.

    Memory: ``O(N graph_k)`` for the graph (built with :func:`xmodal.graph.knn_graph`, never ``N x N``) plus
    the database rows; a search holds ``O(N B)`` for blocks of ``B`` queries (``N B`` about
    ``DIFFUSION_BLOCK_ELEMENTS``).
    """

    def __init__(self, database, *, metric: Optional[str] = None, graph_k: int = 50, gamma: float = 3.0,
                 alpha: float = 0.99, max_iter: int = 20, tol: float = 1e-6):
        self._rows = _Rows(database, metric)
        n = len(self._rows)
        self.graph_k = _int_at_least(graph_k, "graph_k", 1)
        if self.graph_k >= n:
            raise ValueError(f"graph_k must be < the {n} rows of database, got {self.graph_k}")
        self.gamma = _real(gamma, "gamma")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        self.alpha = _real(alpha, "alpha")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        self.max_iter = _int_at_least(max_iter, "max_iter", 1)
        self.tol = _real(tol, "tol")
        self.metric = self._rows.metric
        self.order = self._locality_order()
        self._position = torch.empty_like(self.order)
        self._position[self.order] = torch.arange(n, device=self.order.device)
        self.S = self._normalised_affinity()

    def _locality_order(self) -> Tensor:
        """Rows grouped by k-means cluster: graph neighbours then sit near each other in the matrix, so the
        sparse product's gathers of neighbour rows hit the cache (about 1.5x faster at 100,000 rows)."""
        x = self._rows.rows
        clusters = max(1, min(1024, x.shape[0] // 256))
        if clusters == 1:
            return torch.arange(x.shape[0], device=x.device)
        centroids = kmeans(x, clusters, metric="l2", iterations=5)
        return torch.argsort(assign(x, centroids, "l2"), stable=True)

    def _normalised_affinity(self) -> Tensor:
        x = self._rows.rows[self.order]
        n = x.shape[0]
        edge_index, s = knn_graph(x, self.graph_k, self.metric, mutual=True)
        # both directions of every reciprocal pair are edges: adding W and W^T and halving makes the
        # matrix exactly symmetric (conjugate gradient needs that), whatever the rounding of s_ij vs s_ji
        both = torch.cat([edge_index, edge_index.flip(0)], 1)
        w = s.clamp(min=0).pow(self.gamma)
        w = torch.sparse_coo_tensor(both, torch.cat([w, w]) / 2, (n, n), check_invariants=False).coalesce()
        src, dst = w.indices()
        degree = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, src, w.values())
        inv_sqrt = torch.where(degree > 0, degree.clamp(min=torch.finfo(x.dtype).tiny).rsqrt(),
                               torch.zeros_like(degree))
        # (inv_sqrt[src] * inv_sqrt[dst]) first: a product of two commutes, so S_ij and S_ji round alike
        values = w.values() * (inv_sqrt[src] * inv_sqrt[dst])
        matrix = torch.sparse_coo_tensor(w.indices(), values, (n, n), check_invariants=False).coalesce()
        with warnings.catch_warnings():  # CSR matmul is PyTorch's fastest sparse product, "beta" or not
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return matrix.to_sparse_csr()

    def __len__(self) -> int:
        return len(self._rows)

    def _system(self, like: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> (I - alpha S) v`` into one reused buffer shaped like ``like`` (one sparse addmm)."""
        out = torch.empty_like(like)
        return lambda v: torch.addmm(v, self.S, v, beta=1, alpha=-self.alpha, out=out)

    def search(self, queries: Tensor, k: int, *, seeds: int = 10) -> Tuple[Tensor, Tensor]:
        """The k database rows with the largest diffusion score ``f`` for each query ``[Q, D]``:
        ``(scores, indices)`` ``[Q, k]``, best first; scores are ``f`` (unitless, larger is better; 0 for rows
        the diffusion does not reach), in the database's dtype; indices are rows of the tensor or ids of
        the index. ``seeds``: the query's best rows that start the diffusion (1 <= seeds <= N); k <= N."""
        q = self._rows.check_queries(queries)
        n = len(self)
        k = _int_at_least(k, "k", 1)
        seeds = _int_at_least(seeds, "seeds", 1)
        if k > n:
            raise ValueError(f"k = {k} is larger than the {n} rows of database")
        if seeds > n:
            raise ValueError(f"seeds = {seeds} is larger than the {n} rows of database")
        block = max(1, DIFFUSION_BLOCK_ELEMENTS // n)
        out_v, out_i = [], []
        for start in range(0, q.shape[0], block):
            qb = q[start:start + block]
            s, seed_rows = topk_search(qb, self._rows.rows, seeds, self.metric)
            y = torch.zeros(n, qb.shape[0], dtype=q.dtype, device=q.device)
            cols = torch.arange(qb.shape[0], device=q.device)[:, None].expand_as(seed_rows)
            y[self._position[seed_rows], cols] = s.clamp(min=0).pow(self.gamma)
            f = conjugate_gradient(self._system(y), y, max_iter=self.max_iter, tol=self.tol)
            v, i = torch.topk(f.T, k, dim=1)
            out_v.append(v)
            out_i.append(i)
        return torch.cat(out_v).to(self._rows.dtype), self._rows.ids(self.order[torch.cat(out_i)])


# -- graph message passing ------------------------------------------------------------------------------

def gnn_rerank(queries: Tensor, database, k: int, *, graph_k: int = 20, layers: int = 2,
               metric: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Training-free message-passing re-ranking (after Zhang et al., 2020, "Understanding image retrieval
    re-ranking: a graph neural network perspective").

    The queries and database rows together form one exact ``graph_k``-nearest-neighbour graph
    (:func:`xmodal.graph.knn_graph` with ``loop=True``: a row is normally its own first neighbour), with
    affinities ``a_ij = max(s_ij, 0)``. As in Zhang et al., a row's *feature* is not its embedding but its
    row of affinities ``A_i`` (sparse: which rows it is close to), unit-normalised: ``x_i = A_i / |A_i|``.
    Then ``layers`` times every feature becomes ``normalise(x_i + sum_j a_ij x_j)`` over its neighbours
    ``j``, and each query ranks the database rows by the inner product of the features. Two rows score
    high when their neighbourhoods overlap after propagation, which follows the data's manifold where the
    raw metric cuts across it.

    Args:
        queries: ``[Q, D]`` float tensor. database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex whose
            stored ``vectors`` are used (results are then its ids).
        k: results per query (1 <= k <= N). graph_k: 1 <= graph_k <= Q + N. layers: rounds (>= 0).
        metric: ``"cosine"`` or ``"ip"`` (default ``"cosine"`` for a tensor, the index's for an index).

    Returns:
        ``(scores, indices)`` ``[Q, k]``, best first: scores are the features' inner products, in [0, 1]
        (unitless), in the database's dtype.

    Memory: the graph's ``O((Q + N) graph_k)``; sparse features of at most ``min(Q + N, graph_k **
    (layers + 1))`` non-zeros per row (keep ``graph_k`` and ``layers`` small: 20 and 2 give at most 8000);
    ``O(N B)`` for the dense scores of a block of ``B`` queries (``N B`` about ``DIFFUSION_BLOCK_ELEMENTS``).
    """
    rows = _Rows(database, metric)
    q = rows.check_queries(queries)
    n = len(rows)
    k = _int_at_least(k, "k", 1)
    if k > n:
        raise ValueError(f"k = {k} is larger than the {n} rows of database")
    graph_k = _int_at_least(graph_k, "graph_k", 1)
    total = q.shape[0] + n
    if graph_k > total:
        raise ValueError(f"graph_k must be <= the {total} queries and database rows together, got {graph_k}")
    layers = _int_at_least(layers, "layers", 0)
    edge_index, s = knn_graph(torch.cat([q, rows.rows]), graph_k, rows.metric, loop=True)
    # row i of the affinity matrix holds i's neighbours (the edges' sources), so A @ X sums neighbours' rows
    affinity = torch.sparse_coo_tensor(edge_index.flip(0), s.clamp(min=0), (total, total),
                                       check_invariants=False).coalesce()
    features = _normalise_sparse_rows(affinity)
    for _ in range(layers):
        features = _normalise_sparse_rows((features + torch.sparse.mm(affinity, features)).coalesce())
    nq = q.shape[0]
    database_features = features.index_select(0, torch.arange(nq, total, device=q.device))
    block = max(1, DIFFUSION_BLOCK_ELEMENTS // n)
    out_v, out_i = [], []
    for start in range(0, nq, block):
        picked = torch.arange(start, min(start + block, nq), device=q.device)
        dense = features.index_select(0, picked).to_dense()
        scores = torch.sparse.mm(database_features, dense.T).T  # [B, N], never [Q, N] at once
        v, i = torch.topk(scores, k, dim=1)
        out_v.append(v)
        out_i.append(i)
    return torch.cat(out_v).to(rows.dtype), rows.ids(torch.cat(out_i))


def _normalise_sparse_rows(m: Tensor) -> Tensor:
    """A coalesced sparse COO matrix with each non-zero row scaled to unit Euclidean norm."""
    r = m.indices()[0]
    v = m.values()
    norms = torch.zeros(m.shape[0], dtype=v.dtype, device=v.device).index_add_(0, r, v * v).sqrt()
    scale = torch.where(norms > 0, 1 / norms.clamp(min=torch.finfo(v.dtype).tiny), torch.zeros_like(norms))
    return torch.sparse_coo_tensor(m.indices(), v * scale[r], m.shape, check_invariants=False).coalesce()


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
    """Message-passing re-ranking with the database's graph built once (the reusable form of
    :func:`gnn_rerank`, as :class:`Diffusion` is for diffusion).

    The database rows form a ``graph_k``-nearest-neighbour graph (a row is its own first neighbour) with
    affinities ``a_ij = max(s_ij, 0)``. Each row's feature is its affinity row, unit-normalised and sparse;
    ``layers`` rounds replace it with ``normalise(x_i + sum_j a_ij x_j)``, keeping the ``feature_k`` largest
    entries so that memory stays ``O(N feature_k)`` per round. A query joins the graph through its own
    ``graph_k`` nearest rows and goes through the same rounds against the database's features; database rows
    are then ranked by the inner product of features (rows whose propagated neighbourhoods overlap the
    query's), ties and rows outside every neighbourhood by the raw similarity. Unlike :func:`gnn_rerank`,
    queries do not become neighbours of database rows, so one graph serves every query batch.

    Args:
        database: ``[N, D]`` float tensor, or a FlatIndex/IVFIndex (without ``reduce_to``) whose ``vectors``
            are used; results are then its ids.
        metric: ``"cosine"`` or ``"ip"`` (default ``"cosine"``; an index's own). graph_k: 1 <= graph_k <= N.
        layers: rounds of message passing (>= 0). feature_k: entries kept per feature (>= graph_k).

    Build: one ``graph_k`` self-search plus ``layers`` rounds of ``O(N graph_k feature_k log)`` work.
    """

    def __init__(self, database, *, metric: Optional[str] = None, graph_k: int = 20, layers: int = 2,
                 feature_k: int = 64):
        self._rows = _Rows(database, metric)
        n = len(self._rows)
        self.graph_k = _int_at_least(graph_k, "graph_k", 1)
        if self.graph_k > n:
            raise ValueError(f"graph_k must be <= the {n} rows of database, got {graph_k}")
        self.layers = _int_at_least(layers, "layers", 0)
        self.feature_k = _int_at_least(feature_k, "feature_k", 1)
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
        weights = _affinity(scores, neighbours, 1.0)
        neighbours = neighbours.clamp(min=0)
        vals = weights / weights.norm(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return neighbours, weights, neighbours, vals

    def search(self, queries: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """``(scores, indices)`` ``[Q, k]``, best first; scores are the features' inner products (in [0, 1]),
        in the database's dtype."""
        q = self._rows.check_queries(queries)
        n = len(self._rows)
        k = _int_at_least(k, "k", 1)
        if k > n:
            raise ValueError(f"k = {k} is larger than the {n} rows of database")
        neighbours, weights, cols, vals = self._first_features(q)
        for prev_cols, prev_vals in self._features[:-1]:
            cols, vals = _propagate(cols, vals, neighbours, weights, prev_cols, prev_vals, self.feature_k)
        block = max(1, DIFFUSION_BLOCK_ELEMENTS // n)
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
