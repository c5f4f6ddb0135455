"""Modules over xmodal's fused bilinear ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph.fusion import GraphFusion
from .ops import bilinear, factorized_bilinear

__all__ = ["Bilinear", "FactorizedBilinearPooling", "GraphFusion"]


class Bilinear(nn.Bilinear):
    """Drop-in for ``torch.nn.Bilinear`` computed by :func:`xmodal.bilinear`.

    Same constructor, parameters (``weight [out, in1, in2]``, ``bias [out]``), initialisation and
    ``state_dict`` keys, so a state dict saved from either loads into the other. It is a subclass, so
    ``isinstance(m, torch.nn.Bilinear)`` holds.
    """

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return bilinear(input1, input2, self.weight, self.bias)


class FactorizedBilinearPooling(nn.Module):
    """Multi-modal factorized bilinear pooling (MFB; ``factor=1`` is MLB) of ``x [..., dim_x]`` and ``y [..., dim_y]``.

    Projects both inputs to ``out_features * factor`` (``proj_x``, ``proj_y``: ``nn.Linear``), multiplies them,
    sum-pools groups of ``factor`` and, with ``normalize``, applies the signed square root and L2 normalisation
    (see :func:`xmodal.factorized_bilinear`). ``dropout`` acts on the product before pooling, as in MFB; it is
    applied to the x projection (bias included), which is the same thing, so the product is never materialised.
    Leading shapes broadcast: ``x [B, 1, dim_x]`` against ``y [B, N, dim_y]`` gives ``[B, N, out_features]``.
    ``recompute=True`` keeps one projection for the backward pass and recomputes the other (see
    :func:`xmodal.factorized_bilinear`; with dropout, the y projection is the one recomputed).
    """

    def __init__(
        self,
        dim_x: int,
        dim_y: int,
        out_features: int,
        factor: int = 5,
        dropout: float = 0.0,
        normalize: bool = True,
        *,
        recompute: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if factor <= 0:
            raise ValueError(f"factor must be positive, got {factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim_x, self.dim_y, self.out_features = dim_x, dim_y, out_features
        self.factor, self.dropout, self.normalize, self.recompute = factor, dropout, normalize, recompute
        self.proj_x = nn.Linear(dim_x, out_features * factor, device=device, dtype=dtype)
        self.proj_y = nn.Linear(dim_y, out_features * factor, device=device, dtype=dtype)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # checked here, so that errors name the module's arguments in every mode (the dropout branch below
        # calls the projection op, whose messages speak of "input" and "weight")
        for name, t, dim in (("x", x, self.dim_x), ("y", y, self.dim_y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[-1] != dim:
                raise ValueError(f"{name}'s last dimension must be dim_{name} = {dim}, got shape {tuple(t.shape)}")
        if self.training and self.dropout > 0:
            linear = torch.ops.xmodal.cached_linear
            px = F.dropout(linear(x, self.proj_x.weight) + self.proj_x.bias, self.dropout, training=True)
            if self.recompute:  # the dropped-out x projection is kept; y's is recomputed
                return torch.ops.xmodal.factorized_bilinear_recompute(
                    px, y, self.proj_y.weight, None, self.proj_y.bias, self.factor, self.normalize
                )
            return torch.ops.xmodal.factorized_bilinear(
                px, linear(y, self.proj_y.weight), None, self.proj_y.bias, self.factor, self.normalize
            )
        return factorized_bilinear(
            x,
            y,
            self.proj_x.weight,
            self.proj_y.weight,
            self.proj_x.bias,
            self.proj_y.bias,
            factor=self.factor,
            normalize=self.normalize,
            recompute=self.recompute,
        )

    def extra_repr(self) -> str:
        return (
            f"dim_x={self.dim_x}, dim_y={self.dim_y}, out_features={self.out_features}, factor={self.factor}, "
            f"dropout={self.dropout}, normalize={self.normalize}" + (", recompute=True" if self.recompute else "")
        )
