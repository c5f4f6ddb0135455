"""Re-ranking after a first search: query expansion, database augmentation, diffusion and graph message
passing, all training-free, for similarity metrics (``"cosine"`` and ``"ip"``), whose scores serve as
non-negative affinities once clamped at 0.

``database`` may be a ``[N, D]`` float tensor or an :class:`xmodal.FlatIndex` / :class:`xmodal.IVFIndex`
(without ``reduce_to``: re-ranking mixes the stored vectors with the queries, so both must live in the same
space). With a tensor, results index its rows; with an index, results are the index's ids. Every method works
on a copy of the database rows in at least float32 precision: ``O(N D)`` memory besides what each lists.

The methods live one per module in :mod:`xmodal.graph`; this module names them where users look for them.
"""
from .graph._rows import SIMILARITY_METRICS
from .graph.diffusion import Diffusion, conjugate_gradient
from .graph.expansion import database_augmentation, query_expansion
from .graph.gnn import GNNRerank, gnn_rerank

__all__ = ["SIMILARITY_METRICS", "query_expansion", "database_augmentation", "Diffusion", "conjugate_gradient",
           "gnn_rerank", "GNNRerank"]
