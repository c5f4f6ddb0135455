"""pytest-benchmark suite for topk_search: xmodal, naive PyTorch and faiss-cpu on the same data, grouped
per case so the report shows them side by side. Not part of the default test run:

    python -m pytest benchmarks/test_bench_search.py --benchmark-only --benchmark-json=out.json

(`xmodal bench search` runs the same comparison and prints the ratios.)
"""
import pytest
import torch

import xmodal
from xmodal.bench import SearchCase, faiss_index, make_data, naive_search, search_grid

CPU_CASES = search_grid(device="cpu")
CUDA_CASES = [SearchCase(q, 1_000_000, d, k, dt) for dt in ("float32", "bfloat16") for d in (128, 512)
              for q in (1, 16, 256, 4096) for k in (10, 100)]

_data_cache = {}


def _data(case, device):
    key = (case, device)
    if key not in _data_cache:
        _data_cache.clear()
        _data_cache[key] = make_data(case, device)
    return _data_cache[key]


def _extra(benchmark, case):
    flops = 2 * case.q * case.n * case.d
    nbytes = case.n * case.d * torch.tensor([], dtype=case.torch_dtype).element_size()
    benchmark.extra_info.update(case=case.name, flop=flops, database_bytes=nbytes)


def _run(benchmark, fn, device):
    if device == "cuda":
        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out
        return benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    return benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name.replace(" ", "_"))
@pytest.mark.parametrize("impl", ["xmodal", "naive", "faiss"])
def test_search_cpu(benchmark, case, impl):
    queries, database = _data(case, "cpu")
    benchmark.group = case.name
    _extra(benchmark, case)
    if impl == "xmodal":
        _run(benchmark, lambda: xmodal.topk_search(queries, database, case.k, case.metric), "cpu")
    elif impl == "naive":
        _run(benchmark, lambda: naive_search(queries, database, case.k, case.metric), "cpu")
    else:
        index = faiss_index(database, case.metric)
        if index is None:
            pytest.skip("faiss-cpu not installed")
        qn = queries.float().numpy()
        _run(benchmark, lambda: index.search(qn, case.k), "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name.replace(" ", "_"))
@pytest.mark.parametrize("impl", ["xmodal", "naive"])
def test_search_cuda(benchmark, case, impl):
    queries, database = _data(case, "cuda")
    benchmark.group = case.name + " cuda"
    _extra(benchmark, case)
    if impl == "xmodal":
        _run(benchmark, lambda: xmodal.topk_search(queries, database, case.k, case.metric), "cuda")
    else:
        _run(benchmark, lambda: naive_search(queries, database, case.k, case.metric), "cuda")
