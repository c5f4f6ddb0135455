"""Plain-PyTorch reference implementations of xmodal's ops, computed in float64.

Tests compare the fused kernels against these; benchmarks use them as the naive baseline's semantics.
They materialise every intermediate and are meant for small shapes only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import SEARCH_METRICS, normalises_rows

NORM_EPS = 1e-12


def scores(queries: Tensor, database: Tensor, metric: str) -> Tensor:
    """The full ``[Q, N]`` float64 matrix of ``metric`` between every query and database row."""
    if metric not in ("l2", "sqeuclidean", "kl"):  # inner products are matrix products already
        return scores_by_matmul(queries, database, metric)
    q = queries.detach().to(torch.float64).reshape(-1, queries.shape[-1])
    x = database.detach().to(torch.float64)
    if metric in ("l2", "sqeuclidean"):
        sq = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return sq.sqrt() if metric == "l2" else sq
    # kl: KL(q || d) = sum_i q_i log(q_i / d_i), 0 log 0 = 0, +inf where d_i = 0 < q_i
    qq = q[:, None, :]
    return (torch.xlogy(qq, qq) - torch.xlogy(qq, x[None, :, :])).sum(-1)


def selected_values(queries: Tensor, database: Tensor, indices: Tensor, metric: str) -> Tensor:
    """``metric`` between each query ``[Q, D]`` and its selected rows ``database[indices]`` (``indices [Q, k]``,
    no padding), differentiable by autograd: the reference for the gradients of :func:`xmodal.topk_search`'s
    values. Computed in the inputs' dtype."""
    q = queries.reshape(-1, queries.shape[-1])[:, None, :]
    x = database[indices.reshape(q.shape[0], -1)]
    if metric == "ip":
        return (q * x).sum(-1)
    if normalises_rows(metric):
        cos = (F.normalize(q, dim=-1, eps=NORM_EPS) * F.normalize(x, dim=-1, eps=NORM_EPS)).sum(-1)
        return cos if metric == "cosine" else torch.sqrt(torch.clamp(2 * (1 - cos), min=0))
    if metric in ("l2", "sqeuclidean"):
        sq = ((q - x) ** 2).sum(-1)
        return sq.sqrt() if metric == "l2" else sq
    return (torch.xlogy(q, q) - torch.xlogy(q, x)).sum(-1)


def topk_search(
    queries: Tensor, database: Tensor, k: int, metric: str = "cosine", *, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Reference for :func:`xmodal.topk_search`: float64 values and int64 indices, best first, NaN last,
    padded with index -1 and -inf/+inf. Among tied scores the smaller index comes first."""
    squeeze = queries.dim() == 1
    values, indices = topk_from_scores(scores(queries, database, metric), k, metric, mask=mask)
    if squeeze:
        return values[0], indices[0]
    return values, indices


def topk_from_scores(s: Tensor, k: int, metric: str, *, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The k best of a ``[Q, N]`` score matrix in :func:`topk_search`'s order and padding, on s's device."""
    larger = SEARCH_METRICS[metric]
    n = s.shape[1]
    cand = (torch.arange(n, device=s.device) if mask is None
            else torch.nonzero(mask.to(s.device), as_tuple=False).flatten())
    s = s[:, cand]
    key = s if larger else -s
    nan = torch.isnan(key)
    key = torch.where(nan, torch.full_like(key, -float("inf")), key)
    # order: non-NaN by key descending (stable, so ties keep index order), then NaN
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(nan.gather(1, order).to(torch.int8), dim=1, stable=True))
    take = min(k, cand.numel())
    pad_value = -float("inf") if larger else float("inf")
    values = torch.full((s.shape[0], k), pad_value, dtype=torch.float64, device=s.device)
    indices = torch.full((s.shape[0], k), -1, dtype=torch.int64, device=s.device)
    values[:, :take] = s.gather(1, order[:, :take])
    indices[:, :take] = cand[order[:, :take]]
    return values, indices


def scores_by_matmul(queries: Tensor, database: Tensor, metric: str) -> Tensor:
    """:func:`scores` through matrix products, in float64 on the inputs' device: the reference for large
    problems on a GPU, where ``scores``' ``[Q, N, D]`` differences (l2, kl) would not fit or take minutes.
    Distances come from ``|q|^2 + |x|^2 - 2 q.x`` (float64 keeps the cancellation far below the tests'
    tolerances)."""
    if metric not in SEARCH_METRICS:
        raise ValueError(f"metric must be one of {sorted(SEARCH_METRICS)}, got {metric!r}")
    q = queries.detach().to(torch.float64).reshape(-1, queries.shape[-1])
    x = database.detach().to(torch.float64)
    if metric == "ip":
        return q @ x.T
    if normalises_rows(metric):
        cos = F.normalize(q, dim=1, eps=NORM_EPS) @ F.normalize(x, dim=1, eps=NORM_EPS).T
        return cos if metric == "cosine" else torch.sqrt(torch.clamp(2 * (1 - cos), min=0))
    if metric in ("l2", "sqeuclidean"):
        sq = ((q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * (q @ x.T)).clamp_min(0)
        # a NaN row stays NaN (clamp_min keeps NaN)
        return sq.sqrt() if metric == "l2" else sq
    zero = (x == 0).to(torch.float64)
    kl = torch.xlogy(q, q).sum(1)[:, None] - q @ torch.log(x).masked_fill(x == 0, 0).T
    return kl.masked_fill((q > 0).to(torch.float64) @ zero.T > 0, float("inf"))


def int8_keys(queries: Tensor, codes: Tensor, query_bias: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
              row_bias: Optional[Tensor] = None, row_group: Optional[Tensor] = None) -> Tensor:
    """The ``[Q, N]`` float64 keys :func:`torch.ops.xmodal.topk_int8` ranks (largest first):
    ``(queries . codes + bias) * row_scale + row_bias``, bias ``query_bias[q]``, or ``query_bias[q, row_group[n]]``
    with ``row_group``."""
    keys = queries.double() @ codes.double().T
    if query_bias is not None:
        keys = keys + (query_bias.double()[:, row_group.long()] if row_group is not None else query_bias.double()[:, None])
    if row_scale is not None:
        keys = keys * row_scale.double()
    if row_bias is not None:
        keys = keys + row_bias.double()
    return keys


def hamming(queries: Tensor, codes: Tensor) -> Tensor:
    """The ``[Q, N]`` int64 Hamming distances between packed bit rows (uint8 ``[Q, B]``, ``[N, B]``)."""
    bits = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)
    return bits[(queries[:, None, :] ^ codes[None, :, :]).long()].sum(-1)


SQRT_EPS = 1e-12


def bilinear(input1: Tensor, input2: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.bilinear`` written out: ``out[..., o] = sum_ij input1[..., i] weight[o, i, j] input2[..., j] + bias[o]``.

    Differentiable; computes in the inputs' dtype (pass float64 tensors for a reference).
    """
    out = torch.einsum("...i,oij,...j->...o", input1, weight, input2)
    return out if bias is None else out + bias


def factorized_bilinear(
    x: Tensor,
    y: Tensor,
    weight_x: Tensor,
    weight_y: Tensor,
    bias_x: Optional[Tensor] = None,
    bias_y: Optional[Tensor] = None,
    *,
    factor: int,
    normalize: bool = True,
) -> Tensor:
    """The eager MFB formula (every intermediate materialised, ``x`` broadcast against ``y`` by expansion)."""
    e = F.linear(x, weight_x, bias_x) * F.linear(y, weight_y, bias_y)
    s = e.unflatten(-1, (-1, factor)).sum(-1)
    if not normalize:
        return s
    u = torch.sign(s) * (torch.sqrt(s.abs() + SQRT_EPS) - SQRT_EPS**0.5)
    return F.normalize(u, dim=-1, eps=NORM_EPS)
