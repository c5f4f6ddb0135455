"""What every recommender shares: top-k retrieval of items for users through an xmodal index with the users'
seen items excluded, the BPR training loop with early stopping on validation MRR@10, and evaluation on
RecBole's protocol.

**Retrieval** (:meth:`Recommender.recommend`): user vectors are searched against a :class:`xmodal.FlatIndex`
(metric ``"ip"``) of item vectors. Seen items are excluded by per-user candidate filtering: users are sorted
by how many items they must skip and cut into batches; each batch searches ``k + (most items any of its
users skips)`` candidates, then drops every (user, item) pair that is excluded (a sorted-key lookup, not a
users x items mask) and keeps the first ``k`` that remain. Memory is ``O(batch x candidates)``; the users x
items score matrix is never formed (the index's search tiles it). Users with no training interactions (cold
start) get the items most often interacted with in training (popularity), minus their exclusions.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from .._checks import check_int
from ..index import FlatIndex
from .data import Interactions

__all__ = ["Recommender", "FitResult", "evaluate", "bpr_loss", "sample_negatives", "pair_scores"]

#: users per retrieval batch (sorted by how many items they skip, so each batch searches about as deep as its
#: own users need; 128 measured fastest for all of ml-100k's users on 2 cores)
RECOMMEND_BATCH = 128


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Bayesian personalised ranking: ``mean(-log sigmoid(pos - neg))``; ``pos [B]``, ``neg [B]`` or
    ``[B, n]`` (each positive against each of its ``n`` negatives)."""
    if neg.dim() == 2:
        pos = pos[:, None]
    return F.softplus(neg - pos).mean()


def _pair_keys(users: Tensor, items: Tensor, num_items: int) -> Tensor:
    return users.to(torch.int64) * num_items + items.to(torch.int64)


def _contains(sorted_keys: Tensor, keys: Tensor) -> Tensor:
    """keys found in the sorted 1-D ``sorted_keys``."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    at = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    return sorted_keys[at] == keys


#: users x items pairs up to which dense [users, items] tensors are used in training (a seen-pair bitmap for
#: negative sampling, a batch's scores against every item): 2^25 (ml-100k: 943 x 1682 = 1.6M)
DENSE_PAIRS = 1 << 25


def sample_negatives(users: Tensor, count: int, num_items: int, seen_keys: Tensor, generator: torch.Generator,
                     rounds: int = 20, unseen: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """``[len(users), count]`` items drawn uniformly from those each user has not interacted with (RecBole's
    uniform sampler with its ``used_ids``).

    With ``unseen`` (:func:`unseen_table`: every user's unseen items, concatenated) each draw is exact: a
    uniform position in the user's unseen list. Otherwise draws are redrawn while they hit a seen pair
    (``rounds`` times, then kept; a user who has seen 35% of the items -- ml-100k's densest -- keeps a seen
    draw with odds 0.35^20 < 1e-9)."""
    if unseen is not None:
        items, start, size = unseen
        u = users[:, None].expand(-1, count)
        exact = torch.float32 if num_items < (1 << 22) else torch.float64  # enough bits for every position
        r = (torch.rand(u.shape, generator=generator, dtype=exact) * size[u]).long()
        return items[start[u] + torch.minimum(r, (size[u] - 1).clamp(min=0))]
    neg = torch.randint(num_items, (users.shape[0], count), generator=generator).reshape(-1)
    u = users[:, None].expand(-1, count).reshape(-1)
    todo = torch.arange(neg.shape[0])
    for _ in range(rounds):
        todo = todo[_contains(seen_keys, _pair_keys(u[todo], neg[todo], num_items))]
        if todo.numel() == 0:
            break
        neg[todo] = torch.randint(num_items, (todo.numel(),), generator=generator)
    return neg.reshape(users.shape[0], count)


def unseen_table(seen_keys: Tensor, num_users: int, num_items: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Every user's unseen items: ``(items, start, size)`` with user u's in ``items[start[u] : start[u] +
    size[u]]``; ``O(users x items)`` memory (used up to :data:`DENSE_PAIRS`). A user who has seen every item
    gets size 0 (its draws then repeat the first unseen item of the next user: harmless, never reached on
    real data -- such a user has no negative to learn from)."""
    seen = torch.zeros(num_users * num_items, dtype=torch.bool)
    seen[seen_keys] = True
    free = (~seen).nonzero().flatten()
    size = torch.bincount(free // num_items, minlength=num_users)
    start = torch.cumsum(size, 0) - size
    items = free % num_items
    if items.numel() == 0:
        items = torch.zeros(1, dtype=torch.int64)
    start = start.clamp(max=items.numel() - 1)
    return items, start, size


def pair_scores(user_vectors: Tensor, item_vectors: Tensor, users: Tensor, pos: Tensor, neg: Tensor) -> Tuple[Tensor, Tensor]:
    """Inner-product scores of a batch's positive pairs ``[B]`` and negative pairs ``[B, n]``, differentiable.

    Where the batch's distinct users times the items fit in :data:`DENSE_PAIRS`, the distinct users are scored
    against every item with one GEMM and the pairs gathered from that (a batch of ml-100k positives holds
    nearly every user, so this is a 943 x 1682 product however many negatives there are); otherwise the
    vectors of every pair are gathered (``O(B n D)``)."""
    distinct, local = torch.unique(users, return_inverse=True)
    if distinct.shape[0] * item_vectors.shape[0] <= DENSE_PAIRS:
        scores = user_vectors[distinct] @ item_vectors.T
        return scores[local, pos], scores[local[:, None], neg]
    u = user_vectors[users]
    return (u * item_vectors[pos]).sum(-1), torch.einsum("bd,bnd->bn", u, item_vectors[neg])


def batch_l2(table: Tensor, counts: Tensor) -> Tensor:
    """``sum_r counts[r] * ||table[r]||^2``: the squared norms of a batch's embedding rows (row r used
    counts[r] times), without gathering them."""
    return (counts.to(table.dtype) * table.square().sum(1)).sum()


def batch_counts(ids: Tensor, size: int, weight: float = 1.0) -> Tensor:
    return torch.bincount(ids.reshape(-1), minlength=size).float() * weight


@dataclass
class FitResult:
    """What :meth:`Recommender.fit` did: epochs run, the best epoch (by validation MRR@10) whose weights the
    model now holds, its validation metrics, wall seconds (training and validation together; ``eval_seconds``
    of them validating), and each validation's MRR@10 (``history``, one per evaluated epoch).

    ``stopped_by`` says why training ended: ``"patience"`` (validation stopped improving: early stopping),
    ``"epochs"`` (every epoch ran) or ``"max_seconds"`` (the time limit cut it short: :attr:`cut_short`)."""
    epochs: int
    best_epoch: int
    best_valid: Dict[str, float]
    seconds: float
    eval_seconds: float
    history: List[Tuple[int, float]] = field(default_factory=list)
    losses: Dict[str, float] = field(default_factory=dict)
    stopped_by: str = "epochs"

    @property
    def cut_short(self) -> bool:
        """Whether the time limit ended training before early stopping or the last epoch did."""
        return self.stopped_by == "max_seconds"


class Recommender(nn.Module):
    """Base of the recommenders: subclasses give ``user_item_vectors()`` (``[U, D]``, ``[I, D]``; the score of a
    (user, item) pair is their inner product) and ``training_loss(users, pos, neg)``; this class gives
    ``fit``, ``recommend`` and the retrieval index.

    ``DEFAULTS``: each subclass's training settings (``fit``'s keyword arguments), measured on ml-100k.
    """

    DEFAULTS: Dict[str, object] = dict(epochs=100, lr=1e-3, batch_size=2048, negatives=1, weight_decay=0.0,
                                       patience=10, eval_every=1, seed=0)

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        self.num_users = check_int(num_users, "num_users")
        self.num_items = check_int(num_items, "num_items")
        # training interactions (sorted pair keys), set by fit: what recommend excludes by default
        self.register_buffer("seen_keys", torch.empty(0, dtype=torch.int64), persistent=True)
        self.register_buffer("popularity", torch.zeros(num_items), persistent=True)
        self.register_buffer("user_degree", torch.zeros(num_users, dtype=torch.int64), persistent=True)
        self._fitted = False
        self._cache: Optional[Tuple[Tensor, FlatIndex]] = None
        self.settings: Dict[str, object] = dict(self.DEFAULTS)

    # -- what subclasses provide --------------------------------------------------------------------------
    def user_item_vectors(self) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def training_loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        """The loss of a batch (``users [B]``, positives ``pos [B]``, negatives ``neg [B, n]``) and values to
        report. Default: BPR on inner products of ``user_item_vectors()``."""
        loss = bpr_loss(*pair_scores(*self.user_item_vectors(), users, pos, neg))
        return loss, {"bpr": loss.item()}

    def prepare(self, data) -> None:
        """Called by fit before training with the data set, e.g. to build a graph from ``data.train``."""

    # -- fitting ------------------------------------------------------------------------------------------
    def set_interactions(self, train: Interactions) -> None:
        """Record the training interactions: what recommend excludes, item popularity, cold users."""
        users, items = train.users.to(torch.int64), train.items.to(torch.int64)
        self._check_ids(users, "users of the training interactions", self.num_users, "user")
        self._check_ids(items, "items of the training interactions", self.num_items, "item")
        self.seen_keys = torch.unique(_pair_keys(users, items, self.num_items))
        self.popularity = torch.bincount(items, minlength=self.num_items).float()
        self.user_degree = torch.bincount(users, minlength=self.num_users)
        self._fitted = True
        self.refresh()

    def fit(self, data, *, progress: bool = False, max_seconds: Optional[float] = None, **settings) -> FitResult:
        """Train on ``data.train`` (a :class:`MovieLens100K` or anything with ``train``, ``valid`` and
        ``history``), validating on ``data.valid`` every ``eval_every`` epochs by MRR@10 (RecBole's
        ``valid_metric``); stops after ``patience`` validations without improvement (or ``epochs``, or
        ``max_seconds``) and keeps the best validation's weights.

        Settings (default: the class's ``DEFAULTS``): ``epochs``, ``lr`` (Adam), ``batch_size``, ``negatives``
        (uniform negatives per positive, from the user's unseen items), ``weight_decay`` (Adam's L2),
        ``patience``, ``eval_every``, ``seed``; subclasses add their own (see their ``DEFAULTS``).
        """
        unknown = set(settings) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown fit settings {sorted(unknown)}; {type(self).__name__} takes "
                            f"{sorted(self.DEFAULTS)}")
        cfg = {**self.DEFAULTS, **settings}
        for name in ("epochs", "batch_size", "negatives", "patience", "eval_every"):
            cfg[name] = check_int(cfg[name], name)
        self.settings = cfg
        train: Interactions = data.train
        if len(train) == 0:
            raise ValueError("data.train has no interactions to learn from")
        self.set_interactions(train)
        torch.manual_seed(cfg["seed"])
        generator = torch.Generator().manual_seed(cfg["seed"])
        self.prepare(data)
        self.reset_parameters()
        opt = self.make_optimizer(cfg)
        users_all, items_all = train.users.to(torch.int64), train.items.to(torch.int64)
        unseen = unseen_table(self.seen_keys, self.num_users, self.num_items) \
            if self.num_users * self.num_items <= DENSE_PAIRS else None
        best, best_state, best_epoch, best_valid = -1.0, None, 0, {}
        history: List[Tuple[int, float]] = []
        bad, eval_seconds, epoch, stopped_by = 0, 0.0, 0, "epochs"
        losses: Dict[str, float] = {}
        started = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg["epochs"], desc=type(self).__name__, unit="epoch", dynamic_ncols=True)
        try:
            for epoch in range(1, cfg["epochs"] + 1):
                self.train()
                order = torch.randperm(len(train), generator=generator)
                negs = sample_negatives(users_all[order], cfg["negatives"], self.num_items, self.seen_keys, generator,
                                        unseen=unseen)
                totals: Dict[str, float] = {}
                steps = 0
                for start in range(0, len(train), cfg["batch_size"]):
                    rows = order[start:start + cfg["batch_size"]]
                    loss, parts = self.training_loss(users_all[rows], items_all[rows],
                                                     negs[start:start + cfg["batch_size"]])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for key, value in parts.items():
                        totals[key] = totals.get(key, 0.0) + value
                    steps += 1
                losses = {key: value / steps for key, value in totals.items()}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"{type(self).__name__}: the training loss became {losses} in epoch "
                                             f"{epoch}; lower lr (now {cfg['lr']})")
                if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                    t0 = time.perf_counter()
                    self.eval()
                    valid = evaluate(self, data, "valid")
                    eval_seconds += time.perf_counter() - t0
                    history.append((epoch, valid["mrr@10"]))
                    if valid["mrr@10"] > best:
                        best, best_epoch, best_valid, bad = valid["mrr@10"], epoch, valid, 0
                        best_state = copy.deepcopy(self.state_dict())
                    else:
                        bad += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in losses.items()}, "best_mrr@10": f"{best:.4f}"})
                if bad >= cfg["patience"]:
                    stopped_by = "patience"
                    break
                if (max_seconds is not None and epoch < cfg["epochs"]
                        and time.perf_counter() - started > max_seconds):
                    stopped_by = "max_seconds"
                    break
        finally:
            if bar is not None:
                bar.close()
        if best_state is None:  # stopped before the first validation: validate what there is
            best_epoch, best_valid = epoch, evaluate(self, data, "valid")
        else:
            self.load_state_dict(best_state)
        self.eval()
        self.refresh()
        return FitResult(epoch, best_epoch, best_valid, time.perf_counter() - started, eval_seconds, history, losses,
                         stopped_by)

    def reset_parameters(self) -> None:
        """Fresh weights before fitting (subclasses initialise their own)."""

    def make_optimizer(self, cfg: Dict) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    # -- retrieval ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self.refresh()
        return super().train(mode)

    def refresh(self) -> None:
        """Forget the cached user vectors and item index (after changing the weights by hand)."""
        self._cache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys = state_dict.get(prefix + "seen_keys")
        if isinstance(keys, Tensor) and keys.dim() == 1:  # its length is the number of training pairs
            self.seen_keys = torch.empty_like(keys, device=self.seen_keys.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()
        if keys is not None:
            self._fitted = True

    def retrieval(self) -> Tuple[Tensor, FlatIndex]:
        """The user vectors and a FlatIndex (metric "ip") of the item vectors, computed once and cached."""
        if self._cache is None:
            with torch.no_grad():
                u, i = self.user_item_vectors()
            u, i = u.detach().float().contiguous(), i.detach().float().contiguous()
            index = FlatIndex(i.shape[1], "ip")
            index.add(i)
            self._cache = (u, index)
        return self._cache

    def _check_ids(self, ids: Tensor, name: str, count: int, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
            bad = ids[(ids < 0) | (ids >= count)][0]
            raise ValueError(f"{name}: unknown {what} id {int(bad)} (ids are 0..{count - 1})")

    def _as_users(self, users) -> Tensor:
        if isinstance(users, numbers.Integral) and not isinstance(users, bool):
            users = [int(users)]
        t = torch.as_tensor(users)
        if t.numel() == 0 and t.dim() == 1:
            t = t.to(torch.int64)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"users must be integer user ids, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"users must be one user id or a 1-D sequence of them, got shape {tuple(t.shape)}")
        t = t.to(torch.int64).cpu()
        self._check_ids(t, "users", self.num_users, "user")
        return t

    @staticmethod
    def _as_pairs(exclude) -> Tuple[Tensor, Tensor]:
        """``exclude`` (an :class:`Interactions` or a ``(users, items)`` pair of 1-D integer sequences) as two
        int64 tensors of equal length."""
        if isinstance(exclude, Interactions):
            pair = (exclude.users, exclude.items)
        elif isinstance(exclude, (tuple, list)) and len(exclude) == 2:
            pair = exclude
        else:
            raise TypeError(f"exclude must be Interactions or a (users, items) pair, got {type(exclude).__name__}")
        users, items = (torch.as_tensor(x) for x in pair)
        for name, t in (("exclude users", users), ("exclude items", items)):
            if t.dim() != 1 or (t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)):
                raise TypeError(f"{name} must be a 1-D sequence of integer ids, got shape {tuple(t.shape)} and "
                                f"dtype {t.dtype}")
        if users.shape != items.shape:
            raise ValueError(f"exclude must have as many users as items, got {users.shape[0]} and {items.shape[0]}")
        return users.to(torch.int64).cpu(), items.to(torch.int64).cpu()

    def recommend(self, users, k: int, *, exclude: Optional[Interactions] = None,
                  exclude_seen: bool = True) -> Tuple[Tensor, Tensor]:
        """The top ``k`` items for each of ``users`` (ids; one int or a 1-D sequence), best first.

        Excluded: each user's training interactions (``exclude_seen``) and the pairs of ``exclude`` (an
        :class:`Interactions` or ``(users, items)``; e.g. the validation interactions when testing). Returns ``(scores [B, k], items [B, k])``; where a user has
        fewer than ``k`` items left the rest is padded with item -1 and score -inf. Users without training
        interactions get the most popular training items (their score: the item's training count).
        """
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.recommend: the model has not been fitted (call fit first)")
        users = self._as_users(users)
        k = check_int(k, "k", 1, self.num_items)
        keys = self.seen_keys if exclude_seen else torch.empty(0, dtype=torch.int64)
        if exclude is not None:
            ex_users, ex_items = self._as_pairs(exclude)
            self._check_ids(ex_users, "exclude.users", self.num_users, "user")
            self._check_ids(ex_items, "exclude.items", self.num_items, "item")
            keys = torch.unique(torch.cat([keys, _pair_keys(ex_users, ex_items, self.num_items)]))
        skips = torch.bincount(keys // self.num_items, minlength=self.num_users)
        out_scores = torch.full((users.shape[0], k), float("-inf"))
        out_items = torch.full((users.shape[0], k), -1, dtype=torch.int64)
        cold = self.user_degree[users] == 0
        if bool(cold.any()):
            rows = cold.nonzero().flatten()
            s, i = self._search(self.popularity[None].expand(rows.shape[0], -1), users[rows], k, keys, skips, None)
            out_scores[rows], out_items[rows] = s, i
        warm = (~cold).nonzero().flatten()
        if warm.numel():
            user_vectors, index = self.retrieval()
            s, i = self._search(user_vectors, users[warm], k, keys, skips, index)
            out_scores[warm], out_items[warm] = s, i
        return out_scores, out_items

    def _search(self, vectors: Tensor, users: Tensor, k: int, keys: Tensor, skips: Tensor,
                index: Optional[FlatIndex]) -> Tuple[Tensor, Tensor]:
        """Top k of each user's non-excluded items. ``index`` None: ``vectors`` are already per-row scores over
        all items (the popularity fallback); else user vectors (indexed by user id) searched in ``index``."""
        need = skips[users]
        order = torch.argsort(need)
        scores = torch.empty(users.shape[0], k)
        items = torch.empty(users.shape[0], k, dtype=torch.int64)
        for start in range(0, users.shape[0], RECOMMEND_BATCH):
            rows = order[start:start + RECOMMEND_BATCH]
            batch = users[rows]
            width = min(k + int(need[rows].max()), self.num_items)
            if index is None:
                s, ids = torch.topk(vectors[rows], width, dim=1)
            else:
                s, ids = index.search(vectors[batch], width)
            keep = (ids >= 0) & ~_contains(keys, _pair_keys(batch[:, None].expand_as(ids), ids.clamp(min=0), self.num_items))
            rank = keep.cumsum(1) - 1
            keep &= rank < k
            r, c = keep.nonzero(as_tuple=True)
            bs = torch.full((rows.shape[0], k), float("-inf"))
            bi = torch.full((rows.shape[0], k), -1, dtype=torch.int64)
            bs[r, rank[r, c]] = s[r, c].float()
            bi[r, rank[r, c]] = ids[r, c]
            scores[rows], items[rows] = bs, bi
        return scores, items


@torch.no_grad()
def evaluate(model: Recommender, data, split: str = "test", k: int = 10) -> Dict[str, float]:
    """RecBole's full-ranking evaluation of ``split`` ("valid" or "test"): for every user with interactions
    in that part, the top ``k`` of all items with the user's earlier interactions excluded (valid: training;
    test: training and validation), scored against the part's items by
    :func:`xmodal.metrics.recommendation_report` (Recall, MRR, NDCG, Hit, Precision @k, user means)."""
    part: Interactions = data.part(split)
    history: Interactions = data.history(split)
    users = torch.unique(part.users)
    relevant_by_user = part.items_of(model.num_users)
    _, ranked = model.recommend(users, k, exclude=history)
    return metrics.recommendation_report(ranked, [relevant_by_user[u] for u in users.tolist()], k)
