"""Retrieval evaluation of a :class:`CrossModalModel`: on the built-in Shapes data (``evaluate``: text -> image,
image -> text and composed-query R@1/5/10 through a ``FlatIndex``) and on your own pairs (``evaluate_pairs``:
R@K, mAP@K and mAP both ways, relevance by label or by image file). ``xmodal.train`` re-exports both.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import metrics
from .data import ComposedQueries, ShapesDataset, row_attribute
from .encoders import CrossModalModel
from .index import FlatIndex
from .ops import topk_search

__all__ = ["evaluate", "evaluate_pairs", "rerank_report"]



@torch.no_grad()
def evaluate(model: CrossModalModel, gallery: ShapesDataset, composed: Optional[ComposedQueries] = None) -> Dict[str, float]:
    """R@1/5/10 for text -> image, image -> text (any of the image's captions counts) and composed queries,
    with the gallery indexed in a ``FlatIndex`` (inner product of unit vectors = cosine)."""
    model.eval()
    device = model.logit_scale.device
    image_emb = model.encode_image(gallery.images.to(device)).cpu()
    captions = [c for cs in gallery.captions for c in cs]
    owner = torch.arange(len(gallery)).repeat_interleave(gallery.captions_per_image)
    text_emb = torch.cat([model.encode_text(captions[i : i + 512]).cpu() for i in range(0, len(captions), 512)])

    images = FlatIndex(image_emb.shape[1], "ip")
    images.add(image_emb)
    texts = FlatIndex(text_emb.shape[1], "ip")
    texts.add(text_emb)
    k = min(10, len(gallery))
    _, t2i = images.search(text_emb, k)
    _, i2t = texts.search(image_emb, min(10 * gallery.captions_per_image, len(captions)))
    i2t_images = torch.where(i2t >= 0, owner[i2t.clamp(min=0)], -1)
    out: Dict[str, float] = {}
    for r in (1, 5, 10):
        if r <= k:
            out[f"text_to_image_R@{r}"] = metrics.recall_at_k(t2i, owner, r)
            out[f"image_to_text_R@{r}"] = metrics.recall_at_k(i2t_images, torch.arange(len(gallery)), r)
    if composed is not None and len(composed):
        q = torch.cat([
            model.encode_composed(
                gallery.images[composed.references[i : i + 512]].to(device), composed.texts[i : i + 512]
            ).cpu()
            for i in range(0, len(composed), 512)
        ])
        _, c2i = images.search(q, k)
        for r in (1, 5, 10):
            if r <= k:
                out[f"composed_R@{r}"] = metrics.recall_at_k(c2i, torch.tensor(composed.targets), r)
    return out


def _drop_self(ids: Tensor, own: Tensor, k: int) -> Tensor:
    """Each row's ranking without the query's own row (``own``), cut to ``k``."""
    keep = torch.argsort((ids == own[:, None]).to(torch.int8), dim=1, stable=True)[:, : ids.shape[1] - 1]
    return ids.gather(1, keep)[:, :k]


@torch.no_grad()
def rerank_report(model: CrossModalModel, images: ShapesDataset, *, queries: int = 200, k: int = 100,
                  seed: int = 0) -> Dict[str, float]:
    """Image -> image retrieval of the same shape across colours, sizes and positions -- a task where an
    image's nearest neighbours (same colour, same place) are often the wrong shape, so the database's own
    neighbourhoods can help -- scored by mAP@k over ``queries`` images of ``images`` (each searching all the
    others): raw cosine search, alpha query expansion, diffusion and GNN re-ranking over the model's image
    embeddings."""
    from .rerank import Diffusion, GNNRerank, query_expansion

    model.eval()
    device = model.logit_scale.device
    emb = torch.cat([model.encode_image(images.images[i: i + 512].to(device)).cpu()
                     for i in range(0, len(images), 512)])
    kinds = [a.kind for a in images.attributes]
    picks = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:queries]
    relevant = [[j for j in range(len(images)) if kinds[j] == kinds[int(q)] and j != int(q)] for q in picks]
    q = emb[picks]
    k = min(k, len(images) - 1)
    ranked = {
        "raw": topk_search(q, emb, k + 1, "cosine")[1],
        "alpha-QE": query_expansion(q, emb, k + 1, n=5, alpha=3.0)[1],
        "diffusion": Diffusion(emb, graph_k=20).search(q, k + 1)[1],
        "GNN re-ranking": GNNRerank(emb, graph_k=20, layers=2).search(q, k + 1)[1],
    }
    return {name: metrics.mean_average_precision(_drop_self(ids, picks, k), relevant, k=k)
            for name, ids in ranked.items()}


@torch.no_grad()
def evaluate_pairs(
    model: CrossModalModel, pairs, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256
) -> Dict[str, float]:
    """Retrieval quality on your own pairs (e.g. a held-out ``ImageCaptionCSV``), both ways: each caption
    searches the images (``text_to_image``) and each image searches the captions (``image_to_text``).

    What is relevant: with labels (``pairs.labels``), every image / caption of the query's label; without, a
    caption's own image and an image's own captions. Rows that name one image file share one gallery image
    (its captions are all its rows' captions), so a caption's own image never also counts as a miss.

    Returns, for each direction ``d``: ``d/R@K`` for each K in ``ks`` (the fraction of queries with a relevant
    result among the first K; K is capped at the number of results), ``d/mAP@K`` for the largest K and
    ``d/mAP`` (mean average precision over the whole ranking). Runs the model in eval mode and restores its
    train/eval mode afterwards.
    """
    from torch.utils.data import DataLoader

    from .data import collate_captions

    if not isinstance(ks, (list, tuple)) or not ks \
            or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple or list of positive ints, got {ks!r}")
    ks = [int(k) for k in ks]
    if len(pairs) == 0:
        raise ValueError("evaluate_pairs needs at least one pair, got an empty data set")
    was_training = model.training
    model.eval()
    try:
        device = model.logit_scale.device
        image_emb, text_emb = [], []
        for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=collate_captions):
            image_emb.append(model.encode_image(batch[0].to(device)).float().cpu())
            text_emb.append(model.encode_text(list(batch[1])).float().cpu())
    finally:
        model.train(was_training)
    image_emb, text_emb = torch.cat(image_emb), torch.cat(text_emb)

    # the gallery: one image per image file (per row where files are unknown), embedded from its first row
    paths = row_attribute(pairs, "image_paths")
    files = paths if paths is not None else range(len(pairs))
    ids: Dict[object, int] = {}
    first_row: List[int] = []
    for row, file in enumerate(files):
        if file not in ids:
            ids[file] = len(ids)
            first_row.append(row)
    image_of_row = torch.tensor([ids[file] for file in files])
    gallery = image_emb[first_row]
    # relevance through classes: a caption's class is its label (or, without labels, its image); image u is
    # relevant to caption t when one of u's rows has t's class, and the other way round
    labels = row_attribute(pairs, "labels")
    row_class = torch.as_tensor(labels, dtype=torch.long) if labels is not None else image_of_row
    image_has_class = torch.zeros(len(ids), int(row_class.max()) + 1, dtype=torch.bool)
    image_has_class[image_of_row, row_class] = True

    out: Dict[str, float] = {}
    for direction, queries, database, relevant in (
        ("text_to_image", text_emb, gallery, lambda q: image_has_class[:, row_class[q]].T),
        ("image_to_text", gallery, text_emb, lambda q: image_has_class[q][:, row_class]),
    ):
        n = database.shape[0]
        sums: Dict[str, float] = {}
        # the whole ranking for mAP, a chunk of queries at a time so that [chunk, n] ids stay small
        chunk = max(1, (1 << 22) // n)
        for q0 in range(0, queries.shape[0], chunk):
            q = torch.arange(q0, min(q0 + chunk, queries.shape[0]))
            _, ranked = topk_search(queries[q], database, n, "ip")
            rel = relevant(q)
            values = {f"R@{k}": metrics.recall_at_k(ranked, rel, min(k, n)) for k in ks}
            values[f"mAP@{max(ks)}"] = metrics.mean_average_precision(ranked, rel, min(max(ks), n))
            values["mAP"] = metrics.mean_average_precision(ranked, rel)
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + v * len(q)
        out.update({f"{direction}/{name}": total / queries.shape[0] for name, total in sums.items()})
    return out
