"""Comparing topk_search results with the float64 reference, allowing any index among tied scores."""
import math

import torch

from xmodal import reference
from xmodal.ops import SEARCH_METRICS

# relative precision of each input dtype's arithmetic (16-bit inputs accumulate in fp32 but their values
# are returned rounded to 16 bits)
DTYPE_EPS = {
    torch.float64: 1e-10,
    torch.float32: 3e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def make_inputs(q, n, d, metric, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(q, d, generator=g, dtype=torch.float64)
    database = torch.randn(n, d, generator=g, dtype=torch.float64)
    if metric == "kl":
        queries = torch.softmax(queries, dim=1)
        database = torch.softmax(database, dim=1)
    return queries.to(dtype).to(device), database.to(dtype).to(device)


def _scale(queries, database, metric):
    """A magnitude against which absolute errors of a metric's values are judged."""
    q = queries.detach().double().cpu().reshape(-1, queries.shape[-1])
    x = database.detach().double().cpu()
    if x.numel() == 0 or q.numel() == 0:
        return 1.0
    qn = torch.nan_to_num(q.norm(dim=1), nan=0, posinf=0).max().item()
    xn = torch.nan_to_num(x.norm(dim=1), nan=0, posinf=0).max().item()
    if metric == "ip":
        return max(1.0, qn * xn)
    if metric in ("l2", "sqeuclidean"):
        return max(1.0, (qn + xn) ** 2)
    if metric in ("cosine", "cosine_distance"):
        return 4.0
    logs = torch.log(x[x > 0])
    return 1.0 + (logs.abs().max().item() if logs.numel() else 0.0)


def _comparable(v, metric):
    # l2 and cosine_distance are square roots: compare their squares so the absolute error near 0 is not
    # amplified by the root.
    return v * v if metric in ("l2", "cosine_distance") else v


def assert_topk_close(values, indices, queries, database, k, metric, mask=None, eps=None):
    """values/indices from xmodal.topk_search must match the reference up to the dtype's precision, with
    any index allowed among (near-)tied scores."""
    eps = DTYPE_EPS[queries.dtype] if eps is None else eps
    squeeze = queries.dim() == 1
    assert values.dtype == queries.dtype and indices.dtype == torch.int64
    assert values.device == queries.device and indices.device == queries.device
    expected_shape = (k,) if squeeze else (queries.shape[0], k)
    assert tuple(values.shape) == expected_shape and tuple(indices.shape) == expected_shape
    if queries.is_cuda:
        # on a GPU: float64 references through matrix products, on the device (no [Q, N, D] tensors)
        full = reference.scores_by_matmul(queries, database, metric)
        ref_v, ref_i = reference.topk_from_scores(full, k, metric, mask=mask)
        full, ref_v, ref_i = full.cpu(), ref_v.cpu(), ref_i.cpu()
        if squeeze:
            ref_v, ref_i = ref_v[0], ref_i[0]
    else:
        ref_v, ref_i = reference.topk_search(queries, database, k, metric, mask=mask)
        full = reference.scores(queries, database, metric)
    v = values.detach().cpu().double().reshape(-1, k)
    i = indices.detach().cpu().reshape(-1, k)
    ref_v, ref_i = ref_v.reshape(-1, k), ref_i.reshape(-1, k)

    # the same number of results, padded the same way
    assert torch.equal(i == -1, ref_i == -1), f"padding differs:\n{i}\n{ref_i}"
    pad = -math.inf if SEARCH_METRICS[metric] else math.inf
    assert (v[i == -1] == pad).all()
    found = i != -1
    # indices are valid, distinct per query, and respect the mask
    n = database.shape[0]
    assert ((i[found] >= 0) & (i[found] < n)).all()
    for row in i:
        row = row[row != -1]
        assert row.unique().numel() == row.numel(), f"duplicate indices {row}"
        if mask is not None:
            assert mask.cpu()[row].all(), "a masked-out row was returned"

    if not found.any():
        return
    atol = eps * _scale(queries, database, metric)
    # values match the reference's values at the same rank
    a, b = _comparable(v[found], metric), _comparable(ref_v[found], metric)
    assert torch.allclose(a, b, rtol=eps, atol=atol, equal_nan=True), f"values differ: max err {(a - b).abs().max()}"
    # each returned index really has (about) the score reported at its rank: any tied index is right
    true = _comparable(full.gather(1, i.clamp_min(0))[found], metric)
    assert torch.allclose(true, b, rtol=eps, atol=atol, equal_nan=True), "an index does not have the score of its rank"
