"""xmodal: cross-modal retrieval for PyTorch with fused C++/CUDA kernels.

Importing xmodal loads the compiled extension (which registers ``torch.ops.xmodal.*``), then the fake-tensor
and autograd registrations and the plain-PyTorch kernels for devices without compiled ones, then re-exports
the public API of the core. The applications -- ``xmodal.demo``, ``xmodal.recommend``, ``xmodal.serve``,
``xmodal.client``, ``xmodal.bench`` -- load on first use (``xmodal.recommend`` or ``import xmodal.recommend``),
so ``import xmodal`` loads none of them, nor FastAPI.
"""
import importlib

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401
from . import _registrations  # noqa: F401
from . import _fallback_kernels  # noqa: F401
from . import graph, metrics, nn, rerank
from .index import FlatIndex, GraphIndex, IVFIndex, ShardedIndex
from . import _deprecated, settings
from .ops import SEARCH_METRICS, bilinear, factorized_bilinear, search_plan, topk_search
from .pca import PCA

__version__ = "0.1.0"

__all__ = [
    "SEARCH_METRICS",
    "topk_search",
    "search_plan",
    "settings",
    "bilinear",
    "factorized_bilinear",
    "nn",
    "graph",
    "rerank",
    "recommend",
    "FlatIndex",
    "GraphIndex",
    "IVFIndex",
    "ShardedIndex",
    "PCA",
    "metrics",
    "build_info",
    "empty_cpu_cache",
    "__version__",
]


#: subpackages that are applications of the core: imported on first use, never by ``import xmodal``
_APPLICATIONS = ("demo", "recommend", "serve", "client", "bench")


_moved = _deprecated.module_getattr(__name__)


def __getattr__(name: str):
    if name in _APPLICATIONS:
        return importlib.import_module(f"{__name__}.{name}")  # (binds xmodal.<name> too: no second call)
    return _moved(name)


def build_info() -> dict:
    """How the extension was built: ``{"cuda": bool, "cuda_archs": str, "torch_version": str}``."""
    return dict(_C.build_info())


def empty_cpu_cache() -> int:
    """Free the blocks xmodal keeps for large CPU gradients (weight gradients of its ops come from a cache so
    that a training step does not fault in fresh pages for them; see ``xmodal.settings``' ``cpu_cache_mb``). Returns the
    bytes freed. Blocks still in use by tensors are not affected."""
    return int(_C.empty_cpu_cache())
