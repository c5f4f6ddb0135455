"""Recommendation on MovieLens-100k with RecBole's default protocol, on xmodal's retrieval.

- :class:`MovieLens100K`: the data (RecBole's atomic files, its 8:1:1 per-user random split, full ranking
  with earlier interactions excluded); see :mod:`xmodal.recommend.data` for exactly what RecBole does.
- models, all with ``fit(data, **settings)`` and ``recommend(users, k)``: :class:`Popularity` (train-set
  counts), :class:`MF` (matrix factorisation, BPR), :class:`LightGCN`, :class:`MultimodalRecommender`
  (content + knowledge graph + FREEDOM item graph, fused by factorized bilinear pooling, multi-task).
- :func:`evaluate`: Recall, MRR, NDCG, Hit, Precision @10 on the validation or test part, as RecBole computes
  them (:func:`xmodal.metrics.recommendation_report`).

``recommend`` searches user vectors against a :class:`xmodal.FlatIndex` of item vectors (inner product), with
each user's seen items filtered out of a slightly deeper search (see :mod:`xmodal.recommend.base`).
"""
from .base import FitResult, Recommender, evaluate
from .data import Interactions, MovieLens100K, recbole_data_dir, split_sizes
from .models import MF, LightGCN, Popularity
from .multimodal import MultimodalRecommender

#: ``--model`` names of ``xmodal demo recommend`` and the benchmark
MODELS = {"pop": Popularity, "mf": MF, "lightgcn": LightGCN, "multimodal": MultimodalRecommender}


def build(name: str, data, **options) -> Recommender:
    """A fresh model by name (``"pop"``, ``"mf"``, ``"lightgcn"``, ``"multimodal"``) sized for ``data``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if name == "multimodal":
        return MultimodalRecommender(data, **options)
    return MODELS[name](data.num_users, data.num_items, **options)


__all__ = ["MovieLens100K", "Interactions", "recbole_data_dir", "split_sizes", "Recommender", "FitResult", "evaluate",
           "Popularity", "MF", "LightGCN", "MultimodalRecommender", "MODELS", "build"]
