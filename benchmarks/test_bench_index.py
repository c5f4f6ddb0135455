"""pytest-benchmark suite for the indexes: add and search throughput of FlatIndex and IVFIndex, with
faiss-cpu's IndexFlatIP / IndexIVFFlat on the same data when installed. Not part of the default run:

    python -m pytest benchmarks/test_bench_index.py --benchmark-only

Throughput (vectors/s for add, queries/s for search) is in each result's extra_info.
"""
import pytest
import torch

import xmodal

N, D, NLIST, QUERIES, K = 200_000, 128, 256, 1000, 10


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(100, D, generator=g) * 3
    x = centres[torch.randint(0, 100, (N,), generator=g)] + torch.randn(N, D, generator=g)
    q = centres[torch.randint(0, 100, (QUERIES,), generator=g)] + torch.randn(QUERIES, D, generator=g)
    return torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(q, dim=1)


@pytest.fixture(scope="module")
def trained_ivf(data):
    x, _ = data
    index = xmodal.IVFIndex(D, NLIST, "ip")
    index.train(x)
    return index


def _faiss():
    return pytest.importorskip("faiss")


@pytest.mark.parametrize("impl", ["xmodal", "faiss"])
def test_flat_add(benchmark, data, impl):
    x, _ = data
    benchmark.group = "flat add"
    if impl == "xmodal":
        def add():
            index = xmodal.FlatIndex(D, "ip")
            index.add(x)
    else:
        faiss = _faiss()

        def add():
            faiss.IndexFlatIP(D).add(x.numpy())
    benchmark.pedantic(add, rounds=3, warmup_rounds=1)
    benchmark.extra_info["vectors_per_s"] = N / benchmark.stats["median"]


@pytest.mark.parametrize("impl", ["xmodal", "faiss"])
def test_flat_search(benchmark, data, impl):
    x, q = data
    benchmark.group = "flat search"
    if impl == "xmodal":
        index = xmodal.FlatIndex(D, "ip")
        index.add(x)
        benchmark.pedantic(lambda: index.search(q, K), rounds=3, warmup_rounds=1)
    else:
        faiss = _faiss()
        index = faiss.IndexFlatIP(D)
        index.add(x.numpy())
        qn = q.numpy()
        benchmark.pedantic(lambda: index.search(qn, K), rounds=3, warmup_rounds=1)
    benchmark.extra_info["queries_per_s"] = QUERIES / benchmark.stats["median"]


@pytest.mark.parametrize("impl", ["xmodal", "faiss"])
def test_ivf_add(benchmark, data, trained_ivf, impl):
    x, _ = data
    benchmark.group = "ivf add"
    if impl == "xmodal":
        def add():
            trained_ivf.reset()
            trained_ivf.add(x)
    else:
        faiss = _faiss()
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, NLIST, faiss.METRIC_INNER_PRODUCT)
        index.train(x.numpy())

        def add():
            index.reset()
            index.add(x.numpy())
    benchmark.pedantic(add, rounds=3, warmup_rounds=1)
    benchmark.extra_info["vectors_per_s"] = N / benchmark.stats["median"]


@pytest.mark.parametrize("nprobe", [1, 8])
@pytest.mark.parametrize("impl", ["xmodal", "faiss"])
def test_ivf_search(benchmark, data, trained_ivf, impl, nprobe):
    x, q = data
    benchmark.group = f"ivf search nprobe={nprobe}"
    if impl == "xmodal":
        if len(trained_ivf) != N:
            trained_ivf.reset()
            trained_ivf.add(x)
        benchmark.pedantic(lambda: trained_ivf.search(q, K, nprobe=nprobe), rounds=3, warmup_rounds=1)
    else:
        faiss = _faiss()
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, NLIST, faiss.METRIC_INNER_PRODUCT)
        index.train(x.numpy())
        index.add(x.numpy())
        index.nprobe = nprobe
        qn = q.numpy()
        benchmark.pedantic(lambda: index.search(qn, K), rounds=3, warmup_rounds=1)
    benchmark.extra_info["queries_per_s"] = QUERIES / benchmark.stats["median"]
