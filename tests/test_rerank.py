import math

import pytest
import torch
import torch.nn.functional as F

import xmodal
from xmodal import reference
from xmodal.metrics import mean_average_precision
from xmodal.rerank import Diffusion, GNNRerank, conjugate_gradient, database_augmentation, gnn_rerank, query_expansion

from search_helpers import make_inputs


# -- plain-PyTorch references (float64, full score matrices: small shapes only) -------------------------

def ref_rows(x, metric):
    x = x.double().cpu()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def ref_query_expansion(queries, database, k, n, alpha, metric):
    x = ref_rows(database, metric)
    q = ref_rows(queries, metric)
    s = q @ x.T
    top_v, top_i = reference.topk_from_scores(s, n, metric)
    w = top_v.clamp(min=0) ** alpha
    w = torch.where(top_i >= 0, w, torch.zeros_like(w))
    expanded = F.normalize(q + (w[:, :, None] * x[top_i.clamp(min=0)]).sum(1), dim=1)
    return reference.topk_from_scores(expanded @ x.T, k, metric)


def ref_database_augmentation(database, n, alpha, metric):
    x = ref_rows(database, metric)
    s = x @ x.T
    s.fill_diagonal_(-math.inf)
    top_v, top_i = reference.topk_from_scores(s, n - 1, metric)
    w = top_v.clamp(min=0) ** alpha
    return F.normalize(x + (w[:, :, None] * x[top_i]).sum(1), dim=1)


# -- query expansion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("n, alpha", [(1, 3.0), (5, 3.0), (10, 0.0), (4, 1.5)])
def test_query_expansion_matches_reference(device, metric, n, alpha):
    queries, database = make_inputs(12, 200, 16, metric, torch.float64, device, seed=1)
    scores, indices = query_expansion(queries, database, 7, n=n, alpha=alpha, metric=metric)
    ref_v, ref_i = ref_query_expansion(queries, database, 7, n, alpha, metric)
    assert scores.dtype == torch.float64 and indices.dtype == torch.int64 and tuple(scores.shape) == (12, 7)
    assert torch.equal(indices.cpu(), ref_i)
    torch.testing.assert_close(scores.cpu(), ref_v)


def test_query_expansion_float32_and_n_above_len():
    queries, database = make_inputs(5, 8, 6, "cosine", torch.float32, "cpu", seed=2)
    # n > N: every row is averaged in (the padding carries no weight, even with alpha = 0)
    scores, indices = query_expansion(queries, database, 3, n=20, alpha=0.0)
    ref_v, ref_i = ref_query_expansion(queries, database, 3, 20, 0.0, "cosine")
    assert scores.dtype == torch.float32
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(scores.double(), ref_v, atol=1e-5, rtol=0)


def test_query_expansion_with_index():
    queries, database = make_inputs(10, 300, 16, "cosine", torch.float32, "cpu", seed=3)
    index = xmodal.FlatIndex(16, "cosine")
    ids = torch.arange(300) * 7 + 1000  # ids that are not positions
    index.add(database, ids=ids)
    scores, got_ids = query_expansion(queries, index, 5, n=4)
    ref_v, ref_i = ref_query_expansion(queries, database, 5, 4, 3.0, "cosine")
    assert torch.equal(got_ids, ids[ref_i])
    torch.testing.assert_close(scores.double(), ref_v, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="metric 'ip' differs from the index's metric 'cosine'"):
        query_expansion(queries, index, 5, metric="ip")


def test_query_expansion_with_ivf_index():
    queries, database = make_inputs(10, 400, 8, "ip", torch.float32, "cpu", seed=4)
    index = xmodal.IVFIndex(8, 4, "ip", nprobe=4)  # every list probed: exact
    index.train(database)
    index.add(database)
    scores, ids = query_expansion(queries, index, 5, n=3)
    ref_v, ref_i = ref_query_expansion(queries, database, 5, 3, 3.0, "ip")
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_v, atol=1e-4, rtol=1e-5)


# -- database augmentation ------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("n, alpha", [(2, 3.0), (6, 3.0), (5, 0.0)])
def test_database_augmentation_matches_reference(device, metric, n, alpha):
    _, database = make_inputs(1, 150, 12, metric, torch.float64, device, seed=5)
    augmented = database_augmentation(database, n=n, alpha=alpha, metric=metric)
    assert augmented.dtype == torch.float64 and augmented.device == database.device
    torch.testing.assert_close(augmented.cpu(), ref_database_augmentation(database, n, alpha, metric))


def test_database_augmentation_n1_and_n_equals_len():
    _, database = make_inputs(1, 9, 4, "cosine", torch.float32, "cpu", seed=6)
    torch.testing.assert_close(database_augmentation(database, n=1), F.normalize(database, dim=1))
    torch.testing.assert_close(database_augmentation(database, n=9).double(),
                               ref_database_augmentation(database, 9, 3.0, "cosine"), atol=1e-6, rtol=0)


def test_database_augmentation_duplicates():
    # a duplicated row counts its copy as a neighbour (weight 1) besides itself: both come out unchanged
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = database_augmentation(x, n=2)
    torch.testing.assert_close(out[:2], x[:2])


def test_database_augmentation_with_index():
    _, database = make_inputs(1, 120, 8, "cosine", torch.float32, "cpu", seed=7)
    index = xmodal.FlatIndex(8, "cosine")
    index.add(database, ids=torch.arange(120).flip(0))
    augmented = database_augmentation(index, n=4)
    torch.testing.assert_close(augmented.double(), ref_database_augmentation(index.vectors, 4, 3.0, "cosine"),
                               atol=1e-6, rtol=0)


def test_query_expansion_and_dba_bad_arguments():
    queries, database = make_inputs(3, 20, 4, "cosine", torch.float32, "cpu")
    cases = [
        (lambda: query_expansion(queries, database, 2, alpha=-1.0), ValueError, "alpha must be >= 0, got -1.0"),
        (lambda: query_expansion(queries, database, 2, alpha=math.nan), ValueError, "alpha must be a finite number"),
        (lambda: query_expansion(queries, database, 2, n=0), ValueError, "n must be >= 1, got 0"),
        (lambda: query_expansion(queries, database, 0), ValueError, "k must be >= 1, got 0"),
        (lambda: query_expansion(queries, database, 2, metric="l2"), ValueError,
         r"metric must be one of \['cosine', 'ip'\] .* got 'l2'"),
        (lambda: query_expansion(queries[:, :3], database, 2), ValueError,
         r"queries must have the database's 4 columns, got shape \(3, 3\)"),
        (lambda: query_expansion(queries, database.long(), 2), TypeError,
         "database must be a floating-point tensor, got dtype torch.int64"),
        (lambda: query_expansion(queries, torch.empty(0, 4), 2), ValueError, "database must have at least one row"),
        (lambda: database_augmentation(database, alpha=-0.5), ValueError, "alpha must be >= 0, got -0.5"),
        (lambda: database_augmentation(database, n=0), ValueError, "n must be >= 1, got 0"),
        (lambda: database_augmentation(database, n=21), ValueError, "n = 21 is larger than the 20 rows of database"),
        (lambda: database_augmentation(database, metric="kl"), ValueError, "got 'kl'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    nan_queries = queries.clone()
    nan_queries[1, 0] = math.nan
    with pytest.raises(ValueError, match="queries has NaN in row 1"):
        query_expansion(nan_queries, database, 2)
    index = xmodal.FlatIndex(4, "l2")
    index.add(database)
    with pytest.raises(ValueError, match="got 'l2'"):
        database_augmentation(index)
    index = xmodal.FlatIndex(4, "cosine", reduce_to=2)
    index.add(database)
    with pytest.raises(ValueError, match="database must be an index without reduce_to"):
        query_expansion(queries, index, 2)


# -- a manifold data set: two noisy concentric circles, lifted to 64-d ----------------------------------

def circles(n_per, seed, noise=0.05):
    """Points on two concentric circles (radii 1 and 2, labels 0 and 1) in a plane held at height 4 above
    the origin, so that cosine similarity follows distance in the plane; padded with small noise to 64
    dimensions and rotated by a fixed random orthogonal map. Raw search ranks the other circle's near side
    above the own circle's far side; the graph methods follow each circle round."""
    g = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for label, radius in enumerate((1.0, 2.0)):
        t = torch.rand(n_per, generator=g) * 2 * math.pi
        points.append(torch.stack([radius * t.cos(), radius * t.sin()], 1) + noise * torch.randn(n_per, 2, generator=g))
        labels.append(torch.full((n_per,), label))
    p = torch.cat(points)
    lifted = torch.cat([p, torch.full((p.shape[0], 1), 4.0), 0.02 * torch.randn(p.shape[0], 61, generator=g)], 1)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    return lifted @ rotation, torch.cat(labels)


@pytest.fixture(scope="module")
def manifold():
    database, db_labels = circles(300, 1)
    queries, q_labels = circles(25, 2)
    relevant = q_labels[:, None] == db_labels[None, :]
    _, raw = xmodal.topk_search(queries, database, database.shape[0])
    return queries, database, relevant, mean_average_precision(raw, relevant)


# -- conjugate gradient and diffusion -------------------------------------------------------------------

def test_conjugate_gradient_matches_solve():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T + 12 * torch.eye(12, dtype=torch.float64)  # symmetric positive definite
    b = torch.randn(12, 5, generator=g, dtype=torch.float64)
    b[:, 2] = 0  # a zero right-hand side must stay exactly 0, not NaN
    x = conjugate_gradient(lambda v: a @ v, b, max_iter=100, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert (x[:, 2] == 0).all()
    # with few iterations it is an approximation that improves with each step
    errors = [(conjugate_gradient(lambda v: a @ v, b, max_iter=i) - torch.linalg.solve(a, b)).norm().item()
              for i in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2]


def dense_diffusion(database, graph_k, gamma, alpha):
    """I - alpha S as a dense matrix, from the brute-force reciprocal kNN graph."""
    x = F.normalize(database.double(), dim=1)
    s = x @ x.T
    masked = s.clone().fill_diagonal_(-math.inf)
    _, nbrs = reference.topk_from_scores(masked, graph_k, "cosine")
    knn = torch.zeros_like(s, dtype=torch.bool)
    knn[torch.arange(len(x))[:, None], nbrs] = True
    w = torch.where(knn & knn.T, s.clamp(min=0) ** gamma, torch.zeros_like(s))
    d = w.sum(1)
    inv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    return torch.eye(len(x), dtype=torch.float64) - alpha * inv[:, None] * w * inv[None, :], x


def test_diffusion_matches_dense_solve():
    # 600 rows: enough for the graph to be stored in a (k-means) locality order other than the rows' own
    queries, database = make_inputs(6, 600, 5, "cosine", torch.float64, "cpu", seed=11)
    diffusion = Diffusion(database, graph_k=6, gamma=3.0, alpha=0.9, max_iter=300, tol=1e-12)
    assert torch.equal(diffusion.order.sort().values, torch.arange(600))
    assert not torch.equal(diffusion.order, torch.arange(600))
    scores, indices = diffusion.search(queries, 10, seeds=4)
    a, x = dense_diffusion(database, 6, 3.0, 0.9)
    s_v, s_i = reference.topk_from_scores(F.normalize(queries, dim=1) @ x.T, 4, "cosine")
    y = torch.zeros(6, 600, dtype=torch.float64)
    y[torch.arange(6)[:, None], s_i] = s_v.clamp(min=0) ** 3
    f = torch.linalg.solve(a, y.T).T
    ref_v, _ = reference.topk_from_scores(f, 10, "ip")
    torch.testing.assert_close(scores, ref_v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f.gather(1, indices), scores, rtol=1e-8, atol=1e-10)
    # the sparse S is exactly symmetric
    dense_s = diffusion.S.to_dense()
    assert torch.equal(dense_s, dense_s.T)


def test_diffusion_improves_map(manifold):
    queries, database, relevant, raw_map = manifold
    diffusion = Diffusion(database, graph_k=20)
    scores, indices = diffusion.search(queries, database.shape[0], seeds=5)
    diffused_map = mean_average_precision(indices, relevant)
    assert raw_map < 0.7 and diffused_map > 0.95, (raw_map, diffused_map)
    assert scores.dtype == torch.float32 and (scores.diff(dim=1) <= 0).all()


def test_diffusion_with_index_and_query_blocks(monkeypatch):
    import xmodal.graph.diffusion as diffusion

    queries, database = make_inputs(7, 60, 6, "cosine", torch.float32, "cpu", seed=12)
    expected = Diffusion(database, graph_k=5).search(queries, 8)
    monkeypatch.setattr(diffusion, "DIFFUSION_BLOCK_ELEMENTS", 60 * 3)  # blocks of 3 queries
    index = xmodal.FlatIndex(6, "cosine")
    ids = torch.arange(60) + 500
    index.add(database, ids=ids)
    scores, got = Diffusion(index, graph_k=5).search(queries, 8)
    torch.testing.assert_close(scores, expected[0])
    assert torch.equal(got, ids[expected[1]])


def test_diffusion_bad_arguments():
    queries, database = make_inputs(3, 20, 4, "cosine", torch.float32, "cpu")
    for kwargs, message in [
        (dict(alpha=1.0), r"alpha must be in \(0, 1\), got 1.0"),
        (dict(alpha=0.0), r"alpha must be in \(0, 1\), got 0.0"),
        (dict(gamma=0.0), "gamma must be > 0, got 0.0"),
        (dict(gamma=-2), "gamma must be > 0, got -2.0"),
        (dict(graph_k=0), "graph_k must be >= 1, got 0"),
        (dict(graph_k=20), "graph_k must be < the 20 rows of database, got 20"),
        (dict(metric="l2"), "got 'l2'"),
    ]:
        with pytest.raises(ValueError, match=message):
            Diffusion(database, **{"graph_k": 5, **kwargs})
    diffusion = Diffusion(database, graph_k=3)
    with pytest.raises(ValueError, match="k = 21 is larger than the 20 rows of database"):
        diffusion.search(queries, 21)
    with pytest.raises(ValueError, match="seeds must be >= 1, got 0"):
        diffusion.search(queries, 2, seeds=0)
    with pytest.raises(ValueError, match="seeds = 30 is larger than the 20 rows"):
        diffusion.search(queries, 2, seeds=30)


# -- message passing ------------------------------------------------------------------------------------

def dense_database_gnn_scores(queries, database, graph_k, layers, metric="cosine"):
    """GNNRerank's semantics without truncation: the database's own graph; queries attach to it."""
    norm = (lambda t: F.normalize(t, dim=1)) if metric == "cosine" else (lambda t: t)
    q, d = norm(queries.double()), norm(database.double())

    def affinity(x):
        s = x @ d.T
        _, nbrs = reference.topk_from_scores(s, graph_k, "ip")
        a = torch.zeros_like(s)
        a[torch.arange(len(x))[:, None], nbrs] = s.gather(1, nbrs).clamp(min=0)
        return a

    a_d, a_q = affinity(d), affinity(q)
    x_d, x_q = F.normalize(a_d, dim=1), F.normalize(a_q, dim=1)
    for _ in range(layers):
        x_q = F.normalize(x_q + a_q @ x_d, dim=1)  # (the database's features of the previous round)
        x_d = F.normalize(x_d + a_d @ x_d, dim=1)
    return x_q @ x_d.T


@pytest.mark.parametrize("layers, metric", [(0, "cosine"), (1, "cosine"), (2, "cosine"), (2, "ip")])
def test_gnn_reranker_matches_dense_reference_without_truncation(layers, metric):
    queries, database = make_inputs(5, 40, 6, metric, torch.float64, "cpu", seed=21)
    if metric == "ip":
        database = database.abs()  # non-negative affinities everywhere: no ties at 0 between rows
        queries = queries.abs()
    reranker = GNNRerank(database, graph_k=5, layers=layers, feature_k=40, metric=metric)
    scores, indices = reranker.search(queries, 10)
    full = dense_database_gnn_scores(queries, database, 5, layers, metric)
    ref_v, _ = reference.topk_from_scores(full, 10, "ip")
    torch.testing.assert_close(scores, ref_v, rtol=0, atol=1e-5)  # (raw similarity breaks ties at 1e-6)
    torch.testing.assert_close(full.gather(1, indices), scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_gnn_rerank_is_gnn_reranker_in_one_call(layers):
    queries, database = make_inputs(5, 70, 6, "cosine", torch.float64, "cpu", seed=13)
    scores, indices = gnn_rerank(queries, database, 10, graph_k=6, layers=layers)
    expected = GNNRerank(database, graph_k=6, layers=layers, feature_k=64).search(queries, 10)
    assert torch.equal(scores, expected[0]) and torch.equal(indices, expected[1])
    scores, indices = gnn_rerank(queries, database, 10, graph_k=6, layers=layers, feature_k=70)  # no truncation
    full = dense_database_gnn_scores(queries, database, 6, layers)
    torch.testing.assert_close(full.gather(1, indices), scores, rtol=0, atol=1e-5)


def test_gnn_rerank_with_index_and_blocks(monkeypatch):
    import xmodal.graph.gnn as gnn

    queries, database = make_inputs(7, 60, 6, "ip", torch.float32, "cpu", seed=14)
    expected = gnn_rerank(queries, database, 8, graph_k=5, metric="ip")
    monkeypatch.setattr(gnn, "SCORE_BLOCK_ELEMENTS", 60 * 2)
    monkeypatch.setattr(gnn, "GNN_BLOCK_ENTRIES", 6 * 64 * 3)
    index = xmodal.FlatIndex(6, "ip")
    ids = torch.arange(60) * 3
    index.add(database, ids=ids)
    scores, got = gnn_rerank(queries, index, 8, graph_k=5)
    torch.testing.assert_close(scores, expected[0])
    assert torch.equal(got, ids[expected[1]])


def test_gnn_rerank_bad_arguments():
    queries, database = make_inputs(3, 20, 4, "cosine", torch.float32, "cpu")
    for kwargs, error, message in [
        (dict(k=21), ValueError, "k = 21 is larger than the 20 rows of database"),
        (dict(graph_k=0), ValueError, "graph_k must be >= 1, got 0"),
        (dict(graph_k=21), ValueError, "graph_k must be <= the 20 rows of database, got 21"),
        (dict(layers=-1), ValueError, "layers must be >= 0, got -1"),
        (dict(layers=1.5), TypeError, "layers must be an int, got float"),
        (dict(metric="sqeuclidean"), ValueError, "got 'sqeuclidean'"),
    ]:
        kwargs = {"k": 2, **kwargs}
        with pytest.raises(error, match=message):
            gnn_rerank(queries, database, kwargs.pop("k"), **kwargs)


def test_gnn_reranker_improves_map_with_truncated_features(manifold):
    queries, database, relevant, raw_map = manifold
    reranker = GNNRerank(database, graph_k=20, layers=3, feature_k=100)
    _, indices = reranker.search(queries, database.shape[0])
    gnn_map = mean_average_precision(indices, relevant)
    assert gnn_map > raw_map + 0.1, (raw_map, gnn_map)
    assert sorted(indices[0].tolist()) == list(range(database.shape[0]))  # every row ranked once


def test_gnn_reranker_with_an_index_answers_its_ids():
    queries, database = make_inputs(6, 50, 8, "cosine", torch.float32, "cpu", seed=22)
    expected = GNNRerank(database, graph_k=4).search(queries, 7)
    index = xmodal.FlatIndex(8, "cosine")
    ids = torch.arange(50) * 5 + 1
    index.add(database, ids=ids)
    scores, got = GNNRerank(index, graph_k=4).search(queries, 7)
    torch.testing.assert_close(scores, expected[0])
    assert torch.equal(got, ids[expected[1]])


def test_gnn_reranker_bad_arguments():
    queries, database = make_inputs(3, 20, 4, "cosine", torch.float32, "cpu")
    for kwargs, error, message in [
        (dict(graph_k=0), ValueError, "graph_k must be >= 1, got 0"),
        (dict(graph_k=21), ValueError, "graph_k must be <= the 20 rows of database, got 21"),
        (dict(layers=-1), ValueError, "layers must be >= 0, got -1"),
        (dict(graph_k=8, feature_k=4), ValueError, "feature_k must be >= graph_k = 8, got 4"),
        (dict(metric="l2"), ValueError, "got 'l2'"),
    ]:
        with pytest.raises(error, match=message):
            GNNRerank(database, **kwargs)
    reranker = GNNRerank(database, graph_k=3)
    with pytest.raises(ValueError, match="k = 21 is larger than the 20 rows of database"):
        reranker.search(queries, 21)
    with pytest.raises(ValueError, match="queries must have the database's 4 columns"):
        reranker.search(torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match="NaN"):
        reranker.search(torch.full((1, 4), float("nan")), 3)
