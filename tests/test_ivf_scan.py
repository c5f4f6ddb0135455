"""torch.ops.xmodal.ivf_scan (the IVF list scan) against a brute-force search over each query's probed rows."""
import pytest
import torch

from xmodal import reference

from search_helpers import DTYPE_EPS


def make_lists(n_lists, dim, dtype, seed=0, empty=(2,)):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 60, (n_lists,), generator=g)
    for e in empty:
        sizes[e] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    vectors = torch.randn(int(offsets[-1]), dim, generator=g, dtype=torch.float64).to(dtype)
    return vectors, offsets


def expected(queries, vectors, offsets, probes, k, metric, mask):
    """Per query: reference top-k over the rows of its probed lists (and the mask)."""
    n = vectors.shape[0]
    out_v, out_i = [], []
    for q, lists in zip(queries, probes):
        allowed = torch.zeros(n, dtype=torch.bool)
        for lst in lists.tolist():
            if lst >= 0:
                allowed[offsets[lst]: offsets[lst + 1]] = True
        if mask is not None:
            allowed &= mask
        v, i = reference.topk_search(q[None], vectors, k, metric, mask=allowed)
        out_v.append(v[0])
        out_i.append(i[0])
    return torch.stack(out_v), torch.stack(out_i)


@pytest.mark.parametrize("metric", ["ip", "l2", "sqeuclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 5, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_brute_force(metric, dtype, k, masked):
    vectors, offsets = make_lists(12, 16, dtype)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(9, 16, generator=g, dtype=torch.float64).to(dtype)
    probes = torch.randint(0, 12, (9, 3), generator=g)
    probes[0, 1] = -1  # no list
    probes[1, 2] = probes[1, 0]  # the same list twice: scanned once
    probes[2] = 2  # only the empty list
    mask = torch.rand(vectors.shape[0], generator=g) < 0.7 if masked else None
    values, indices = torch.ops.xmodal.ivf_scan(queries, vectors, offsets, probes, k, metric, mask)
    ref_v, ref_i = expected(queries, vectors, offsets, probes, k, metric, mask)
    assert values.dtype == dtype and indices.dtype == torch.int64 and values.shape == (9, k)
    tol = DTYPE_EPS[dtype] * 20
    finite = ref_v.isfinite()
    assert torch.equal(indices == -1, ~finite)  # same padding
    torch.testing.assert_close(values.double()[finite], ref_v[finite], atol=tol * 10, rtol=tol)
    # each returned index is a probed, unmasked row whose exact value matches its reported value
    exact = reference.scores(queries, vectors, metric)
    for q in range(9):
        got = indices[q][indices[q] >= 0]
        assert len(set(got.tolist())) == len(got)
        torch.testing.assert_close(exact[q, got], values[q, : len(got)].double(), atol=tol * 10, rtol=tol)


def test_nan_rows_rank_last():
    vectors, offsets = make_lists(4, 8, torch.float32, empty=())
    vectors[0] = float("nan")
    queries = torch.randn(2, 8)
    probes = torch.tensor([[0, 1], [0, 3]])
    values, indices = torch.ops.xmodal.ivf_scan(queries, vectors, offsets, probes, int(offsets[2]), "ip")
    assert indices[0, -1] == 0 and values[0, -1].isnan()
    assert values[0, :-1].isfinite().all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(metric="cosine"), "metric must be one of 'ip', 'l2', 'sqeuclidean' for ivf_scan, got 'cosine'"),
        (dict(k=0), "k must be positive, got 0"),
        (dict(probes=torch.tensor([[0, 7]])), r"probes must hold list ids in \[0, 3\) or -1, got 7"),
        (dict(probes=torch.tensor([[0, 1], [1, 2]])), r"probes must be a 2-D int64 tensor \[Q, nprobe\] with Q = 1"),
        (dict(offsets=torch.tensor([0, 5, 3, 10])), "list_offsets must be non-decreasing, got 5 before 3"),
        (dict(offsets=torch.tensor([0, 5, 6, 9])), "list_offsets must start at 0 and end at N = 10, got 0 and 9"),
        (dict(queries=torch.randn(1, 5)), "queries and vectors must have the same dimension D, got 5 and 4"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), r"mask must be a 1-D bool tensor \[N\] = \[10\]"),
    ],
)
def test_errors(kwargs, match):
    args = dict(queries=torch.randn(1, 4), vectors=torch.randn(10, 4), offsets=torch.tensor([0, 5, 6, 10]),
                probes=torch.tensor([[0, 1]]), k=3, metric="ip", mask=None)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.xmodal.ivf_scan(args["queries"], args["vectors"], args["offsets"], args["probes"], args["k"],
                                  args["metric"], args["mask"])


def test_opcheck():
    vectors, offsets = make_lists(5, 8, torch.float32, empty=())
    queries, probes = torch.randn(3, 8), torch.tensor([[0, 1], [2, 4], [3, 3]])
    torch.library.opcheck(torch.ops.xmodal.ivf_scan.default, (queries, vectors, offsets, probes, 4, "l2", None))


def with_gaps(vectors, offsets, seed=0):
    """The same lists spread over a larger buffer in shuffled order, with unused rows between them:
    ``(buffer, ranges [nlist, 2], slot of each original row)``."""
    g = torch.Generator().manual_seed(seed)
    nlist = offsets.numel() - 1
    gaps = torch.randint(0, 5, (nlist,), generator=g)
    sizes = offsets[1:] - offsets[:-1]
    order = torch.randperm(nlist, generator=g)
    starts = torch.zeros(nlist, dtype=torch.int64)
    at = 0
    for lst in order.tolist():
        at += int(gaps[lst])
        starts[lst] = at
        at += int(sizes[lst])
    buffer = torch.randn(at + 3, vectors.shape[1], generator=g, dtype=torch.float64).to(vectors.dtype)
    slot = torch.cat([torch.arange(starts[l], starts[l] + sizes[l]) for l in range(nlist)])
    buffer[slot] = vectors
    return buffer, torch.stack([starts, starts + sizes], dim=1), slot


@pytest.mark.parametrize("metric", ["ip", "l2", "sqeuclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_ranges_layout_matches_offsets_layout(metric, dtype, masked):
    vectors, offsets = make_lists(10, 16, dtype)
    buffer, ranges, slot = with_gaps(vectors, offsets)
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(7, 16, generator=g, dtype=torch.float64).to(dtype)
    probes = torch.randint(-1, 10, (7, 4), generator=g)
    mask = torch.rand(vectors.shape[0], generator=g) < 0.6 if masked else None
    slot_mask = None
    if masked:
        slot_mask = torch.zeros(buffer.shape[0], dtype=torch.bool)
        slot_mask[slot] = mask
    v, i = torch.ops.xmodal.ivf_scan(queries, vectors, offsets, probes, 6, metric, mask)
    gv, gi = torch.ops.xmodal.ivf_scan(queries, buffer, ranges, probes, 6, metric, slot_mask)
    assert torch.equal(gi, torch.where(i >= 0, slot[i.clamp(min=0)], i))
    torch.testing.assert_close(gv, v, rtol=0, atol=0)


def test_ranges_errors():
    queries, vectors, probes = torch.randn(1, 4), torch.randn(10, 4), torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match=r"list_offsets row 1 must be a range 0 <= begin <= end <= N = 10, got \(6, 11\)"):
        torch.ops.xmodal.ivf_scan(queries, vectors, torch.tensor([[0, 5], [6, 11]]), probes, 3)
    with pytest.raises(RuntimeError, match=r"list_offsets must be a 1-D int64 tensor \[nlist \+ 1\] or a 2-D int64 "
                                           r"tensor \[nlist, 2\]"):
        torch.ops.xmodal.ivf_scan(queries, vectors, torch.tensor([[0, 5, 6]]), probes, 3)


@pytest.mark.parametrize("metric", ["ip", "l2", "sqeuclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 7, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_plain_pytorch_kernel_matches_cpu_kernel(metric, dtype, k, masked):
    """The kernel other devices run (xmodal/_fallback_kernels.py), called on CPU tensors, against the C++ one."""
    from xmodal._fallback_kernels import ivf_scan

    vectors, offsets = make_lists(12, 16, dtype)
    vectors[3] = float("nan")
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(9, 16, generator=g, dtype=torch.float64).to(dtype)
    probes = torch.randint(0, 12, (9, 3), generator=g)
    probes[0, 1] = -1
    probes[1, 2] = probes[1, 0]
    probes[2] = 2
    mask = torch.rand(vectors.shape[0], generator=g) < 0.7 if masked else None
    for layout in (offsets, with_gaps(vectors, offsets)[1]):
        data = vectors if layout is offsets else with_gaps(vectors, offsets)[0]
        m = mask
        if masked and layout is not offsets:
            m = torch.zeros(data.shape[0], dtype=torch.bool)
            m[with_gaps(vectors, offsets)[2]] = mask
        want_v, want_i = torch.ops.xmodal.ivf_scan(queries, data, layout, probes, k, metric, m)
        got_v, got_i = ivf_scan(queries, data, layout, probes, k, metric, m)
        assert got_v.dtype == want_v.dtype and got_i.dtype == torch.int64
        tol = DTYPE_EPS[dtype] * 20
        torch.testing.assert_close(got_v.double(), want_v.double(), atol=tol * 10, rtol=tol, equal_nan=True)
        assert torch.equal(got_i == -1, want_i == -1)
        same = got_i == want_i  # ties may swap; where they differ, the values must agree (checked above)
        assert same.float().mean() > 0.95


def test_ranges_opcheck():
    vectors, offsets = make_lists(5, 8, torch.float32, empty=())
    buffer, ranges, _ = with_gaps(vectors, offsets)
    queries, probes = torch.randn(3, 8), torch.tensor([[0, 1], [2, 4], [3, 3]])
    torch.library.opcheck(torch.ops.xmodal.ivf_scan.default, (queries, buffer, ranges, probes, 4, "ip", None))


@pytest.mark.parametrize("kind", ["int8", "int8_groups", "bits"])
def test_compressed_rows_match_the_flat_ops_over_the_probed_lists(kind):
    """ivf_scan over int8 codes / packed bits gives, per query, the flat op's answer over its probed lists;
    the plain-PyTorch kernel (other devices) agrees."""
    from xmodal._fallback_kernels import ivf_scan as plain_ivf_scan

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 40, (9,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    n = int(offsets[-1])
    probes = torch.randint(-1, 9, (6, 3), generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    if kind.startswith("int8"):
        rows = torch.randint(-128, 128, (n, 20), generator=g, dtype=torch.int8)
        queries = torch.randn(6, 20, generator=g)
        rs, rb = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
        # a bias per query, or per query and row group (codes relative to 7 centres)
        groups = torch.randint(0, 7, (n,), generator=g).to(torch.uint8) if kind == "int8_groups" else None
        qb = torch.randn(6, 7, generator=g) * 5 if groups is not None else torch.randn(6, generator=g)
        kwargs = dict(query_bias=qb, row_scale=rs, row_bias=rb, row_group=groups)
        values, idx = torch.ops.xmodal.ivf_scan(queries, rows, offsets, probes, 5, "ip", mask, **kwargs)
        full = reference.int8_keys(queries, rows, qb, rs, rb, groups)
        metric = "ip"
        assert values.dtype == torch.float32
    else:
        rows = torch.randint(0, 256, (n, 16), generator=g, dtype=torch.uint8)
        queries = torch.randint(0, 256, (6, 16), generator=g, dtype=torch.uint8)
        values, idx = torch.ops.xmodal.ivf_scan(queries, rows, offsets, probes, 5, "hamming", mask)
        full = reference.hamming(queries, rows).double()
        metric, kwargs = "l2", {}
        assert values.dtype == torch.int32
    for q in range(6):
        allowed = torch.zeros(n, dtype=torch.bool)
        for lst in probes[q].tolist():
            if lst >= 0:
                allowed[offsets[lst]: offsets[lst + 1]] = True
        want_v, want_i = reference.topk_from_scores(full[q: q + 1], 5, metric, mask=allowed & mask)
        assert torch.equal(idx[q], want_i[0])
        found = want_i[0] >= 0
        # (int8 keys: exact up to the query's rounding to int16 in AVX2 scans, ~2e-5 of the key range)
        torch.testing.assert_close(values[q][found].double(), want_v[0][found], rtol=1e-4, atol=1e-4)
    plain = plain_ivf_scan(queries, rows, offsets, probes, 5, "hamming" if kind == "bits" else "ip", mask, **kwargs)
    assert torch.equal(plain[1], idx) and plain[0].dtype == values.dtype
    torch.testing.assert_close(plain[0].double(), values.double(), rtol=1e-4, atol=1e-3)


def test_compressed_rows_errors():
    bits = torch.zeros(10, 8, dtype=torch.uint8)
    offsets, probes = torch.tensor([0, 5, 10]), torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="metric must be 'hamming' with uint8 vectors"):
        torch.ops.xmodal.ivf_scan(torch.zeros(1, 8, dtype=torch.uint8), bits, offsets, probes, 3, "ip")
    with pytest.raises(RuntimeError, match="queries must be float32 with int8 vectors"):
        torch.ops.xmodal.ivf_scan(torch.zeros(1, 8, dtype=torch.float64), bits.to(torch.int8), offsets, probes, 3)
    with pytest.raises(RuntimeError, match="query_bias, row_scale, row_bias and row_group apply to int8 vectors only"):
        torch.ops.xmodal.ivf_scan(torch.zeros(1, 8), torch.zeros(10, 8), offsets, probes, 3, "ip",
                                  row_scale=torch.ones(10))


def test_row_groups_are_checked_on_the_probed_lists_rows_only():
    """Slots between lists (the appendable [nlist, 2] layout) hold anything; a bad group inside a probed list
    raises (a list no query probes is not read, so not checked: checking all of them cost every call O(N))."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(-128, 128, (12, 8), generator=g, dtype=torch.int8)
    queries, bias = torch.randn(2, 8, generator=g), torch.randn(2, 3, generator=g)
    ranges, probes = torch.tensor([[0, 4], [6, 10]]), torch.tensor([[0, 1], [1, -1]])
    groups = torch.tensor([0, 1, 2, 0, 255, 200, 1, 2, 0, 1, 255, 255], dtype=torch.uint8)  # 4, 5, 10, 11: gaps
    values, idx = torch.ops.xmodal.ivf_scan(queries, rows, ranges, probes, 3, "ip", query_bias=bias, row_group=groups)
    full = reference.int8_keys(queries, rows, bias, row_group=groups.clamp(max=2))
    for q, allowed in enumerate(([0, 1, 2, 3, 6, 7, 8, 9], [6, 7, 8, 9])):
        keep = torch.zeros(12, dtype=torch.bool)
        keep[allowed] = True
        assert torch.equal(idx[q], reference.topk_from_scores(full[q: q + 1], 3, "ip", mask=keep)[1][0])
    three = torch.tensor([[0, 4], [6, 10], [10, 12]])  # list 2 holds rows 10, 11 (groups 255): not probed
    assert torch.equal(torch.ops.xmodal.ivf_scan(queries, rows, three, probes, 3, "ip", query_bias=bias,
                                                 row_group=groups)[1], idx)
    with pytest.raises(RuntimeError, match=r"row_group values must be below G = 3 \(query_bias's columns\), got 255"):
        torch.ops.xmodal.ivf_scan(queries, rows, three, torch.tensor([[0, 2], [1, -1]]), 3, "ip", query_bias=bias,
                                  row_group=groups)
    groups[7] = 3
    with pytest.raises(RuntimeError, match=r"row_group values must be below G = 3 \(query_bias's columns\), got 3"):
        torch.ops.xmodal.ivf_scan(queries, rows, ranges, probes, 3, "ip", query_bias=bias, row_group=groups)
    from xmodal._fallback_kernels import ivf_scan as plain_ivf_scan

    with pytest.raises(RuntimeError, match="query_bias, row_scale, row_bias and row_group apply to int8 vectors only"):
        plain_ivf_scan(queries, rows.float(), ranges, probes, 3, "ip", query_bias=bias, row_group=groups)


def _composed_search(index, queries, k, nprobe, mask):
    """IVFIndex's search composed from the ops in Python: the path of devices other than the CPU."""
    from xmodal.index.codecs import ListScan

    q = index._prepare(queries)
    scan = ListScan(index._lists.ranges(), index._probes(q, min(nprobe, index.nlist)))
    return index._encoding.codec.search(scan, q, index._lists.data, k, index._slot_mask(mask))


@pytest.mark.parametrize("metric", ["ip", "cosine", "cosine_distance", "l2", "sqeuclidean"])
@pytest.mark.parametrize("rows", ["int8", "float32", "bfloat16", "float64"])
@pytest.mark.parametrize("masked", [False, True])
def test_search_in_one_call_matches_the_composed_ops(metric, rows, masked):
    """The CPU's one-call IVF search (xmodal._C.ivf_search) answers as the composed ops, bit for bit (square
    roots to the last bit: torch.sqrt's vectorised one can be one unit off the correctly rounded one): int8
    codes and float rows, one query and many, k past the probed rows, nprobe past nlist, lists with gaps and an
    empty one."""
    import xmodal

    g = torch.Generator().manual_seed(3)
    data = torch.randn(3000, 24, generator=g) + 2 * torch.randn(6, 24, generator=g).repeat(500, 1)
    codec, dtype = (rows, torch.float32) if rows == "int8" else (None, getattr(torch, rows))
    index = xmodal.IVFIndex(24, 12, metric, codec=codec, nprobe=3, dtype=dtype)
    index.train(data)
    index.add(data)
    index.remove(torch.arange(0, 3000, 7))  # gaps between the lists' kept rows
    index.remove(index.ids[index._lists.lists() == 5])  # an empty list
    index.add(data[:50] + 0.01)  # appended after the removal
    mask = torch.rand(len(index), generator=g) < 0.3 if masked else None
    queries = torch.randn(17, 24, generator=g) + data[:17]
    for q, k, nprobe in ((queries[:1], 10, 1), (queries, 10, 3), (queries, 800, 2), (queries[:3], 5, 40)):
        values, slots = index._search_rows(q, k, mask, nprobe=nprobe)
        want_values, want_slots = _composed_search(index, q, k, nprobe, mask)
        assert torch.equal(slots, want_slots) and values.dtype == want_values.dtype
        if metric in ("l2", "cosine_distance"):
            torch.testing.assert_close(values, want_values, rtol=1.2e-7 if values.dtype != torch.bfloat16 else 8e-3,
                                       atol=0)
        else:
            assert torch.equal(values, want_values), (values - want_values).abs().max()
        assert (slots == -1).any() == (k == 800)  # k = 800 over 2 of 12 lists: padded


def test_search_in_one_call_errors():
    from xmodal import _C

    q, cents, ranges = torch.randn(1, 8), torch.randn(4, 8), torch.tensor([[0, 2], [2, 4], [4, 6], [6, 8]])
    codes, groups = torch.zeros(8, 8, dtype=torch.int8), torch.zeros(8, dtype=torch.uint8)
    scale, bases = torch.ones(8), torch.zeros(1, 8)

    def call(**changes):
        args = dict(queries=q, centroids=cents, nprobe=2, probes=None, list_ranges=ranges, rows=codes,
                    groups=groups, row_terms=None, scale=scale, bases=bases, k=3, metric="ip", mask=None)
        return _C.ivf_search(**{**args, **changes})

    assert call()[1].shape == (1, 3)
    assert call(rows=torch.randn(8, 8), groups=None, scale=None, bases=None)[1].shape == (1, 3)
    for changes, match in (({"metric": "kl"}, "metric must be one of 'ip', 'cosine'.*got 'kl'"),
                           ({"nprobe": 0}, "nprobe must be positive, got 0"),
                           ({"metric": "l2"}, "row_terms must be given for metric 'l2'"),
                           ({"row_terms": torch.ones(8)}, "row_terms must be given .* only with l2 or cosine"),
                           ({"queries": q.int()}, "queries must be float32, float64, float16 or bfloat16, got Int"),
                           ({"centroids": cents.double()}, "centroids must be float32, got Double"),
                           ({"scale": torch.ones(7)}, r"scale must be \[D\] and bases \[G, D\] with D = 8"),
                           ({"scale": None}, "groups, scale and bases must be given with int8 rows"),
                           ({"rows": torch.randn(8, 8)}, "groups, scale and bases must be given with int8 rows .* "
                                                         "and only then, got rows of Float"),
                           ({"queries": torch.randn(8)}, r"queries must be 2-D \[Q, D\]"),
                           ({"probes": torch.tensor([[0, 9]])}, r"probes must hold list ids in \[0, 4\) or -1, got 9"),
                           ({"groups": torch.full((8,), 3, dtype=torch.uint8)}, "row_group values must be below G = 1")):
        with pytest.raises(RuntimeError, match=match):
            call(**changes)
    with pytest.raises(RuntimeError, match="row_terms apply to int8 rows"):
        call(rows=torch.randn(8, 8), groups=None, scale=None, bases=None, metric="l2", row_terms=torch.ones(8))
