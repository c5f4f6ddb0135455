"""Plain-PyTorch kernels for ops on devices without a compiled one (CUDA, MPS, ...), so every op runs
everywhere: the C++ kernels are faster where they exist; these are the definition of correct elsewhere.

Registered for every device (CompositeExplicitAutograd); a kernel registered for a specific device (the CPU
kernels in csrc/) takes precedence there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_SCORE_ELEMENTS = 1 << 24  # queries x rows scored at once, to bound memory on large lists


def _list_bounds(list_offsets: Tensor):
    """(begin, end) rows of each list from ``[nlist + 1]`` offsets or ``[nlist, 2]`` ranges."""
    offsets = list_offsets.cpu()
    if offsets.dim() == 2:
        return offsets[:, 0].tolist(), offsets[:, 1].tolist()
    return offsets[:-1].tolist(), offsets[1:].tolist()


def ivf_scan(queries: Tensor, vectors: Tensor, list_offsets: Tensor, probes: Tensor, k: int, metric: str = "ip",
             mask: Optional[Tensor] = None, *, query_bias: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
             row_bias: Optional[Tensor] = None, row_group: Optional[Tensor] = None):
    """As the CPU kernel (csrc/search/ivf_scan_cpu.cpp): each probed list is searched once for all the queries
    probing it (with the flat ops' plain kernels, or a GEMM for float rows); each query's candidates are then
    merged. Float rows return values in their dtype, int8 codes float32 keys, packed bits int32 distances."""
    codes = vectors.dtype in (torch.int8, torch.uint8)
    allowed = ("hamming",) if vectors.dtype == torch.uint8 else ("ip",) if codes else ("ip", "l2", "sqeuclidean")
    if metric not in allowed:
        raise RuntimeError(f"metric must be one of {allowed} for ivf_scan with {vectors.dtype} vectors, got '{metric}'")
    if vectors.dtype != torch.int8 and any(t is not None for t in (query_bias, row_scale, row_bias, row_group)):
        raise RuntimeError("query_bias, row_scale, row_bias and row_group apply to int8 vectors only")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    begin, end = _list_bounds(list_offsets)
    nq, nprobe = probes.shape
    device = vectors.device
    # candidate keys (larger is better) per (query, probe) pair; -inf = none
    keys = torch.full((nq, nprobe, k), float("-inf"), dtype=torch.float64, device=device)
    slots = torch.full((nq, nprobe, k), -1, dtype=torch.int64, device=device)
    pairs = probes.to(device).reshape(-1)
    first = torch.ones_like(probes, dtype=torch.bool)  # a list probed twice by one query is scanned once
    for j in range(1, nprobe):
        first[:, j] = (probes[:, :j] != probes[:, j:j + 1]).all(1)
    pairs = torch.where(first.reshape(-1).to(device), pairs, torch.full_like(pairs, -1))
    order = torch.argsort(pairs, stable=True)
    lists, counts = torch.unique_consecutive(pairs[order].cpu(), return_counts=True)
    start = 0
    for lst, count in zip(lists.tolist(), counts.tolist()):
        chosen, start = order[start: start + count], start + count
        lo, hi = (begin[lst], end[lst]) if lst >= 0 else (0, 0)
        if hi <= lo:
            continue
        q = queries[chosen // nprobe]
        sub_mask = None if mask is None else mask[lo:hi].to(device)
        take = min(k, hi - lo)
        if vectors.dtype == torch.uint8:
            dist, idx = topk_hamming(q, vectors[lo:hi], take, sub_mask)
            found, top = idx >= 0, -dist.double()
        elif vectors.dtype == torch.int8:
            top, idx = topk_int8(q, vectors[lo:hi], take, None if query_bias is None else query_bias[chosen // nprobe],
                                 None if row_scale is None else row_scale[lo:hi],
                                 None if row_bias is None else row_bias[lo:hi], sub_mask,
                                 row_group=None if row_group is None else row_group[lo:hi])
            found, top = idx >= 0, top.double()
        else:
            top, idx = _float_topk(q, vectors[lo:hi], take, metric, sub_mask)
            found = idx >= 0
        keys.view(-1, k)[chosen, :take] = torch.where(found, top, torch.full_like(top, float("-inf")))
        slots.view(-1, k)[chosen, :take] = torch.where(found, idx + lo, torch.full_like(idx, -1))
    keys, slots = keys.reshape(nq, nprobe * k), slots.reshape(nq, nprobe * k)
    keys = keys.masked_fill(slots < 0, float("-inf"))
    take = min(k, nprobe * k)
    best_keys, best_slots = _best(keys, slots, take)
    found = best_keys > float("-inf")
    out_slots = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    out_slots[:, :take] = torch.where(found, best_slots, -1)
    if vectors.dtype == torch.uint8:
        out = torch.full((nq, k), torch.iinfo(torch.int32).max, dtype=torch.int32, device=device)
        out[:, :take] = (-best_keys).masked_fill(~found, 0).to(torch.int32).masked_fill(~found, out.max())
        return out, out_slots
    if vectors.dtype == torch.int8:
        out = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=device)
        out[:, :take] = best_keys.float()
        return out, out_slots
    return _float_values(queries, vectors, out_slots, metric), out_slots


def _float_topk(q: Tensor, rows: Tensor, k: int, metric: str, mask: Optional[Tensor]):
    """Keys (larger is better, float64; NaN below every number) and row indices of the k best float rows."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    q, rows = q.to(acc), rows.to(acc)
    s = q @ rows.T
    if metric != "ip":  # distances, negated into keys
        s = -((q * q).sum(1, keepdim=True) + (rows * rows).sum(1) - 2 * s).clamp_min(0)
    s = s.double().nan_to_num(nan=-torch.finfo(torch.float64).max)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    top, idx = torch.topk(s, k, dim=1)
    return top, torch.where(top > float("-inf"), idx, -1)


def _float_values(queries: Tensor, vectors: Tensor, slots: Tensor, metric: str) -> Tensor:
    """The metric between each query and its chosen rows, from the rows themselves (so NaN stays NaN), a
    block of queries at a time; padding where a slot is -1."""
    nq, k = slots.shape
    acc = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    values = torch.empty(nq, k, dtype=acc, device=vectors.device)
    step = max(1, _SCORE_ELEMENTS // max(1, k * vectors.shape[1]))
    for q0 in range(0, nq, step):
        rows = vectors[slots[q0: q0 + step].clamp(min=0)].to(acc)
        q = queries[q0: q0 + step].to(acc)[:, None, :]
        values[q0: q0 + step] = (q * rows).sum(-1) if metric == "ip" else ((q - rows) ** 2).sum(-1)
    if metric == "l2":
        values = values.sqrt()
    pad = float("-inf") if metric == "ip" else float("inf")
    return torch.where(slots >= 0, values, torch.full_like(values, pad)).to(vectors.dtype)


def _best(keys: Tensor, idx: Tensor, k: int):
    """The k largest keys of each row with their indices (-1: none), ties to the smaller index."""
    # sort by index first, then stably by key: equal keys keep index order
    order = torch.argsort(idx.masked_fill(idx < 0, torch.iinfo(torch.int64).max), dim=1, stable=True)
    keys, idx = keys.gather(1, order), idx.gather(1, order)
    top = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    return keys.gather(1, top), idx.gather(1, top)


def _merge_topk(best_keys: Tensor, best_idx: Tensor, keys: Tensor, base: int, k: int):
    """The k largest of the running best and a new block of keys (rows base ..), ties to the smaller index."""
    idx = torch.arange(base, base + keys.shape[1], device=keys.device).expand(keys.shape[0], -1)
    return _best(torch.cat([best_keys, keys], 1), torch.cat([best_idx, idx], 1), k)


def _blocks(n: int, q: int, width: int):
    step = max(1, _SCORE_ELEMENTS // max(1, q * width))
    return range(0, n, step), step


def topk_int8(queries: Tensor, codes: Tensor, k: int, query_bias: Optional[Tensor] = None,
              row_scale: Optional[Tensor] = None, row_bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
              row_group: Optional[Tensor] = None, candidates: Optional[Tensor] = None):
    """As the CPU kernel (csrc/search/codes_int8_kernels.cpp): keys = (queries . codes + bias) * row_scale + row_bias
    (bias: query_bias[q], or query_bias[q, row_group[n]] with row_group), k largest first; blocks of rows are
    decoded to float32 and multiplied. With ``candidates`` only those rows of each query are ranked."""
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    if candidates is not None:
        torch._check(candidates.dtype == torch.int64 and candidates.dim() == 2 and candidates.shape[0] == queries.shape[0],
                     lambda: f"candidates must be an int64 tensor [Q, W] with Q = {queries.shape[0]}, got "
                             f"{candidates.dtype} of shape {list(candidates.shape)}")
        torch._check(candidates.numel() == 0 or (int(candidates.min()) >= -1 and int(candidates.max()) < codes.shape[0]),
                     lambda: f"candidates must be row indices in [0, N) = [0, {codes.shape[0]}) or -1")
    if row_group is not None:
        torch._check(row_group.dtype == torch.uint8 and row_group.dim() == 1 and row_group.shape[0] == codes.shape[0],
                     lambda: f"row_group must be a 1-D uint8 tensor of {codes.shape[0]} values, got {row_group.dtype} "
                             f"of shape {list(row_group.shape)}")
        torch._check(query_bias is not None and query_bias.dim() == 2,
                     lambda: "row_group needs query_bias of shape [Q, G] (a bias per query and group)")
        read = row_group if candidates is None else row_group[candidates[candidates >= 0]]  # the rows it reads
        torch._check(read.numel() == 0 or int(read.max()) < query_bias.shape[1],
                     lambda: f"row_group values must be below G = {query_bias.shape[1]} (query_bias's columns)")
    torch._check(query_bias is None or query_bias.dim() == (2 if row_group is not None else 1),
                 lambda: f"query_bias must be a float32 tensor of shape {'[Q, G]' if row_group is not None else '[Q]'}, "
                         f"got shape {list(query_bias.shape)}")
    if candidates is not None:
        return _rescore_int8(queries, codes, k, query_bias, row_scale, row_bias, mask, row_group, candidates)
    nq, device = queries.shape[0], queries.device
    best_keys = torch.full((nq, k), float("-inf"), device=device)
    best_idx = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    starts, step = _blocks(codes.shape[0], nq, codes.shape[1])
    for n0 in starts:
        block = slice(n0, n0 + step)
        keys = queries.float() @ codes[block].float().T
        if query_bias is not None:
            keys = keys + (query_bias[:, row_group[block].long()] if row_group is not None else query_bias[:, None])
        if row_scale is not None:
            keys = keys * row_scale[block]
        if row_bias is not None:
            keys = keys + row_bias[block]
        keys = keys.nan_to_num(nan=-torch.finfo(torch.float32).max)
        if mask is not None:
            keys = keys.masked_fill(~mask[block].to(device), float("-inf"))
        best_keys, best_idx = _merge_topk(best_keys, best_idx, keys, n0, k)
    best_idx = torch.where(best_keys > float("-inf"), best_idx, -1)
    return best_keys, best_idx


def _rescore_int8(queries, codes, k, query_bias, row_scale, row_bias, mask, row_group, candidates):
    """topk_int8 over each query's own candidate rows (-1, repeats and masked-out rows skipped)."""
    nq, width = candidates.shape
    # each query's candidates by row: a repeat sits right after its first, and the stable sort by key below
    # then leaves ties in row order (to the smaller row)
    rows = candidates.sort(dim=1).values
    skip = rows < 0
    skip[:, 1:] |= rows[:, 1:] == rows[:, :-1]
    at = rows.clamp(min=0)
    if mask is not None:
        skip |= ~mask.to(rows.device)[at]
    keys = torch.einsum("qd,qwd->qw", queries.float(), codes[at].float())
    if query_bias is not None:
        keys = keys + (query_bias.gather(1, row_group[at].long()) if row_group is not None else query_bias[:, None])
    if row_scale is not None:
        keys = keys * row_scale[at]
    if row_bias is not None:
        keys = keys + row_bias[at]
    keys = keys.nan_to_num(nan=-torch.finfo(torch.float32).max).masked_fill(skip, float("-inf"))
    best = keys.sort(dim=1, descending=True, stable=True)
    take = min(k, width)
    best_keys = torch.full((nq, k), float("-inf"), device=keys.device)
    best_idx = torch.full((nq, k), -1, dtype=torch.int64, device=keys.device)
    best_keys[:, :take] = best.values[:, :take]
    best_idx[:, :take] = rows.gather(1, best.indices[:, :take])
    return best_keys, torch.where(best_keys > float("-inf"), best_idx, -1)


_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int32)


def topk_hamming(queries: Tensor, codes: Tensor, k: int, mask: Optional[Tensor] = None):
    """As the CPU kernel: the k smallest Hamming distances between packed bit rows, ties to the smaller
    index; a table lookup per byte."""
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    nq, device = queries.shape[0], queries.device
    table = _POPCOUNT.to(device)
    best_keys = torch.full((nq, k), float("-inf"), device=device)
    best_idx = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    starts, step = _blocks(codes.shape[0], nq, codes.shape[1])
    for n0 in starts:
        block = slice(n0, n0 + step)
        dist = table[(queries[:, None, :] ^ codes[block][None, :, :]).long()].sum(-1)
        keys = -dist.float()
        if mask is not None:
            keys = keys.masked_fill(~mask[block].to(device), float("-inf"))
        best_keys, best_idx = _merge_topk(best_keys, best_idx, keys, n0, k)
    found = best_keys > float("-inf")
    dist = (-best_keys).masked_fill(~found, 0).to(torch.int32).masked_fill(~found, torch.iinfo(torch.int32).max)
    return dist, torch.where(found, best_idx, -1)


def candidate_dots(queries: Tensor, rows: Tensor, candidates: Tensor) -> Tensor:
    """As the CPU kernel (csrc/search/candidate_dots_cpu.cpp): each query's float32 dot products with its own
    candidate rows, -inf for -1 candidates."""
    if queries.dtype != torch.float32:
        raise RuntimeError(f"queries must be float32, got {queries.dtype}")
    if rows.shape[1] != queries.shape[1]:
        raise RuntimeError(f"rows must have D = {queries.shape[1]} columns (the queries' dimension), got "
                           f"{rows.shape[1]}")
    if candidates.dtype != torch.int64 or candidates.shape[0] != queries.shape[0]:
        raise RuntimeError(f"candidates must be an int64 [Q, W] tensor with Q = {queries.shape[0]} rows, got "
                           f"{candidates.dtype} {list(candidates.shape)}")
    if candidates.numel() and (int(candidates.min()) < -1 or int(candidates.max()) >= rows.shape[0]):
        raise IndexError(f"candidates must be rows in [0, {rows.shape[0]}) or -1")
    out = torch.empty(candidates.shape, dtype=torch.float32, device=queries.device)
    step = max(1, _SCORE_ELEMENTS // max(1, candidates.shape[1] * queries.shape[1]))
    for start in range(0, queries.shape[0], step):
        c = candidates[start: start + step]
        dots = (queries[start: start + step, None, :] * rows[c.clamp(min=0)].float()).sum(-1)
        out[start: start + step] = dots.masked_fill(c < 0, float("-inf"))
    return out


torch.library.register_kernel("xmodal::candidate_dots", None, candidate_dots)
torch.library.register_kernel("xmodal::topk_int8", None, topk_int8)
torch.library.register_kernel("xmodal::topk_hamming", None, topk_hamming)
torch.library.register_kernel("xmodal::ivf_scan", None, ivf_scan)
