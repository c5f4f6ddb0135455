"""k-means whose assignment step is :func:`xmodal.topk_search` with k = 1 (the IVF coarse quantiser)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import topk_search


def assign(x: Tensor, centroids: Tensor, metric: str) -> Tensor:
    """The nearest centroid of each row under ``metric`` ("ip" or "l2")."""
    return topk_search(x.to(centroids.dtype), centroids, 1, metric)[1][:, 0]


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
