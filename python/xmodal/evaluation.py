"""Retrieval evaluation of a :class:`CrossModalModel` on your own pairs (``evaluate_pairs``: R@K, mAP@K and mAP
both ways, relevance by label or by image file). ``xmodal.train`` re-exports it.

The demo's evaluation on the built-in Shapes data (``evaluate``, ``rerank_report``) moved to
:mod:`xmodal.demo.evaluation`; the old names still resolve here, with a ``DeprecationWarning``, for one release.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Sequence

import torch

from . import _deprecated, metrics
from .data import row_attribute
from .encoders import CrossModalModel
from .ops import topk_search

__all__ = ["evaluate_pairs"]

# the demo's evaluation, moved to xmodal.demo.evaluation: resolved lazily (and with a warning) by xmodal._deprecated
__getattr__ = _deprecated.module_getattr(__name__)


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
