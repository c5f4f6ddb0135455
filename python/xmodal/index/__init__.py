"""Indexes over :func:`xmodal.topk_search`: FlatIndex (exact), IVFIndex (inverted lists), GraphIndex
(proximity graph), ShardedIndex
(one shard per torch.distributed rank).

Conventions shared by every index (they live in :class:`base.Index`):
  - ``add``, ``search`` and ``remove`` accept torch tensors, NumPy arrays and CuPy arrays (CuPy and CUDA
    tensors through DLPack, without copies where the dtype and device already match) and ``search``
    answers in the queries' array type.
  - ids are int64; ``add`` without ids numbers the vectors by a running counter (0, 1, 2, ... in the order
    they were added, never reused after ``remove``).
  - a ``mask`` is a bool array of length ``len(index)`` aligned with ``index.ids``: True = candidate.
  - search parameters (k, mask, IVF's nprobe) are call arguments, never state, so threads may share an index
    for searching.
  - a failed call leaves the index unchanged: every argument is checked before anything is modified.
  - ids are non-negative (-1 pads answers with fewer than k results); rows must be finite.
  - training a lossy encoding (a codec or ``reduce_to``) estimates the recall it keeps on held-out training
    rows (``estimated_recall``) and warns (:class:`LossyEncodingWarning`) when it is poor.
  - ``save`` writes a safetensors file (tensors + JSON metadata, no pickle) atomically, with a checksum that
    ``load`` verifies (see :mod:`.io`).

Layout: ``base`` (the Index class), ``flat``, ``graph``, ``ivf`` (with ``kmeans`` and the ``inverted_lists`` store),
``sharded``, ``io`` (files), ``arrays`` (torch / NumPy / CuPy interop).
"""
from .base import Index
from .encoding import LossyEncodingWarning
from .flat import FlatIndex
from .graph import GraphIndex
from .ivf import IVFIndex
from .sharded import ShardedIndex

__all__ = ["Index", "FlatIndex", "GraphIndex", "IVFIndex", "ShardedIndex", "LossyEncodingWarning"]
