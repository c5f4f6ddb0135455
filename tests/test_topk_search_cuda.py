"""CUDA-only checks of topk_search (the device-parametrised tests in test_topk_search.py cover the rest)."""
import pytest
import torch

import xmodal

from conftest import HAS_CUDA
from search_helpers import assert_topk_close, make_inputs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and CUDA kernels")]


def captured_search(queries, database, k, metric, strategy="auto"):
    """A CUDA graph of one search (captured after warm-up calls on a side stream, as capture requires) and
    the static outputs its replays write."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            xmodal.topk_search(queries, database, k, metric, strategy=strategy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = xmodal.topk_search(queries, database, k, metric, strategy=strategy)
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


# --- every CUDA strategy, forced: a covering set of cases each -------------------------------------------
# Test ids carry "via_<strategy>", so scripts/gpu_check.sh runs one strategy per process with -k via_<name>.
# References are float64 on the GPU through matrix products (search_helpers), once per case. Small tiles
# (settings.cuda_max_tile_rows) make small problems span many tiles, so thresholds, overflows and merges
# all happen; one test keeps production tile sizes.

STRATEGIES = ["tiled", "aten", "filtered", "tensor_core", "fused_scan"]


@pytest.fixture(params=STRATEGIES, ids=[f"via_{s}" for s in STRATEGIES])
def strategy(request):
    with xmodal.settings.override(cuda_max_tile_rows=4096):
        yield request.param


def search_or_skip(queries, database, k, metric, strategy, mask=None):
    """The search with a forced strategy; skips the case where the strategy cannot run it (the planner's
    error says why; test_planner.py checks those errors)."""
    try:
        xmodal.search_plan(queries, database, k, metric, mask=mask, strategy=strategy)
    except RuntimeError as e:
        pytest.skip(str(e).splitlines()[0])
    return xmodal.topk_search(queries, database, k, metric, mask=mask, strategy=strategy)


F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
CASES = [  # (metric, dtype, Q, N, D, k): every metric and dtype, few and many queries, k from 1 to 2048
    ("ip", F32, 1, 100_000, 128, 10), ("ip", BF16, 16, 30_000, 256, 192), ("ip", F16, 300, 40_000, 64, 10),
    ("ip", F64, 3, 9_000, 24, 100), ("ip", BF16, 129, 3_000, 8, 7), ("ip", F32, 5, 9_000, 24, 2048),
    ("cosine", BF16, 1, 50_000, 16, 1), ("cosine", F32, 40, 30_000, 128, 100), ("cosine", F16, 7, 5_000, 36, 20),
    ("l2", F16, 130, 20_000, 200, 1000), ("l2", F32, 4, 3_001, 260, 5), ("l2", BF16, 512, 60_000, 128, 256),
    ("sqeuclidean", F32, 2, 5, 16, 10), ("sqeuclidean", BF16, 64, 20_000, 64, 64),
    ("cosine_distance", F16, 16, 1_000, 512, 1), ("cosine_distance", F32, 300, 10_000, 32, 32),
    ("kl", F32, 129, 3_000, 8, 7), ("kl", BF16, 40, 20_000, 64, 100), ("kl", F64, 1, 10_000, 16, 10),
]


@pytest.mark.parametrize("metric,dtype,q,n,d,k", CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-Q{c[2]}-N{c[3]}-D{c[4]}-k{c[5]}" for c in CASES])
def test_strategy_matches_reference(strategy, metric, dtype, q, n, d, k):
    queries, database = make_inputs(q, n, d, metric, dtype, "cuda", seed=21)
    values, indices = search_or_skip(queries, database, k, metric, strategy)
    assert_topk_close(values, indices, queries, database, k, metric)


def test_strategy_ties_mask_nan(strategy):
    base = make_inputs(1, 500, 32, "ip", F32, "cpu", seed=33)[1]
    database = base.repeat(40, 1)  # every row 40 times: thresholds equal to many keys
    database[123] = float("nan")
    for dtype in (F32, BF16):
        db = database.to(dtype).cuda()
        queries = make_inputs(12, 1, 32, "ip", dtype, "cuda", seed=34)[0]
        sparse = torch.zeros(db.shape[0], dtype=torch.bool, device="cuda")
        sparse[::401] = True  # 50 rows for k = 100: thresholds stay unset, results are padded
        dense = torch.rand(db.shape[0], device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) < 0.7
        for m, k in ((None, 64), (dense, 64), (sparse, 100)):
            values, indices = search_or_skip(queries, db, k, "ip", strategy, mask=m)
            assert_topk_close(values, indices, queries, db, k, "ip", mask=m)
            # the custom kernels resolve a tie at rank k to the smaller index, as the CPU does; "aten" is
            # torch.topk's selection, whose choice among tied keys is unspecified
            if strategy != "aten":
                cpu_i = xmodal.topk_search(queries.cpu(), db.cpu(), k, "ip", mask=None if m is None else m.cpu())[1]
                assert torch.equal(indices.cpu().sort(1).values, cpu_i.sort(1).values)


def test_strategy_overflow_falls_back_to_the_whole_tile(strategy):
    # scores rise with the row index, so every later tile beats every threshold: each candidate buffer
    # overflows and the merge must select over the whole tile
    g = torch.Generator().manual_seed(32)
    direction = torch.randn(64, generator=g, dtype=F64)
    scale = torch.linspace(0.1, 10.0, 30_000, dtype=F64)[:, None]
    noise = 1e-3 * torch.randn(30_000, 64, generator=g, dtype=F64)
    for dtype in (F32, BF16):
        database = (scale * direction + noise).to(dtype).cuda()
        queries = torch.stack([direction, -direction, torch.randn(64, generator=g, dtype=F64)]).to(dtype).cuda()
        for k in (5, 150):
            values, indices = search_or_skip(queries, database, k, "ip", strategy)
            assert_topk_close(values, indices, queries, database, k, "ip")


def test_strategy_k_above_n_and_identical_rows(strategy):
    queries, database = make_inputs(3, 100, 16, "l2", F32, "cuda", seed=35)
    values, indices = search_or_skip(queries, database, 150, "l2", strategy)
    assert_topk_close(values, indices, queries, database, 150, "l2")
    assert (indices[:, 100:] == -1).all() and (values[:, 100:] == float("inf")).all()
    ones = torch.ones(20_000, 16, device="cuda", dtype=BF16)
    values, indices = search_or_skip(torch.ones(8, 16, device="cuda", dtype=BF16), ones, 50, "ip", strategy)
    assert (values == 16).all() and all(row.unique().numel() == 50 for row in indices.cpu())


def test_strategy_non_contiguous_inputs(strategy):
    queries, database = make_inputs(12, 20_000, 64, "cosine", BF16, "cuda", seed=36)
    q_nc, db_nc = queries.t().contiguous().t(), database[::2]
    values, indices = search_or_skip(q_nc, db_nc, 20, "cosine", strategy)
    assert_topk_close(values, indices, q_nc, db_nc, 20, "cosine")


def test_strategy_under_graph_capture(strategy):
    queries, database = make_inputs(12, 20_000, 64, "l2", BF16, "cuda", seed=37)
    expected = search_or_skip(queries, database, 10, "l2", strategy)
    graph, out = captured_search(queries, database, 10, "l2", strategy=strategy)
    for _ in range(2):  # replays start from fresh state
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out[0], expected[0])


@pytest.mark.parametrize("s", ["tiled", "filtered", "tensor_core"], ids=lambda s: f"via_{s}")
def test_strategy_production_tiles(s):
    # tile sizes as chosen in production (growing after the first tile)
    queries, database = make_inputs(512, 300_000, 128, "ip", BF16, "cuda", seed=38)
    for k in (10, 256):
        values, indices = xmodal.topk_search(queries, database, k, "ip", strategy=s)
        assert_topk_close(values, indices, queries, database, k, "ip")
