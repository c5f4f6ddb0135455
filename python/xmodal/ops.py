"""Typed, documented public functions over ``torch.ops.xmodal.*``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: metric name -> True when larger values are better
METRICS = {
    "ip": True,
    "cosine": True,
    "l2": False,
    "sqeuclidean": False,
    "cosine_distance": False,
    "kl": False,
}


def topk_search(
    queries: Tensor,
    database: Tensor,
    k: int,
    metric: str = "cosine",
    *,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Exact batched top-k similarity search, fused so the Q x N score matrix is never materialised.

    Args:
        queries: ``[Q, D]`` or ``[D]``; float32, float64, float16 or bfloat16 (16-bit inputs accumulate in fp32).
        database: ``[N, D]``, same dtype and device as ``queries``.
        k: number of results per query (> 0). ``k > N`` is allowed: missing results are padded.
        metric: ``"ip"`` (inner product) or ``"cosine"`` (larger is better); ``"l2"`` (Euclidean),
            ``"sqeuclidean"``, ``"cosine_distance"`` = sqrt(2 (1 - cos)) or ``"kl"`` = KL(q || d)
            (smaller is better; kl inputs must be non-negative, 0 log 0 = 0, +inf where d_i = 0 < q_i).
            Zero vectors have cosine 0 with everything (norms are clamped at 1e-12, as ``F.normalize`` does).
        mask: optional bool ``[N]``; True marks a row as a candidate.

    Returns:
        ``(values, indices)``, each ``[Q, k]`` (or ``[k]`` for a 1-D query), best first; ``values`` in the
        input dtype, ``indices`` int64. Where fewer than k candidates exist the rest is padded with index -1
        and value -inf (similarities) or +inf (distances). A NaN score ranks below every number.
    """
    return torch.ops.xmodal.topk_search(queries, database, k, metric, mask)
