"""A multimodal recommender: LightGCN over the user-item graph whose item inputs fuse collaborative ID
embeddings with item content (title TF-IDF, genres, release year) and knowledge-graph neighbours, plus a
FREEDOM-style frozen item-item kNN graph over the same side information; trained with BPR and, optionally, an
auxiliary genre-prediction task weighted by :class:`xmodal.train.MultiTaskLoss`.

Per item ``i`` (``D = dim``):

- content ``c_i = LayerNorm(W_title tfidf(title_i) + E_genre(genres_i) + E_year[bucket(year_i)])``: the title as
  a TF-IDF bag of words through a learned projection (not xmodal's text encoder: ml-100k's 1,682 titles are too
  few to train a transformer on, and TF-IDF keeps the words' identity); genres and 5-year release buckets as
  learned embeddings;
- knowledge graph ``g_i = LayerNorm(E_entity(kg_i))``: the entities one hop from the item's Freebase entity
  (``ml-100k.link`` + ``ml-100k.kg``: actors, directors, writers, studios, awards, ...) as a TF-IDF-weighted
  bag of learned entity embeddings;
- fusion: ``s_i = W_s [c_i; g_i]`` (side vector) and ``x_i = e_i + s_i + alpha * FBP(e_i, s_i)`` where ``e_i``
  is the item's ID embedding and FBP is :class:`xmodal.nn.FactorizedBilinearPooling` (multiplicative
  interactions between what users did with the item and what the item is; ``alpha`` learned, from 0). ``W_s``
  starts at zero, so training starts from plain LightGCN and takes in side information as far as it helps: a
  side vector of LayerNorm scale from the first step swamps the ID embeddings and costs ~0.01 NDCG@10;
- LightGCN: ``x`` (items) and the user ID embeddings propagated over ``D^-1/2 A D^-1/2`` of the training
  graph, ``layers`` rounds, mean over rounds;
- FREEDOM (Zhou et al. 2022): the items' final vectors add ``0.3 S x`` where ``S`` is the symmetric-normalised
  ``item_k``-nearest-neighbour graph (k = 10) of the items by content and KG similarity (cosines of the title
  TF-IDF, genres and KG TF-IDF weighted 0.25 / 0.5 / 1: titles alone make poor neighbours -- "Toy Story" finds
  "Philadelphia Story"), built once with :func:`xmodal.graph.knn_graph` and frozen. At weight 1, as in
  FREEDOM, it cost ~0.02 NDCG@10 on ml-100k.

On ml-100k (dense: 6% of the user-item pairs are observed, 97% of test interactions are with items that have
10 or more training interactions) side information adds little to a well-trained collaborative model; see the
benchmark report (``benchmarks/results/*recommend*``) for the measured ablations.

Score = inner product of the user's and the item's final vectors, so :meth:`recommend` is one top-k search of
an item index. Items without training interactions still get a vector from their side information (cold
items); users without any fall back to popularity (as every :class:`Recommender`).

Auxiliary task (``aux_genres``): predict each item's genres (multi-label, binary cross-entropy) from its *ID
embedding* ``e_i`` -- not from the fused vector, which has the genres as an input and would make the task
trivial -- so that the collaborative embeddings are pushed to carry genre information. The BPR and genre
losses are combined by :class:`xmodal.train.MultiTaskLoss` (``weighting``: learned homoscedastic-uncertainty
weights, or fixed).

Ablations: ``use_content=False`` drops title, genres and year (inputs and graph); ``use_kg=False`` drops the
knowledge graph (input and graph); with both False the model is LightGCN with the same training (and the
auxiliary task, unless ``aux_genres=False``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import FactorizedBilinearPooling
from ..losses import MultiTaskLoss
from . import features as Fe
from .base import batch_counts, batch_l2, bpr_loss, pair_scores
from .models import LightGCN, propagate

__all__ = ["MultimodalRecommender"]


class _Bag(nn.Module):
    """A weighted bag of learned embeddings (an ``nn.EmbeddingBag`` over fixed :class:`Bags`)."""

    def __init__(self, bags: Fe.Bags, dim: int) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(max(bags.vocabulary, 1), dim, mode="sum")
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.register_buffer("ids", bags.ids, persistent=False)
        self.register_buffer("offsets", bags.offsets, persistent=False)
        self.register_buffer("weights", bags.weights, persistent=False)

    def forward(self) -> Tensor:
        return self.embedding(self.ids, self.offsets, per_sample_weights=self.weights)


class MultimodalRecommender(LightGCN):
    """See the module docstring. ``data``: a :class:`MovieLens100K` (or anything with its side information:
    ``num_users``, ``num_items``, ``titles``, ``years``, ``genres``, ``kg_neighbours``, ``entity_names``).

    Args:
        dim, layers: embedding size and LightGCN rounds.
        use_content, use_kg: which side information to use (the ablations).
        side_input: fuse the side vectors into the items' inputs (False: only the item-item graph uses them).
        use_item_graph: add FREEDOM's item-item graph term; ``item_k`` neighbours per item; its output scaled
            by ``item_graph_weight``; ``graph_weights``: the weights of the title, genre and KG cosines in the
            items' similarity.
        fusion_factor: the factor of the :class:`xmodal.nn.FactorizedBilinearPooling`.
        aux_genres: the auxiliary genre task; ``weighting`` (``"uncertainty"`` or ``"fixed"``) and, for fixed,
            ``aux_weight`` (the BPR task's weight is 1); ``aux_holdout``: a fraction of the items (a fixed draw,
            ``genre_holdout_items``) whose genres the task never sees, to measure genre prediction on;
            ``aux_max_weight``: cap on the learned weights (``MultiTaskLoss``'s ``max_weight``). The ID embeddings
            learn the training items' genres almost exactly, so without a cap the genre task's learned weight
            grows without bound (1e4 to 1e9 on ml-100k; the ranking metrics did not suffer from it).

    Training settings (``fit``): LightGCN's, plus ``side_reg`` (L2 on the side embeddings' weights, per batch).
    """

    DEFAULTS = dict(LightGCN.DEFAULTS, side_reg=1e-4)

    def __init__(self, data, dim: int = 64, layers: int = 3, *, use_content: bool = True, use_kg: bool = True,
                 side_input: bool = True, use_item_graph: bool = True, item_k: int = 10,
                 item_graph_weight: float = 0.3, graph_weights: Tuple[float, float, float] = (0.25, 0.5, 1.0),
                 fusion_factor: int = 4, aux_genres: bool = True, weighting: str = "uncertainty",
                 aux_weight: float = 1.0, aux_holdout: float = 0.0, aux_max_weight: Optional[float] = None) -> None:
        for name, flag in (("use_content", use_content), ("use_kg", use_kg), ("side_input", side_input),
                           ("use_item_graph", use_item_graph), ("aux_genres", aux_genres)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
        if len(graph_weights) != 3 or any(not w >= 0 for w in graph_weights):
            raise ValueError(f"graph_weights must be three weights >= 0 (title, genres, KG), got {graph_weights!r}")
        super().__init__(data.num_users, data.num_items, dim, layers)
        self.use_content, self.use_kg, self.side_input, self.aux_genres = use_content, use_kg, side_input, aux_genres
        self.item_graph_weight = float(item_graph_weight)
        genres = torch.as_tensor(data.genres).float()
        if genres.shape[0] != self.num_items:
            raise ValueError(f"data.genres must have one row per item ({self.num_items}), got shape {tuple(genres.shape)}")
        self.register_buffer("genres", genres, persistent=False)
        parts, blocks = 0, []
        if use_content:
            titles = Fe.title_bags(data.titles)
            buckets = Fe.year_buckets(torch.as_tensor(data.years))
            self.register_buffer("year_bucket", buckets, persistent=False)
            if side_input:
                self.title = _Bag(titles, dim)
                self.genre_projection = nn.Linear(genres.shape[1], dim, bias=False)
                self.year = nn.Embedding(int(buckets.max()) + 1, dim)
                self.content_norm = nn.LayerNorm(dim)
            parts += 1
            blocks += [(titles.dense(), graph_weights[0]), (genres, graph_weights[1])]
        if use_kg:
            kg = Fe.kg_bags(data.kg_neighbours, data.entity_names)
            if side_input:
                self.kg = _Bag(kg, dim)
                self.kg_norm = nn.LayerNorm(dim)
            parts += 1
            blocks.append((kg.dense(), graph_weights[2]))
        self.side_parts = parts if side_input else 0
        if self.side_parts:
            self.side = nn.Linear(parts * dim, dim)
            self.fusion = FactorizedBilinearPooling(dim, dim, dim, factor=fusion_factor)
            self.alpha = nn.Parameter(torch.zeros(()))
        blocks = [(f, w) for f, w in blocks if w > 0]
        self.item_graph = None
        if parts and use_item_graph and blocks:
            edge_index, weight = Fe.item_knn_graph(blocks, item_k)
            self.item_graph = Fe.sparse_symmetric(edge_index, weight, self.num_items)
        if not 0.0 <= aux_holdout < 1.0:
            raise ValueError(f"aux_holdout must be in [0, 1), got {aux_holdout!r}")
        # items whose genres the auxiliary task never sees (a fixed draw), to measure genre prediction on
        held = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(0))[: int(aux_holdout * self.num_items)]
        self.genre_holdout_items = held.sort().values
        self.register_buffer("genre_train_mask", torch.ones(self.num_items, dtype=torch.bool).index_fill_(0, held, False),
                             persistent=False)
        self.genre_head = nn.Linear(dim, genres.shape[1]) if aux_genres else None
        if aux_genres:
            fixed = {"bpr": 1.0, "genres": aux_weight} if weighting == "fixed" else None
            self.multitask = MultiTaskLoss(["bpr", "genres"], weighting, fixed, max_weight=aux_max_weight)
        else:
            self.multitask = MultiTaskLoss(["bpr"], "fixed")  # one task: nothing to balance
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "side", None) is not None:
            # the side branch starts silent: the model starts as LightGCN and uses the side information as far
            # as training finds it useful (a side vector of LayerNorm scale from the first step swamps the IDs)
            nn.init.zeros_(self.side.weight)
            nn.init.zeros_(self.side.bias)

    def side_vectors(self) -> Optional[Tensor]:
        """``[I, dim]``: the items' side vectors (content and/or KG), or None when they are not an input."""
        if not self.side_parts:
            return None
        parts = []
        if self.use_content:
            content = self.title() + self.genre_projection(self.genres) + self.year(self.year_bucket)
            parts.append(self.content_norm(content))
        if self.use_kg:
            parts.append(self.kg_norm(self.kg()))
        return self.side(torch.cat(parts, dim=1))

    def item_inputs(self) -> Tensor:
        """``[I, dim]``: layer-0 item vectors, the ID embedding fused with the side vector."""
        e = self.item_embedding.weight
        s = self.side_vectors()
        if s is None:
            return e
        return e + s + self.alpha * self.fusion(e, s)

    def user_item_vectors(self) -> Tuple[Tensor, Tensor]:
        return self._vectors(self.item_inputs())

    def _vectors(self, items: Tensor) -> Tuple[Tensor, Tensor]:
        out = propagate(self._graph(), torch.cat([self.user_embedding.weight, items]), self.layers)
        users, item_out = out[: self.num_users], out[self.num_users:]
        if self.item_graph is not None:
            item_out = item_out + self.item_graph_weight * torch.sparse.mm(self.item_graph, items)
        return users, item_out

    def training_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        items = self.item_inputs()
        bpr = bpr_loss(*pair_scores(*self._vectors(items), users, pos, neg))
        values = {"bpr": bpr.item()}
        # the ranking task's L2 terms (on the batch's user embeddings and fused item inputs, and on the side
        # weights) belong to it, so that a learned task weight scales them with BPR
        ranking = bpr
        if self.settings["reg"]:
            item_counts = batch_counts(pos, self.num_items) + batch_counts(neg, self.num_items, 1.0 / neg.shape[1])
            ranking = ranking + self.settings["reg"] * (
                batch_l2(self.user_embedding.weight, batch_counts(users, self.num_users))
                + batch_l2(items, item_counts)) / users.shape[0]
        if self.side_parts and self.settings["side_reg"]:
            side = [p for name, p in self.named_parameters() if name.startswith(("title.", "kg.", "year.", "genre_projection."))]
            ranking = ranking + self.settings["side_reg"] * sum(p.square().sum() for p in side) / users.shape[0]
        losses = {"bpr": ranking}
        if self.aux_genres:
            mask = self.genre_train_mask
            logits = self.genre_head(self.item_embedding.weight[mask])
            losses["genres"] = F.binary_cross_entropy_with_logits(logits, self.genres[mask])
            values["genres"] = losses["genres"].item()
        return self.multitask(losses), values

    def make_optimizer(self, cfg: Dict) -> torch.optim.Optimizer:
        task = list(self.multitask.parameters())  # the learned task weights: no weight decay
        ids = {id(p) for p in task}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids], "weight_decay": cfg["weight_decay"]}]
        if task:
            groups.append({"params": task, "weight_decay": 0.0})
        return torch.optim.Adam(groups, lr=cfg["lr"])
