"""Tuning settings: process-wide, typed, in one place (nothing is read from the environment).

The planner chooses well on the CPUs and GPUs it knows; these let you correct it on others, and let tests
and benchmarks compare paths. Read them with :func:`get`, change them with :func:`set` or, for a block of
code, :func:`override`::

    with xmodal.settings.override(cpu_tile_gemm="scan"):
        xmodal.topk_search(q, x, 10)

``cpu_tile_gemm``
    How the CPU's tiled search scores a tile: ``"auto"`` (the planner decides), ``"blas"`` (fp32/fp64 GEMM),
    ``"mkl16"`` (MKL's bf16/fp16 GEMM with fp32 output: fast with AMX), ``"widen"`` (16-bit tiles widened to
    fp32 in cache, then the fp32 GEMM), ``"aten16"`` (ATen's 16-bit GEMM: oneDNN with native bf16 dot
    products), ``"scan"`` (one pass over the rows, for a handful of queries). A choice that cannot run a
    search (``"blas"`` on 16-bit inputs, say) is ignored for it.
``cpu_tile_kib``
    KiB of database rows per CPU tile; 0 (default) lets the planner decide.
``cuda_max_tile_rows``
    The most database rows per CUDA tile; 0 (default) means no cap. Tests use a small cap so that small
    problems span many tiles.
``cpu_cache_mb``
    The most MiB of free blocks the CPU block cache keeps for large weight gradients (default 1024; 0 turns
    it off): a training step that frees its gradients (``param.grad = None``) and asks for them again gets
    blocks whose pages are already mapped. ``xmodal.empty_cpu_cache()`` frees what it holds.
``bilinear_tile_kib``, ``bilinear_max_rows``
    The CPU bilinear ops' outer-product tile size (default 2048 KiB) and most batch rows per tile (256).
``cpu_min_thread_us``
    The CPU searches use one thread per this many microseconds of (estimated) one-thread work (default
    1000; 0: every thread, however small the search). Shorter searches stay on fewer threads: a thread
    whose core another process holds can delay a parallel call by a scheduler time slice, and a search of a
    millisecond or two gains little from a second thread anyway.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Union

from . import _C

__all__ = ["get", "set", "override"]

#: the ways the CPU's tiled search can score a tile (cpu_tile_gemm, besides "auto")
TILE_GEMMS = ("blas", "mkl16", "widen", "aten16", "scan")
_TILE_GEMMS = ("auto",) + TILE_GEMMS  # the C++ codes are the positions


def get() -> Dict[str, Union[int, str]]:
    """Every setting's current value, by name."""
    values: Dict[str, Union[int, str]] = dict(_C.get_settings())
    values["cpu_tile_gemm"] = _TILE_GEMMS[int(values["cpu_tile_gemm"])]
    return values


def set(**values: Union[int, str]) -> None:  # noqa: A001 (the module's verb, as in torch.set_*)
    """Set one or more settings; raises ValueError / TypeError naming the setting for a bad value."""
    known = get()
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {name!r}; known: {sorted(known)}")
        if name == "cpu_tile_gemm":
            if value not in _TILE_GEMMS:
                raise ValueError(f"cpu_tile_gemm must be one of {list(_TILE_GEMMS)}, got {value!r}")
            value = _TILE_GEMMS.index(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        try:
            _C.set_setting(name, int(value))
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None


@contextlib.contextmanager
def override(**values: Union[int, str]) -> Iterator[None]:
    """Set settings for the duration of a ``with`` block, then restore them (process-wide: not for code
    that runs searches on other threads meanwhile)."""
    before = get()
    set(**values)
    try:
        yield
    finally:
        set(**{name: before[name] for name in values})
