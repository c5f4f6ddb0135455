import math

import pytest
import torch

from xmodal import metrics

RANKED = torch.tensor([[3, 1, 4, 1_000, -1], [0, 2, 5, 6, 7], [9, 8, 7, 6, 5]])
RELEVANT = [{1, 4}, {7}, set()]


def test_recall_at_k_hand_computed():
    # query 0 hits at rank 2, query 1 at rank 5, query 2 never
    assert metrics.recall_at_k(RANKED, RELEVANT, 1) == 0.0
    assert metrics.recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)


def test_mean_average_precision_hand_computed():
    # q0: hits at ranks 2 and 3 -> (1/2 + 2/3) / 2; q1: hit at rank 5 -> (1/5) / 1; q2: 0
    expected = ((0.5 + 2 / 3) / 2 + 0.2 + 0.0) / 3
    assert metrics.mean_average_precision(RANKED, RELEVANT) == pytest.approx(expected)
    # cut at k = 2: q0 -> (1/2) / min(2, 2); q1 -> 0
    assert metrics.mean_average_precision(RANKED, RELEVANT, 2) == pytest.approx((0.25 + 0 + 0) / 3)


def test_ndcg_hand_computed():
    d = lambda i: 1 / math.log2(i + 1)  # noqa: E731
    q0 = (d(2) + d(3)) / (d(1) + d(2))
    q1 = d(5) / d(1)
    assert metrics.ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx((q0 + q1 + 0) / 3)
    assert metrics.ndcg_at_k(RANKED, RELEVANT, 1) == 0.0


def test_relevance_forms_agree():
    as_matrix = torch.zeros(3, 10, dtype=torch.bool)
    for q, rel in enumerate(RELEVANT):
        for i in rel:
            as_matrix[q, i] = True
    for fn, args in [(metrics.recall_at_k, (3,)), (metrics.mean_average_precision, (4,)), (metrics.ndcg_at_k, (5,))]:
        assert fn(RANKED, RELEVANT, *args) == pytest.approx(fn(RANKED, as_matrix, *args))
    single = torch.tensor([1, 7, 0])
    assert metrics.recall_at_k(RANKED, single, 5) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(RANKED.numpy(), single.numpy(), 5) == pytest.approx(2 / 3)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"k must be positive, got 0"):
        metrics.recall_at_k(RANKED, RELEVANT, 0)
    with pytest.raises(ValueError, match=r"k = 6 is larger than the 5 results per query"):
        metrics.ndcg_at_k(RANKED, RELEVANT, 6)
    with pytest.raises(ValueError, match=r"relevant must have one entry per query \(3\), got 2"):
        metrics.recall_at_k(RANKED, RELEVANT[:2], 1)
    with pytest.raises(ValueError, match=r"ranked must be 2-D"):
        metrics.recall_at_k(torch.arange(3), RELEVANT, 1)


def test_retrieval_report_both_directions():
    # 3 images, 6 captions (2 each); caption embeddings sit next to their image except caption 5
    images = torch.eye(3, 4)
    captions = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0, 0.1, 0], [0, 1, 0, 0.1], [0.1, 1, 0, 0],
                             [0, 0, 1, 0.2], [1, 0, 0.05, 0]])
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    report = metrics.retrieval_report(images, captions, text_to_image, ks=(1, 2))
    assert report["text_to_image_R@1"] == pytest.approx(5 / 6)
    assert report["text_to_image_R@2"] == pytest.approx(1.0)
    # image 0's nearest caption is caption 5 (which describes image 2); its second is caption 0
    assert report["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert report["image_to_text_R@2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"text_to_image must have one entry per caption \(6\), got 5"):
        metrics.retrieval_report(images, captions, text_to_image[:5])


def test_retrieval_report_rejects_bad_text_to_image():
    images, captions = torch.eye(3, 4), torch.eye(4)[[0, 0, 1, 1, 2, 2]]
    bad = [
        (torch.tensor([0, 0, 1, 3, 2, 2]), r"text_to_image\[3\] = 3 is out of range: with 3 images an image index must "
                                           r"be in \[0, 2\] \(1 of the 6 entries are out of range\)"),
        ([0, -1, 1, 1, 2, 7], r"text_to_image\[1\] = -1 is out of range: .* must be in \[0, 2\] \(2 of the 6"),
        (torch.tensor([0.0, 0, 1, 1, 2, 2.7]), r"text_to_image must hold integer image indices, got dtype "
                                               r"torch.float32"),
        (torch.ones(6, dtype=torch.bool), r"text_to_image must hold integer image indices, got dtype torch.bool"),
        (torch.zeros(6, 1, dtype=torch.int64), r"text_to_image must be 1-D, one image index per caption, got shape "
                                               r"\(6, 1\)"),
        ([0, 1, 2], r"text_to_image must have one entry per caption \(6\), got 3"),
    ]
    for text_to_image, message in bad:
        with pytest.raises(ValueError, match=message):
            metrics.retrieval_report(images, captions, text_to_image)
    np = pytest.importorskip("numpy")
    report = metrics.retrieval_report(images.numpy(), captions.numpy(), np.array([0, 0, 1, 1, 2, 2], dtype=np.int32),
                                      ks=(1, np.int64(2)))
    assert report["text_to_image_R@1"] == 1.0 and set(report) == {"text_to_image_R@1", "image_to_text_R@1",
                                                                  "text_to_image_R@2", "image_to_text_R@2"}


def test_retrieval_report_rejects_bad_embeddings_and_ks():
    images, captions, t2i = torch.eye(3, 4), torch.eye(4)[[0, 1, 2]], [0, 1, 2]
    with pytest.raises(ValueError, match=r"image_embeddings and text_embeddings must have the same dimension D, got 4 "
                                         r"and 3"):
        metrics.retrieval_report(images, captions[:, :3], t2i)
    with pytest.raises(ValueError, match=r"image_embeddings must be 2-D \[N, D\] with N >= 1, got shape \(0, 4\)"):
        metrics.retrieval_report(images[:0], captions, t2i)
    with pytest.raises(ValueError, match=r"text_embeddings must be 2-D \[N, D\] with N >= 1, got shape \(4,\)"):
        metrics.retrieval_report(images, captions[0], [0])
    for ks in [(), (0, 1), (1.5,), 5]:
        with pytest.raises(ValueError, match=r"ks must be a non-empty tuple or list of positive ints, got "):
            metrics.retrieval_report(images, captions, t2i, ks=ks)


def test_knn_recall_hand_computed():
    exact = torch.tensor([[1, 2, 3], [4, 5, -1]])  # the second query has only two exact results
    found = torch.tensor([[3, 9, 1, 7], [5, -1, -1, -1]])
    assert metrics.knn_recall(found, exact) == pytest.approx(3 / 5)
    assert metrics.knn_recall(exact, exact) == 1.0
    assert math.isnan(metrics.knn_recall(found[:1], torch.tensor([[-1, -1, -1]])))
    with pytest.raises(ValueError, match="found and exact must have the same number of queries, got 2 and 1"):
        metrics.knn_recall(found, exact[:1])
