"""Training a lossy encoding (a codec or a PCA) estimates the recall it keeps on a sample of its training rows, warns
with the figure when it is poor, and keeps the estimate in the index's file."""
import warnings

import pytest
import torch

import xmodal
from xmodal import FlatIndex, IVFIndex
from xmodal.index import LossyEncodingWarning


def _clusters(n, d=64, clusters=40, noise=0.5, seed=0):
    """Isotropic Gaussian clusters: the nearest neighbours of a row are decided by noise spread evenly over every
    dimension, which sign bits and a PCA to few dimensions lose."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    return centres[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)


def _real_recall(index, x, queries):
    index.add(x)
    _, found = index.search(queries, 10)
    return xmodal.metrics.knn_recall(found, xmodal.topk_search(queries, x, 10, index.metric).indices)


@pytest.mark.parametrize("make", [lambda: FlatIndex(64, "cosine", codec="binary", rescore=2),
                                  lambda: IVFIndex(64, 8, "cosine", nprobe=8, reduce_to=8)])
def test_a_collapsing_encoding_warns_with_an_estimate_close_to_the_real_recall(make):
    x, queries = _clusters(6200).split([6000, 200])
    index = make()
    with pytest.warns(LossyEncodingWarning, match=r"estimated recall@10 of 0\.\d+ \(exact search: 1\.0\), measured on "
                                                  r"256 training rows each searched among 5999 others"):
        index.train(x)
    estimate = index.estimated_recall
    assert estimate < 0.9
    assert abs(estimate - _real_recall(index, x, queries)) < 0.1


def test_a_faithful_encoding_is_quiet_and_its_estimate_survives_a_file(tmp_path):
    x = _clusters(6200)[:6000]
    index = FlatIndex(64, "cosine", codec="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyEncodingWarning)
        index.add(x)  # the first add trains
    assert index.estimated_recall >= 0.9
    index.save(tmp_path / "i.xmodal")
    assert FlatIndex.load(tmp_path / "i.xmodal").estimated_recall == index.estimated_recall
    x, queries = _clusters(6200).split([6000, 200])
    assert abs(index.estimated_recall - _real_recall(FlatIndex(64, "cosine", codec="int8"), x, queries)) < 0.05


def test_no_estimate_without_a_lossy_encoding_or_with_few_rows():
    x = _clusters(2000)
    exact = FlatIndex(64, "cosine")
    exact.add(x)
    assert exact.estimated_recall is None
    few = FlatIndex(64, "cosine", codec="int8")
    few.add(x[:999])
    assert few.estimated_recall is None
    again = FlatIndex(64, "cosine", codec="int8")
    again.train(x)
    assert again.estimated_recall is not None
    again.reset()
    again.train(x[:500])  # a retraining without an estimate forgets the old one
    assert again.estimated_recall is None
