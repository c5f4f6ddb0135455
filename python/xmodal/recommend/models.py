"""The collaborative recommenders: train-set popularity, matrix factorisation with BPR, LightGCN."""
from __future__ import annotations

import time
import warnings
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .base import FitResult, Recommender, batch_counts, batch_l2, bpr_loss, evaluate, pair_scores
from .data import Interactions

__all__ = ["Popularity", "MF", "LightGCN", "normalized_adjacency", "propagate", "embedding_reg"]


class Popularity(Recommender):
    """Recommends the items most often interacted with in training (exact counts), the same list for every
    user minus what the user has seen. ``fit`` only counts."""

    DEFAULTS: Dict[str, object] = {}

    def fit(self, data, *, progress: bool = False, max_seconds=None, **settings) -> FitResult:
        if settings:
            raise TypeError(f"Popularity.fit takes no training settings, got {sorted(settings)}")
        started = time.perf_counter()
        self.set_interactions(data.train)
        seconds = time.perf_counter() - started
        t0 = time.perf_counter()
        valid = evaluate(self, data, "valid")
        return FitResult(0, 0, valid, seconds + time.perf_counter() - t0, time.perf_counter() - t0)

    def user_item_vectors(self) -> Tuple[Tensor, Tensor]:
        return torch.ones(self.num_users, 1), self.popularity[:, None].clone()


class MF(Recommender):
    """Matrix factorisation trained with BPR (Rendle et al. 2009): a ``dim``-vector per user and per item,
    score = inner product. Initialised as RecBole's BPR (Xavier normal)."""

    DEFAULTS = dict(Recommender.DEFAULTS, epochs=200, lr=2e-2, batch_size=8192, negatives=32, weight_decay=0.0,
                    patience=5, eval_every=2, reg=1e-2)

    def __init__(self, num_users: int, num_items: int, dim: int = 64) -> None:
        super().__init__(num_users, num_items)
        self.dim = dim
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)

    def user_item_vectors(self) -> Tuple[Tensor, Tensor]:
        return self.user_embedding.weight, self.item_embedding.weight

    def training_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        loss = bpr_loss(*pair_scores(self.user_embedding.weight, self.item_embedding.weight, users, pos, neg))
        return loss + embedding_reg(self, users, pos, neg), {"bpr": loss.item()}


def embedding_reg(model: Recommender, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """The ``reg`` setting times the batch's mean squared norm of the layer-0 embeddings it uses (its user, its
    positive, the mean over its negatives), as RecBole's EmbLoss; counted per row, nothing gathered."""
    if not model.settings["reg"]:
        return torch.zeros(())
    item_counts = batch_counts(pos, model.num_items) + batch_counts(neg, model.num_items, 1.0 / neg.shape[1])
    total = batch_l2(model.user_embedding.weight, batch_counts(users, model.num_users)) \
        + batch_l2(model.item_embedding.weight, item_counts)
    return model.settings["reg"] * total / users.shape[0]


def normalized_adjacency(train: Interactions, num_users: int, num_items: int) -> Tensor:
    """The symmetric normalised adjacency ``D^-1/2 A D^-1/2`` of the user-item graph (users first, then items;
    an edge per training interaction, both ways) as a sparse CSR ``[U + I, U + I]`` float32 tensor."""
    u, i = train.users.to(torch.int64), train.items.to(torch.int64) + num_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    n = num_users + num_items
    degree = torch.bincount(rows, minlength=n).float()
    inv = degree.clamp(min=1).rsqrt() * (degree > 0)
    values = inv[rows] * inv[cols]
    with warnings.catch_warnings():  # "sparse CSR support is in beta", "invariant checks are disabled"
        warnings.simplefilter("ignore")
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n)).coalesce().to_sparse_csr()


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ x`` for a symmetric sparse ``A``: the gradient is ``A @ grad`` (the same CSR product)."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:
        ctx.a = a
        return a @ x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, ctx.a @ grad


def propagate(a: Tensor, x: Tensor, layers: int) -> Tensor:
    """LightGCN's layer combination: the mean of ``x, A x, ..., A^layers x``."""
    out, h = x, x
    for _ in range(layers):
        h = _SymmetricSpMM.apply(a, h)
        out = out + h
    return out / (layers + 1)


class LightGCN(Recommender):
    """LightGCN (He et al., SIGIR 2020): ID embeddings smoothed over the user-item graph by ``layers`` rounds of
    ``D^-1/2 A D^-1/2`` propagation (torch.sparse CSR products, no weights, no non-linearity), the final
    vector the mean over rounds 0..layers; BPR loss plus L2 on the batch's layer-0 embeddings (``reg``)."""

    DEFAULTS = dict(Recommender.DEFAULTS, epochs=400, lr=2e-2, batch_size=8192, negatives=16, weight_decay=0.0,
                    patience=5, eval_every=5, reg=1e-3)

    def __init__(self, num_users: int, num_items: int, dim: int = 64, layers: int = 3) -> None:
        super().__init__(num_users, num_items)
        self.dim, self.layers = dim, layers
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        self.adjacency = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding.weight)  # as RecBole's LightGCN
        nn.init.xavier_uniform_(self.item_embedding.weight)

    def prepare(self, data) -> None:
        self.adjacency = normalized_adjacency(data.train, self.num_users, self.num_items)

    def _graph(self) -> Tensor:
        if self.adjacency is None:  # e.g. weights loaded into a fresh model: rebuild from the seen pairs
            keys = self.seen_keys
            self.adjacency = normalized_adjacency(Interactions(keys // self.num_items, keys % self.num_items),
                                                  self.num_users, self.num_items)
        return self.adjacency

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.adjacency = None  # the loaded training pairs may differ: rebuilt from them when next needed

    def user_item_vectors(self) -> Tuple[Tensor, Tensor]:
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        out = propagate(self._graph(), x, self.layers)
        return out[: self.num_users], out[self.num_users:]

    def training_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        loss = bpr_loss(*pair_scores(*self.user_item_vectors(), users, pos, neg))
        return loss + embedding_reg(self, users, pos, neg), {"bpr": loss.item()}
