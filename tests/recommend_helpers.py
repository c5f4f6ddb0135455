"""Shared by the xmodal.recommend tests: a toy data set in ml-100k's format and the fixtures that load it (or
RecBole's bundled ml-100k where installed)."""
import importlib.util
import os
import random

import pytest

from xmodal.recommend import MovieLens100K, recbole_data_dir

HAS_ML100K = importlib.util.find_spec("recbole") is not None \
    and os.path.isfile(os.path.join(recbole_data_dir(), "ml-100k.inter"))
needs_ml100k = pytest.mark.skipif(not HAS_ML100K, reason="needs RecBole's bundled ml-100k files")

HEADERS = {
    "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "kg": "head_id:token\trelation_id:token\ttail_id:token",
    "link": "item_id:token\tentity_id:token",
}


def write_toy(folder, users=24, items=40, seed=0, per_user=20):
    """A small ml-100k-format data set with structure: users of group g mostly pick items of group g (item
    ids with the same parity), and items of a group share a genre and knowledge-graph entities."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for u in range(1, users + 1):
        group = u % 2
        liked = [i for i in range(1, items + 1) if i % 2 == group]
        other = [i for i in range(1, items + 1) if i % 2 != group]
        picks = rng.sample(liked, min(per_user - 3, len(liked))) + rng.sample(other, 3)
        rows += [f"{u}\t{i}\t{rng.randint(1, 5)}\t{880000000 + u * 100 + i}" for i in picks]
    files = {
        "inter": rows,
        "item": [f"{i}\t{'Space' if i % 2 else 'Love'} Story {i}\t{1990 + i % 8}\t{'Sci-Fi Action' if i % 2 else 'Romance'}"
                 for i in range(1, items + 1)],
        "link": [f"{i}\tm.item{i}" for i in range(1, items + 1)],
        "kg": [f"m.item{i}\tfilm.film.actor\tm.actor{i % 2}{i % 3}" for i in range(1, items + 1)]
              + [f"m.director{i % 4}\tfilm.director.film\tm.item{i}" for i in range(1, items + 1)],
    }
    for name, lines in files.items():
        with open(os.path.join(folder, f"ml-100k.{name}"), "w", encoding="utf-8") as fh:
            fh.write("\n".join([HEADERS[name]] + lines) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return MovieLens100K(write_toy(tmp_path_factory.mktemp("toy")), seed=1)


@pytest.fixture(scope="module")
def ml100k():
    if not HAS_ML100K:
        pytest.skip("needs RecBole's bundled ml-100k files")
    return MovieLens100K(seed=2020)
