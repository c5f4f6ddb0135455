"""xmodal.recommend: the ml-100k loader and RecBole's split, the recommendation metrics against hand-computed
values, retrieval with seen items excluded against brute force, and bad input. The models and the demo are in
test_recommend_models.py; the toy data set and fixtures in recommend_helpers.py."""
import math
import os

import pytest
import torch

from recommend_helpers import ml100k, needs_ml100k, toy, write_toy  # noqa: F401 (ml100k, toy: fixtures)
from xmodal import metrics
from xmodal.recommend import MF, Interactions, MovieLens100K, split_sizes
from xmodal.recommend import base as B


# --- the split ---------------------------------------------------------------------------------------------

def test_split_sizes_follow_recboles_rule():
    # int(0.1 n) for validation and test, the rest for training
    assert split_sizes(20) == [16, 2, 2]
    assert split_sizes(737) == [591, 73, 73]
    assert split_sizes(29) == [25, 2, 2]
    # a part whose share is below one row gets one while training keeps more than one (from the last part)
    assert split_sizes(5) == [3, 1, 1]
    assert split_sizes(2) == [1, 0, 1]
    assert split_sizes(1) == [1, 0, 0]
    assert split_sizes(10) == [8, 1, 1]


@needs_ml100k
def test_ml100k_split_matches_recboles_sizes(ml100k):
    assert (ml100k.num_users, ml100k.num_items) == (943, 1682)
    assert (len(ml100k.train), len(ml100k.valid), len(ml100k.test)) == (80_808, 9_596, 9_596)
    for part in (ml100k.train, ml100k.valid, ml100k.test):
        assert torch.unique(part.users).numel() == 943
    keys = [p.users * 1682 + p.items for p in (ml100k.train, ml100k.valid, ml100k.test)]
    everything = torch.cat(keys)
    assert torch.unique(everything).numel() == 100_000  # disjoint, and together every interaction
    # per user, the RecBole rounding of that user's count
    counts = torch.bincount(ml100k.interactions.users, minlength=943).tolist()
    got = [torch.bincount(p.users, minlength=943).tolist() for p in (ml100k.train, ml100k.valid, ml100k.test)]
    assert all([got[0][u], got[1][u], got[2][u]] == split_sizes(counts[u]) for u in range(943))
    # side information
    assert ml100k.genres.shape == (1682, 19) and int(ml100k.genres.sum()) > 1682
    assert int((ml100k.years == 0).sum()) == 2  # 'unkonwn' and 'V' in the file
    assert sum(len(n) > 0 for n in ml100k.kg_neighbours) == 1598  # the linked items
    assert ml100k.titles[0] == "Toy Story"


@needs_ml100k
def test_split_depends_on_the_seed_only():
    a, b, c = MovieLens100K(seed=5), MovieLens100K(seed=5), MovieLens100K(seed=6)
    assert torch.equal(a.test.items, b.test.items) and torch.equal(a.test.users, b.test.users)
    assert not torch.equal(a.test.items, c.test.items)
    assert len(c.test) == 9_596


def test_history_and_tokens(toy):
    assert len(toy.history("valid")) == len(toy.train)
    assert len(toy.history("test")) == len(toy.train) + len(toy.valid)
    assert toy.user_index(["3", 4]).tolist() == [2, 3]
    assert toy.item_tokens[int(toy.item_index("7"))] == "7"
    with pytest.raises(ValueError, match=r"unknown user token '999'"):
        toy.user_index("999")
    with pytest.raises(ValueError, match=r"unknown item token 'x'"):
        toy.item_index(["1", "x"])
    with pytest.raises(ValueError, match=r"split must be 'valid' or 'test'.*got 'train'"):
        toy.history("train")
    with pytest.raises(ValueError, match=r"split must be 'train', 'valid' or 'test', got 'dev'"):
        toy.part("dev")


# --- loading errors ----------------------------------------------------------------------------------------

def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root='.*nowhere': no such folder"):
        MovieLens100K(str(tmp_path / "nowhere"))
    folder = write_toy(tmp_path / "d")
    os.remove(os.path.join(folder, "ml-100k.kg"))
    with pytest.raises(FileNotFoundError, match=r"ml-100k\.kg: no such file"):
        MovieLens100K(folder)


@pytest.mark.parametrize("name, line, text, message", [
    ("inter", 3, "5\t7\t3", r"ml-100k\.inter, line 3: expected 4 tab-separated fields .* got 3"),
    ("inter", 2, "5\t\t3\t880000000", r"ml-100k\.inter, line 2: empty item_id"),
    ("inter", 4, "5\t9999\t3\t880000000", r"ml-100k\.inter, line 4: item_id '9999' is not in ml-100k\.item"),
    ("item", 2, "1\tToy Story\t1995", r"ml-100k\.item, line 2: expected 4 tab-separated fields"),
    ("link", 3, "77777\tm.x", r"ml-100k\.link, line 3: item_id '77777' is not in ml-100k\.item"),
    ("kg", 2, "m.a\tfilm.film.actor", r"ml-100k\.kg, line 2: expected 3 tab-separated fields"),
])
def test_malformed_rows_name_file_and_line(tmp_path, name, line, text, message):
    folder = write_toy(tmp_path / "d")
    path = os.path.join(folder, f"ml-100k.{name}")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    lines[line - 1] = text
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        MovieLens100K(folder)


def test_bad_header_duplicate_and_arguments(tmp_path):
    folder = write_toy(tmp_path / "d")
    path = os.path.join(folder, "ml-100k.inter")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace("item_id:token", "movie:token", 1))
    with pytest.raises(ValueError, match=r"ml-100k\.inter, line 1: the header must have the columns \['user_id', 'item_id'\]"):
        MovieLens100K(folder)
    lines = text.split("\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines[:3] + [lines[1]] + lines[3:]))
    with pytest.raises(ValueError, match=r"ml-100k\.inter, lines \[2, 4\]: the interaction of user .* appears more than once"):
        MovieLens100K(folder)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    with pytest.raises(ValueError, match=r"ratios must be three positive numbers"):
        MovieLens100K(folder, ratios=(0.8, 0.2))
    with pytest.raises(TypeError, match=r"seed must be an int, got str"):
        MovieLens100K(folder, seed="1")


# --- metrics -----------------------------------------------------------------------------------------------

RANKED = torch.tensor([[3, 1, 4, 9, -1], [0, 2, 5, 6, 7], [9, 8, 7, 6, 5]])
RELEVANT = [{1, 4, 6}, {7}, {0, 1}]


def test_recommendation_metrics_hand_computed():
    d = lambda i: 1 / math.log2(i + 1)  # noqa: E731
    # user 0: hits at ranks 2 and 3 of 3 relevant; user 1: rank 5 of 1; user 2: none of 2
    assert metrics.fractional_recall_at_k(RANKED, RELEVANT, 5) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics.fractional_recall_at_k(RANKED, RELEVANT, 2) == pytest.approx((1 / 3) / 3)
    assert metrics.mrr_at_k(RANKED, RELEVANT, 5) == pytest.approx((1 / 2 + 1 / 5 + 0) / 3)
    assert metrics.mrr_at_k(RANKED, RELEVANT, 4) == pytest.approx((1 / 2) / 3)
    assert metrics.hit_rate_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert metrics.precision_at_k(RANKED, RELEVANT, 5) == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)
    # padding (-1) counts as a miss and the divisor stays k
    assert metrics.precision_at_k(torch.tensor([[1, -1]]), [{1, 2}], 2) == pytest.approx(0.5)
    # NDCG: ideal over min(|relevant|, k) ranks
    ndcg0 = (d(2) + d(3)) / (d(1) + d(2) + d(3))
    ndcg1 = d(5) / d(1)
    assert metrics.ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx((ndcg0 + ndcg1 + 0) / 3)
    ndcg0_k2 = d(2) / (d(1) + d(2))
    assert metrics.ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(ndcg0_k2 / 3)
    report = metrics.recommendation_report(RANKED, RELEVANT, 5)
    assert list(report) == ["recall@5", "mrr@5", "ndcg@5", "hit@5", "precision@5"]
    assert report["ndcg@5"] == pytest.approx((ndcg0 + ndcg1) / 3)


def test_recommendation_metrics_against_recboles_formulas():
    """RecBole's metric_info formulas (recbole/evaluator/metrics.py), written out on random rankings."""
    g = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(50)])
    relevant = [set(torch.randperm(30, generator=g)[: 1 + i % 7].tolist()) for i in range(50)]
    pos = torch.tensor([[int(i) in r for i in row] for row, r in zip(ranked.tolist(), relevant)], dtype=torch.float64)
    pos_len = torch.tensor([len(r) for r in relevant], dtype=torch.float64)
    ranks = torch.arange(1, 11, dtype=torch.float64)
    recall = (pos.cumsum(1) / pos_len[:, None])[:, -1].mean()
    hit = (pos.cumsum(1) > 0).double()[:, -1].mean()
    precision = (pos.cumsum(1) / ranks)[:, -1].mean()
    first = pos.argmax(1)
    mrr = torch.where(pos.gather(1, first[:, None])[:, 0] > 0, 1 / (first + 1.0), torch.zeros(50, dtype=torch.float64)).mean()
    idcg = torch.cumsum(1 / torch.log2(ranks + 1), 0)[(pos_len.clamp(max=10) - 1).long()]
    ndcg = ((pos / torch.log2(ranks + 1)).sum(1) / idcg).mean()
    report = metrics.recommendation_report(ranked, relevant, 10)
    for name, value in (("recall", recall), ("hit", hit), ("precision", precision), ("mrr", mrr), ("ndcg", ndcg)):
        assert report[f"{name}@10"] == pytest.approx(float(value)), name


def test_recommendation_metric_errors():
    with pytest.raises(ValueError, match=r"k must be positive, got 0"):
        metrics.mrr_at_k(RANKED, RELEVANT, 0)
    with pytest.raises(ValueError, match=r"k = 6 is larger than the 5 results per query"):
        metrics.precision_at_k(RANKED, RELEVANT, 6)
    with pytest.raises(ValueError, match=r"relevant must have one entry per query \(3\), got 2"):
        metrics.fractional_recall_at_k(RANKED, RELEVANT[:2], 5)


# --- retrieval ---------------------------------------------------------------------------------------------

class Fixed(B.Recommender):
    """A recommender with given vectors (no training)."""

    def __init__(self, users, items):
        super().__init__(users.shape[0], items.shape[0])
        self.u, self.i = users, items

    def user_item_vectors(self):
        return self.u, self.i


def brute_force(model, users, k, excluded):
    scores = model.u[users] @ model.i.T
    for row, u in enumerate(users.tolist()):
        scores[row, sorted(excluded.get(u, ()))] = float("-inf")
    return scores.topk(k, 1)


def test_recommend_matches_brute_force_with_seen_items_excluded():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(60, 8, generator=g), torch.randn(50, 8, generator=g)
    model = Fixed(users, items)
    # users 1..59 have seen random item sets of very different sizes (1 to 45 items), user 0 none
    seen_u, seen_i, seen = [], [], {}
    for u in range(60):
        its = torch.randperm(50, generator=g)[: 0 if u == 0 else 1 + (u * 7) % 45].tolist()
        seen[u] = set(its)
        seen_u += [u] * len(its)
        seen_i += its
    model.set_interactions(Interactions(torch.tensor(seen_u), torch.tensor(seen_i)))
    old = B.RECOMMEND_BATCH
    B.RECOMMEND_BATCH = 7  # several batches of different depths
    try:
        ask = torch.arange(1, 60)  # user 0 has seen nothing: a cold user, tested below
        scores, ids = model.recommend(ask, 4)
    finally:
        B.RECOMMEND_BATCH = old
    ref_v, ref_i = brute_force(model, ask, 4, seen)
    assert torch.equal(ids, ref_i)
    assert torch.allclose(scores, ref_v)
    for row, u in enumerate(ask.tolist()):
        assert not set(ids[row].tolist()) & seen[u]
    # extra exclusions
    extra = Interactions(torch.tensor([5, 5]), ref_i[4, :2])
    _, ids5 = model.recommend([5], 4, exclude=extra)
    seen5 = seen[5] | set(ref_i[4, :2].tolist())
    assert torch.equal(ids5, brute_force(model, torch.tensor([5]), 4, {5: seen5})[1])
    # exclude_seen=False searches everything
    _, all_ids = model.recommend([7], 3, exclude_seen=False)
    assert torch.equal(all_ids, (users[[7]] @ items.T).topk(3, 1).indices)


def test_recommend_pads_when_too_few_items_remain_and_serves_cold_users():
    users, items = torch.eye(3, 4), torch.eye(5, 4)
    model = Fixed(users, items)
    # user 0 has seen 4 of the 5 items; user 1 one item; user 2 none (cold: popularity)
    model.set_interactions(Interactions(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 1, 2, 3, 3])))
    scores, ids = model.recommend([0, 2], 3)
    assert ids[0].tolist() == [4, -1, -1] and torch.isinf(scores[0, 1:]).all()
    # popularity: item 3 twice, items 0-2 once, 4 never -> 3 first; ties in any order
    assert ids[1, 0].item() == 3 and scores[1, 0].item() == 2.0
    assert set(ids[1, 1:].tolist()) <= {0, 1, 2}


def test_recommend_bad_input(toy):
    model = MF(toy.num_users, toy.num_items, dim=8)
    with pytest.raises(RuntimeError, match=r"MF.recommend: the model has not been fitted"):
        model.recommend([0], 3)
    model.fit(toy, epochs=1)
    with pytest.raises(ValueError, match=rf"users: unknown user id {toy.num_users} \(ids are 0..{toy.num_users - 1}\)"):
        model.recommend([0, toy.num_users], 3)
    with pytest.raises(ValueError, match=r"users: unknown user id -1"):
        model.recommend(-1, 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\], got 0"):
        model.recommend([0], 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\], got 41"):
        model.recommend([0], 41)
    with pytest.raises(TypeError, match=r"k must be an int, got float"):
        model.recommend([0], 2.0)
    with pytest.raises(TypeError, match=r"users must be integer user ids, got dtype torch.float32"):
        model.recommend(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match=r"exclude.items: unknown item id 40"):
        model.recommend([0], 3, exclude=Interactions(torch.tensor([0]), torch.tensor([40])))
    with pytest.raises(TypeError, match=r"unknown fit settings \['lerning_rate'\]"):
        model.fit(toy, lerning_rate=0.1)
    with pytest.raises(ValueError, match=r"epochs must be >= 1, got 0"):
        model.fit(toy, epochs=0)
    with pytest.raises(TypeError, match=r"exclude must be Interactions or a \(users, items\) pair, got dict"):
        model.recommend([0], 3, exclude={"users": [0]})
    with pytest.raises(ValueError, match=r"exclude must have as many users as items, got 2 and 1"):
        model.recommend([0], 3, exclude=([0, 1], [2]))
    with pytest.raises(ValueError, match=r"users must be one user id or a 1-D sequence of them, got shape \(1, 1\)"):
        model.recommend([[0]], 3)
    # an empty request is an empty answer; a (users, items) pair works as exclude
    scores, ids = model.recommend([], 3)
    assert ids.shape == (0, 3)
    _, with_pair = model.recommend([0], 3, exclude=([0], [int(model.recommend([0], 1)[1][0, 0])]))
    assert with_pair[0, 0] != model.recommend([0], 1)[1][0, 0]
    # k = every item works
    _, ids = model.recommend([0], toy.num_items)
    assert (ids[0] >= 0).sum() == toy.num_items - int((model.seen_keys // toy.num_items == 0).sum())


def test_training_interactions_are_checked(toy):
    model = MF(toy.num_users, toy.num_items, dim=8)
    with pytest.raises(ValueError, match=r"items of the training interactions: unknown item id 99"):
        model.set_interactions(Interactions(torch.tensor([0]), torch.tensor([99])))


def test_negative_sampling_never_draws_a_seen_item():
    g = torch.Generator().manual_seed(0)
    users = torch.arange(6).repeat_interleave(5)
    items = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(6)]).flatten()
    keys = torch.unique(users * 12 + items)
    table = B.unseen_table(keys, 6, 12)
    for unseen in (table, None):
        neg = B.sample_negatives(users, 50, 12, keys, g, unseen=unseen)
        assert not torch.isin(users[:, None] * 12 + neg, keys).any()
        assert neg.min() >= 0 and neg.max() < 12
    # uniform over the unseen items
    neg = B.sample_negatives(torch.zeros(70_000, dtype=torch.long), 1, 12, keys, g, unseen=table).flatten()
    counts = torch.bincount(neg, minlength=12).float()
    free = counts[counts > 0]
    assert free.numel() == 7 and (free / free.mean() - 1).abs().max() < 0.05


def test_pair_scores_dense_and_gathered_agree():
    g = torch.Generator().manual_seed(0)
    u, i = torch.randn(10, 4, generator=g), torch.randn(15, 4, generator=g)
    users, pos, neg = torch.randint(10, (20,), generator=g), torch.randint(15, (20,), generator=g), torch.randint(15, (20, 3), generator=g)
    dense = B.pair_scores(u, i, users, pos, neg)
    old = B.DENSE_PAIRS
    B.DENSE_PAIRS = 1
    try:
        gathered = B.pair_scores(u, i, users, pos, neg)
    finally:
        B.DENSE_PAIRS = old
    assert torch.allclose(dense[0], gathered[0]) and torch.allclose(dense[1], gathered[1])
    assert torch.allclose(dense[0], (u[users] * i[pos]).sum(1))
