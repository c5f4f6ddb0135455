"""Item side information as tensors: TF-IDF of titles, genres, release-year buckets, knowledge-graph neighbours
as TF-IDF-weighted bags of entities, and FREEDOM's frozen item-item kNN graph over them."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import knn_graph

__all__ = ["Bags", "tfidf_bags", "title_bags", "kg_bags", "year_buckets", "item_knn_graph", "sparse_symmetric"]


@dataclass
class Bags:
    """A sparse ``[rows, vocabulary]`` matrix as ``nn.EmbeddingBag`` takes it: ``ids`` and ``weights`` of
    every entry, row ``r``'s entries starting at ``offsets[r]``. ``names[j]`` says what column j is."""
    ids: Tensor
    offsets: Tensor
    weights: Tensor
    names: List[str]

    @property
    def rows(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def vocabulary(self) -> int:
        return len(self.names)

    def dense(self) -> Tensor:
        out = torch.zeros(self.rows, max(self.vocabulary, 1))
        lengths = torch.diff(torch.cat([self.offsets, torch.tensor([self.ids.shape[0]])]))
        rows = torch.repeat_interleave(torch.arange(self.rows), lengths)
        out[rows, self.ids] = self.weights
        return out


def tfidf_bags(docs: Sequence[Sequence[int]], names: Sequence[str], min_df: int = 2) -> Bags:
    """TF-IDF of documents given as lists of term ids (``names[term]``): terms in fewer than ``min_df``
    documents are dropped (they cannot make two documents alike), idf = ``log((1 + n) / (1 + df)) + 1``,
    each row scaled to unit L2 norm (rows with no term stay empty)."""
    n = len(docs)
    df = torch.zeros(len(names))
    for doc in docs:
        for t in set(doc):
            df[t] += 1
    keep = (df >= min_df).nonzero().flatten().tolist()
    new_id = {t: j for j, t in enumerate(keep)}
    idf = torch.log((1 + n) / (1 + df)) + 1
    ids, weights, offsets = [], [], []
    for doc in docs:
        offsets.append(len(ids))
        counts = {}
        for t in doc:
            if t in new_id:
                counts[t] = counts.get(t, 0) + 1
        row = {new_id[t]: c * float(idf[t]) for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in row.values())) or 1.0
        for j in sorted(row):
            ids.append(j)
            weights.append(row[j] / norm)
    return Bags(torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(weights, dtype=torch.float32), [names[t] for t in keep])


def title_bags(titles: Sequence[str], min_df: int = 2) -> Bags:
    """TF-IDF over the lower-cased words of the titles (a trailing ", The" / ", A" as ml-100k writes articles
    is just another word; words in fewer than ``min_df`` titles are dropped)."""
    vocab: dict = {}
    docs = [[vocab.setdefault(w, len(vocab)) for w in re.findall(r"[a-z0-9]+", t.lower())] for t in titles]
    return tfidf_bags(docs, list(vocab), min_df)


def kg_bags(neighbours: Sequence[Sequence[int]], entity_names: Sequence[str], min_df: int = 2) -> Bags:
    """TF-IDF over each item's one-hop knowledge-graph entities (actors, directors, genres, awards, ...):
    entities shared by fewer than ``min_df`` items are dropped."""
    return tfidf_bags(neighbours, list(entity_names), min_df)


def year_buckets(years: Tensor, start: int = 1920, width: int = 5, count: int = 17) -> Tensor:
    """Release years as bucket ids: ``0`` for unknown (year 0), else ``1 + clamp((year - start) // width, 0,
    count - 1)`` (ml-100k's years run from 1922 to 1998)."""
    b = 1 + ((years - start) // width).clamp(0, count - 1)
    return torch.where(years > 0, b, torch.zeros_like(b))


def sparse_symmetric(edge_index: Tensor, weight: Tensor, n: int) -> Tensor:
    """``D^-1/2 W D^-1/2`` of the symmetrised graph ``max(W, W^T)`` as a sparse CSR ``[n, n]`` tensor."""
    rows = torch.cat([edge_index[1], edge_index[0]])
    cols = torch.cat([edge_index[0], edge_index[1]])
    values = torch.cat([weight, weight]).float()
    keys = rows * n + cols
    order = torch.argsort(keys)
    keys, values = keys[order], values[order]
    unique, inverse = torch.unique_consecutive(keys, return_inverse=True)
    merged = torch.full((unique.shape[0],), float("-inf")).scatter_reduce(0, inverse, values, "amax")
    rows, cols = unique // n, unique % n
    degree = torch.zeros(n).index_add_(0, rows, merged)
    inv = degree.clamp(min=1e-12).rsqrt() * (degree > 0)
    values = inv[rows] * merged * inv[cols]
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, (n, n))


def item_knn_graph(blocks: Sequence[Tuple[Tensor, float]], k: int) -> Tuple[Tensor, Tensor]:
    """FREEDOM's frozen item-item graph: each item's ``k`` most similar other items under the weighted sum of
    cosine similarities of the feature ``blocks`` (``[(features [I, d], weight), ...]``; each block's rows are
    unit-normalised, scaled by ``sqrt(weight)`` and concatenated, so one cosine search gives the weighted sum).
    Built with :func:`xmodal.graph.knn_graph` (metric ``"ip"``); returns its ``(edge_index, weight)`` with
    negative similarities clamped to 0."""
    if not blocks:
        raise ValueError("item_knn_graph needs at least one feature block")
    total = sum(w for _, w in blocks)
    x = torch.cat([F.normalize(f.float(), dim=1) * math.sqrt(w / total) for f, w in blocks], dim=1).contiguous()
    edge_index, weight = knn_graph(x, k, "ip")
    return edge_index, weight.clamp(min=0)
