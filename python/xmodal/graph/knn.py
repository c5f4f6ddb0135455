"""k-nearest-neighbour graphs built on :func:`xmodal.topk_search`, in PyTorch Geometric's edge convention."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..index._rows import non_finite_rows
from ..ops import SEARCH_METRICS, topk_search

#: queries per topk_search call: the graph is built block by block, so nothing larger than
#: [QUERY_BLOCK, k + 1] results is held besides the output edges (topk_search bounds its own scratch)
QUERY_BLOCK = 4096


def knn_graph(
    x: Tensor,
    k: int,
    metric: str = "cosine",
    *,
    y: Optional[Tensor] = None,
    mutual: bool = False,
    loop: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The exact k-nearest-neighbour graph of the rows of ``x`` under ``metric``.

    Edge convention: PyTorch Geometric's ``knn_graph(..., flow="source_to_target")``. Each row ``i`` (the
    *target*, the point whose neighbours were searched) receives ``k`` edges ``(j, i)`` from its ``k`` best
    rows ``j`` (the *sources*): ``edge_index[0]`` holds neighbours, ``edge_index[1]`` the row they are
    neighbours of, so message passing with this ``edge_index`` sends each neighbour's features to the row
    that chose it. Edges come grouped by target in increasing order, each group best first.

    Args:
        x: ``[N, D]`` float tensor (float32, float64, float16 or bfloat16), on the CPU or a GPU.
        k: neighbours per row (>= 1).
        metric: any of :data:`xmodal.SEARCH_METRICS` (as :func:`xmodal.topk_search`).
        y: optional ``[M, D]`` rows of the same dtype and device: a bipartite graph. Then each row ``i`` of
            ``y`` gets its ``k`` nearest rows ``j`` of ``x`` (as PyG's ``knn(x, y, k)``), as edges ``(j, i)``:
            ``edge_index[0]`` indexes ``x``, ``edge_index[1]`` indexes ``y``. ``mutual`` and ``loop`` concern a
            graph of ``x`` with itself and must stay False.
        mutual: keep only the edges ``(j, i)`` whose reverse ``(i, j)`` was found too (reciprocal neighbours);
            rows may then have fewer than ``k`` edges.
        loop: whether a row may be its own neighbour. With ``loop=False`` exactly the edge ``(i, i)`` is
            excluded (a duplicate of row ``i`` stays a candidate, and every row gets ``k`` other rows, so
            ``k <= N - 1``); with ``loop=True`` row ``i`` is searched like any other (``k <= N``) and is an
            edge wherever it ranks in the top ``k``.

    Returns:
        ``(edge_index, weight)``: ``edge_index`` int64 ``[2, E]`` and ``weight`` ``[E]``, the metric's value
        for the edge in ``x``'s dtype and the metric's units (similarity for ip/cosine, distance otherwise;
        for ``kl`` the divergence ``KL(target || source)``). ``E = N k`` (``M k`` with ``y``) unless ``mutual``.

    Memory: the output's ``O(E)`` plus ``O(QUERY_BLOCK * k)`` per block of queries; the ``N x N`` score
    matrix is never formed. Inputs are checked before any search, so bad input raises with no partial graph.
    """
    k = _check_args(x, k, metric, y, mutual, loop)
    database = x
    queries = x if y is None else y
    exclude_self = y is None and not loop
    sources, values = [], []
    for start in range(0, queries.shape[0], QUERY_BLOCK):
        block = queries[start:start + QUERY_BLOCK]
        if not exclude_self:
            v, j = topk_search(block, database, k, metric)
        else:
            v, j = _search_without_self(block, database, k, metric, start)
        sources.append(j.reshape(-1))
        values.append(v.reshape(-1))
    source = torch.cat(sources)
    weight = torch.cat(values)
    target = torch.arange(queries.shape[0], device=x.device).repeat_interleave(k)
    edge_index = torch.stack([source, target])
    if mutual:
        edge_index, weight = _reciprocal(edge_index, weight, x.shape[0])
    return edge_index, weight


def _search_without_self(block: Tensor, database: Tensor, k: int, metric: str, start: int):
    """The k best rows of ``database`` for ``block`` (rows ``start..`` of database), row ``start + r`` never
    its own neighbour. One more result is searched, then exactly the self index is dropped: a duplicate row
    may tie with (or, after rounding, beat) the row itself, so "drop the first result" would be wrong. A row
    whose own index is not among its k + 1 best has k + 1 better-or-tied others; it loses its last."""
    v, j = topk_search(block, database, k + 1, metric)
    rows = torch.arange(start, start + block.shape[0], device=j.device)
    is_self = j == rows[:, None]
    keep = ~is_self
    keep[:, -1] &= is_self.any(1)  # no self among the k + 1: drop the (k + 1)-th instead
    return v[keep].reshape(-1, k), j[keep].reshape(-1, k)


def _reciprocal(edge_index: Tensor, weight: Tensor, n: int):
    """The edges (j, i) whose reverse (i, j) is also an edge, in their original order. Each edge is encoded
    as one int64 key so the lookup is a sorted search over E keys, not an N x N matrix."""
    src, dst = edge_index
    keys = src * n + dst
    keep = torch.isin(dst * n + src, keys)
    return edge_index[:, keep], weight[keep]


def _check_args(x, k, metric, y, mutual, loop) -> int:
    """Every check before any work, so that errors never leave half a graph. Returns k as a Python int."""
    check_rows(x, "x")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r})")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not isinstance(metric, str) or metric not in SEARCH_METRICS:
        raise ValueError(f"metric must be one of {sorted(SEARCH_METRICS)}, got {metric!r}")
    for name, flag in (("mutual", mutual), ("loop", loop)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
    n = x.shape[0]
    if y is not None:
        check_rows(y, "y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have as many columns as x ({x.shape[1]}), got shape {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
        if mutual:
            raise ValueError("mutual=True needs a graph of x with itself; it cannot be used with y")
        if loop:
            raise ValueError("loop=True needs a graph of x with itself; it cannot be used with y")
        if k > n:
            raise ValueError(f"k = {k} is larger than the {n} rows of x that y's rows can have as neighbours")
    elif loop and k > n:
        raise ValueError(f"k = {k} is larger than the {n} rows of x (loop=True)")
    elif not loop and k > n - 1:
        raise ValueError(f"k = {k} is larger than the {n - 1} other rows of x each row can have as neighbours "
                         f"(loop=False)")
    return k


def check_rows(t, name: str) -> None:
    """Raise unless ``t`` is a non-empty 2-D float tensor of finite values (the error names ``name`` and the first bad row)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}")
    bad = non_finite_rows(t)
    if bad.numel():
        row = int(bad[0])
        what = "NaN" if bool(torch.isnan(t[row]).any()) else "inf"
        raise ValueError(f"{name} has {what} in row {row}")
