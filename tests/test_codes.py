"""torch.ops.xmodal.topk_int8 and topk_hamming (compressed search) against plain-PyTorch references."""
import os
import subprocess
import sys

import pytest
import torch

import xmodal  # noqa: F401
from xmodal import reference
from xmodal._fallback_kernels import topk_hamming as plain_hamming
from xmodal._fallback_kernels import topk_int8 as plain_int8


def _int8_case(q, n, d, seed=0, terms=True):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(q, d, generator=g)
    codes = torch.randint(-128, 128, (n, d), generator=g, dtype=torch.int8)
    qb = torch.randn(q, generator=g) if terms else None
    rs = torch.rand(n, generator=g) + 0.5 if terms else None
    rb = torch.randn(n, generator=g) * 10 if terms else None
    return queries, codes, qb, rs, rb


# keys are exact up to how the kernels round the queries: to int16 in AVX2 scans and rescoring, to two int8
# parts in the many-query int8 GEMM (~2e-5 of the key range either way)
KEY_RTOL = 1e-4


def _check_int8(keys, idx, queries, codes, qb, rs, rb, k, mask=None, rtol=KEY_RTOL, groups=None):
    ref = reference.int8_keys(queries, codes, qb, rs, rb, groups)
    want_v, want_i = reference.topk_from_scores(ref, k, "ip", mask=mask)
    assert keys.dtype == torch.float32 and idx.dtype == torch.int64 and keys.shape == (queries.shape[0], k)
    assert torch.equal(idx == -1, want_i == -1)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    found = want_i >= 0
    torch.testing.assert_close(keys.double()[found], want_v[found], rtol=0, atol=rtol * scale)
    # every returned row's exact key matches its reported key, and the k-th best is as good as the reference's
    got = idx.clamp(min=0)
    torch.testing.assert_close(ref.gather(1, got)[found], keys.double()[found], rtol=0, atol=rtol * scale)
    if mask is not None:
        assert bool(mask[idx[found]].all())


@pytest.mark.parametrize("q", [1, 3, 16, 17, 300])  # scan (up to 16 queries) and GEMM paths
@pytest.mark.parametrize("d", [16, 37, 512])
def test_int8_matches_reference(q, d):
    queries, codes, qb, rs, rb = _int8_case(q, 1500, d)
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 10, qb, rs, rb, None)
    _check_int8(keys, idx, queries, codes, qb, rs, rb, 10)
    # the ranking agrees with the exact one
    ref_i = reference.topk_from_scores(reference.int8_keys(queries, codes, qb, rs, rb), 10, "ip")[1]
    assert (idx == ref_i).float().mean() > 0.98


@pytest.mark.parametrize("q", [1, 3, 17, 300])
@pytest.mark.parametrize("count", [1, 5, 256])
def test_int8_row_groups_match_reference(q, count):
    """query_bias [Q, G] picked per row by row_group (residual codes: each query's score against each centre)."""
    queries, codes, _, rs, rb = _int8_case(q, 1500, 48, seed=count)
    g = torch.Generator().manual_seed(q)
    groups = torch.randint(0, count, (1500,), generator=g).to(torch.uint8)
    qb = torch.randn(q, count, generator=g) * 20
    mask = torch.rand(1500, generator=g) < 0.7
    for m in (None, mask):
        keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 10, qb, rs, rb, m, row_group=groups)
        _check_int8(keys, idx, queries, codes, qb, rs, rb, 10, mask=m, groups=groups)
        plain = plain_int8(queries, codes, 10, qb, rs, rb, m, row_group=groups)
        torch.testing.assert_close(plain[0], keys, rtol=0, atol=1e-4 * keys.abs().max().item())
    # one group's rows, lifted by a large bias, come first
    lifted = qb.clone()
    lifted[:, 0] += 1e6
    _, idx = torch.ops.xmodal.topk_int8(queries, codes, 10, lifted, None, None, None, row_group=groups)
    first = min(10, int((groups == 0).sum()))
    assert bool((groups[idx[:, :first]] == 0).all()) and bool((groups[idx[:, first:]] != 0).all())


@pytest.mark.parametrize("k", [1, 7, 2000])
def test_int8_mask_padding_and_no_terms(k):
    queries, codes, *_ = _int8_case(5, 900, 24, terms=False)
    mask = torch.rand(900, generator=torch.Generator().manual_seed(3)) < 0.3
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, k, mask=mask)
    _check_int8(keys, idx, queries, codes, None, None, None, k, mask=mask)
    assert bool((keys[idx < 0] == float("-inf")).all())


def test_int8_ties_go_to_the_smaller_index_and_edge_shapes():
    codes = torch.randint(-5, 5, (1, 8), dtype=torch.int8).repeat(50, 1)
    keys, idx = torch.ops.xmodal.topk_int8(torch.randn(2, 8), codes, 5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2
    k0, i0 = torch.ops.xmodal.topk_int8(torch.randn(0, 8), codes, 3)
    assert k0.shape == (0, 3) and i0.shape == (0, 3)
    ke, ie = torch.ops.xmodal.topk_int8(torch.randn(2, 8), codes[:0], 3)
    assert bool((ie == -1).all()) and bool((ke == float("-inf")).all())
    # non-contiguous inputs
    q = torch.randn(8, 3).T
    strided = torch.randint(-128, 128, (40, 16), dtype=torch.int8)[:, ::2]
    keys, idx = torch.ops.xmodal.topk_int8(q, strided, 4)
    _check_int8(keys, idx, q, strided, None, None, None, 4)


def test_int8_errors():
    q, codes = torch.randn(2, 8), torch.zeros(5, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="codes must be int8, got Float"):
        torch.ops.xmodal.topk_int8(q, codes.float(), 1)
    with pytest.raises(RuntimeError, match="queries must be float32"):
        torch.ops.xmodal.topk_int8(q.double(), codes, 1)
    with pytest.raises(RuntimeError, match="queries and codes must have the same dimension D, got 8 and 4"):
        torch.ops.xmodal.topk_int8(q, codes[:, :4], 1)
    with pytest.raises(RuntimeError, match="k must be positive, got 0"):
        torch.ops.xmodal.topk_int8(q, codes, 0)
    with pytest.raises(RuntimeError, match=r"row_scale must be a 1-D float32 tensor of 5 values, got Float of shape \[4\]"):
        torch.ops.xmodal.topk_int8(q, codes, 1, row_scale=torch.ones(4))
    with pytest.raises(RuntimeError, match=r"mask must be a 1-D bool tensor \[N\] = \[5\]"):
        torch.ops.xmodal.topk_int8(q, codes, 1, mask=torch.ones(5))
    groups = torch.tensor([0, 1, 2, 1, 0], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"row_group needs query_bias of shape \[Q, G\]"):
        torch.ops.xmodal.topk_int8(q, codes, 1, torch.zeros(2), row_group=groups)
    with pytest.raises(RuntimeError, match="row_group values must be below G = 2 \\(query_bias's columns\\), got 2"):
        torch.ops.xmodal.topk_int8(q, codes, 1, torch.zeros(2, 2), row_group=groups)
    with pytest.raises(RuntimeError, match=r"row_group must be a 1-D uint8 tensor of 5 values, got Long"):
        torch.ops.xmodal.topk_int8(q, codes, 1, torch.zeros(2, 3), row_group=groups.long())
    with pytest.raises(RuntimeError, match=r"query_bias must be a float32 tensor of shape \[Q, G\] with Q = 2"):
        torch.ops.xmodal.topk_int8(q, codes, 1, torch.zeros(3, 3), row_group=groups)
    with pytest.raises(RuntimeError, match=r"query_bias must be a float32 tensor of shape \[Q\] = 2, got Float of shape \[\]"):
        torch.ops.xmodal.topk_int8(q, codes, 1, torch.tensor(0.5))
    # the plain-PyTorch kernel (other devices) refuses the same
    for bad in (dict(query_bias=torch.zeros(2), row_group=groups), dict(query_bias=torch.zeros(2, 3), row_group=groups.long()),
                dict(query_bias=torch.zeros(2, 3))):
        with pytest.raises(RuntimeError, match="row_group|query_bias"):
            plain_int8(q, codes, 1, **bad)


def _candidate_reference(queries, codes, qb, rs, rb, groups, candidates, k, mask=None):
    """Each query's k best distinct candidates (no -1, allowed by the mask) by the exact keys, ties to the
    smaller row: the float64 keys and rows."""
    ref = reference.int8_keys(queries, codes, qb, rs, rb, groups)
    want_v = torch.full((queries.shape[0], k), float("-inf"), dtype=torch.float64)
    want_i = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
    for q, rows in enumerate(candidates.tolist()):
        rows = sorted({r for r in rows if r >= 0 and (mask is None or bool(mask[r]))})
        best = sorted(rows, key=lambda r: (-ref[q, r].item(), r))[:k]
        want_i[q, :len(best)] = torch.tensor(best, dtype=torch.int64)
        want_v[q, :len(best)] = ref[q, best]
    return ref, want_v, want_i


@pytest.mark.parametrize("q", [1, 5, 40])
@pytest.mark.parametrize("width", [1, 12, 300])
def test_int8_candidates_rank_only_each_querys_own_rows(q, width):
    """With candidates each query ranks its own rows (the rescoring of binary codes): -1, repeats and rows
    the mask leaves out are skipped; k past the candidates pads."""
    queries, codes, _, rs, rb = _int8_case(q, 800, 40, seed=width)
    g = torch.Generator().manual_seed(width)
    groups = torch.randint(0, 9, (800,), generator=g).to(torch.uint8)
    qb = torch.randn(q, 9, generator=g) * 5
    candidates = torch.randint(-1, 800, (q, width), generator=g)
    if width > 1:
        candidates[:, 1] = candidates[:, 0]  # a repeat
    mask = torch.rand(800, generator=g) < 0.8
    for k, m in ((10, None), (10, mask), (width + 5, None)):
        keys, idx = torch.ops.xmodal.topk_int8(queries, codes, k, qb, rs, rb, m, row_group=groups, candidates=candidates)
        ref, want_v, want_i = _candidate_reference(queries, codes, qb, rs, rb, groups, candidates, k, m)
        assert torch.equal(idx, want_i)
        found = want_i >= 0
        atol = KEY_RTOL * ref.abs().max().item()
        torch.testing.assert_close(keys.double()[found], want_v[found], rtol=0, atol=atol)
        assert bool((keys[~found] == float("-inf")).all())
        plain = plain_int8(queries, codes, k, qb, rs, rb, m, row_group=groups, candidates=candidates)
        assert torch.equal(plain[1], want_i)
        torch.testing.assert_close(plain[0].double()[found], want_v[found], rtol=0, atol=atol)


def test_int8_candidates_edges_and_errors():
    queries, codes, qb, rs, rb = _int8_case(3, 50, 16)
    tied = codes[:1].repeat(50, 1)
    keys, idx = torch.ops.xmodal.topk_int8(queries, tied, 3, candidates=torch.tensor([[9, 4, 7, -1]] * 3))
    assert idx.tolist() == [[4, 7, 9]] * 3  # ties to the smaller row
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 2, candidates=torch.full((3, 4), -1))
    assert bool((idx == -1).all()) and bool((keys == float("-inf")).all())
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 2, candidates=torch.zeros(3, 0, dtype=torch.int64))
    assert idx.shape == (3, 2) and bool((idx == -1).all())
    nan = queries.clone()
    nan[1] = float("nan")
    keys, idx = torch.ops.xmodal.topk_int8(nan, codes, 2, candidates=torch.tensor([[0, 1]] * 3))
    assert idx[1].tolist() == [0, 1] and torch.equal(idx[[0, 2]].sort(1).values, torch.tensor([[0, 1]] * 2))
    strided = torch.arange(12).reshape(3, 4)[:, ::2]  # non-contiguous candidates
    _, idx = torch.ops.xmodal.topk_int8(queries, codes, 2, qb, rs, rb, candidates=strided)
    assert torch.equal(idx, _candidate_reference(queries, codes, qb, rs, rb, None, strided, 2)[2])
    # only the candidates' groups are read, and checked (an IVF store's unused slots hold anything)
    groups = torch.zeros(50, dtype=torch.uint8)
    groups[40:] = 255
    for op in (torch.ops.xmodal.topk_int8, plain_int8):
        _, idx = op(queries, codes, 2, torch.zeros(3, 1), row_group=groups, candidates=torch.tensor([[1, 2]] * 3))
        assert sorted(idx[0].tolist()) == [1, 2]
        with pytest.raises(RuntimeError, match="row_group values must be below G = 1"):
            op(queries, codes, 2, torch.zeros(3, 1), row_group=groups, candidates=torch.tensor([[1, 45]] * 3))
    for bad, match in ((torch.tensor([[0, 50]] * 3), r"candidates must be row indices in \[0, N\) = \[0, 50\) or -1, "
                                                     r"got values in \[0, 50\]"),
                       (torch.tensor([[0, -2]] * 3), r"in \[-2, 0\]"),
                       (torch.zeros(3, 2, dtype=torch.int32), r"candidates must be an int64 tensor \[Q, W\] with Q = 3"),
                       (torch.zeros(2, 2, dtype=torch.int64), r"with Q = 3, got Long of shape \[2, 2\]"),
                       (torch.zeros(3, dtype=torch.int64), "candidates")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.xmodal.topk_int8(queries, codes, 2, candidates=bad)
        with pytest.raises(RuntimeError, match="candidates"):
            plain_int8(queries, codes, 2, candidates=bad)


def _bits(n, b, seed):
    return torch.randint(0, 256, (n, b), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("q", [1, 5, 40])
@pytest.mark.parametrize("nbytes", [8, 64, 72])  # 64: whole 512-bit vectors; 72: a partial one
@pytest.mark.parametrize("k", [1, 10, 3000])
def test_hamming_matches_reference(q, nbytes, k):
    queries, codes = _bits(q, nbytes, 1), _bits(2000, nbytes, 2)
    codes[5] = codes[9]  # equal distances: the smaller index first
    mask = torch.rand(2000, generator=torch.Generator().manual_seed(4)) < 0.8
    for m in (None, mask):
        dist, idx = torch.ops.xmodal.topk_hamming(queries, codes, k, m)
        want_v, want_i = reference.topk_from_scores(reference.hamming(queries, codes).double(), k, "l2", mask=m)
        assert dist.dtype == torch.int32 and idx.dtype == torch.int64
        assert torch.equal(idx, want_i)
        found = want_i >= 0
        assert torch.equal(dist[found].long(), want_v[found].long())
        assert bool((dist[~found] == torch.iinfo(torch.int32).max).all())


def test_hamming_errors():
    q, codes = _bits(2, 8, 0), _bits(5, 8, 1)
    with pytest.raises(RuntimeError, match="codes must hold a multiple of 8 bytes"):
        torch.ops.xmodal.topk_hamming(q[:, :6], codes[:, :6], 1)
    with pytest.raises(RuntimeError, match="queries and codes must be uint8"):
        torch.ops.xmodal.topk_hamming(q.to(torch.int8), codes, 1)
    with pytest.raises(RuntimeError, match="same number of bytes B, got 8 and 16"):
        torch.ops.xmodal.topk_hamming(q, _bits(5, 16, 1), 1)


def test_plain_pytorch_kernels_match_the_cpu_kernels():
    """What devices without a compiled kernel run (xmodal/_fallback_kernels.py), on CPU tensors."""
    queries, codes, qb, rs, rb = _int8_case(6, 3000, 40)
    mask = torch.rand(3000, generator=torch.Generator().manual_seed(5)) < 0.5
    want = torch.ops.xmodal.topk_int8(queries, codes, 9, qb, rs, rb, mask)
    got = plain_int8(queries, codes, 9, qb, rs, rb, mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=KEY_RTOL * want[0].abs().max().item())
    assert torch.equal(got[1], want[1])
    bq, bc = _bits(4, 16, 6), _bits(3000, 16, 7)
    for m in (None, mask):
        want = torch.ops.xmodal.topk_hamming(bq, bc, 12, m)
        got = plain_hamming(bq, bc, 12, m)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_opcheck():
    queries, codes, qb, rs, rb = _int8_case(3, 100, 16)
    torch.library.opcheck(torch.ops.xmodal.topk_int8.default, (queries, codes, 5, qb, rs, rb, None))
    groups = torch.arange(100).remainder(3).to(torch.uint8)
    torch.library.opcheck(torch.ops.xmodal.topk_int8.default, (queries, codes, 5, torch.randn(3, 3), rs, rb, None),
                          {"row_group": groups})
    torch.library.opcheck(torch.ops.xmodal.topk_int8.default, (queries, codes, 5, torch.randn(3, 3), rs, rb, None),
                          {"row_group": groups, "candidates": torch.randint(-1, 100, (3, 20))})
    torch.library.opcheck(torch.ops.xmodal.topk_hamming.default, (_bits(3, 8, 0), _bits(100, 8, 1), 5, None))


_OTHER_KIND = """
import torch, xmodal
from xmodal import reference
g = torch.Generator().manual_seed(0)
for q in (1, 5, 40):
    queries, codes = torch.randn(q, 45, generator=g), torch.randint(-128, 128, (700, 45), generator=g, dtype=torch.int8)
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 6)
    ref = reference.int8_keys(queries, codes)
    assert torch.equal(idx, reference.topk_from_scores(ref, 6, "ip")[1]), q
    bq = torch.randint(0, 256, (q, 64), generator=g, dtype=torch.uint8)
    bc = torch.randint(0, 256, (700, 64), generator=g, dtype=torch.uint8)
    dist, idx = torch.ops.xmodal.topk_hamming(bq, bc, 6)
    assert torch.equal(idx, reference.topk_from_scores(reference.hamming(bq, bc).double(), 6, "l2")[1]), q
# the largest sums a row can reach (AVX2 rounds queries to int16 with room for them in int32), long rows
for d in (512, 3000):
    codes = torch.full((5, d), -128, dtype=torch.int8)
    codes[2] = 127
    queries = torch.full((2, d), -1.0)
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 2)
    assert idx[:, 0].tolist() == [0, 0] and torch.allclose(keys[:, 0], torch.full((2,), 128.0 * d)), (d, keys)
# many queries (AVX2: a 6-bit first pass, its candidates rescored) give the keys and ranking of the exact
# int8 keys, with every term, groups, a mask and D not a multiple of 4 whose very last row wins
for d in (512, 45):
    queries, codes = torch.randn(300, d, generator=g) + 1, torch.randint(-128, 128, (1501, d), generator=g, dtype=torch.int8)
    codes[-1] = 127
    groups = torch.randint(0, 7, (1501,), generator=g).to(torch.uint8)
    qb, rs, rb = torch.randn(300, 7, generator=g), torch.rand(1501, generator=g) + 0.5, torch.randn(1501, generator=g)
    mask = torch.rand(1501, generator=g) < 0.9
    mask[-1] = True
    keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 10, qb, rs, rb, mask, row_group=groups)
    ref = reference.int8_keys(queries, codes, qb, rs, rb, groups)
    want_v, want_i = reference.topk_from_scores(ref, 10, "ip", mask=mask)
    assert (idx == want_i).float().mean() > 0.99, d
    assert bool(mask[idx].all()) and bool((idx[:, 0] == 1500).all()), d
    assert torch.allclose(keys.double(), want_v, rtol=0, atol=1e-4 * ref.abs().max().item()), d
    assert torch.allclose(ref.gather(1, idx), keys.double(), rtol=0, atol=1e-4 * ref.abs().max().item()), d
# ... with the extreme codes and queries (the 6-bit pass's int16 sums come closest to saturating there)
codes = torch.full((50, 512), -128, dtype=torch.int8)
codes[7] = 127
queries = torch.full((40, 512), -1.0)
queries[::2] = 1.0
keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 2)
assert idx[1::2, 0].tolist() == [0] * 20 and idx[::2, 0].tolist() == [7] * 20, idx
assert torch.allclose(keys[1::2, 0], torch.full((20,), 128.0 * 512)) and torch.allclose(keys[::2, 0], torch.full((20,), 127.0 * 512))
# a query that is not finite leaves the others' answers alone
queries, codes = torch.randn(3, 45, generator=g), torch.randint(-128, 128, (700, 45), generator=g, dtype=torch.int8)
queries[1, 4] = float("inf")
keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 6)
ref = reference.int8_keys(queries[[0, 2]], codes)
assert torch.equal(idx[[0, 2]], reference.topk_from_scores(ref, 6, "ip")[1])
# queries too small to scale to int16 (the step would overflow) are searched in fp32
tiny = torch.randn(2, 45, generator=g) * 1e-36
keys, idx = torch.ops.xmodal.topk_int8(tiny, codes, 6)
assert torch.equal(idx, reference.topk_from_scores(reference.int8_keys(tiny, codes), 6, "ip")[1])
# candidates: each query ranks its own rows, with the same keys as a scan of them
queries = torch.randn(5, 45, generator=g)
candidates = torch.randint(0, 700, (5, 30), generator=g)
keys, idx = torch.ops.xmodal.topk_int8(queries, codes, 4, candidates=candidates)
ref = reference.int8_keys(queries, codes)
for q in range(5):
    own = sorted(set(candidates[q].tolist()), key=lambda r: (-ref[q, r].item(), r))[:4]
    assert idx[q].tolist() == own, q
print("ok")
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_cpu_kinds(capability):
    """The AVX2 and portable kernels, chosen as on CPUs of those kinds (ATEN_CPU_CAPABILITY, as ATen does)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _OTHER_KIND], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
