"""The name :mod:`xmodal.graph_fusion` keeps for :class:`xmodal.graph.GraphFusion` (defined in
:mod:`xmodal.graph.fusion`; also :class:`xmodal.nn.GraphFusion`)."""
from .graph.fusion import GraphFusion

__all__ = ["GraphFusion"]
