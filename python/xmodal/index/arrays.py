"""Array interop for the indexes: torch tensors, NumPy arrays and CuPy arrays in, the same kind out.

CuPy arrays and CUDA tensors pass through DLPack, without copies where the dtype and device already match.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor


def to_torch(x, name: str) -> Tuple[Tensor, str]:
    """(tensor, kind) where kind is 'torch', 'numpy' or 'cupy'; ``name`` is the argument's, for errors."""
    if isinstance(x, Tensor):
        return x, "torch"
    module = type(x).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        x = np.ascontiguousarray(x)
        if x.flags.writeable:
            return torch.from_numpy(x), "numpy"
        with warnings.catch_warnings():  # read-only arrays (np.load(mmap_mode="r")) are welcome: inputs are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(x), "numpy"
    if module == "cupy":
        return torch.from_dlpack(x), "cupy"
    raise TypeError(f"{name} must be a torch tensor, NumPy array or CuPy array, got {type(x).__name__}")


def from_torch(t: Tensor, kind: str):
    """``t`` as an array of ``kind`` (see :func:`to_torch`)."""
    if kind == "torch":
        return t
    if t.dtype == torch.bfloat16:  # neither NumPy nor CuPy has bfloat16
        t = t.float()
    if kind == "numpy":
        return t.numpy() if t.is_cpu and not t.requires_grad else t.detach().cpu().numpy()
    import cupy

    return cupy.from_dlpack(t.detach().contiguous())


def as_rows(x, dim: int, name: str) -> Tuple[Tensor, str, bool]:
    """A float ``[n, dim]`` tensor from x (1-D x is one row), its array kind, and whether x was 1-D."""
    t, kind = to_torch(x, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values, got {t.dtype}")
    squeeze = t.dim() == 1
    if squeeze:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 1-D [{dim}] or 2-D [n, {dim}], got shape {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise ValueError(f"{name} must have dimension {dim}, got {t.shape[1]}")
    return t, kind, squeeze


def as_ids(ids, n: int, name: str = "ids") -> Tensor:
    """A CPU int64 ``[n]`` tensor of ids (``n < 0``: any length)."""
    if isinstance(ids, (list, tuple, range, int)):
        t = torch.as_tensor(ids) if len(ids if not isinstance(ids, int) else [ids]) else torch.empty(0, dtype=torch.int64)
    else:
        t, _ = to_torch(ids, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {t.dtype}")
    t = t.reshape(-1).to(torch.int64).cpu()
    if n >= 0 and t.numel() != n:
        raise ValueError(f"{name} must have one id per vector ({n}), got {t.numel()}")
    return t
