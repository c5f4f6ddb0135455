"""k-means whose assignment step is :func:`xmodal.topk_search` with k = 1 (the IVF coarse quantiser)."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import topk_search


# Assignment through a bf16 shortlist: where the CPU has native bf16 dot products (AVX512-BF16, AMX) the bf16
# search runs at about 1.7x the float32 one's rate (200,000 rows x 2,048 centroids x 256: 926 against 1,530 ms
# on a Zen 4, the best 8 against the best 1). Its 8 best centroids are then scored exactly in float32.
_SHORTLIST = 8
_SHORTLIST_STEP = 16_384  # rows per shortlist search (the first step shows whether the shortlist pays)


def assign(x: Tensor, centroids: Tensor, metric: str, *, shortlist: Optional[bool] = None) -> Tensor:
    """The nearest centroid of each row under ``metric`` ("ip" or "l2").

    ``shortlist``: find it among the best few centroids by bf16 dot products, rescored in float32, and score a row
    against every centroid in float32 where the bf16 error could have left its nearest one out: the answer of the
    float32 search (up to float32 rounding between near-equal centroids), sooner on CPUs with native bf16
    products. None: where that pays (metric "ip", float32 rows and centroids on such a CPU, 512 or more
    centroids)."""
    if shortlist is None:
        shortlist = (metric == "ip" and x.device.type == "cpu" and x.dtype == centroids.dtype == torch.float32
                     and centroids.shape[0] >= 512 and _native_bf16())
    if not shortlist:
        return topk_search(x.to(centroids.dtype), centroids, 1, metric)[1][:, 0]
    if metric != "ip":
        raise ValueError(f"the bf16 shortlist assigns by inner product (metric 'ip'), got metric {metric!r}")
    x, centroids = x.float(), centroids.float()
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    through_shortlist, start = True, 0
    while start < x.shape[0]:
        part = x[start: start + (_SHORTLIST_STEP // 4 if start == 0 else _SHORTLIST_STEP)]  # (a small first step)
        if through_shortlist:
            labels[start: start + part.shape[0]], unsure = _assign_by_shortlist(part, centroids)
            # rows too close to call cost a float32 search on top: past a fifth of them the float32 search alone
            # is sooner (uniformly spread rows against many centroids), for the rest of the rows too
            through_shortlist = unsure <= 0.2 * part.shape[0]
        else:
            labels[start: start + part.shape[0]] = topk_search(part, centroids, 1, "ip")[1][:, 0]
        start += part.shape[0]
    return labels


def _assign_by_shortlist(x: Tensor, centroids: Tensor) -> Tuple[Tensor, int]:
    """(assign(x, centroids, "ip"), how many rows needed the float32 search) through the bf16 shortlist."""
    w = min(_SHORTLIST, centroids.shape[0])
    values, candidates = topk_search(x.bfloat16(), centroids.bfloat16(), w, "ip")
    exact = torch.ops.xmodal.candidate_dots(x, centroids, candidates)
    labels = candidates.gather(1, exact.argmax(1, keepdim=True))[:, 0]
    if w == centroids.shape[0]:
        return labels, 0
    # a bf16 score is within eps of the float32 one: each factor rounded to 8 significant bits (2^-7 |x||c| for
    # the products), float32 sums over D terms, and the score itself rounded to bf16 (2^-8 |x||c|). A row whose
    # shortlist spans more than 2 eps holds its nearest centroid; the others are scored against every centroid.
    eps = (2.0 ** -7 + 2.0 ** -8 + 2.0 ** -16 + x.shape[1] * 2.0 ** -24) * 1.01
    bound = eps * x.norm(dim=1) * centroids.norm(dim=1).max()
    v = values.float()
    unsure = torch.nonzero(v[:, 0] - v[:, -1] <= 2 * bound).flatten()
    if unsure.numel():
        labels[unsure] = topk_search(x[unsure], centroids, 1, "ip")[1][:, 0]
    return labels, int(unsure.numel())


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    from .. import _C

    return _C.device_facts("cpu")["cpu_kind"] in ("amx", "avx512_bf16")


def _kmeans_plus_plus(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k rows of x, each drawn with probability proportional to its squared distance from those drawn before
    (k-means++ seeding: every well-separated group of rows gets a centroid)."""
    sq = x.square().sum(1)
    chosen = [int(torch.randint(0, x.shape[0], (1,), generator=g))]
    nearest = torch.full_like(sq, float("inf"))
    for _ in range(1, k):
        c = x[chosen[-1]]
        torch.minimum(nearest, (sq - 2 * (x @ c) + c.square().sum()).clamp_min_(0), out=nearest)
        weights = nearest.cpu() if nearest.sum() > 0 else torch.ones_like(nearest, device="cpu")
        chosen.append(int(torch.multinomial(weights, 1, generator=g)))
    return x[torch.tensor(chosen, device=x.device)].clone()


def kmeans(x: Tensor, k: int, *, metric: str, spherical: bool = False, iterations: int = 10, seed: int = 0,
           max_points: int = 256 * 1024, init: str = "random") -> Tensor:
    """``k`` float32 centroids of (a random sample of at most ``max_points``) rows of ``x``.

    ``metric``: "ip" or "l2", the assignment metric. ``spherical``: centroids are renormalised to unit length
    after each update (for unit rows searched by inner product). ``init``: "random" (k distinct rows) or
    "kmeans++" (k passes over the sample, so for modest k). An empty cluster is re-seeded from a random row.
    """
    if init not in ("random", "kmeans++"):
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_points].to(x.device)]
    x = x.to(torch.float32)
    if init == "kmeans++":
        centroids = _kmeans_plus_plus(x, k, g)
    else:
        centroids = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    for _ in range(iterations):
        labels = assign(x, centroids, metric)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1)[:, None]
        if bool(empty.any()):
            pick = torch.randint(0, x.shape[0], (int(empty.sum()),), generator=g).to(x.device)
            centroids[empty] = x[pick]
        if spherical:
            centroids = F.normalize(centroids, dim=1, eps=1e-12)
    return centroids
