"""Every entry point that searches accepts inputs that require grad, whatever the grad mode and thread count.

ATen calls inside the CPU kernels' worker threads once ran with the threads' default state (grad mode on),
so a search on tensors with requires_grad=True failed on 2+ threads even inside torch.no_grad().
"""
import contextlib

import pytest
import torch

import xmodal
from xmodal import reference
from xmodal import FlatIndex, IVFIndex, metrics

GRAD_MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2", "kl"])
def test_topk_search(threads, mode, metric):
    queries, database = _leaf(5, 16, seed=1), _leaf(3000, 16, seed=2)
    if metric == "kl":
        queries = torch.softmax(queries.detach(), 1).requires_grad_()
        database = torch.softmax(database.detach(), 1).requires_grad_()
    with GRAD_MODES[mode]():
        values, indices = xmodal.topk_search(queries, database, 4, metric)
        one_v, one_i = xmodal.topk_search(queries[0], database, 4, metric)  # the one-query (GEMV) path
    ref_v, ref_i = reference.topk_search(queries.detach(), database.detach(), 4, metric)
    torch.testing.assert_close(values.detach(), ref_v.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(indices, ref_i) and torch.equal(one_i, ref_i[0])


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_flat_index_search(threads, mode):
    index = FlatIndex(16, "cosine")
    index.add(_leaf(2000, 16, seed=3))
    queries = _leaf(3, 16, seed=4)
    with GRAD_MODES[mode]():
        scores, ids = index.search(queries, 5)
    assert ids.shape == (3, 5) and torch.isfinite(scores).all()


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_index_search(threads, mode, metric):
    rows = _leaf(4000, 16, seed=5)
    index = IVFIndex(16, nlist=8, metric=metric, nprobe=4)
    index.train(rows)
    index.add(rows)
    queries = _leaf(6, 16, seed=6)
    with GRAD_MODES[mode]():
        scores, ids = index.search(queries, 5)
    exact = FlatIndex(16, metric)
    exact.add(rows.detach())
    assert ids.shape == (6, 5) and torch.isfinite(scores).all()
    with GRAD_MODES[mode]():
        scores, ids = index.search(queries, 5, nprobe=8)  # every list: exact
    assert torch.equal(ids, exact.search(queries.detach(), 5)[1])


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_retrieval_report(threads, mode):
    images, texts = _leaf(300, 16, seed=7), _leaf(900, 16, seed=8)
    with GRAD_MODES[mode]():
        report = metrics.retrieval_report(images, texts, torch.arange(900) // 3)
    assert all(0 <= v <= 1 for v in report.values())
