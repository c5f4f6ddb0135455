"""Row helpers the index modules share (``base``, ``codecs``, ``encoding``, ``sharded``, ``inverted_lists``,
``mapped``): chunking, ranges of rows, unit rows, cosine -> distance, merging candidate lists. A leaf module,
so that none of them imports another for these."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# add() prepares and stores rows in chunks of this many: the most float rows it holds beyond the stored ones
# (65536 x 512 float32 = 128 MiB)
ADD_CHUNK_ROWS = 65536


def non_finite_rows(rows: Tensor) -> Tensor:
    """The positions (int64, ascending, on the CPU) of the rows of ``rows`` holding NaN or inf, a chunk at a
    time. A NaN or inf makes a chunk's sum NaN or inf: one vectorised op finds that there is none (2 us for one
    query, where aminmax and isfinite took 14; ``torch.isfinite`` over a large chunk is ~30x slower); only a
    chunk whose sum is not finite (a NaN or inf, or finite values too large to sum) is looked at row by row.
    float16 sums overflow past 65504, so a float16 chunk shows a NaN or inf in its least or greatest value."""
    found = []
    for start in range(0, rows.shape[0], ADD_CHUNK_ROWS):
        chunk = rows[start: start + ADD_CHUNK_ROWS]
        if chunk.numel() == 0:
            continue
        if chunk.dtype == torch.float16:
            if bool(torch.isfinite(torch.stack(torch.aminmax(chunk))).all()):
                continue
        elif math.isfinite(float(chunk.sum())):
            continue
        found.append(start + torch.nonzero(~torch.isfinite(chunk).all(1)).flatten().cpu())
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def concatenated_ranges(starts: Tensor, sizes: Tensor) -> Tensor:
    """``arange(starts[i], starts[i] + sizes[i])`` for each i, concatenated (CPU int64)."""
    first = torch.repeat_interleave(starts - (sizes.cumsum(0) - sizes), sizes)
    return first + torch.arange(int(sizes.sum()))


def duplicates(ids: Tensor, limit: int = 10) -> list:
    """Up to ``limit`` values that occur more than once in ``ids``."""
    values, counts = torch.unique(ids, return_counts=True)
    return values[counts > 1][:limit].tolist()


def unit_rows(rows: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, computed in fp32 (fp64 for fp64 input); zero rows stay zero."""
    return F.normalize(rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32), dim=1, eps=1e-12)


def cosine_to_distance(cos: Tensor, positions: Tensor) -> Tensor:
    """sqrt(2 (1 - cos)) where a result exists, +inf padding elsewhere."""
    dist = torch.sqrt(torch.clamp(2 * (1 - cos.float()), min=0)).to(cos.dtype)
    return torch.where(positions >= 0, dist, torch.full_like(dist, float("inf")))


def merge_best(values: Tensor, positions: Tensor, k: int, larger: bool, pad: float) -> Tuple[Tensor, Tensor]:
    """The k best of each row's candidates (position -1 = none; NaN ranks below every number), best first,
    padded with (pad, -1) when a row has fewer than k columns."""
    key = values.float() if larger else -values.float()
    key = torch.where(positions >= 0, key.nan_to_num(nan=float("-inf")), torch.full_like(key, float("-inf")))
    take = min(k, key.shape[1])
    best = torch.topk(key, take, dim=1).indices
    out_v = torch.full((values.shape[0], k), pad, dtype=values.dtype, device=values.device)
    out_p = torch.full((values.shape[0], k), -1, dtype=torch.int64, device=values.device)
    out_v[:, :take] = values.gather(1, best)
    out_p[:, :take] = positions.gather(1, best)
    return out_v, out_p
