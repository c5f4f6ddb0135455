"""Typed, documented public functions over ``torch.ops.xmodal.*``."""
from __future__ import annotations

import math
import numbers
import reprlib
from typing import Optional

import torch
from torch import Tensor

from . import _C, _deprecated

#: metric name -> True when larger values are better (read from the extension's one metric table)
SEARCH_METRICS = dict(_C.metrics())


def normalises_rows(metric: str) -> bool:
    """Whether ``metric`` compares unit-normalised rows (cosine and cosine distance), so that a search under it
    is an inner-product search of normalised rows."""
    return metric in ("cosine", "cosine_distance")


__getattr__ = _deprecated.module_getattr(__name__)


def topk_search(
    queries: Tensor,
    database: Tensor,
    k: int,
    metric: str = "cosine",
    *,
    mask: Optional[Tensor] = None,
    tf32: bool = False,
    strategy: str = "auto",
) -> "torch.return_types.topk":
    """Exact batched top-k similarity search, fused so the Q x N score matrix is never materialised.

    ``topk_search(q, X, k, "ip")`` answers what ``torch.topk(q @ X.T, k)`` answers (the default metric is
    ``"cosine"``, which normalises both sides first).

    Args:
        queries: ``[Q, D]`` or ``[D]``; float32, float64, float16 or bfloat16 (16-bit inputs accumulate in fp32).
        database: ``[N, D]``, same dtype and device as ``queries``.
        k: number of results per query (> 0). ``k > N`` is allowed: missing results are padded.
        metric: ``"ip"`` (inner product) or ``"cosine"`` (larger is better); ``"l2"`` (Euclidean),
            ``"sqeuclidean"``, ``"cosine_distance"`` = sqrt(2 (1 - cos)) or ``"kl"`` = KL(q || d)
            (smaller is better; kl inputs must be non-negative, 0 log 0 = 0, +inf where d_i = 0 < q_i).
            Zero vectors have cosine 0 with everything (norms are clamped at 1e-12, as ``F.normalize`` does).
        mask: optional bool ``[N]``; True marks a row as a candidate.
        tf32: let float32 score GEMMs on a GPU use TF32 tensor cores (faster on large batches; scores then
            carry ~1e-3 relative error, so near-ties may swap). Off by default; ignored on the CPU and for
            other dtypes.
        strategy: how the search runs. ``"auto"`` (default) lets the planner choose for this device, dtype
            and shape (:func:`search_plan` says what it picks). ``"tiled"``: score database tiles and select
            while they are in cache (CPU; on CUDA, cuBLAS tiles and a radix select). ``"aten"``: naive
            PyTorch's own GEMM and ``torch.topk`` in bounded tiles (any device). CUDA only, not chosen by
            ``"auto"`` until a GPU run has verified them: ``"filtered"`` (threshold-filtered selection),
            ``"tensor_core"`` (float16/bfloat16 tiles scored and filtered on the tensor cores, sm_80+) and
            ``"fused_scan"`` (up to 16 queries, k <= 192, one pass). A strategy that cannot run the inputs
            raises an error saying why.

    Returns:
        ``(values, indices)`` as ``torch.topk`` returns them (a named tuple: ``.values``, ``.indices``), each
        ``[Q, k]`` (or ``[k]`` for a 1-D query), best first; ``values`` in the
        input dtype, ``indices`` int64. Where fewer than k candidates exist the rest is padded with index -1
        and value -inf (similarities) or +inf (distances). A NaN score ranks below every number. On the CPU,
        l2 and sqeuclidean values are summed from the differences of the returned rows (a row searched for
        itself is at distance 0), not taken from the expanded form the ranking uses.

    ``queries``, ``database`` and ``mask`` may also be NumPy (or CuPy) arrays, as the indexes accept them; the
    result is then in the queries' array type (bfloat16 comes back as float32, which NumPy and CuPy lack).
    """
    queries, database, k, mask, kind = _search_args(queries, database, k, metric, mask, tf32, strategy)
    values, indices = torch.ops.xmodal.topk_search(queries, database, k, metric, mask, tf32=tf32, strategy=strategy)
    if kind != "torch":
        from .index.arrays import from_torch

        values, indices = from_torch(values, kind), from_torch(indices, kind)
    # the named tuple torch.topk returns, so code reading .values / .indices works unchanged
    return torch.return_types.topk((values, indices))


def _search_args(queries, database, k, metric, mask, tf32, strategy="auto"):
    """topk_search's arguments checked for type (values, shapes and dtypes are the op's to check), arrays
    turned into tensors: ``(queries, database, k, mask, kind)``, kind being the queries' array type. Plain
    isinstance checks, so that torch.compile traces through them (for tensors and an int k nothing else runs)."""
    kind = "torch"
    tensors = isinstance(queries, Tensor) and isinstance(database, Tensor)
    if not (tensors and (mask is None or isinstance(mask, Tensor))):
        from .index.arrays import to_torch  # (the index package imports this module)

        queries, kind = to_torch(queries, "queries")
        database, _ = to_torch(database, "database")
        mask = None if mask is None else to_torch(mask, "mask")[0]
    # the schema's int takes a Python int (a SymInt under torch.compile): a NumPy integer is converted, and a
    # bool, an int to Python, refused
    if not isinstance(k, (int, torch.SymInt)) or isinstance(k, bool):
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise TypeError(f"k must be an int, got {_given(k)}")
        k = int(k)
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str, got {_given(metric)}")
    if not isinstance(tf32, bool):
        raise TypeError(f"tf32 must be a bool, got {_given(tf32)}")
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {_given(strategy)}")
    return queries, database, k, mask, kind


def search_plan(queries, database, k: int, metric: str = "cosine", *, mask=None, strategy: str = "auto") -> str:
    """What :func:`topk_search` would do with these arguments on this machine, in words: the strategy and,
    for the CPU's tiled search, how tiles are scored (BLAS, MKL's or ATen's 16-bit GEMM, tiles widened to
    fp32, or a one-pass scan and its instruction set) and the tile size. Raises the error the search would
    raise for a strategy that cannot run the inputs. Computes nothing."""
    queries, database, k, mask, _ = _search_args(queries, database, k, metric, mask, False, strategy)
    from . import _C

    return _C.search_plan(queries, database, k, metric, mask, strategy)


def _given(value) -> str:
    """What was passed, for an error message: its type and a repr cut short (a tensor's could be huge)."""
    return f"{type(value).__name__} ({reprlib.repr(value)})"


def bilinear(input1: Tensor, input2: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Bilinear pooling with the semantics of ``torch.nn.functional.bilinear``, fused.

    ``out[..., o] = sum_ij input1[..., i] * weight[o, i, j] * input2[..., j] + bias[o]``.

    Args:
        input1: ``[..., in1_features]``.
        input2: ``[..., in2_features]`` with the same leading (batch) shape as ``input1``.
        weight: ``[out_features, in1_features, in2_features]``.
        bias: optional ``[out_features]``.

    All of the same dtype (float32, float64, float16, bfloat16; 16-bit inputs accumulate in fp32) and device.
    Neither the forward nor the backward pass allocates a ``B x in1 x in2`` or ``B x out x in2`` tensor: they
    work on cache-sized (CPU) or bounded (GPU) tiles of the outer product. Differentiable once (no double
    backward).
    """
    return torch.ops.xmodal.bilinear(input1, input2, weight, bias)


def _check_factorized(x, y, weight_x, weight_y, factor):
    for name, t in (("x", x), ("y", y), ("weight_x", weight_x), ("weight_y", weight_y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight_x.dim() != 2:
        raise ValueError(f"weight_x must be 2-D [out_features * factor, dim_x], got shape {tuple(weight_x.shape)}")
    if weight_y.dim() != 2:
        raise ValueError(f"weight_y must be 2-D [out_features * factor, dim_y], got shape {tuple(weight_y.shape)}")
    if weight_x.shape[0] != weight_y.shape[0]:
        raise ValueError(
            f"weight_x and weight_y must have the same number of rows (out_features * factor), "
            f"got {weight_x.shape[0]} and {weight_y.shape[0]}"
        )
    if x.dim() < 1 or x.shape[-1] != weight_x.shape[1]:
        raise ValueError(f"x's last dimension must equal weight_x.shape[1] = {weight_x.shape[1]}, got shape {tuple(x.shape)}")
    if y.dim() < 1 or y.shape[-1] != weight_y.shape[1]:
        raise ValueError(f"y's last dimension must equal weight_y.shape[1] = {weight_y.shape[1]}, got shape {tuple(y.shape)}")
    for name, t in (("y", y), ("weight_x", weight_x), ("weight_y", weight_y)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the same dtype as x, got {t.dtype} and {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the same device as x, got {t.device} and {x.device}")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if weight_x.shape[0] % factor != 0:
        raise ValueError(
            f"factor must divide the projection width weight_x.shape[0] = {weight_x.shape[0]}, got factor {factor}"
        )


def factorized_bilinear(
    x: Tensor,
    y: Tensor,
    weight_x: Tensor,
    weight_y: Tensor,
    bias_x: Optional[Tensor] = None,
    bias_y: Optional[Tensor] = None,
    *,
    factor: int,
    normalize: bool = True,
    recompute: bool = False,
) -> Tensor:
    """Factorized bilinear pooling (MFB; MLB is ``factor=1``).

    ``e = (x weight_x^T + bias_x) * (y weight_y^T + bias_y)``, weights ``[out_features * factor, dim]``;
    ``s[..., j] = sum_{r < factor} e[..., j * factor + r]``; with ``normalize``:
    ``u = sign(s) * (sqrt(|s| + 1e-12) - 1e-6)`` (a signed square root whose gradient stays finite at 0: at most
    ``1 / (2 * 1e-6)``; it differs from ``sign(s) sqrt(|s|)`` by at most 1e-6) and ``z = u / max(||u||_2, 1e-12)``
    (as ``F.normalize``, finite at ``u = 0``).

    ``x [..., dim_x]`` and ``y [..., dim_y]`` have leading shapes that broadcast: e.g. one question
    ``x [B, 1, dim_x]`` against ``N`` image regions ``y [B, N, dim_y]`` gives ``[B, N, out_features]``; ``x`` is
    projected once per row, never copied ``N`` times. The two projections are GEMMs; bias, product, pooling and
    normalisation run as one fused pass (``torch.ops.xmodal.factorized_bilinear``) forward and backward, saving
    only the two projections for the backward pass.

    ``recompute=True`` keeps one projection instead of two and recomputes the other in the backward pass
    (one more GEMM): the one with more rows (``y``'s for regions), or with the narrower input when the row
    counts are equal, as that is the cheaper to recompute per byte saved.
    """
    _check_factorized(x, y, weight_x, weight_y, factor)
    linear = torch.ops.xmodal.cached_linear  # F.linear, with weight gradients from the CPU block cache
    if not recompute:
        return torch.ops.xmodal.factorized_bilinear(linear(x, weight_x), linear(y, weight_y), bias_x, bias_y, factor,
                                                    normalize)
    if (math.prod(y.shape[:-1]), -y.shape[-1]) >= (math.prod(x.shape[:-1]), -x.shape[-1]):
        return torch.ops.xmodal.factorized_bilinear_recompute(linear(x, weight_x), y, weight_y, bias_x, bias_y, factor,
                                                              normalize)
    # the pooling is symmetric in its two sides
    return torch.ops.xmodal.factorized_bilinear_recompute(linear(y, weight_y), x, weight_x, bias_y, bias_x, factor,
                                                              normalize)
