"""Graphs over embeddings and the methods built on them, one module each: exact kNN graphs in PyTorch
Geometric's edge convention (:mod:`.knn`), re-ranking after a first search — query expansion and database
augmentation (:mod:`.expansion`), diffusion (:mod:`.diffusion`), message passing (:mod:`.gnn`) —
and the trainable :class:`GraphFusion` module (:mod:`.fusion`). :mod:`xmodal.rerank` and
:class:`xmodal.nn.GraphFusion` name the same objects.
"""
from .diffusion import Diffusion, conjugate_gradient
from .expansion import database_augmentation, query_expansion
from .fusion import GraphFusion
from .gnn import GNNRerank, gnn_rerank
from .knn import check_rows, knn_graph

__all__ = [
    "knn_graph",
    "check_rows",
    "query_expansion",
    "database_augmentation",
    "Diffusion",
    "conjugate_gradient",
    "gnn_rerank",
    "GNNRerank",
    "GraphFusion",
]
