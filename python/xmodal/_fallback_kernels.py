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
             mask: Optional[Tensor] = None):
    """As the CPU kernel (csrc/search/ivf_scan_cpu.cpp): per list, the queries probing it score its rows in
    one GEMM; each query's candidates are then merged. Argument checks are the CPU kernel's, run on metadata."""
    if metric not in ("ip", "l2", "sqeuclidean"):
        raise RuntimeError(f"metric must be one of 'ip', 'l2', 'sqeuclidean' for ivf_scan, got '{metric}'")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    torch._check(queries.shape[1] == vectors.shape[1],
                 lambda: f"queries and vectors must have the same dimension D, got {queries.shape[1]} and "
                         f"{vectors.shape[1]}")
    begin, end = _list_bounds(list_offsets)
    nq, nprobe = probes.shape
    device, acc = vectors.device, torch.float64 if vectors.dtype == torch.float64 else torch.float32
    # candidate keys (larger is better) per (query, probe) pair; -inf = none
    keys = torch.full((nq, nprobe, k), float("-inf"), dtype=torch.float64, device=device)
    slots = torch.full((nq, nprobe, k), -1, dtype=torch.int64, device=device)
    pairs = probes.to(device).reshape(-1)
    # a list probed twice by one query is scanned once
    first = torch.ones_like(probes, dtype=torch.bool)
    for j in range(1, nprobe):
        first[:, j] = (probes[:, :j] != probes[:, j:j + 1]).all(1)
    pairs = torch.where(first.reshape(-1).to(device), pairs, torch.full_like(pairs, -1))
    order = torch.argsort(pairs, stable=True)
    lists, counts = torch.unique_consecutive(pairs[order].cpu(), return_counts=True)
    start = 0
    for lst, count in zip(lists.tolist(), counts.tolist()):
        chosen, start = order[start: start + count], start + count
        if lst < 0 or end[lst] <= begin[lst]:
            continue
        rows = vectors[begin[lst]: end[lst]].to(acc)
        allowed = None if mask is None else mask[begin[lst]: end[lst]].to(device)
        step = max(1, _SCORE_ELEMENTS // rows.shape[0])
        for c in range(0, count, step):
            pair = chosen[c: c + step]
            q = queries[pair // nprobe].to(acc)
            s = q @ rows.T
            if metric != "ip":  # distances, negated into keys
                s = -((q * q).sum(1, keepdim=True) + (rows * rows).sum(1) - 2 * s).clamp_min(0)
            s = s.double().nan_to_num(nan=-torch.finfo(torch.float64).max)  # NaN ranks below every number
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            take = min(k, rows.shape[0])
            top_keys, top_rows = torch.topk(s, take, dim=1)
            found = top_keys > float("-inf")
            keys.view(-1, k)[pair, :take] = top_keys
            slots.view(-1, k)[pair, :take] = torch.where(found, top_rows + begin[lst], torch.full_like(top_rows, -1))
    keys, slots = keys.reshape(nq, nprobe * k), slots.reshape(nq, nprobe * k)
    keys = keys.masked_fill(slots < 0, float("-inf"))
    take = min(k, nprobe * k)
    best_keys, best = torch.topk(keys, take, dim=1)
    out_slots = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    out_slots[:, :take] = torch.where(best_keys > float("-inf"), slots.gather(1, best), -1)
    # values from the rows themselves (so NaN scores come back as NaN), a block of queries at a time
    values = torch.empty(nq, k, dtype=acc, device=device)
    step = max(1, _SCORE_ELEMENTS // (k * vectors.shape[1]))
    for q0 in range(0, nq, step):
        rows = vectors[out_slots[q0: q0 + step].clamp(min=0)].to(acc)
        q = queries[q0: q0 + step].to(acc)[:, None, :]
        values[q0: q0 + step] = (q * rows).sum(-1) if metric == "ip" else ((q - rows) ** 2).sum(-1)
    if metric == "l2":
        values = values.sqrt()
    pad = float("-inf") if metric == "ip" else float("inf")
    values = torch.where(out_slots >= 0, values, torch.full_like(values, pad))
    return values.to(vectors.dtype), out_slots


torch.library.register_kernel("xmodal::ivf_scan", None, ivf_scan)


def _merge_topk(best_keys: Tensor, best_idx: Tensor, keys: Tensor, base: int, k: int):
    """The k largest of the running best and a new block of keys (rows base ..), ties to the smaller index."""
    idx = torch.arange(base, base + keys.shape[1], device=keys.device).expand(keys.shape[0], -1)
    all_keys, all_idx = torch.cat([best_keys, keys], 1), torch.cat([best_idx, idx], 1)
    # sort by index first, then stably by key: equal keys keep index order
    order = torch.argsort(all_idx.masked_fill(all_idx < 0, torch.iinfo(torch.int64).max), dim=1, stable=True)
    all_keys, all_idx = all_keys.gather(1, order), all_idx.gather(1, order)
    top = torch.sort(all_keys, dim=1, descending=True, stable=True).indices[:, :k]
    return all_keys.gather(1, top), all_idx.gather(1, top)


def _blocks(n: int, q: int, width: int):
    step = max(1, _SCORE_ELEMENTS // max(1, q * width))
    return range(0, n, step), step


def topk_int8(queries: Tensor, codes: Tensor, k: int, query_bias: Optional[Tensor] = None,
              row_scale: Optional[Tensor] = None, row_bias: Optional[Tensor] = None, mask: Optional[Tensor] = None):
    """As the CPU kernel (csrc/search/codes_cpu.cpp): keys = (queries . codes + query_bias) * row_scale +
    row_bias, k largest first; blocks of rows are decoded to float32 and multiplied."""
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    nq, device = queries.shape[0], queries.device
    best_keys = torch.full((nq, k), float("-inf"), device=device)
    best_idx = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    starts, step = _blocks(codes.shape[0], nq, codes.shape[1])
    for n0 in starts:
        block = slice(n0, n0 + step)
        keys = queries.float() @ codes[block].float().T
        if query_bias is not None:
            keys = keys + query_bias[:, None]
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


torch.library.register_kernel("xmodal::topk_int8", None, topk_int8)
torch.library.register_kernel("xmodal::topk_hamming", None, topk_hamming)

