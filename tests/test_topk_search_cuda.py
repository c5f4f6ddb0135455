"""CUDA-only checks of topk_search (the device-parametrised tests in test_topk_search.py cover the rest)."""
import pytest
import torch

import xmodal

from conftest import HAS_CUDA
from search_helpers import assert_topk_close, make_inputs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and CUDA kernels")]


def captured_search(queries, database, k, metric):
    """A CUDA graph of one search (captured after warm-up calls on a side stream, as capture requires) and
    the static outputs its replays write."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            xmodal.topk_search(queries, database, k, metric)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = xmodal.topk_search(queries, database, k, metric)
    return graph, out


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_kernel_on_a_larger_problem(metric, dtype):
    queries, database = make_inputs(40, 50_000, 64, metric, dtype, "cpu", seed=11)
    v_cpu, i_cpu = xmodal.topk_search(queries, database, 32, metric)
    v_gpu, i_gpu = xmodal.topk_search(queries.cuda(), database.cuda(), 32, metric)
    assert v_gpu.is_cuda and i_gpu.is_cuda
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(v_gpu.cpu().float(), v_cpu.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("k", [1, 10, 100, 1024, 2048, 5000])
def test_cuda_large_k(k):
    queries, database = make_inputs(3, 20_000, 16, "ip", torch.float32, "cuda", seed=12)
    values, indices = xmodal.topk_search(queries, database, k, "ip")
    assert_topk_close(values, indices, queries, database, k, "ip")


def test_cuda_graph_capture():
    queries, database = make_inputs(8, 3000, 32, "cosine", torch.float32, "cuda", seed=13)
    expected = xmodal.topk_search(queries, database, 10, "cosine")
    static_q = queries.clone()
    graph, (out_v, out_i) = captured_search(static_q, database, 10, "cosine")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_v, expected[0])
    assert torch.equal(out_i, expected[1])
    # new queries copied into the static input give new answers on replay
    new_q = make_inputs(8, 1, 32, "cosine", torch.float32, "cuda", seed=14)[0]
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    ref_v, ref_i = xmodal.topk_search(new_q, database, 10, "cosine")
    torch.testing.assert_close(out_v, ref_v)


def test_cuda_runs_on_the_current_stream_and_device_guard():
    queries, database = make_inputs(4, 1000, 8, "l2", torch.float32, "cuda", seed=15)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        values, indices = xmodal.topk_search(queries, database, 5, "l2")
    stream.synchronize()
    assert_topk_close(values, indices, queries, database, 5, "l2")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_cuda_many_queries_single_stage(metric):
    # enough queries that each gets one block (no segment split)
    queries, database = make_inputs(700, 5000, 16, metric, torch.float32, "cuda", seed=16)
    values, indices = xmodal.topk_search(queries, database, 20, metric)
    assert_topk_close(values, indices, queries, database, 20, metric)


@pytest.mark.parametrize("q,n,k", [(1, 100_000, 10), (2, 50_000, 1000), (5, 30_000, 3000), (1, 3000, 2048)])
def test_cuda_few_queries_split_over_blocks(q, n, k):
    queries, database = make_inputs(q, n, 16, "ip", torch.float32, "cuda", seed=17)
    mask = torch.rand(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)) < 0.9
    values, indices = xmodal.topk_search(queries, database, k, "ip", mask=mask)
    assert_topk_close(values, indices, queries, database, k, "ip", mask=mask)


# --- the fused few-query scan (opt-in with XMODAL_CUDA_FUSED_SCAN=1 until verified on a GPU) ------------


@pytest.fixture
def fused_scan(monkeypatch):
    monkeypatch.setenv("XMODAL_CUDA_FUSED_SCAN", "1")


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2", "sqeuclidean", "cosine_distance"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q,n,d,k", [(1, 100_000, 128, 10), (3, 50_000, 64, 100), (16, 30_000, 256, 192), (5, 70, 8, 64),
                                     (16, 1000, 512, 1), (2, 5, 16, 10), (7, 5000, 36, 20), (4, 3001, 260, 5)])
def test_fused_scan_matches_reference(fused_scan, metric, dtype, q, n, d, k):
    queries, database = make_inputs(q, n, d, metric, dtype, "cuda", seed=21)
    values, indices = xmodal.topk_search(queries, database, k, metric)
    assert_topk_close(values, indices, queries, database, k, metric)


def test_fused_scan_mask_ties_nan(fused_scan):
    base = make_inputs(1, 400, 32, "ip", torch.float32, "cpu", seed=22)[1]
    database = base.repeat(3, 1)  # ties: every row three times
    database[7] = float("nan")
    database = database.cuda()
    queries = make_inputs(4, 1, 32, "ip", torch.float32, "cuda", seed=23)[0]
    mask = torch.rand(database.shape[0], device="cuda") < 0.6
    for m in (None, mask):
        values, indices = xmodal.topk_search(queries, database, 50, "ip", mask=m)
        assert_topk_close(values, indices, queries, database, 50, "ip", mask=m)
        if m is not None:
            assert m[indices[indices >= 0]].all()


def test_fused_scan_under_graph_capture(fused_scan):
    queries, database = make_inputs(2, 20_000, 128, "cosine", torch.bfloat16, "cuda", seed=24)
    expected = xmodal.topk_search(queries, database, 10, "cosine")
    graph, out = captured_search(queries, database, 10, "cosine")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[0], expected[0])


# --- threshold-filtered tile selection (XMODAL_CUDA_FILTER_SELECT=1) and the fused tensor-core tile kernel
# (XMODAL_CUDA_FUSED_GEMM=1, 16-bit inputs; other dtypes take the filtered path): opt-in until verified.
# XMODAL_CUDA_TILE_ROWS=4096 makes small problems span many tiles, so thresholds, overflows and merges
# all happen.


# param ids name the path, so `-k score_tiles` / `-k mma_tiles` (scripts/gpu_check.sh) pick one
@pytest.fixture(params=["score_tiles", "mma_tiles"])
def filtered(request, monkeypatch):
    monkeypatch.setenv("XMODAL_CUDA_FILTER_SELECT" if request.param == "score_tiles" else "XMODAL_CUDA_FUSED_GEMM", "1")
    monkeypatch.setenv("XMODAL_CUDA_TILE_ROWS", "4096")
    return request.param


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2", "sqeuclidean", "cosine_distance", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("q,n,d,k", [(300, 40_000, 64, 10), (40, 30_000, 128, 100), (130, 20_000, 200, 1000),
                                     (5, 9000, 24, 2048), (1, 50_000, 16, 1), (129, 3000, 8, 7)])
def test_filtered_selection_matches_reference(filtered, metric, dtype, q, n, d, k):
    queries, database = make_inputs(q, n, d, metric, dtype, "cuda", seed=31)
    values, indices = xmodal.topk_search(queries, database, k, metric)
    assert_topk_close(values, indices, queries, database, k, metric)


def test_filtered_selection_overflow_falls_back_to_the_whole_tile(filtered):
    # scores rise with the row index, so every later tile beats every threshold: each buffer overflows and
    # the merge must select over the whole tile (recomputing scores in the fused case)
    g = torch.Generator().manual_seed(32)
    direction = torch.randn(64, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.1, 10.0, 30_000, dtype=torch.float64)[:, None]
    noise = 1e-3 * torch.randn(30_000, 64, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        database = (scale * direction + noise).to(dtype).cuda()
        queries = torch.stack([direction, -direction, torch.randn(64, generator=g, dtype=torch.float64)]).to(dtype).cuda()
        for k in (5, 600):
            values, indices = xmodal.topk_search(queries, database, k, "ip")
            assert_topk_close(values, indices, queries, database, k, "ip")


def test_filtered_selection_ties_mask_nan(filtered):
    base = make_inputs(1, 500, 32, "ip", torch.float32, "cpu", seed=33)[1]
    database = base.repeat(40, 1)  # every row 40 times: thresholds equal to many keys
    database[123] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        db = database.to(dtype).cuda()
        queries = make_inputs(70, 1, 32, "ip", dtype, "cuda", seed=34)[0]
        sparse = torch.zeros(db.shape[0], dtype=torch.bool, device="cuda")
        sparse[::401] = True  # 50 rows for k = 100: thresholds stay unset, results are padded
        dense = torch.rand(db.shape[0], device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) < 0.7
        for m, k in ((None, 64), (dense, 64), (sparse, 100)):
            values, indices = xmodal.topk_search(queries, db, k, "ip", mask=m)
            assert_topk_close(values, indices, queries, db, k, "ip", mask=m)


def test_filtered_selection_identical_rows(filtered):
    database = torch.ones(20_000, 16, device="cuda", dtype=torch.bfloat16)
    queries = torch.ones(200, 16, device="cuda", dtype=torch.bfloat16)
    values, indices = xmodal.topk_search(queries, database, 50, "ip")
    assert (values == 16).all()
    assert all(row.unique().numel() == 50 for row in indices.cpu())


def test_filtered_selection_non_contiguous_inputs(filtered):
    queries, database = make_inputs(150, 20_000, 64, "cosine", torch.bfloat16, "cuda", seed=35)
    q_nc = queries.t().contiguous().t()  # same values, column-major
    db_nc = database[::2]
    values, indices = xmodal.topk_search(q_nc, db_nc, 20, "cosine")
    assert_topk_close(values, indices, q_nc, db_nc, 20, "cosine")


def test_filtered_selection_large_batch_default_tiles_mma_tiles(monkeypatch):
    # tile sizes as chosen in production (growing after the first tile)
    monkeypatch.setenv("XMODAL_CUDA_FUSED_GEMM", "1")
    queries, database = make_inputs(512, 300_000, 128, "ip", torch.bfloat16, "cuda", seed=36)
    for k in (10, 256):
        values, indices = xmodal.topk_search(queries, database, k, "ip")
        assert_topk_close(values, indices, queries, database, k, "ip")


def test_filtered_selection_under_graph_capture(filtered):
    queries, database = make_inputs(300, 20_000, 64, "l2", torch.bfloat16, "cuda", seed=37)
    expected = xmodal.topk_search(queries, database, 10, "l2")
    graph, out = captured_search(queries, database, 10, "l2")
    for _ in range(2):  # replays start from fresh thresholds
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out[0], expected[0])
