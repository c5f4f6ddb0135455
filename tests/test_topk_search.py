import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xmodal
from xmodal import reference
from xmodal.ops import SEARCH_METRICS

from search_helpers import assert_topk_close, make_inputs

ALL_METRICS = list(SEARCH_METRICS)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 50, 16, 5), (7, 300, 33, 10), (3, 5, 1, 3), (4, 9, 8, 20), (2, 2000, 64, 100)])
def test_matches_reference(device, metric, dtype, shape):
    q, n, d, k = shape
    queries, database = make_inputs(q, n, d, metric, dtype, device)
    values, indices = xmodal.topk_search(queries, database, k, metric)
    assert_topk_close(values, indices, queries, database, k, metric)


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_many_tiles_and_query_blocks(device, metric):
    # enough rows for several tiles per thread and enough queries for several query blocks
    queries, database = make_inputs(300, 20000, 24, metric, torch.float32, device, seed=1)
    values, indices = xmodal.topk_search(queries, database, 7, metric)
    assert_topk_close(values, indices, queries, database, 7, metric)


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_queries_over_few_rows(device, metric, dtype):
    """Many queries over a database of one tile (k-means' assignment): threads split the queries, not the
    rows; with a mask, k > N and a NaN row."""
    queries, database = make_inputs(1500, 300, 20, metric, dtype, device, seed=3)
    database[11] = float("nan")
    mask = torch.rand(300, generator=torch.Generator().manual_seed(2)).to(device) < 0.9
    for k, m in ((1, None), (10, mask), (320, mask)):
        values, indices = xmodal.topk_search(queries, database, k, metric, mask=m)
        assert_topk_close(values, indices, queries, database, k, metric, mask=m)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("q", [1, 5, 300])
def test_rows_in_more_parts_than_threads(device, metric, q):
    """Enough rows for several parts per thread, taken by whichever thread is free: the answer is the same as
    one scan's, with a mask and a NaN row, and duplicates across part boundaries."""
    queries, database = make_inputs(q, 40_000, 8, metric, torch.float32, device, seed=7)
    database[16_384: 16_400] = database[100: 116]  # equal rows on both sides of a part boundary
    database[33] = float("nan")
    mask = torch.rand(40_000, generator=torch.Generator().manual_seed(3)).to(device) < 0.7
    for m in (None, mask):
        values, indices = xmodal.topk_search(queries, database, 12, metric, mask=m)
        assert_topk_close(values, indices, queries, database, 12, metric, mask=m)
        assert not (indices == 33).any()


@pytest.mark.parametrize("k", [1, 2, 64, 999, 1000, 1500])
def test_k_relative_to_n(device, k):
    queries, database = make_inputs(5, 1000, 12, "ip", torch.float32, device)
    values, indices = xmodal.topk_search(queries, database, k, "ip")
    assert_topk_close(values, indices, queries, database, k, "ip")
    if k >= 1000:
        assert (indices[:, :1000] >= 0).all() and (indices[:, 1000:] == -1).all()
        assert torch.equal(indices[:, :1000].sort(dim=1).values.cpu(), torch.arange(1000).expand(5, -1))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_k_a_large_share_of_n_many_queries(device, metric):
    # k = 30% of N: every row is kept as a candidate (no compaction) and queries go in many small blocks;
    # with duplicated rows, a NaN row and a mask
    queries, base = make_inputs(300, 1000, 16, metric, torch.float32, device, seed=5)
    database = torch.cat([base, base[:500]])
    database[7] = float("nan")
    mask = torch.rand(1500, generator=torch.Generator().manual_seed(1)).to(device) < 0.8
    for m in (None, mask):
        values, indices = xmodal.topk_search(queries, database, 450, metric, mask=m)
        assert_topk_close(values, indices, queries, database, 450, metric, mask=m)
        assert not (indices == 7).any()  # the NaN row ranks below 450 numbers


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_ties_any_tied_index(device, metric):
    base = make_inputs(1, 40, 8, metric, torch.float64, "cpu", seed=3)[1]
    database = base.repeat(5, 1).to(device)  # every row appears 5 times
    queries = make_inputs(6, 1, 8, metric, torch.float64, "cpu", seed=4)[0].to(device)
    values, indices = xmodal.topk_search(queries, database, 12, metric)
    assert_topk_close(values, indices, queries, database, 12, metric)
    # The promise for identical rows: their scores agree up to the GEMM's rounding (BLAS may sum a row in
    # another order depending on where it falls in a tile: a few ulps, seen 1.8e-15 on AMD CPUs), and all
    # copies of the best row come first, in any order among themselves.
    best = values[:, :5].double()
    torch.testing.assert_close(best, best[:, :1].expand(-1, 5), rtol=1e-13, atol=1e-13)
    assert (indices[:, :5] % 40 == indices[:, :1] % 40).all(), indices


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(device, metric, dtype):
    queries, database = make_inputs(20, 600, 40, metric, dtype, device, seed=5)
    q_views = [queries[::2], queries.t().contiguous().t(), queries[:, ::2]]
    x_views = [database[::3], database.t().contiguous().t(), database[:, ::2]]
    for q, x in zip(q_views, x_views):
        assert not (q.is_contiguous() and x.is_contiguous())
        values, indices = xmodal.topk_search(q, x, 9, metric)
        assert_topk_close(values, indices, q, x, 9, metric)


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_mask(device, metric):
    queries, database = make_inputs(8, 500, 16, metric, torch.float32, device, seed=6)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(500, generator=g) < 0.3).to(device)
    values, indices = xmodal.topk_search(queries, database, 10, metric, mask=mask)
    assert_topk_close(values, indices, queries, database, 10, metric, mask=mask)


def test_mask_with_fewer_candidates_than_k(device):
    queries, database = make_inputs(3, 100, 8, "l2", torch.float32, device)
    mask = torch.zeros(100, dtype=torch.bool, device=device)
    mask[[3, 50, 77]] = True
    values, indices = xmodal.topk_search(queries, database, 5, "l2", mask=mask)
    assert_topk_close(values, indices, queries, database, 5, "l2", mask=mask)
    assert set(indices[:, :3].flatten().tolist()) == {3, 50, 77}
    assert (indices[:, 3:] == -1).all() and (values[:, 3:] == math.inf).all()

    none = torch.zeros(100, dtype=torch.bool, device=device)
    values, indices = xmodal.topk_search(queries, database, 4, "cosine", mask=none)
    assert (indices == -1).all() and (values == -math.inf).all()


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_nan_never_outranks_a_number(device, metric):
    queries, database = make_inputs(4, 200, 8, metric, torch.float32, device, seed=7)
    database = database.clone()
    database[[0, 17, 123]] = float("nan")
    values, indices = xmodal.topk_search(queries, database, 10, metric)
    assert_topk_close(values, indices, queries, database, 10, metric)
    assert not torch.isnan(values).any()
    # with k = N the NaN rows come last, as candidates
    values, indices = xmodal.topk_search(queries, database, 200, metric)
    assert torch.isnan(values[:, -3:]).all() and not torch.isnan(values[:, :-3]).any()
    assert set(indices[0, -3:].tolist()) == {0, 17, 123}


def test_nan_query_and_infinities_do_not_crash(device):
    queries, database = make_inputs(3, 50, 4, "ip", torch.float32, device)
    queries = queries.clone()
    queries[0] = float("nan")
    queries[1, 0] = float("inf")
    database = database.clone()
    database[5, 1] = -float("inf")
    for metric in ["ip", "cosine", "l2", "sqeuclidean", "cosine_distance"]:
        values, indices = xmodal.topk_search(queries, database, 4, metric)
        assert torch.isnan(values[0]).all() and (indices[0] >= 0).all()
        assert values.shape == (3, 4)


def test_kl_zero_conventions(device):
    # 0 log 0 = 0, and +inf where d_i = 0 < q_i
    queries = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], device=device)
    database = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], device=device)
    values, indices = xmodal.topk_search(queries, database, 4, "kl")
    assert_topk_close(values, indices, queries, database, 4, "kl")
    assert indices[0, 0].item() == 0 and values[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert values[0, 3].item() == math.inf and values[1, 2:].eq(math.inf).all()


def test_one_dimensional_query(device):
    queries, database = make_inputs(1, 80, 6, "cosine", torch.float32, device)
    values, indices = xmodal.topk_search(queries[0], database, 5)
    assert values.shape == (5,) and indices.shape == (5,)
    assert_topk_close(values, indices, queries[0], database, 5, "cosine")


def test_empty_inputs(device):
    x = torch.randn(10, 4, device=device)
    values, indices = xmodal.topk_search(torch.empty(0, 4, device=device), x, 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)
    values, indices = xmodal.topk_search(torch.randn(2, 4, device=device), torch.empty(0, 4, device=device), 3, "l2")
    assert (indices == -1).all() and (values == math.inf).all() and values.shape == (2, 3)
    # D = 0: every score is 0 (ip)
    values, indices = xmodal.topk_search(torch.empty(2, 0, device=device), torch.empty(5, 0, device=device), 3, "ip")
    assert (values == 0).all() and (indices >= 0).all()


BAD_CALLS = [
    (lambda dev: (torch.randn(2, 3, 4, device=dev), torch.randn(5, 4, device=dev), 2, "ip", None),
     r"queries must be 1-D \[D\] or 2-D \[Q, D\], got shape \[2, 3, 4\]"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, device=dev), 2, "ip", None),
     r"database must be 2-D \[N, D\], got shape \[5\]"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 3, device=dev), 2, "ip", None),
     r"queries and database must have the same dimension D, got 4 and 3"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev), 0, "ip", None),
     r"k must be positive, got 0"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev), -3, "ip", None),
     r"k must be positive, got -3"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev), 2, "dot", None),
     r"metric must be one of 'ip', 'cosine', 'l2', 'sqeuclidean', 'cosine_distance', 'kl', got 'dot'"),
    (lambda dev: (torch.ones(2, 4, dtype=torch.int64, device=dev), torch.ones(5, 4, dtype=torch.int64, device=dev), 2, "ip", None),
     r"queries must be float32, float64, float16 or bfloat16, got Long"),
    (lambda dev: (torch.randn(2, 4, dtype=torch.complex64, device=dev), torch.randn(5, 4, dtype=torch.complex64, device=dev), 2, "ip", None),
     r"queries must be float32, float64, float16 or bfloat16, got ComplexFloat"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev).half(), 2, "ip", None),
     r"queries must have the same dtype as database, got Float and Half"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev), 2, "ip", torch.ones(5, device=dev)),
     r"mask must be a bool tensor, got Float"),
    (lambda dev: (torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev), 2, "ip", torch.ones(4, dtype=torch.bool, device=dev)),
     r"mask must have shape \[N\] = \[5\], got \[4\]"),
    (lambda dev: (torch.rand(2, 4, device=dev), -torch.rand(5, 4, device=dev), 2, "kl", None),
     r"must be non-negative with metric 'kl'"),
    (lambda dev: (-torch.rand(2, 4, device=dev), torch.rand(5, 4, device=dev), 2, "kl", None),
     r"must be non-negative with metric 'kl'"),
]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_errors(device, case):
    make, message = BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.xmodal.topk_search(*make(device))


def test_device_mismatch_errors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(RuntimeError, match=r"queries must be on the same device as database, got cuda:0 and cpu"):
        xmodal.topk_search(torch.randn(2, 4, device="cuda"), torch.randn(5, 4), 2)
    with pytest.raises(RuntimeError, match=r"mask must be on the same device as database"):
        xmodal.topk_search(torch.randn(2, 4), torch.randn(5, 4), 2, mask=torch.ones(5, dtype=torch.bool, device="cuda"))


@pytest.mark.parametrize("metric", ["cosine", "l2", "kl"])
def test_opcheck(device, metric):
    queries, database = make_inputs(5, 64, 8, metric, torch.float32, device)
    mask = torch.rand(64, device=device) < 0.5
    torch.library.opcheck(torch.ops.xmodal.topk_search.default, (queries, database, 4, metric, None))
    torch.library.opcheck(torch.ops.xmodal.topk_search.default, (queries, database, 70, metric, mask))
    torch.library.opcheck(torch.ops.xmodal.topk_search.default, (queries[0], database, 3, metric, None))
    torch.library.opcheck(torch.ops.xmodal.topk_search.default, (queries, database, 4, metric, None), {"tf32": True})


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_tf32_option(device, metric):
    # float32 scores from TF32 tensor cores (GPU) carry ~1e-3 relative error; the CPU ignores the flag
    queries, database = make_inputs(40, 3000, 64, metric, torch.float32, device, seed=5)
    exact_v, exact_i = xmodal.topk_search(queries, database, 10, metric)
    v, i = xmodal.topk_search(queries, database, 10, metric, tf32=True)
    if device == "cpu":
        assert torch.equal(v, exact_v) and torch.equal(i, exact_i)
    else:
        assert_topk_close(v, i, queries, database, 10, metric, eps=3e-3)
    # other dtypes are unaffected
    qb, xb = queries.bfloat16(), database.bfloat16()
    assert torch.equal(xmodal.topk_search(qb, xb, 5, metric, tf32=True)[1], xmodal.topk_search(qb, xb, 5, metric)[1])


def test_torch_compile_fullgraph(device):
    queries, database = make_inputs(6, 100, 8, "cosine", torch.float32, device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def search_then_gather(q, x):
        values, indices = xmodal.topk_search(q * 2.0, x, 5, "cosine")
        return values + 1.0, x[indices.clamp_min(0)]

    values, rows = search_then_gather(queries, database)
    ref_v, ref_i = xmodal.topk_search(queries * 2.0, database, 5, "cosine")
    torch.testing.assert_close(values, ref_v + 1.0)
    torch.testing.assert_close(rows, database[ref_i])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.integers(0, 6),
    n=st.integers(0, 300),
    d=st.integers(1, 20),
    k=st.integers(1, 40),
    metric=st.sampled_from(ALL_METRICS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(q, n, d, k, metric, dtype, use_mask, seed):
    queries, database = make_inputs(q, n, d, metric, dtype, "cpu", seed=seed)
    mask = None
    if use_mask:
        mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    values, indices = xmodal.topk_search(queries, database, k, metric, mask=mask)
    if q == 0:
        assert values.shape == (0, k)
        return
    assert_topk_close(values, indices, queries, database, k, metric, mask=mask)
    # the scores are sorted best first (NaN and padding last)
    finite = values.double().nan_to_num(nan=-math.inf if SEARCH_METRICS[metric] else math.inf)
    diffs = finite[:, 1:] - finite[:, :-1]
    ok = diffs <= 0 if SEARCH_METRICS[metric] else diffs >= 0
    assert (ok | diffs.isnan()).all()


def test_reference_is_self_consistent():
    q = torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    v, i = reference.topk_search(q, x, 5, "ip")
    assert i.tolist() == [[3, 0, 1, 2, -1]] and v[0, :4].tolist() == [2.0, 1.0, 0.0, -1.0]
    v, i = reference.topk_search(q, x, 2, "cosine")
    assert i.tolist() == [[0, 3]]  # tie between 0 and 3: smaller index first
    v, i = reference.topk_search(q, x, 4, "l2")
    assert i.tolist() == [[0, 3, 1, 2]] and v[0].tolist() == pytest.approx([0, 1, math.sqrt(2), 2])


def test_large_search_uses_bounded_memory():
    """Q = 4096, N = 1,000,000, D = 64, fp32, k = 10: the naive way needs 16 GB of scores; the fused
    op must stay under 1 GB of extra peak memory (measured as the RSS high-water mark in a fresh process)."""
    script = textwrap.dedent(
        """
        import resource, torch, xmodal
        torch.manual_seed(0)
        database = torch.randn(1_000_000, 64)
        queries = torch.randn(4096, 64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values, indices = xmodal.topk_search(queries, database, 10, "ip")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # spot-check a few queries against a direct computation
        for i in (0, 1234, 4095):
            ref = torch.topk(database @ queries[i], 10)
            assert torch.allclose(values[i], ref.values, rtol=1e-4, atol=1e-3), (values[i], ref.values)
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 1 << 30, f"extra peak memory {extra / 2**20:.0f} MiB"
