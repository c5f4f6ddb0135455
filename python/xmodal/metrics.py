"""Retrieval metrics for multi-positive ground truth (e.g. five captions per image), and the top-k metrics of
recommender evaluations (RecBole's Recall, MRR, NDCG, Hit, Precision: :func:`recommendation_report`).

``ranked`` is a ``[Q, K]`` array of retrieved ids, best first (``-1`` = no result, as topk_search pads).
``relevant`` says which ids are right for each query, as either
  - a sequence of Q iterables of ids (``[{3}, {0, 7}, ...]``), or
  - a bool ``[Q, N]`` tensor/array (``relevant[q, id]``), or
  - a ``[Q]`` integer tensor/array: exactly one relevant id per query.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Sequence, Set, Union

import torch
from torch import Tensor

Relevant = Union[Sequence, Tensor]


def _as_ranked(ranked) -> Tensor:
    r = torch.as_tensor(ranked)
    if r.dim() != 2:
        raise ValueError(f"ranked must be 2-D [Q, K] ids, got shape {tuple(r.shape)}")
    return r.to(torch.int64).cpu()


def _relevance(ranked: Tensor, relevant: Relevant) -> tuple[Tensor, Tensor]:
    """hits[q, j] = ranked[q, j] is relevant; counts[q] = number of relevant ids of query q."""
    q = ranked.shape[0]
    if isinstance(relevant, Tensor) or hasattr(relevant, "__array__"):
        rel = torch.as_tensor(relevant).cpu()
        if rel.dim() == 1:
            if rel.shape[0] != q:
                raise ValueError(f"relevant must have one id per query ({q}), got {rel.shape[0]}")
            rel = rel.to(torch.int64)
            return (ranked == rel[:, None]) & (ranked >= 0), torch.ones(q, dtype=torch.int64)
        if rel.dim() == 2 and rel.dtype == torch.bool:
            if rel.shape[0] != q:
                raise ValueError(f"relevant must have {q} rows, got {rel.shape[0]}")
            valid = (ranked >= 0) & (ranked < rel.shape[1])
            hits = rel.gather(1, ranked.clamp(0, max(rel.shape[1] - 1, 0))) & valid
            return hits, rel.sum(1)
        raise ValueError(f"relevant as a tensor must be [Q] ids or a bool [Q, N] matrix, got shape {tuple(rel.shape)} "
                         f"and dtype {rel.dtype}")
    sets: List[Set[int]] = [set(int(i) for i in r) for r in relevant]
    if len(sets) != q:
        raise ValueError(f"relevant must have one entry per query ({q}), got {len(sets)}")
    hits = torch.tensor([[int(i) in s and i >= 0 for i in row.tolist()] for row, s in zip(ranked, sets)],
                        dtype=torch.bool).reshape(ranked.shape)
    return hits, torch.tensor([len(s) for s in sets], dtype=torch.int64)


def _check_k(k: int, ranked: Tensor) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > ranked.shape[1]:
        raise ValueError(f"k = {k} is larger than the {ranked.shape[1]} results per query in ranked")


def recall_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Fraction of queries with at least one relevant id among their first k results (R@K as CLIP-style
    retrieval evaluations report it). Queries with no relevant id count as misses."""
    ranked = _as_ranked(ranked)
    _check_k(k, ranked)
    if ranked.shape[0] == 0:
        return float("nan")
    hits, _ = _relevance(ranked, relevant)
    return hits[:, :k].any(1).double().mean().item()


def mean_average_precision(ranked, relevant: Relevant, k: int | None = None) -> float:
    """mAP@k: for each query, the mean of precision@i over the ranks i <= k holding a relevant id, divided
    by min(#relevant, k); averaged over queries (queries with no relevant id score 0)."""
    ranked = _as_ranked(ranked)
    k = ranked.shape[1] if k is None else k
    _check_k(k, ranked)
    if ranked.shape[0] == 0:
        return float("nan")
    hits, counts = _relevance(ranked, relevant)
    hits = hits[:, :k].double()
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    precision = hits.cumsum(1) / ranks
    denom = counts.clamp(max=k).double()
    ap = torch.where(denom > 0, (precision * hits).sum(1) / denom.clamp(min=1), torch.zeros_like(denom))
    return ap.mean().item()


def ndcg_at_k(ranked, relevant: Relevant, k: int) -> float:
    """nDCG@k with binary relevance: DCG = Σ_i rel_i / log2(i + 1) over the first k ranks, divided by the
    DCG of an ideal ranking (all relevant ids first); queries with no relevant id score 0."""
    ranked = _as_ranked(ranked)
    _check_k(k, ranked)
    if ranked.shape[0] == 0:
        return float("nan")
    hits, counts = _relevance(ranked, relevant)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    dcg = (hits[:, :k].double() * discounts).sum(1)
    ideal_cum = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])
    idcg = ideal_cum[counts.clamp(max=k)]
    return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-300), torch.zeros_like(dcg)).mean().item()


def _topk_hits(ranked, relevant: Relevant, k: int) -> tuple[Tensor, Tensor]:
    """The checked inputs of the recommendation metrics: ``hits[q, j]`` (float64, first k ranks) and the
    number of relevant ids of each query (int64)."""
    ranked = _as_ranked(ranked)
    _check_k(k, ranked)
    hits, counts = _relevance(ranked, relevant)
    return hits[:, :k].double(), counts


def hit_rate_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Hit@k: fraction of queries with a relevant id among their first k results (RecBole's ``Hit``; the same
    number as :func:`recall_at_k`)."""
    hits, _ = _topk_hits(ranked, relevant, k)
    return float("nan") if hits.shape[0] == 0 else hits.any(1).double().mean().item()


def mrr_at_k(ranked, relevant: Relevant, k: int) -> float:
    """MRR@k: the mean over queries of 1 / (rank of the first relevant id), 0 when none is among the first k
    (RecBole's ``MRR``)."""
    hits, _ = _topk_hits(ranked, relevant, k)
    if hits.shape[0] == 0:
        return float("nan")
    first = hits.argmax(1)  # the first hit's position (0 where there is none, masked below)
    return torch.where(hits.any(1), 1.0 / (first + 1).double(), torch.zeros(hits.shape[0], dtype=torch.float64)).mean().item()


def precision_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Precision@k: relevant ids among the first k results divided by k, averaged over queries (RecBole's
    ``Precision``: padding (-1) and missing results count as misses, the divisor stays k)."""
    hits, _ = _topk_hits(ranked, relevant, k)
    return float("nan") if hits.shape[0] == 0 else (hits.sum(1) / k).mean().item()


def fractional_recall_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Recall@k as recommender evaluations (RecBole's ``Recall``) define it: for each query, the fraction of its
    relevant ids found among its first k results, averaged over queries; queries with no relevant id score 0.

    Not :func:`recall_at_k`, which is the cross-modal retrieval R@K (did *any* relevant id come back) and
    equals :func:`hit_rate_at_k`. With one relevant id per query the two agree."""
    hits, counts = _topk_hits(ranked, relevant, k)
    if hits.shape[0] == 0:
        return float("nan")
    return torch.where(counts > 0, hits.sum(1) / counts.clamp(min=1).double(), torch.zeros_like(hits[:, 0])).mean().item()


def knn_recall(found, exact) -> float:
    """How much of the exact answer an approximate search found: the share of the exact top-k ids (``exact``,
    ``[Q, k]``, ``-1`` = no result) among ``found``'s ids (``[Q, k']``), over all queries. The "recall@k" of
    approximate nearest-neighbour benchmarks (FAISS's "k-recall@k"); 1.0 when the search is exact. NaN when
    ``exact`` holds no result."""
    found, exact = _as_ranked(found), _as_ranked(exact)
    if found.shape[0] != exact.shape[0]:
        raise ValueError(f"found and exact must have the same number of queries, got {found.shape[0]} and "
                         f"{exact.shape[0]}")
    present = exact >= 0
    if not bool(present.any()):
        return float("nan")
    hits = (exact[:, :, None] == found[:, None, :]).any(2) & present
    return float(hits.sum()) / float(present.sum())


#: the five metrics of :func:`recommendation_report`, in RecBole's default order (its ``metrics`` setting)
RECOMMENDATION_METRICS = ("recall", "mrr", "ndcg", "hit", "precision")


def recommendation_report(ranked, relevant: Relevant, k: int = 10) -> Dict[str, float]:
    """The top-k metrics RecBole reports by default, as it computes them: ``{"recall@k", "mrr@k", "ndcg@k",
    "hit@k", "precision@k"}`` (:func:`fractional_recall_at_k`, :func:`mrr_at_k`, :func:`ndcg_at_k` with binary
    relevance and the ideal DCG over ``min(#relevant, k)`` ranks, :func:`hit_rate_at_k`,
    :func:`precision_at_k`), each the mean over queries. ``ranked`` is ``[Q, >= k]`` ids best first (``-1`` =
    no result); RecBole evaluates only users with at least one relevant item, so pass those."""
    return {
        f"recall@{k}": fractional_recall_at_k(ranked, relevant, k),
        f"mrr@{k}": mrr_at_k(ranked, relevant, k),
        f"ndcg@{k}": ndcg_at_k(ranked, relevant, k),
        f"hit@{k}": hit_rate_at_k(ranked, relevant, k),
        f"precision@{k}": precision_at_k(ranked, relevant, k),
    }


def _image_of_caption(text_to_image, captions: int, images: int) -> Tensor:
    """text_to_image as int64 image indices, checked: one per caption, each in [0, images)."""
    t2i = torch.as_tensor(text_to_image).cpu()
    if t2i.dtype.is_floating_point or t2i.dtype.is_complex or t2i.dtype == torch.bool:
        # a cast would truncate 1.7 to image 1 without a word
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    if t2i.dim() != 1:
        raise ValueError(f"text_to_image must be 1-D, one image index per caption, got shape {tuple(t2i.shape)}")
    if t2i.shape[0] != captions:
        raise ValueError(f"text_to_image must have one entry per caption ({captions}), got {t2i.shape[0]}")
    t2i = t2i.to(torch.int64)
    bad = ((t2i < 0) | (t2i >= images)).nonzero().flatten()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(f"text_to_image[{t}] = {int(t2i[t])} is out of range: with {images} images an image index "
                         f"must be in [0, {images - 1}] ({bad.numel()} of the {captions} entries are out of range)")
    return t2i


def retrieval_report(image_embeddings, text_embeddings, text_to_image, ks=(1, 5, 10), metric: str = "cosine") -> Dict[str, float]:
    """R@K in both directions, as CLIP evaluations report them.

    image_embeddings ``[Ni, D]``, text_embeddings ``[Nt, D]``; ``text_to_image[t]`` is the index of the image
    caption t describes (several captions may describe one image). text->image: a caption's query is right
    when its image is retrieved; image->text: an image's query is right when any of its captions is.
    Returns ``{"text_to_image_R@1": ..., "image_to_text_R@1": ..., ...}``.
    """
    from .ops import topk_search

    img = torch.as_tensor(image_embeddings)
    txt = torch.as_tensor(text_embeddings)
    for name, e in (("image_embeddings", img), ("text_embeddings", txt)):
        if e.dim() != 2 or e.shape[0] == 0:
            raise ValueError(f"{name} must be 2-D [N, D] with N >= 1, got shape {tuple(e.shape)}")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_embeddings and text_embeddings must have the same dimension D, got "
                         f"{img.shape[1]} and {txt.shape[1]}")
    t2i = _image_of_caption(text_to_image, txt.shape[0], img.shape[0])
    if not isinstance(ks, (tuple, list)) or not ks \
            or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple or list of positive ints, got {ks!r}")
    ks = [int(k) for k in ks]
    kmax = max(ks)
    _, t_ranked = topk_search(txt, img, min(kmax, img.shape[0]), metric)
    _, i_ranked = topk_search(img, txt, min(kmax, txt.shape[0]), metric)
    captions_of: List[Set[int]] = [set() for _ in range(img.shape[0])]
    for t, i in enumerate(t2i.tolist()):
        captions_of[i].add(t)
    report = {}
    for k in ks:
        report[f"text_to_image_R@{k}"] = recall_at_k(t_ranked.cpu(), t2i, min(k, t_ranked.shape[1]))
        report[f"image_to_text_R@{k}"] = recall_at_k(i_ranked.cpu(), captions_of, min(k, i_ranked.shape[1]))
    return report


__all__ = ["recall_at_k", "mean_average_precision", "ndcg_at_k", "retrieval_report", "hit_rate_at_k", "mrr_at_k",
           "precision_at_k", "fractional_recall_at_k", "knn_recall", "recommendation_report",
           "RECOMMENDATION_METRICS"]
