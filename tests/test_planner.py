"""The search planner: its decisions for a table of machines and shapes (a pure function of explicit facts),
forced strategies that cannot run, and every CPU path against the reference."""
import math

import pytest
import torch

import xmodal
from xmodal import _C
from xmodal.ops import SEARCH_METRICS

from search_helpers import assert_topk_close, make_inputs

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def plan(cpu="avx2", dtype=F32, metric="ip", Q=1, N=200_000, D=512, k=10, cuda=False, cc=9, mkl=True,
         aligned=True, strategy="auto"):
    return _C.plan_for(cuda, cc, cpu, mkl, dtype, metric, Q, N, D, k, aligned, strategy)


DECISIONS = [
    # (facts, what the plan must say)
    (dict(cpu="amx", dtype=BF16, Q=256), "MKL's 16-bit GEMM"),
    (dict(cpu="amx", dtype=BF16, Q=1), "one-pass scan, AVX512-BF16"),  # a few queries: native bf16 products
    (dict(cpu="amx", dtype=BF16, Q=3, D=128), "one-pass scan, AVX512-BF16"),
    (dict(cpu="amx", dtype=BF16, Q=4, D=128), "one-pass scan, AMX"),  # the tile unit at memory speed
    (dict(cpu="amx", dtype=BF16, Q=16), "one-pass scan, AMX"),
    (dict(cpu="amx", dtype=BF16, Q=16, D=100), "MKL's 16-bit GEMM"),  # the AMX scan needs D % 32 == 0
    (dict(cpu="amx", dtype=BF16, Q=8, D=100), "one-pass scan, AVX512-BF16"),
    (dict(cpu="amx", dtype=BF16, Q=17), "MKL's 16-bit GEMM"),
    (dict(cpu="amx", dtype=F16, Q=16), "one-pass scan, AVX-512"),  # (no AMX fp16 GEMM in MKL there)
    (dict(cpu="amx", dtype=BF16, Q=256, mkl=False), "widened to fp32"),  # a torch build without MKL's GEMM
    (dict(cpu="avx512_bf16", dtype=BF16, Q=256), "ATen's 16-bit GEMM"),
    (dict(cpu="avx512_bf16", dtype=BF16, Q=16), "one-pass scan, AVX512-BF16"),
    (dict(cpu="avx512_bf16", dtype=F16, Q=256), "widened to fp32"),  # no native fp16 dot products
    (dict(cpu="avx512", dtype=BF16, Q=256), "widened to fp32"),
    (dict(cpu="avx512", dtype=BF16, Q=4), "one-pass scan, AVX-512"),
    (dict(cpu="avx2", dtype=BF16, Q=1), "one-pass scan, AVX2"),
    (dict(cpu="avx2", dtype=BF16, Q=17), "widened to fp32"),
    (dict(cpu="avx2", dtype=F16, Q=1024), "widened to fp32"),
    (dict(cpu="avx2", dtype=F32, Q=16, D=128), "one-pass scan, AVX2"),
    (dict(cpu="avx2", dtype=F32, Q=8), "one-pass scan, AVX2"),
    (dict(cpu="avx2", dtype=F32, Q=9), "BLAS GEMM"),  # wide fp32 rows: BLAS from 9 queries on
    (dict(cpu="avx2", dtype=BF16, Q=16), "one-pass scan, AVX2"),
    (dict(cpu="avx2", dtype=F32, Q=256), "BLAS GEMM"),
    (dict(cpu="arm", dtype=F16, Q=2), "one-pass scan, portable"),
    (dict(cpu="arm", dtype=BF16, Q=64), "widened to fp32"),
    (dict(cpu="avx2", dtype=F64, Q=1), "BLAS GEMM"),  # the scan is fp32
    (dict(cpu="avx2", dtype=BF16, Q=1, metric="kl"), "BLAS GEMM"),  # kl multiplies log(d) in fp32
    (dict(cpu="avx2", dtype=F32, Q=1, strategy="aten"), "aten"),
    # CUDA: no custom kernel is verified on a GPU yet, so "auto" runs naive's own GEMM and top-k in tiles
    (dict(cuda=True, dtype=BF16, Q=1), "aten"),
    (dict(cuda=True, dtype=F32, Q=4096, k=100), "aten"),
    (dict(cuda=True, dtype=BF16, Q=256, strategy="tensor_core"), "tensor_core"),
    (dict(cuda=True, dtype=F32, Q=8, k=10, strategy="fused_scan"), "fused_scan"),
    (dict(cuda=True, dtype=F32, Q=8, strategy="tiled"), "tiled"),
]


@pytest.mark.parametrize("facts, expected", DECISIONS, ids=[str(i) for i in range(len(DECISIONS))])
def test_decisions(facts, expected):
    assert expected in plan(**facts)


def test_tile_sizes():
    assert "16384 KiB tiles" in plan(cpu="avx2", dtype=F32, Q=1)
    assert "512 KiB tiles" in plan(cpu="avx2", dtype=F32, Q=256)
    assert "256 KiB tiles" in plan(cpu="avx2", dtype=BF16, Q=256)  # widened tiles stay in L2
    assert "2048 KiB tiles" in plan(cpu="avx512_bf16", dtype=BF16, Q=256, D=512)  # 2048 rows for oneDNN


FORCED_ERRORS = [
    (dict(strategy="fused_scan"), "strategy 'fused_scan' cannot run this search: it runs on CUDA tensors only"),
    (dict(strategy="filtered"), "strategy 'filtered' cannot run this search: it runs on CUDA tensors only"),
    (dict(cuda=True, dtype=F32, strategy="tensor_core"), "it needs float16 or bfloat16 inputs, got Float"),
    (dict(cuda=True, cc=7, dtype=BF16, strategy="tensor_core"), "it needs compute capability 8.0 or newer"),
    (dict(cuda=True, dtype=BF16, D=100, strategy="tensor_core"), "D a multiple of 8, got D = 100"),
    (dict(cuda=True, dtype=BF16, aligned=False, strategy="tensor_core"), "16-byte aligned rows"),
    (dict(cuda=True, dtype=BF16, k=4096, strategy="filtered"), "it supports k <= 2048, got k = 4096"),
    (dict(cuda=True, Q=17, strategy="fused_scan"), "it supports up to 16 queries, got 17"),
    (dict(cuda=True, k=193, strategy="fused_scan"), "it supports k <= 192, got k = 193"),
    (dict(cuda=True, metric="kl", strategy="fused_scan"), "it does not support metric 'kl'"),
    (dict(cuda=True, dtype=F64, strategy="fused_scan"), "it does not support float64"),
    (dict(strategy="fastest"), "strategy must be one of 'auto', 'tiled', 'aten', 'filtered', 'tensor_core', "
                               "'fused_scan', got 'fastest'"),
]


@pytest.mark.parametrize("facts, message", FORCED_ERRORS, ids=[str(i) for i in range(len(FORCED_ERRORS))])
def test_forced_strategies_that_cannot_run(facts, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(**facts)


def test_search_plan_and_errors_on_real_tensors():
    q, x = torch.randn(2, 16), torch.randn(100, 16)
    assert xmodal.search_plan(q, x, 5, "ip").startswith("tiled (")
    assert xmodal.search_plan(q, x, 5, "ip", strategy="aten") == "aten"
    with pytest.raises(RuntimeError, match="strategy 'tensor_core' cannot run this search: it runs on CUDA tensors only"):
        xmodal.topk_search(q, x, 5, strategy="tensor_core")
    with pytest.raises(TypeError, match="strategy must be a str, got int"):
        xmodal.topk_search(q, x, 5, strategy=1)


def test_settings():
    before = xmodal.settings.get()
    with xmodal.settings.override(cpu_tile_gemm="widen", cpu_tile_kib=64):
        assert xmodal.settings.get()["cpu_tile_gemm"] == "widen"
        assert "64 KiB tiles" in xmodal.search_plan(torch.randn(300, 8).bfloat16(), torch.randn(50, 8).bfloat16(), 3)
    assert xmodal.settings.get() == before
    with pytest.raises(ValueError, match="cpu_tile_gemm must be one of"):
        xmodal.settings.set(cpu_tile_gemm="fast")
    with pytest.raises(ValueError, match="unknown setting 'tile'"):
        xmodal.settings.set(tile=3)
    with pytest.raises(ValueError, match=r"cuda_max_tile_rows must be in \[0, 9223372036854775807\], got -1"):
        xmodal.settings.set(cuda_max_tile_rows=-1)
    with pytest.raises(TypeError, match="cpu_tile_kib must be an int, got float"):
        xmodal.settings.set(cpu_tile_kib=1.5)


# --- every CPU path gives the reference answer ---------------------------------------------------------------

CPU_PATHS = [("aten", "auto")] + [("tiled", g) for g in ("auto", "blas", "mkl16", "widen", "aten16", "scan")]


@pytest.fixture(params=CPU_PATHS, ids=[f"{s}-{g}" for s, g in CPU_PATHS])
def cpu_path(request):
    strategy, gemm = request.param
    with xmodal.settings.override(cpu_tile_gemm=gemm, cpu_tile_kib=16):  # small tiles: many per call
        yield strategy


@pytest.mark.parametrize("metric", list(SEARCH_METRICS))
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
# D = 64 and 96 (multiples of 32) with 4 to 16 queries take the AMX scan on CPUs with AMX
@pytest.mark.parametrize("shape", [(1, 700, 45, 5), (5, 700, 16, 7), (40, 300, 20, 12), (3, 10, 4, 20), (5, 700, 64, 7),
                                   (16, 1000, 96, 10)])
def test_every_cpu_path_matches_the_reference(cpu_path, metric, dtype, shape):
    q, n, d, k = shape
    queries, database = make_inputs(q, n, d, metric, dtype, "cpu", seed=q + n)
    values, indices = xmodal.topk_search(queries, database, k, metric, strategy=cpu_path)
    assert_topk_close(values, indices, queries, database, k, metric)


@pytest.mark.parametrize("metric", list(SEARCH_METRICS))
@pytest.mark.parametrize("dtype, d", [(F32, 12), (BF16, 64)], ids=["f32", "bf16"])  # bf16, D = 64: the AMX scan
def test_every_cpu_path_edge_cases(cpu_path, metric, dtype, d):
    queries, database = make_inputs(6, 400, d, metric, dtype, "cpu", seed=9)
    database = database.clone()
    database[[3, 77]] = float("nan")
    mask = torch.arange(400) % 3 != 1
    # a mask, NaN rows, and k > candidates (padding)
    values, indices = xmodal.topk_search(queries, database, 300, metric, mask=mask, strategy=cpu_path)
    assert_topk_close(values, indices, queries, database, 300, metric, mask=mask)
    assert (indices[:, -33:] == -1).all()
    # NaN rows come after every number, as candidates
    values, indices = xmodal.topk_search(queries, database, 400, metric, strategy=cpu_path)
    assert set(indices[0, -2:].tolist()) == {3, 77} and torch.isnan(values[:, -2:]).all()
    # non-contiguous inputs, a 1-D query
    values, indices = xmodal.topk_search(queries[::2], database[::3], 5, metric, strategy=cpu_path)
    assert_topk_close(values, indices, queries[::2], database[::3], 5, metric)
    values, indices = xmodal.topk_search(queries[0], database, 5, metric, strategy=cpu_path)
    assert values.shape == (5,)
    # identical rows: all copies of the best come first
    base = make_inputs(1, 40, 8, metric, F64, "cpu", seed=3)[1]
    q = make_inputs(4, 1, 8, metric, F64, "cpu", seed=4)[0]
    values, indices = xmodal.topk_search(q, base.repeat(5, 1), 5, metric, strategy=cpu_path)
    assert (indices % 40 == indices[:, :1] % 40).all()


def test_aten_masks_keep_candidates_whose_score_is_infinite():
    # kl gives +inf where d_i = 0 < q_i; with a mask leaving few rows, those rows are still candidates
    q = torch.tensor([[0.5, 0.5, 0.0]])
    x = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([True, True, False, True])
    values, indices = xmodal.topk_search(q, x, 4, "kl", mask=mask, strategy="aten")
    assert indices[0, 0].item() == 1 and set(indices[0, 1:3].tolist()) == {0, 3} and indices[0, 3].item() == -1
    assert values[0, 1].item() == math.inf and values[0, 3].item() == math.inf
