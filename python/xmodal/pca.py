"""PCA for reducing embeddings before indexing (the role of faiss's PCAMatrix).

``fit`` makes one pass over the data, which may be a single ``[N, D]`` tensor / NumPy array or an iterable of
such chunks (a generator reading a file, say), so N can be far larger than memory. Means and the covariance
are accumulated in float64; the D x D eigendecomposition is exact (``torch.linalg.eigh`` in float64).
"""
from __future__ import annotations

import numbers
import warnings
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]

__all__ = ["PCA"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rows per covariance step are chosen so that one step's working buffer stays near this many bytes (128 MiB
# in float32): large enough for the matrix product to run at full speed, small enough to bound memory.
_STEP_BYTES = 1 << 27
_MAX_STEP_ROWS = 65536
# Whitening divides by sqrt(variance). Components whose variance is below this fraction of the largest would
# be blown up to noise (their variance is mostly rounding error), so their scale is floored there.
_WHITEN_REL_FLOOR = 1e-12

_STATE_TENSORS = ("mean", "components", "explained_variance", "explained_variance_ratio")
_STATE_META = ("n_components", "whiten", "n_features_in", "n_samples_seen")


def _as_tensor(a, name: str) -> Tensor:
    """A torch view of a tensor or NumPy array, validated to be floating point."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64); got NumPy dtype "
                            f"{a.dtype}")
        with warnings.catch_warnings():
            # read-only arrays (memory maps) are fine: nothing here writes to the input
            warnings.simplefilter("ignore", UserWarning)
            a = torch.from_numpy(np.ascontiguousarray(a))
    elif not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a torch tensor or NumPy array; got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64); got {a.dtype}")
    return a


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 input keeps float64; everything else is computed in float32 (16-bit matrix products lose too much)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_n_components(n_components) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) or n_components <= 0:
        raise ValueError(f"n_components must be a positive int; got {n_components!r}")
    return int(n_components)


def _meta_int(value, key: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"state_dict[{key!r}] must be an int; got {value!r}")
    return int(value)


def _meta_bool(value, key: str) -> bool:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"state_dict[{key!r}] must be a bool; got {value!r}")


class _Moments:
    """Running mean and centred second moment (sum of outer products about the mean) over row chunks.

    Each step subtracts its own approximate mean before the float32 product, so the product sees centred data
    and keeps its precision even when the mean is large next to the spread; steps are combined exactly in
    float64 with the pairwise update (Chan et al.).
    """

    def __init__(self, n_components: int):
        self.n_components = n_components
        self.n = 0
        self.dim: Optional[int] = None
        self.device: Optional[torch.device] = None
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self._bufs: Dict[torch.dtype, Tensor] = {}

    def _start(self, dim: int, device: torch.device) -> None:
        if self.n_components > dim:
            raise ValueError(f"n_components={self.n_components} exceeds the data's dimension {dim}")
        self.dim, self.device = dim, device
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.step = min(_MAX_STEP_ROWS, max(1024, _STEP_BYTES // (4 * dim)))

    def _buffer(self, dtype: torch.dtype, rows: int) -> Tensor:
        # reused across steps: a fresh allocation per step costs page faults on every pass
        buf = self._bufs.get(dtype)
        if buf is None or buf.shape[0] < rows:
            buf = self._bufs[dtype] = torch.empty(rows, self.dim, dtype=dtype, device=self.device)
        return buf[:rows]

    def add(self, chunk: Tensor, where: str) -> None:
        if chunk.dim() != 2:
            raise ValueError(f"{where} must be 2-D [N, D]; got shape {tuple(chunk.shape)}")
        if self.dim is None:
            self._start(chunk.shape[1], chunk.device)
        elif chunk.shape[1] != self.dim:
            raise ValueError(f"{where} has dimension {chunk.shape[1]}, but earlier rows of x had {self.dim}")
        for start in range(0, chunk.shape[0], self.step):
            # moved a step at a time, so a large chunk elsewhere never needs a full copy on this device
            self._add_step(chunk[start:start + self.step].to(self.device), where, start)

    def _add_step(self, x: Tensor, where: str, row0: int) -> None:
        rows = x.shape[0]
        cdt = _compute_dtype(x.dtype)
        y = self._buffer(cdt, rows)
        if x.dtype == cdt:
            shift = x.mean(0)
            torch.sub(x, shift, out=y)
        else:
            y.copy_(x)
            shift = y.mean(0)
            y.sub_(shift)
        if not bool(torch.isfinite(shift).all()):
            # a non-finite column mean means NaN/inf in the data (or a float32 overflow of its sum): find which
            bad = (~torch.isfinite(x)).any(1).nonzero()
            if bad.numel():
                raise ValueError(f"{where} contains NaN or inf (first at row {row0 + int(bad[0])})")
            raise ValueError(f"{where} has values too large to accumulate in {cdt}; scale it down or pass float64")
        d = y.sum(0).double()
        # sum over rows of (y - d/rows)(y - d/rows)^T = y^T y - d d^T / rows
        m2 = torch.mm(y.T, y).double().sub_(torch.outer(d, d).div_(rows))
        mean = shift.double().add_(d.div_(rows))
        n_a, n = self.n, self.n + rows
        delta = mean.sub_(self.mean)
        self.mean.add_(delta, alpha=rows / n)
        self.m2.add_(m2).add_(torch.outer(delta, delta), alpha=n_a * rows / n)
        self.n = n


def _iter_chunks(x, name: str) -> Iterable[Tuple[Tensor, str]]:
    if isinstance(x, (Tensor, np.ndarray)):
        yield _as_tensor(x, name), name
        return
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{name} must be a torch tensor, a NumPy array or an iterable of them; got {type(x).__name__}")
    for i, chunk in enumerate(x):
        where = f"{name} chunk {i}"
        yield _as_tensor(chunk, where), where


class PCA:
    """Principal component analysis: ``transform(x) = (x - mean_) @ components_.T``, divided by
    ``sqrt(explained_variance_)`` when ``whiten``.

    Parameters are kept in float64 on the device the data was fitted on (``.to(device)`` moves them);
    ``transform`` / ``inverse_transform`` compute in float32 (float64 for float64 input) on the input's device,
    using copies of the parameters made for that device and dtype on first use and kept, and return the
    input's dtype. Inputs may be ``[D]`` or ``[..., D]``; NumPy arrays are accepted and give tensors.
    On CUDA, the float32 products follow ``torch.backends.cuda.matmul`` (TF32 lowers their precision).
    """

    def __init__(self, n_components: int, *, whiten: bool = False):
        self.n_components = _check_n_components(n_components)
        if not isinstance(whiten, bool):
            raise ValueError(f"whiten must be a bool; got {whiten!r}")
        self.whiten = whiten
        self.mean_: Optional[Tensor] = None
        self.components_: Optional[Tensor] = None
        self.explained_variance_: Optional[Tensor] = None
        self.explained_variance_ratio_: Optional[Tensor] = None
        self.n_features_in_: Optional[int] = None
        self.n_samples_seen_: Optional[int] = None
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tuple[Tensor, Tensor, Tensor]] = {}

    # ---------------------------------------------------------------- fitting
    @property
    def is_fitted(self) -> bool:
        return self.components_ is not None

    @property
    def n_components_(self) -> int:
        return self.n_components

    @property
    def device(self) -> Optional[torch.device]:
        return None if self.mean_ is None else self.mean_.device

    def fit(self, x) -> "PCA":
        """Fit to ``x``: an ``[N, D]`` float tensor / NumPy array, or an iterable of ``[n_i, D]`` chunks
        (read once). Returns self."""
        acc = _Moments(self.n_components)
        with torch.no_grad():
            for chunk, where in _iter_chunks(x, "x"):
                acc.add(chunk, where)
            if acc.n < 2:
                raise ValueError(f"x has {acc.n} row{'' if acc.n == 1 else 's'}; PCA needs at least 2")
            if not bool(torch.isfinite(acc.m2).all()):
                raise ValueError("x has values too large for its covariance to be represented; scale it down "
                                 "or pass float64")
            cov = acc.m2.div_(acc.n - 1)
            cov = (cov + cov.T).mul_(0.5).cpu()  # symmetric to the last bit; eigh on the CPU for reproducibility
            evals, evecs = torch.linalg.eigh(cov)
            # decreasing order; rounding can leave zero eigenvalues slightly negative
            evals, evecs = evals.flip(0).clamp_min_(0.0), evecs.flip(1)
            total = evals.sum()
            k = self.n_components
            comps = evecs[:, :k].T.contiguous()
            # eigenvectors are defined up to sign; fix it so refits (and other libraries' eigh) agree
            big = comps.abs().argmax(1, keepdim=True)
            comps.mul_(torch.sign(comps.gather(1, big)))
            ev = evals[:k].clone()
            ratio = ev / total if total > 0 else torch.zeros_like(ev)
        self._set(acc.mean, comps, ev, ratio, acc.dim, acc.n, device=acc.device)
        return self

    def _set(self, mean, comps, ev, ratio, dim, n, device) -> None:
        self.mean_ = mean.to(device)
        self.components_ = comps.to(device)
        self.explained_variance_ = ev.to(device)
        self.explained_variance_ratio_ = ratio.to(device)
        self.n_features_in_ = int(dim)
        self.n_samples_seen_ = int(n)
        self._cache = {}

    def fit_transform(self, x: ArrayLike) -> Tensor:
        """``fit(x)`` then ``transform(x)``; x must be one tensor / array (chunks cannot be read twice)."""
        if not isinstance(x, (Tensor, np.ndarray)):
            raise TypeError(f"fit_transform needs x as one torch tensor or NumPy array; got {type(x).__name__} "
                            "(for chunks, call fit and then transform each chunk)")
        return self.fit(x).transform(x)

    # ------------------------------------------------------------- transforms
    def _check_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"this PCA is not fitted yet; call fit before {what}")

    def _params(self, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        """(mean, forward [D, k], inverse [k, D]) in ``dtype`` on ``device``, made once per pair."""
        key = (device, dtype)
        p = self._cache.get(key)
        if p is None:
            comps = self.components_
            if self.whiten:
                ev = self.explained_variance_
                top = float(ev[0]) if ev.numel() else 0.0
                floor = top * _WHITEN_REL_FLOOR if top > 0 else 1.0  # all-zero variance: nothing to whiten
                std = ev.clamp_min(floor).sqrt()[:, None]
                fwd, inv = comps / std, comps * std
            else:
                fwd = inv = comps
            p = (self.mean_.to(device, dtype), fwd.T.to(device, dtype).contiguous(), inv.to(device, dtype))
            self._cache[key] = p
        return p

    def transform(self, x: ArrayLike) -> Tensor:
        """Project ``x`` ``[..., D]`` (or ``[D]``) to ``[..., n_components]`` in x's dtype."""
        self._check_fitted("transform")
        x = _as_tensor(x, "x")
        if x.dim() == 0 or x.shape[-1] != self.n_features_in_:
            got = "a scalar" if x.dim() == 0 else f"dimension {x.shape[-1]} (shape {tuple(x.shape)})"
            raise ValueError(f"x has {got}; this PCA was fitted on dimension {self.n_features_in_}")
        mean, fwd, _ = self._params(x.device, _compute_dtype(x.dtype))
        # centring before the product keeps precision when the mean is large next to the spread
        return torch.matmul(x.to(mean.dtype) - mean, fwd).to(x.dtype)

    def inverse_transform(self, z: ArrayLike) -> Tensor:
        """Map ``z`` ``[..., n_components]`` (or ``[n_components]``) back to ``[..., D]`` in z's dtype."""
        self._check_fitted("inverse_transform")
        z = _as_tensor(z, "z")
        if z.dim() == 0 or z.shape[-1] != self.n_components:
            got = "a scalar" if z.dim() == 0 else f"{z.shape[-1]} components (shape {tuple(z.shape)})"
            raise ValueError(f"z has {got}; this PCA has n_components={self.n_components}")
        mean, _, inv = self._params(z.device, _compute_dtype(z.dtype))
        return torch.addmm(mean, z.to(inv.dtype).reshape(-1, self.n_components), inv) \
            .reshape(*z.shape[:-1], self.n_features_in_).to(z.dtype)

    # ----------------------------------------------------------- device / io
    def to(self, device: Union[str, torch.device]) -> "PCA":
        """Move the fitted parameters to ``device``; returns self."""
        if self.is_fitted:
            self._set(self.mean_, self.components_, self.explained_variance_, self.explained_variance_ratio_,
                      self.n_features_in_, self.n_samples_seen_, device=torch.device(device))
        return self

    def state_dict(self) -> Dict[str, Union[Tensor, int, bool]]:
        """Plain tensors (``mean``, ``components``, ``explained_variance``, ``explained_variance_ratio``, float64)
        and int/bool metadata (``n_components``, ``whiten``, ``n_features_in``, ``n_samples_seen``)."""
        self._check_fitted("state_dict")
        return {
            "mean": self.mean_.clone(),
            "components": self.components_.clone(),
            "explained_variance": self.explained_variance_.clone(),
            "explained_variance_ratio": self.explained_variance_ratio_.clone(),
            "n_components": self.n_components,
            "whiten": self.whiten,
            "n_features_in": self.n_features_in_,
            "n_samples_seen": self.n_samples_seen_,
        }

    @classmethod
    def from_state_dict(cls, state: Dict, device: Union[str, torch.device, None] = None) -> "PCA":
        """A fitted PCA from ``state_dict()``'s output, on ``device`` (default: where the tensors are)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        for key in ("n_components", "whiten"):
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
        pca = cls(_meta_int(state["n_components"], "n_components"), whiten=_meta_bool(state["whiten"], "whiten"))
        return pca.load_state_dict(state, device=device)

    def load_state_dict(self, state: Dict, device: Union[str, torch.device, None] = None) -> "PCA":
        """Load ``state_dict()``'s output into this PCA (its n_components and whiten must match); returns self."""
        missing = [k for k in _STATE_TENSORS + _STATE_META if k not in state]
        extra = [k for k in state if k not in _STATE_TENSORS + _STATE_META]
        if missing or extra:
            raise ValueError(f"state_dict keys do not match a PCA's: missing {missing}, unexpected {extra}")
        k, whiten = _meta_int(state["n_components"], "n_components"), _meta_bool(state["whiten"], "whiten")
        if k != self.n_components or whiten != self.whiten:
            raise ValueError(f"state_dict has n_components={k}, whiten={whiten}; this PCA has "
                             f"n_components={self.n_components}, whiten={self.whiten}")
        dim = _meta_int(state["n_features_in"], "n_features_in")
        n = _meta_int(state["n_samples_seen"], "n_samples_seen")
        expected = {"mean": (dim,), "components": (k, dim), "explained_variance": (k,),
                    "explained_variance_ratio": (k,)}
        tensors = {}
        for key, shape in expected.items():
            t = state[key]
            if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state_dict[{key!r}] must be a float tensor of shape {shape}; got {got}")
            tensors[key] = t.detach().to(torch.float64).clone()
        if k > dim or n < 2:
            raise ValueError(f"state_dict is inconsistent: n_components={k}, n_features_in={dim}, n_samples_seen={n}")
        target = torch.device(device) if device is not None else tensors["mean"].device
        self._set(tensors["mean"], tensors["components"], tensors["explained_variance"],
                  tensors["explained_variance_ratio"], dim, n, device=target)
        return self

    def __repr__(self) -> str:
        fitted = (f", fitted on {self.n_samples_seen_} x {self.n_features_in_}, device={self.device}"
                  if self.is_fitted else "")
        return f"PCA(n_components={self.n_components}, whiten={self.whiten}{fitted})"
