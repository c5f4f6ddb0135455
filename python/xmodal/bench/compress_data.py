"""The data sets of ``xmodal bench compress``: ``clustered`` (a seeded synthetic set with cluster structure)
and ``model`` (embeddings of rendered Shapes images by a CrossModalModel trained in-process): how each is
made, the description the report gives of it, and the caches that keep the last data set and model.
"""
from __future__ import annotations

import time
from typing import Tuple

import torch

DATASETS = ("clustered", "model")
GEN_ROWS = 65536                       # rows per generated chunk of the clustered set (part of its definition)
MODEL_STEPS, MODEL_STEPS_QUICK = 300, 30
MODEL_TRAIN_IMAGES = 6000

_data_cache: dict = {}   # the last data set made (one at a time: a 1M x 512 one is 2 GB)
_model_cache: dict = {}  # the last trained model


def clustered_centres(n: int) -> int:
    """Centres of the clustered set: about 256 rows per centre, between 64 and 4096 (3906 at N = 1M)."""
    return min(4096, max(64, n // 256))


def clustered_data(n: int, d: int, q: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(database [n, d], queries [q, d], description): unit rows drawn around Gaussian centres.

    A spectrum s_j = j^-1/2 (j = 1..d, scaled to mean s_j^2 = 1) shapes both the centres and the clusters, so
    the data have a decaying covariance spectrum like learnt embeddings (not isotropic noise); C centres
    c ~ N(0, diag(s^2)); each cluster has its own spread sigma ~ U(0.25, 0.6); a row of cluster a (drawn
    uniformly) is (c_a + sigma_a * N(0, diag(s^2))) @ R with R one random rotation (so no axis is special
    to a per-dimension quantiser), then L2-normalised. Queries: more rows drawn the same way (another seed).
    """
    c = clustered_centres(n)
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)
    s = (s / s.square().mean().sqrt()).float()
    centres = torch.randn(c, d, generator=g) * s
    spread = torch.empty(c).uniform_(0.25, 0.6, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    rotation = rotation.float()

    def draw(rows: int, gen: torch.Generator, out: torch.Tensor) -> None:
        for start in range(0, rows, GEN_ROWS):
            m = min(GEN_ROWS, rows - start)
            a = torch.randint(0, c, (m,), generator=gen)
            z = torch.randn(m, d, generator=gen).mul_(s).mul_(spread[a, None]).add_(centres[a])
            out[start:start + m] = torch.nn.functional.normalize(z @ rotation, dim=1)

    database = torch.empty(n, d)
    draw(n, torch.Generator().manual_seed(seed + 1), database)
    queries = torch.empty(q, d)
    draw(q, torch.Generator().manual_seed(seed + 2), queries)
    text = (f"clustered: {n:,} unit rows in D = {d} around {c:,} Gaussian centres (N / 256, clamped to 64..4096); "
            f"covariance spectrum s_j^2 = 1/j (scaled to mean 1) for the centres and inside each cluster, per-cluster "
            f"spread sigma ~ U(0.25, 0.6), one random rotation, rows L2-normalised; queries: {q} more rows drawn the "
            f"same way (torch generators seeded {seed}, {seed + 1}, {seed + 2}).")
    return database, queries, text


def trained_model(d: int, steps: int, seed: int = 0):
    """A CrossModalModel.default with ``embed_dim=d``, trained ``steps`` steps on Shapes (demo.training.train, its
    default settings otherwise); kept for the next call with the same arguments. Global RNG state is kept."""
    from ..demo.shapes import vocabulary_words
    from ..demo.training import TrainConfig, train
    from ..encoders import CrossModalModel, Tokenizer

    key = (d, steps, seed)
    if key not in _model_cache:
        _model_cache.clear()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # as demo.training.build_model, with embed_dim = d
            model = CrossModalModel.default(Tokenizer.fit(vocabulary_words(), max_length=24), embed_dim=d)
            config = TrainConfig(steps=steps, seed=seed, train_images=MODEL_TRAIN_IMAGES, checkpoint_every=10**9)
            train(model, config, progress=False)
        _model_cache[key] = (model.eval(), time.perf_counter() - start)
    return _model_cache[key]


def model_data(n: int, d: int, q: int, steps: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(database [n, d], queries [q, d], description): embeddings by the demo's model architecture.

    A CrossModalModel.default(embed_dim=d) trained ``steps`` steps (demo.training.train: InfoNCE on renderings of
    ShapesDataset(6000, seed=seed + 1000), seed ``seed``); database: encode_image of n random renderings
    (ShapesDataset(count=16384, seed=10_000 + i) for chunk i, the last chunk shorter); queries, alternately:
    encode_text of the first caption of a rendering of ShapesDataset(q // 2, seed=20_000) (text -> image)
    and encode_image of a rendering of ShapesDataset(q - q // 2, seed=30_000) (image -> image). All rows are
    unit vectors (the model normalises them)."""
    from ..demo.shapes import ShapesDataset

    model, train_seconds = trained_model(d, steps, seed)
    start = time.perf_counter()
    database = torch.empty(n, d)
    per = 16384
    with torch.inference_mode():
        for i, row in enumerate(range(0, n, per)):
            shapes = ShapesDataset(min(per, n - row), seed=10_000 + i)
            for b in range(0, len(shapes), 4096):
                database[row + b: row + b + 4096] = model.encode_image(shapes.images[b: b + 4096])
            del shapes
        texts = ShapesDataset(q // 2, seed=20_000)
        images = ShapesDataset(q - q // 2, seed=30_000)
        by_text = model.encode_text([c[0] for c in texts.captions])
        by_image = model.encode_image(images.images)
    queries = torch.empty(q, d)
    queries[0::2], queries[1::2] = by_image[: (q + 1) // 2], by_text[: q // 2]
    text = (f"model: CrossModalModel.default(embed_dim={d}) trained {steps} steps with xmodal.demo.training.train (batch 128, "
            f"composed loss on, {MODEL_TRAIN_IMAGES} training renderings, seed {seed}; {train_seconds:.0f} s); "
            f"database: "
            f"encode_image of {n:,} random Shapes renderings (ShapesDataset(count=16384, seed=10000 + chunk)); "
            f"queries, alternately: encode_image of other renderings (image -> image, ShapesDataset seed 30000) and "
            f"encode_text of captions (text -> image, seed 20000); {time.perf_counter() - start:.0f} s to render and "
            f"encode. Shapes has 192 attribute combinations, so about N / 192 renderings share one and differ only "
            f"by jitter: many near-ties, a hard set for any compression.")
    return database, queries, text


def make_data(case, model_steps: int = MODEL_STEPS, seed: int = 0):
    """(database, queries, description) of the data set of ``case`` (a ``compress.CompressCase``: its ``dataset``,
    ``n``, ``d`` and ``q_batch``; not imported here, as compress imports this module), kept for the next call with the same arguments
    (only the last one: the previous is dropped before the next is made)."""
    key = (case.dataset, case.n, case.d, case.q_batch, model_steps, seed)
    if key not in _data_cache:
        _data_cache.clear()
        if case.dataset == "clustered":
            _data_cache[key] = clustered_data(case.n, case.d, case.q_batch, seed)
        elif case.dataset == "model":
            _data_cache[key] = model_data(case.n, case.d, case.q_batch, model_steps, seed)
        else:
            raise ValueError(f"unknown data set {case.dataset!r}: one of {list(DATASETS)}")
    return _data_cache[key]
