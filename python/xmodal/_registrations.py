"""Fake-tensor (and, as ops gain backward passes, autograd) registrations for every xmodal op: one place.

Imported by ``xmodal/__init__.py`` right after the compiled extension defines the ops.
"""
import torch


@torch.library.register_fake("xmodal::topk_search")
def _topk_search_fake(queries, database, k, metric="cosine", mask=None):
    torch._check(queries.dim() in (1, 2), lambda: f"queries must be 1-D [D] or 2-D [Q, D], got shape {tuple(queries.shape)}")
    torch._check(database.dim() == 2, lambda: f"database must be 2-D [N, D], got shape {tuple(database.shape)}")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    shape = (k,) if queries.dim() == 1 else (queries.shape[0], k)
    values = queries.new_empty(shape)
    indices = queries.new_empty(shape, dtype=torch.int64)
    return values, indices
