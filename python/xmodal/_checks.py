"""Argument checks for the Python layer, one definition each, worded as ``csrc/common/checks.h`` words the ops'
checks: say what was wrong and what was given (``"k must be a positive int, got 0"``). Indexes, PCA, graphs,
re-ranking and the applications check their arguments with these."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .ops import SEARCH_METRICS

#: the floating dtypes every op and index accepts
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in FLOAT_DTYPES}


def check_metric(metric: str) -> str:
    """``metric`` if it names one of ``xmodal.SEARCH_METRICS``, else ``ValueError``."""
    if metric not in SEARCH_METRICS:
        raise ValueError(f"metric must be one of {list(SEARCH_METRICS)}, got {metric!r}")
    return metric


def check_dtype(dtype) -> torch.dtype:
    """The torch dtype ``dtype`` names (a dtype or its name, ``"float16"`` / ``"torch.float16"``), if floating."""
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    return dtype


def check_positive(value, name: str) -> int:
    """``value`` if it is an int > 0 (not a bool), else ``ValueError`` naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_int(value, name: str, low: int = 1, high: Optional[int] = None) -> int:
    """``value`` as an int if it is an integral number (not a bool) in ``[low, high]`` (no upper bound without
    ``high``); ``TypeError`` for a non-integer, ``ValueError`` out of range, each naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_non_negative_ids(ids: Tensor, name: str = "ids") -> None:
    """Stored ids are >= 0: a search answers -1 where it has fewer than k results."""
    negative = torch.nonzero(ids < 0)
    if negative.numel():
        at = int(negative[0])
        raise ValueError(f"{name} must be non-negative (-1 marks a missing result), got {int(ids[at])} at position {at}")
