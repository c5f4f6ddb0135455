import math

import pytest
import torch

from xmodal import reference
from xmodal.graph import knn_graph
from xmodal.ops import SEARCH_METRICS

from search_helpers import DTYPE_EPS, make_inputs

ALL_METRICS = list(SEARCH_METRICS)


def brute_force(x, k, metric, y=None, loop=False):
    """The reference graph: the full float64 score matrix, the self score made the worst when loop=False,
    sorted. Returns (source [M, k], values [M, k], full scores [M, N])."""
    queries = x if y is None else y
    full = reference.scores(queries.cpu(), x.cpu(), metric)
    masked = full.clone()
    if y is None and not loop:
        worst = -math.inf if SEARCH_METRICS[metric] else math.inf
        masked.fill_diagonal_(worst)
    values, source = reference.topk_from_scores(masked, k, metric)
    return source, values, full


def check_graph(edge_index, weight, x, k, metric, y=None, loop=False):
    """edge_index/weight must be the exact kNN graph up to the dtype's precision, any index among ties."""
    m = (x if y is None else y).shape[0]
    assert edge_index.dtype == torch.int64 and tuple(edge_index.shape) == (2, m * k)
    assert weight.dtype == x.dtype and tuple(weight.shape) == (m * k,)
    assert edge_index.device == x.device and weight.device == x.device
    src, dst = edge_index.cpu().reshape(2, m, k)
    w = weight.cpu().double().reshape(m, k)
    # targets grouped in order, k edges each
    assert torch.equal(dst, torch.arange(m)[:, None].expand(m, k))
    assert (src >= 0).all() and (src < x.shape[0]).all()
    # no row twice among a target's neighbours
    assert (src.sort(1).values.diff(dim=1) != 0).all()
    if y is None and not loop:
        assert not (src == dst).any(), "self edge with loop=False"
    ref_src, ref_v, full = brute_force(x, k, metric, y, loop)
    eps = DTYPE_EPS[x.dtype] * (4.0 if metric in ("cosine", "cosine_distance") else
                                max(1.0, x.double().norm(dim=1).max().item() ** 2))
    # the weights are the k best values, best first, and each is the true score of its edge
    # (l2 and cosine_distance are square roots: compared squared, so rounding near 0 is not amplified)
    sq = (lambda v: v * v) if metric in ("l2", "cosine_distance") else (lambda v: v)
    torch.testing.assert_close(sq(w), sq(ref_v), rtol=0, atol=eps)
    torch.testing.assert_close(sq(w), sq(full.gather(1, src)), rtol=0, atol=eps)
    # the same neighbours as the reference wherever the k-th value is not tied with the (k+1)-th
    return src, ref_src


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("loop", [False, True])
def test_matches_brute_force(device, metric, loop):
    _, x = make_inputs(1, 150, 12, metric, torch.float64, device, seed=1)
    edge_index, weight = knn_graph(x, 7, metric, loop=loop)
    src, ref_src = check_graph(edge_index, weight, x, 7, metric, loop=loop)
    # random float64 rows have no ties: the neighbour lists are exactly the reference's
    assert torch.equal(src, ref_src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(device, dtype):
    _, x = make_inputs(1, 120, 16, "cosine", dtype, device, seed=2)
    edge_index, weight = knn_graph(x, 5)
    check_graph(edge_index, weight, x, 5, "cosine")


def test_several_query_blocks(device, monkeypatch):
    import xmodal.graph.knn as graph

    monkeypatch.setattr(graph, "QUERY_BLOCK", 37)  # blocks that do not divide N
    _, x = make_inputs(1, 200, 8, "l2", torch.float64, device, seed=3)
    edge_index, weight = knn_graph(x, 4, "l2")
    src, ref_src = check_graph(edge_index, weight, x, 4, "l2")
    assert torch.equal(src, ref_src)


def test_loop_true_includes_self():
    _, x = make_inputs(1, 50, 8, "cosine", torch.float64, "cpu", seed=4)
    edge_index, weight = knn_graph(x, 3, loop=True)
    src, dst = edge_index.reshape(2, 50, 3)
    # each row's best match under cosine is itself (cos = 1)
    assert torch.equal(src[:, 0], torch.arange(50))
    torch.testing.assert_close(weight.reshape(50, 3)[:, 0], torch.ones(50, dtype=torch.float64))
    assert (src[:, 1:] != dst[:, 1:]).all()


@pytest.mark.parametrize("copies", [2, 5])
def test_duplicates_stay_neighbours(device, copies):
    # every row appears `copies` times: with loop=False only the self index is excluded, so a row's
    # first neighbours are its copies, whatever order the tied scores come in
    base = make_inputs(1, 30, 6, "cosine", torch.float64, "cpu", seed=5)[1]
    x = base.repeat(copies, 1).to(device)
    n = x.shape[0]
    k = copies + 2
    edge_index, weight = knn_graph(x, k)
    src, dst = edge_index.cpu().reshape(2, n, k)
    assert not (src == dst).any()
    assert (src[:, : copies - 1] % 30 == dst[:, : copies - 1] % 30).all()
    torch.testing.assert_close(weight.cpu().reshape(n, k)[:, : copies - 1],
                               torch.ones(n, copies - 1, dtype=torch.float64))
    check_graph(edge_index, weight, x, k, "cosine")


def test_k_is_all_other_rows():
    # k = N - 1 with duplicates: each row's neighbours are exactly the other N - 1 rows
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    edge_index, _ = knn_graph(x, 3)
    src, dst = edge_index.reshape(2, 4, 3)
    for i in range(4):
        assert sorted(src[i].tolist()) == [j for j in range(4) if j != i]


def test_all_rows_tied():
    # identical rows: every score ties, any other row is a valid neighbour, never the row itself
    x = torch.ones(10, 4)
    edge_index, weight = knn_graph(x, 9)
    src, dst = edge_index.reshape(2, 10, 9)
    assert not (src == dst).any()
    assert (src.sort(1).values.diff(dim=1) != 0).all()
    torch.testing.assert_close(weight, torch.ones(90))


def test_mutual(device):
    _, x = make_inputs(1, 100, 5, "cosine", torch.float64, device, seed=6)
    k = 6
    edge_index, weight = knn_graph(x, k, mutual=True)
    full_ei, full_w = knn_graph(x, k)
    pairs = set(map(tuple, full_ei.t().tolist()))
    expected = [[j, i] for (j, i) in full_ei.t().tolist() if (i, j) in pairs]
    assert edge_index.t().tolist() == expected  # the reciprocal edges, in the original order
    assert 0 < len(expected) < len(pairs)
    got = set(map(tuple, edge_index.t().tolist()))
    assert all((i, j) in got for (j, i) in got)  # symmetric
    lookup = {p: w for p, w in zip(map(tuple, full_ei.t().tolist()), full_w.tolist())}
    assert weight.tolist() == [lookup[p] for p in map(tuple, edge_index.t().tolist())]


def test_mutual_brute_force():
    _, x = make_inputs(1, 40, 3, "l2", torch.float64, "cpu", seed=7)
    k = 4
    edge_index, _ = knn_graph(x, k, "l2", mutual=True)
    ref_src, _, _ = brute_force(x, k, "l2")
    nbrs = [set(r.tolist()) for r in ref_src]
    expected = {(j, i) for i in range(40) for j in nbrs[i] if i in nbrs[j]}
    assert set(map(tuple, edge_index.t().tolist())) == expected


@pytest.mark.parametrize("metric", ["cosine", "l2", "kl"])
def test_bipartite(device, metric):
    y, x = make_inputs(25, 90, 10, metric, torch.float64, device, seed=8)
    edge_index, weight = knn_graph(x, 6, metric, y=y)
    src, ref_src = check_graph(edge_index, weight, x, 6, metric, y=y)
    assert torch.equal(src, ref_src)
    # edge_index[0] indexes x, [1] indexes y
    assert edge_index[0].max() < 90 and edge_index[1].max() == 24


def test_bipartite_k_equals_len_x():
    y, x = make_inputs(3, 5, 4, "ip", torch.float64, "cpu", seed=9)
    edge_index, _ = knn_graph(x, 5, "ip", y=y)
    for i in range(3):
        assert sorted(edge_index[0, edge_index[1] == i].tolist()) == list(range(5))


def test_pyg_convention():
    # PyG's documented example (torch_geometric.nn.knn_graph docstring): a square, k = 2, loop=False,
    # flow="source_to_target": edge (j, i) means j is one of i's neighbours, and i is edge_index[1].
    x = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    edge_index, weight = knn_graph(x, 2, "l2")
    expected = {(1, 0), (2, 0), (0, 1), (3, 1), (0, 2), (3, 2), (1, 3), (2, 3)}
    assert set(map(tuple, edge_index.t().tolist())) == expected
    torch.testing.assert_close(weight, torch.full((8,), 2.0))
    # an asymmetric case tells source from target: row 2 is far from both, but its nearest is row 1
    x = torch.tensor([[0.0], [1.0], [10.0]])
    edge_index, _ = knn_graph(x, 1, "l2")
    assert edge_index.tolist() == [[1, 0, 1], [0, 1, 2]]  # (neighbour, row): 1 -> 0, 0 -> 1, 1 -> 2
    try:
        from torch_geometric.nn import knn_graph as pyg_knn_graph

        pyg = pyg_knn_graph(x, 1, loop=False, flow="source_to_target")
    except Exception as e:  # PyG's knn_graph needs torch_cluster or pyg-lib, often not installed
        pytest.skip(f"torch_geometric's knn_graph is unavailable: {e}")
    assert set(map(tuple, pyg.t().tolist())) == set(map(tuple, edge_index.t().tolist()))


def test_pyg_random_if_available():
    try:
        from torch_geometric.nn import knn_graph as pyg_knn_graph

        _, x = make_inputs(1, 60, 3, "l2", torch.float32, "cpu", seed=10)
        pyg = pyg_knn_graph(x, 5, loop=False, flow="source_to_target")
    except Exception as e:
        pytest.skip(f"torch_geometric's knn_graph is unavailable: {e}")
    edge_index, _ = knn_graph(x, 5, "l2")
    assert set(map(tuple, pyg.t().tolist())) == set(map(tuple, edge_index.t().tolist()))


def test_memory_is_not_quadratic(monkeypatch):
    # the graph is built from topk_search calls on query blocks: no call sees more than QUERY_BLOCK queries
    import xmodal.graph.knn as graph

    seen = []
    real = graph.topk_search

    def spy(q, d, k, metric):
        seen.append(q.shape[0])
        return real(q, d, k, metric)

    monkeypatch.setattr(graph, "topk_search", spy)
    monkeypatch.setattr(graph, "QUERY_BLOCK", 64)
    x = torch.randn(300, 4)
    knn_graph(x, 3)
    assert seen == [64, 64, 64, 64, 44]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(k=0), ValueError, "k must be >= 1, got 0"),
        (dict(k=-3), ValueError, "k must be >= 1, got -3"),
        (dict(k=2.0), TypeError, "k must be an int, got float"),
        (dict(k=True), TypeError, "k must be an int, got bool"),
        (dict(k=10), ValueError, "k = 10 is larger than the 9 other rows"),
        (dict(k=11, loop=True), ValueError, "k = 11 is larger than the 10 rows of x"),
        (dict(k=2, metric="hamming"), ValueError, "metric must be one of .* got 'hamming'"),
        (dict(k=2, mutual=1), TypeError, "mutual must be a bool, got int"),
        (dict(k=2, y=torch.randn(3, 5)), ValueError, r"y must have as many columns as x \(4\), got shape \(3, 5\)"),
        (dict(k=2, y=torch.randn(3, 4, dtype=torch.float64)), TypeError, "y must have x's dtype torch.float32"),
        (dict(k=2, y=torch.randn(3, 4), mutual=True), ValueError, "mutual=True .* cannot be used with y"),
        (dict(k=2, y=torch.randn(3, 4), loop=True), ValueError, "loop=True .* cannot be used with y"),
        (dict(k=11, y=torch.randn(3, 4)), ValueError, "k = 11 is larger than the 10 rows of x"),
        (dict(k=2, y=torch.empty(0, 4)), ValueError, r"y must have at least one row .* got shape \(0, 4\)"),
        (dict(k=2, y=torch.ones(3, 4).index_fill_(0, torch.tensor([2]), math.nan)), ValueError,
         "y has NaN in row 2"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    x = torch.randn(10, 4)
    with pytest.raises(error, match=message):
        knn_graph(x, **kwargs)


def test_bad_x():
    x = torch.randn(30, 4)
    x[17, 2] = math.nan
    with pytest.raises(ValueError, match="x has NaN in row 17"):
        knn_graph(x, 3)
    x[17, 2] = math.inf
    with pytest.raises(ValueError, match="x has inf in row 17"):
        knn_graph(x, 3)
    with pytest.raises(ValueError, match=r"x must have at least one row .* got shape \(0, 4\)"):
        knn_graph(torch.empty(0, 4), 1)
    with pytest.raises(ValueError, match=r"x must be 2-D \[rows, dim\], got shape \(4,\)"):
        knn_graph(torch.randn(4), 1)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        knn_graph(torch.arange(12).reshape(6, 2), 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        knn_graph([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="k = 1 is larger than the 0 other rows"):
        knn_graph(torch.randn(1, 3), 1)
    # one row with loop=True is fine
    edge_index, weight = knn_graph(torch.randn(1, 3), 1, loop=True)
    assert edge_index.tolist() == [[0], [0]]
