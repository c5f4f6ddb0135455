"""MovieLens-100k as RecBole 1.2.1 evaluates it by default, read from RecBole's atomic files.

**RecBole's default protocol for ml-100k** (``recbole/properties/overall.yaml`` and
``recbole/properties/dataset/ml-100k.yaml``, read as text):

- interactions: every row of ``ml-100k.inter`` is a positive (implicit feedback). No rating threshold
  (``threshold: ~``), no value filter (``val_interval: ~``), no k-core filter (``user_inter_num_interval`` and
  ``item_inter_num_interval`` are ``~``), duplicates kept (``rm_dup_inter: ~``; ml-100k has none). The
  ``rating`` and ``timestamp`` columns are loaded but unused by general recommenders.
- split (``eval_args: {split: {RS: [0.8, 0.1, 0.1]}, group_by: user, order: RO}``): all interactions are
  shuffled once (``order: RO``, under ``seed: 2020``), then grouped by user in that shuffled order; each
  user's ``n`` interactions are cut into ``int(0.1 n)`` validation and ``int(0.1 n)`` test interactions and
  the rest for training (``Dataset._calcu_split_ids``: parts other than the first are rounded down, and a
  part whose share ``0 < ratio * n < 1`` gets one row while training keeps more than one). ml-100k's users
  have 20 to 737 ratings, so this gives 80,808 / 9,596 / 9,596 interactions with all 943 users in each part.
- evaluation (``mode: full``): every item is ranked for every user of the evaluated part; items the user
  has interacted with before are excluded (validation: the user's training items; test: training and
  validation items -- RecBole's sampler ``used_ids`` for the phase minus the part's own positives).
  Metrics ``Recall, MRR, NDCG, Hit, Precision @10`` (see :func:`xmodal.metrics.recommendation_report`),
  averaged over the users of the evaluated part. Model selection: ``valid_metric: MRR@10`` after every epoch,
  early stopping after ``stopping_step: 10`` epochs without improvement, the best epoch's model tested.
- training: ``train_neg_sample_args``: one negative per positive, drawn uniformly from the items the user has
  no training interaction with.

**What this class does**: exactly the same steps -- all rows positive, the shuffle-then-group-by-user split
with RecBole's rounding rule (so the part sizes are the same: 80,808 / 9,596 / 9,596), the same exclusions at
evaluation -- with its own random generator (``torch.Generator`` seeded with ``seed``), so the rows that land
in each part differ from RecBole's: compare over several seeds, not row for row. Where RecBole would keep a
repeated (user, item) row, this class refuses the file (ml-100k has none): one row per pair is what implicit
feedback means, and a repeat could sit in training and test at once.

Ids: users and items are numbered ``0 .. num_users - 1`` / ``0 .. num_items - 1`` in the order of their tokens
(numerically where every token is an integer, as in ml-100k, else as strings); ``user_tokens`` /
``item_tokens`` map back, :meth:`MovieLens100K.user_index` / :meth:`MovieLens100K.item_index` map tokens to
ids. The catalogue is every item of ``ml-100k.item`` (RecBole ranks those too; an item without any
interaction can never be a positive). Side information (for content-aware models): titles, release years,
genres (``ml-100k.item``) and knowledge-graph neighbours (``ml-100k.link`` maps items to Freebase entities,
``ml-100k.kg`` holds (head, relation, tail) triples between entities).
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["MovieLens100K", "Interactions", "recbole_data_dir", "split_sizes", "FILES"]

#: the files a ml-100k folder holds, and the columns (RecBole's ``name:type`` headers) each must have
FILES = {
    "inter": ("user_id", "item_id"),
    "item": ("item_id", "movie_title", "release_year", "class"),
    "kg": ("head_id", "relation_id", "tail_id"),
    "link": ("item_id", "entity_id"),
}


def recbole_data_dir() -> str:
    """The folder of RecBole's bundled ml-100k files (``<site-packages>/recbole/dataset_example/ml-100k``),
    found without importing RecBole. FileNotFoundError when RecBole is not installed."""
    spec = importlib.util.find_spec("recbole")  # a top-level package: found, not executed
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the ml-100k files were not found: RecBole (which bundles them under "
                                "recbole/dataset_example/ml-100k) is not installed; pass root= a folder holding "
                                "ml-100k.inter, ml-100k.item, ml-100k.kg and ml-100k.link")
    return os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k")


def split_sizes(n: int, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> List[int]:
    """How many of a user's ``n`` interactions go to each part, by RecBole's rule (``_calcu_split_ids``):
    ``int(ratio * n)`` for every part but the first, the rest to the first; then, walking from the last part,
    a part with ``0 < ratio * n < 1`` takes one row from the first part while the first has more than one."""
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    count = [int(r * n) for r in ratios]
    count[0] = n - sum(count[1:])
    for i in range(1, len(ratios)):
        if count[0] <= 1:
            break
        if 0 < ratios[-i] * n < 1:
            count[-i] += 1
            count[0] -= 1
    return count


@dataclass(frozen=True)
class Interactions:
    """(user, item) pairs: two int64 tensors of equal length."""
    users: Tensor
    items: Tensor

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def __iter__(self) -> Iterator[Tensor]:  # users, items = interactions
        return iter((self.users, self.items))

    def __add__(self, other: "Interactions") -> "Interactions":
        return Interactions(torch.cat([self.users, other.users]), torch.cat([self.items, other.items]))

    def items_of(self, num_users: int) -> List[List[int]]:
        """For each user id, the items of its pairs (sorted)."""
        order = torch.argsort(self.users * (int(self.items.max()) + 1 if len(self) else 1) + self.items)
        users, items = self.users[order].tolist(), self.items[order].tolist()
        out: List[List[int]] = [[] for _ in range(num_users)]
        for u, i in zip(users, items):
            out[u].append(i)
        return out


def _read_atomic(path: str, needed: Sequence[str]) -> Tuple[List[str], Iterator[Tuple[int, List[str]]]]:
    """The header names of a RecBole atomic file (``name:type`` separated by tabs) and an iterator over
    ``(line number, fields)`` of its rows, each checked to have as many fields as the header. Errors name
    the file (and the line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a ml-100k folder holds ml-100k.inter, ml-100k.item, "
                                f"ml-100k.kg and ml-100k.link in RecBole's atomic format)")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}, line 1: expected a header of tab-separated 'name:type' columns, got an empty line")
    header = [column.split(":", 1)[0].strip() for column in lines[0].rstrip("\r").split("\t")]
    missing = [name for name in needed if name not in header]
    if missing:
        raise ValueError(f"{path}, line 1: the header must have the columns {list(needed)}; {missing} missing "
                         f"(got {header})")

    def rows():
        for number, line in enumerate(lines[1:], start=2):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ValueError(f"{path}, line {number}: expected {len(header)} tab-separated fields "
                                 f"({', '.join(header)}), got {len(fields)}: {line[:80]!r}")
            yield number, fields

    return header, rows()


def _read_pairs(path: str, kind: str, first: str, second: str) -> Iterator[Tuple[int, str, str]]:
    """``(line number, first, second)``: two columns of each row of an atomic file of ``FILES[kind]``, stripped;
    an empty one is an error naming the file, the line and the column."""
    header, rows = _read_atomic(path, FILES[kind])
    a, b = header.index(first), header.index(second)
    for line, f in rows:
        x, y = f[a].strip(), f[b].strip()
        if not x or not y:
            raise ValueError(f"{path}, line {line}: empty {first if not x else second}")
        yield line, x, y


def _token_order(tokens) -> List[str]:
    tokens = set(tokens)
    if all(re.fullmatch(r"-?\d+", t) for t in tokens):
        return sorted(tokens, key=int)
    return sorted(tokens)


class MovieLens100K:
    """MovieLens-100k (943 users, 1682 items, 100,000 interactions) split as RecBole's default protocol
    splits it (see the module docstring), plus its items' side information.

    Args:
        root: a folder with ``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.kg`` and ``ml-100k.link`` (RecBole's
            atomic files); default: the copy bundled with an installed RecBole (:func:`recbole_data_dir`).
        seed: seed of the split's shuffle (RecBole's default seed is 2020; this is another generator, so the
            same seed gives another split than RecBole's).
        ratios: train / validation / test shares (RecBole's default ``(0.8, 0.1, 0.1)``).

    Attributes:
        num_users, num_items; ``user_tokens``, ``item_tokens`` (the ids as written in the files);
        ``train``, ``valid``, ``test``: :class:`Interactions`;
        ``titles`` (list of str, as written), ``years`` (``[I]``
        int64, 0 where the file has no valid year), ``genres`` (``[I, G]`` bool), ``genre_names``;
        ``kg_neighbours``: for each item, the ids of the knowledge-graph entities one hop from its linked
        entity (either direction), ``entity_names[id]`` (Freebase ids), ``kg_triples`` (count read).

    Missing files raise FileNotFoundError naming the file; malformed ones ValueError naming file and line.
    """

    def __init__(self, root: Optional[str] = None, seed: int = 2020, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> None:
        if root is None:
            root = recbole_data_dir()
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path, got {type(root).__name__} ({root!r})")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"root={root!r}: no such folder (it should hold ml-100k.inter, ml-100k.item, "
                                    f"ml-100k.kg and ml-100k.link)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
        ratios = tuple(ratios)
        if len(ratios) != 3 or any(not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 for r in ratios):
            raise ValueError(f"ratios must be three positive numbers (train, validation, test), got {ratios!r}")
        self.root, self.seed, self.ratios = root, seed, ratios
        path = {name: os.path.join(root, f"ml-100k.{name}") for name in FILES}
        for name in FILES:  # every file present before any is parsed
            if not os.path.isfile(path[name]):
                raise FileNotFoundError(f"{path[name]}: no such file (a ml-100k folder holds ml-100k.inter, "
                                        f"ml-100k.item, ml-100k.kg and ml-100k.link in RecBole's atomic format)")
        self._read_items(path["item"])
        self._read_interactions(path["inter"])
        self._read_kg(path["link"], path["kg"])
        self._split()

    # -- reading -------------------------------------------------------------------------------------------
    def _read_items(self, path: str) -> None:
        header, rows = _read_atomic(path, FILES["item"])
        col = {name: header.index(name) for name in FILES["item"]}
        by_token: Dict[str, Tuple[str, int, List[str]]] = {}
        for line, f in rows:
            token = f[col["item_id"]].strip()
            if not token:
                raise ValueError(f"{path}, line {line}: empty item_id")
            if token in by_token:
                raise ValueError(f"{path}, line {line}: item_id {token!r} appears twice")
            year = f[col["release_year"]].strip()
            # ml-100k has two rows without a year ('unkonwn', 'V'): those read as 0, unknown
            by_token[token] = (f[col["movie_title"]].strip(), int(year) if year.isdigit() else 0,
                               f[col["class"]].split())
        if not by_token:
            raise ValueError(f"{path}: no items")
        self.item_tokens = _token_order(by_token)
        self._item_id = {t: i for i, t in enumerate(self.item_tokens)}
        self.titles = [by_token[t][0] for t in self.item_tokens]
        self.years = torch.tensor([by_token[t][1] for t in self.item_tokens], dtype=torch.int64)
        self.genre_names = sorted({g for t in self.item_tokens for g in by_token[t][2]})
        genre_id = {g: j for j, g in enumerate(self.genre_names)}
        self.genres = torch.zeros(len(self.item_tokens), len(self.genre_names), dtype=torch.bool)
        for i, t in enumerate(self.item_tokens):
            for g in by_token[t][2]:
                self.genres[i, genre_id[g]] = True

    def _read_interactions(self, path: str) -> None:
        users_raw, items, lines = [], [], []
        for line, user, item in _read_pairs(path, "inter", "user_id", "item_id"):
            users_raw.append(user)
            items.append(self._known_item(path, line, item))
            lines.append(line)
        if not users_raw:
            raise ValueError(f"{path}: no interactions")
        self.user_tokens = _token_order(users_raw)
        self._user_id = {t: i for i, t in enumerate(self.user_tokens)}
        self.num_users, self.num_items = len(self.user_tokens), len(self.item_tokens)
        users = torch.tensor([self._user_id[u] for u in users_raw], dtype=torch.int64)
        items_t = torch.tensor(items, dtype=torch.int64)
        keys = users * self.num_items + items_t
        unique, counts = torch.unique(keys, return_counts=True)
        if bool((counts > 1).any()):
            key = int(unique[counts > 1][0])
            where = [lines[j] for j in (keys == key).nonzero().flatten().tolist()]
            raise ValueError(f"{path}, lines {where}: the interaction of user {self.user_tokens[key // self.num_items]!r} "
                             f"with item {self.item_tokens[key % self.num_items]!r} appears more than once (implicit "
                             f"feedback needs one row per pair)")
        self.interactions = Interactions(users, items_t)

    def _known_item(self, path: str, line: int, token: str) -> int:
        """The id of an item token that ml-100k.item listed (else an error naming the file and line)."""
        if token not in self._item_id:
            raise ValueError(f"{path}, line {line}: item_id {token!r} is not in ml-100k.item")
        return self._item_id[token]

    def _read_kg(self, link_path: str, kg_path: str) -> None:
        entity_of: Dict[str, List[int]] = {}  # entity -> the item ids linked to it
        for line, item, entity in _read_pairs(link_path, "link", "item_id", "entity_id"):
            entity_of.setdefault(entity, []).append(self._known_item(link_path, line, item))
        neighbours: List[set] = [set() for _ in range(len(self.item_tokens))]
        entity_id: Dict[str, int] = {}
        triples = 0
        for _, head, tail in _read_pairs(kg_path, "kg", "head_id", "tail_id"):
            triples += 1
            for a, b in ((head, tail), (tail, head)):
                for item in entity_of.get(a, ()):
                    neighbours[item].add(entity_id.setdefault(b, len(entity_id)))
        self.kg_triples = triples
        self.entity_names = list(entity_id)
        self.kg_neighbours: List[List[int]] = [sorted(s) for s in neighbours]

    # -- the split -----------------------------------------------------------------------------------------
    def _split(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.interactions), generator=generator)  # RecBole's "RO": shuffle all
        users = self.interactions.users[order]
        # group by user, keeping the shuffled order inside each user (a stable sort)
        by_user = order[torch.sort(users, stable=True).indices]
        counts = torch.bincount(self.interactions.users, minlength=self.num_users).tolist()
        parts: List[List[Tensor]] = [[], [], []]
        start = 0
        for n in counts:
            rows = by_user[start:start + n]
            a, b, _ = split_sizes(n, self.ratios)
            for part, piece in zip(parts, (rows[:a], rows[a:a + b], rows[a + b:])):
                part.append(piece)
            start += n
        splits = []
        for part in parts:
            rows = torch.cat(part) if part else torch.empty(0, dtype=torch.int64)
            splits.append(Interactions(self.interactions.users[rows], self.interactions.items[rows]))
        self.train, self.valid, self.test = splits

    # -- lookups -------------------------------------------------------------------------------------------
    def part(self, split: str) -> Interactions:
        """The interactions of ``split`` ("train", "valid" or "test")."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        return getattr(self, split)

    def history(self, split: str) -> Interactions:
        """What is excluded when ranking for ``split`` (as RecBole): "valid": the training interactions; "test":
        training and validation interactions."""
        if split == "valid":
            return self.train
        if split == "test":
            return self.train + self.valid
        raise ValueError(f"split must be 'valid' or 'test' (the parts that are evaluated), got {split!r}")

    def user_index(self, tokens) -> Tensor:
        """Ids of users given by their tokens (as written in ml-100k.inter); ValueError for an unknown one."""
        return self._lookup(tokens, self._user_id, "user")

    def item_index(self, tokens) -> Tensor:
        """Ids of items given by their tokens (as written in ml-100k.item); ValueError for an unknown one."""
        return self._lookup(tokens, self._item_id, "item")

    @staticmethod
    def _lookup(tokens, table: Dict[str, int], what: str) -> Tensor:
        single = isinstance(tokens, (str, int))
        out = []
        for t in ([tokens] if single else tokens):
            key = str(t).strip()
            if key not in table:
                raise ValueError(f"unknown {what} token {t!r}: not in the data ({len(table)} {what}s)")
            out.append(table[key])
        return torch.tensor(out, dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"MovieLens100K({self.num_users} users, {self.num_items} items, split seed {self.seed}: "
                f"{len(self.train):,} / {len(self.valid):,} / {len(self.test):,})")
