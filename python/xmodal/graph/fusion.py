"""Message passing over a graph of embeddings (e.g. image and caption nodes joined by pair and kNN edges)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GraphFusion"]


def _check_graph(x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor], dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"x must be [N, dim] = [N, {dim}] node embeddings, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    bad = (~torch.isfinite(x)).any(1).nonzero().flatten()
    if bad.numel():
        r = int(bad[0])
        kind = "NaN" if torch.isnan(x[r]).any() else "inf"
        raise ValueError(f"x holds non-finite values: row {r} has {kind} ({bad.numel()} of the {x.shape[0]} rows "
                         f"are not finite)")
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor, got {type(edge_index).__name__}")
    if edge_index.dtype != torch.int64:
        raise ValueError(f"edge_index must be int64 (source, target) node indices, got dtype {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be [2, E] (row 0: sources, row 1: targets), got shape "
                         f"{tuple(edge_index.shape)}")
    if edge_index.device != x.device:
        raise ValueError(f"edge_index is on {edge_index.device} but x is on {x.device}")
    n = x.shape[0]
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if hi >= n:
            raise ValueError(f"edge_index points at node {hi} but x has {n} rows (node indices must be in "
                             f"[0, {n - 1}])")
        if lo < 0:
            raise ValueError(f"edge_index holds the negative node index {lo} (node indices must be in [0, {n - 1}])")
    if edge_weight is None:
        return
    if not isinstance(edge_weight, Tensor):
        raise TypeError(f"edge_weight must be a torch.Tensor or None, got {type(edge_weight).__name__}")
    e = edge_index.shape[1]
    if edge_weight.dim() != 1 or edge_weight.shape[0] != e:
        raise ValueError(f"edge_weight must be [E] = [{e}], one weight per column of edge_index, got shape "
                         f"{tuple(edge_weight.shape)}")
    if not edge_weight.dtype.is_floating_point:
        raise ValueError(f"edge_weight must be a floating-point tensor, got dtype {edge_weight.dtype}")
    if edge_weight.device != x.device:
        raise ValueError(f"edge_weight is on {edge_weight.device} but x is on {x.device}")
    bad = (~torch.isfinite(edge_weight)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"edge_weight[{int(bad[0])}] = {edge_weight[bad[0]].item()} is not finite")


class _GraphAttention(nn.Module):
    """One GATv2 layer, dim -> dim, ``heads`` heads averaged (PyG ``GATv2Conv(dim, dim, heads, concat=False,
    edge_dim=1)``, self-loops added with the mean incoming weight)."""

    def __init__(self, dim: int, heads: int, dropout: float, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.dim, self.heads, self.dropout, self.negative_slope = dim, heads, dropout, negative_slope
        self.lin_l = nn.Linear(dim, heads * dim)  # sources (the messages)
        self.lin_r = nn.Linear(dim, heads * dim)  # targets
        self.lin_edge = nn.Linear(1, heads * dim, bias=False)
        self.att = nn.Parameter(torch.empty(1, heads, dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_l, self.lin_r, self.lin_edge):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        bound = math.sqrt(6.0 / (self.heads + self.dim))  # glorot over [heads, dim]
        nn.init.uniform_(self.att, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor]) -> Tensor:
        n, h, c = x.shape[0], self.heads, self.dim
        src, dst = edge_index[0], edge_index[1]
        # self-loops: existing ones are dropped, then one per node is added; its weight is the mean weight of the
        # node's other incoming edges (0 without any)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        loops = torch.arange(n, device=x.device)
        if edge_weight is not None:
            w = edge_weight[keep].to(x.dtype)
            total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, dst, w)
            count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, dst, torch.ones_like(w))
            w = torch.cat([w, total / count.clamp(min=1)])
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])

        x_l = self.lin_l(x).view(n, h, c)
        x_r = self.lin_r(x).view(n, h, c)
        z = x_l[src] + x_r[dst]  # [E, H, C]
        if edge_weight is not None:
            z = z + self.lin_edge(w[:, None]).view(-1, h, c)
        logits = (F.leaky_relu(z, self.negative_slope) * self.att).sum(-1)  # [E, H]

        # softmax over each target's incoming edges
        index = dst[:, None].expand(-1, h)
        peak = torch.full((n, h), float("-inf"), dtype=x.dtype, device=x.device)
        peak = peak.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
        e = (logits - peak[dst]).exp()
        denom = torch.zeros(n, h, dtype=x.dtype, device=x.device).index_add_(0, dst, e)
        alpha = e / (denom[dst] + 1e-16)
        alpha = F.dropout(alpha, self.dropout, training=self.training)

        out = torch.zeros(n, h, c, dtype=x.dtype, device=x.device).index_add_(0, dst, x_l[src] * alpha[..., None])
        return out.mean(1) + self.bias


class GraphFusion(nn.Module):
    """Refines node embeddings ``x [N, dim]`` by attention over the edges of a graph; returns ``[N, dim]``.

    ``forward(x, edge_index, edge_weight=None)``: ``edge_index [2, E]`` int64, PyTorch Geometric's convention
    (messages flow from ``edge_index[0]`` to ``edge_index[1]``); ``edge_weight [E]`` optional. Duplicate edges
    count once each; self-loops given in ``edge_index`` are replaced by one self-loop per node.

    Each of the ``layers`` layers is ``x = LayerNorm(x + dropout(GATv2(x)))``, followed by ELU on all but the
    last layer. ``GATv2`` is PyG's ``GATv2Conv(dim, dim, heads=heads, concat=False, negative_slope=0.2,
    dropout=dropout, add_self_loops=True, edge_dim=1)`` (heads averaged, so the width stays ``dim``;
    ``dropout`` also drops attention coefficients): edge weights enter as 1-d edge features (a learnt
    ``lin_edge`` vector per head, scaled by the weight, added inside the attention's leaky ReLU), and an added
    self-loop gets the mean weight of the node's incoming edges. Parameters of layer i are ``convs.i.lin_l``,
    ``lin_r``, ``lin_edge``, ``att``, ``bias`` (PyG's names) and ``norms.i``. Needs no graph library.
    """

    def __init__(self, dim: int, *, layers: int = 2, heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("layers", layers), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.layers, self.heads, self.dropout = dim, layers, heads, dropout
        self.convs = nn.ModuleList(_GraphAttention(dim, heads, dropout) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
        _check_graph(x, edge_index, edge_weight, self.dim)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = F.dropout(conv(x, edge_index, edge_weight), self.dropout, training=self.training)
            x = norm(x + h)
            if i < self.layers - 1:
                x = F.elu(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={self.layers}, heads={self.heads}, dropout={self.dropout}"
