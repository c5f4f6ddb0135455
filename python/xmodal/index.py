"""Indexes over :func:`xmodal.topk_search`: FlatIndex (exact), IVFIndex (inverted lists), ShardedIndex
(one shard per torch.distributed rank).

Conventions shared by every index:
  - ``add``, ``search`` and ``remove`` accept torch tensors, NumPy arrays and CuPy arrays (CuPy and CUDA
    tensors through DLPack, without copies where the dtype and device already match) and ``search``
    answers in the queries' array type.
  - ids are int64; ``add`` without ids numbers the vectors by a running counter (0, 1, 2, ... in the order
    they were added, never reused after ``remove``).
  - a ``mask`` is a bool array of length ``len(index)`` aligned with ``index.ids``: True = candidate.
  - a failed call leaves the index unchanged: every argument is checked before anything is modified.
  - ``save`` writes a safetensors file (tensors + JSON metadata, no pickle) atomically: to a temporary file
    in the same folder, then renamed over the target, so an interrupted save leaves the old file intact.
    The metadata holds a checksum of the contents, which ``load`` verifies (``verify=False`` skips it).
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import METRICS, topk_search

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in _FLOAT_DTYPES}


# ------------------------------------------------------------------------------------------------ arrays

def _to_torch(x, name: str) -> Tuple[Tensor, str]:
    """(tensor, kind) where kind is 'torch', 'numpy' or 'cupy'."""
    if isinstance(x, Tensor):
        return x, "torch"
    module = type(x).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(x)), "numpy"
    if module == "cupy":
        return torch.from_dlpack(x), "cupy"
    raise TypeError(f"{name} must be a torch tensor, NumPy array or CuPy array, got {type(x).__name__}")


def _from_torch(t: Tensor, kind: str):
    if kind == "torch":
        return t
    if t.dtype == torch.bfloat16:  # neither NumPy nor CuPy has bfloat16
        t = t.float()
    if kind == "numpy":
        return t.detach().cpu().numpy()
    import cupy

    return cupy.from_dlpack(t.detach().contiguous())


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    return dtype


def _check_k(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _rows(x, dim: int, name: str) -> Tuple[Tensor, str, bool]:
    """A float [n, dim] tensor from x (1-D x is one row), its array kind, and whether x was 1-D."""
    t, kind = _to_torch(x, name)
    if not (t.is_floating_point()):
        raise TypeError(f"{name} must hold floating-point values, got {t.dtype}")
    squeeze = t.dim() == 1
    if squeeze:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 1-D [{dim}] or 2-D [n, {dim}], got shape {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise ValueError(f"{name} must have dimension {dim}, got {t.shape[1]}")
    return t, kind, squeeze


def _ids_tensor(ids, n: int, name: str = "ids") -> Tensor:
    if isinstance(ids, (list, tuple, range, int)):
        t = torch.as_tensor(ids) if len(ids if not isinstance(ids, int) else [ids]) else torch.empty(0, dtype=torch.int64)
    else:
        t, _ = _to_torch(ids, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {t.dtype}")
    t = t.reshape(-1).to(torch.int64).cpu()
    if n >= 0 and t.numel() != n:
        raise ValueError(f"{name} must have one id per vector ({n}), got {t.numel()}")
    return t


def _duplicates(ids: Tensor, limit: int = 10) -> list:
    values, counts = torch.unique(ids, return_counts=True)
    return values[counts > 1][:limit].tolist()


def _check_present(ids: Tensor, stored: Tensor) -> None:
    missing = ids[~torch.isin(ids, stored)]
    if missing.numel():
        raise KeyError(f"ids not in the index: {missing[:10].tolist()}")


def _unit_rows(rows: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, computed in fp32 (fp64 for fp64 input); zero rows stay zero."""
    return F.normalize(rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32), dim=1, eps=1e-12)


def _cosine_to_distance(cos: Tensor, positions: Tensor) -> Tensor:
    """sqrt(2 (1 - cos)) where a result exists, +inf padding elsewhere."""
    dist = torch.sqrt(torch.clamp(2 * (1 - cos.float()), min=0)).to(cos.dtype)
    return torch.where(positions >= 0, dist, torch.full_like(dist, float("inf")))


def _merge_best(values: Tensor, positions: Tensor, k: int, larger: bool, pad: float) -> Tuple[Tensor, Tensor]:
    """The k best of each row's candidates (position -1 = none; NaN ranks below every number), best first,
    padded with (pad, -1) when a row has fewer than k columns."""
    key = values.float() if larger else -values.float()
    key = torch.where(positions >= 0, key.nan_to_num(nan=float("-inf")), torch.full_like(key, float("-inf")))
    take = min(k, key.shape[1])
    best = torch.topk(key, take, dim=1).indices
    out_v = torch.full((values.shape[0], k), pad, dtype=values.dtype, device=values.device)
    out_p = torch.full((values.shape[0], k), -1, dtype=torch.int64, device=values.device)
    out_v[:, :take] = values.gather(1, best)
    out_p[:, :take] = positions.gather(1, best)
    return out_v, out_p


def _path_error(e: OSError, message: str) -> OSError:
    """An OSError of e's kind (FileNotFoundError, PermissionError, ...; from its errno) whose message names the
    user's path, not whatever file the failing call was on."""
    return OSError(e.errno, f"{message}: {e.strerror}") if e.errno and e.strerror else OSError(f"{message}: {e}")


# The checksum: for each tensor, the wrapping sums of its 64-bit words over 64 KiB blocks, hashed (BLAKE2b)
# together with its name, dtype and shape and with the metadata. Summing runs at memory speed (a 200k x 256
# float32 index: ~5 ms of a ~60 ms load) where a byte hash costs far more (zlib.crc32 ~35 ms, BLAKE2b ~170
# ms); per-block sums keep where a change is, so moved blocks are caught too, and any one changed byte
# changes its block's sum. It guards against damage, not against deliberate tampering.
_CHECKSUM_KIND = "blocksum64-blake2b"
_CHECKSUM_BLOCK = 1 << 16  # bytes


def _checksum(tensors: dict, metadata: dict) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        b = t.contiguous().view(-1).view(torch.uint8)
        whole = b.numel() // _CHECKSUM_BLOCK * _CHECKSUM_BLOCK
        h.update(b[:whole].view(torch.int64).view(-1, _CHECKSUM_BLOCK // 8).sum(1).numpy().tobytes())
        h.update(b[whole:].numpy().tobytes())
    return f"{_CHECKSUM_KIND}:{h.hexdigest()}"


def _atomic_save(tensors: dict, metadata: dict, path) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = f"cannot save index to {path!r}"
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{problem}: folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{problem}: {folder!r} is not a folder")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata["checksum"] = _checksum(tensors, metadata)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".xmodal-", suffix=".tmp", dir=folder)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # the error would name the temporary file, which is gone
        raise _path_error(e, problem) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _read(path, expected_format: str, verify: bool = True) -> Tuple[dict, dict]:
    """The tensors and metadata of an index file of ``expected_format``; with ``verify``, checked against the
    checksum stored at save time (files written before xmodal stored one load unchecked)."""
    from safetensors import safe_open

    path = os.fspath(path)
    problem = f"cannot load index from {path!r}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder, not an index file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{problem}: no such file")
    try:
        tensors = {}
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except OSError as e:
        raise _path_error(e, problem) from e
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise ValueError(f"{path!r} is not a readable xmodal index file: truncated, corrupt or not a safetensors "
                         f"file ({type(e).__name__}: {e})") from None
    found = metadata.get("format")
    if found != expected_format:
        if not (found or "").startswith("xmodal."):
            raise ValueError(f"{path!r} is not an xmodal index file (no xmodal format in its metadata)")
        raise ValueError(f"{path!r} holds an {found}, not an {expected_format}: load it with "
                         f"{found[len('xmodal.'):].split('/')[0]}.load")
    stored = metadata.get("checksum")
    if verify and stored is not None:
        if not stored.startswith(_CHECKSUM_KIND + ":"):
            raise ValueError(f"{path!r} has a checksum of a kind this xmodal does not know ({stored.split(':')[0]!r}); "
                             f"load it with verify=False to skip the check")
        if _checksum(tensors, metadata) != stored:
            raise ValueError(f"{path!r} is corrupt: its contents do not match the checksum stored when it was saved "
                             f"(load it with verify=False to read it anyway)")
    return tensors, metadata


# ------------------------------------------------------------------------------------------------ flat

class FlatIndex:
    """Exact search over every stored vector with :func:`xmodal.topk_search`.

    Vectors are stored in ``dtype`` (bfloat16 halves memory) on ``device``. For ``cosine`` and
    ``cosine_distance`` rows are stored unit-normalised, so a search does no per-call work on the database
    (it runs an inner-product search); ``l2``/``sqeuclidean``/``ip``/``kl`` store rows as given.
    """

    FORMAT = "xmodal.FlatIndex/1"

    def __init__(self, dim: int, metric: str = "cosine", *, dtype=torch.float32, device="cpu"):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _check_metric(metric)
        self.dim = dim
        self.metric = metric
        self.dtype = _check_dtype(dtype)
        self.device = torch.device(device)
        self._vectors = torch.empty(0, dim, dtype=self.dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._size = 0
        self._next_id = 0

    # -- introspection
    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, dtype={self.dtype}, "
                f"device={self.device}, len={len(self)})")

    @property
    def ids(self) -> Tensor:
        """The stored ids, in storage order (the order a ``mask`` follows)."""
        return self._ids[: self._size]

    @property
    def vectors(self) -> Tensor:
        """The stored rows (unit-normalised for cosine metrics), aligned with ``ids``."""
        return self._vectors[: self._size]

    @property
    def _normalised(self) -> bool:
        return self.metric in ("cosine", "cosine_distance")

    def _prepare(self, rows: Tensor, name: str) -> Tensor:
        rows = rows.to(self.device)
        if self._normalised:
            rows = _unit_rows(rows)
        if self.metric == "kl" and bool((rows < 0).any()):
            raise ValueError(f"{name} must be non-negative with metric 'kl', found a negative entry")
        return rows.to(self.dtype)

    # -- mutation
    def add(self, vectors, ids=None) -> Tensor:
        """Add rows; returns their ids. ``ids``: optional int64 per row, unique and not already present."""
        rows, _, _ = _rows(vectors, self.dim, "vectors")
        n = rows.shape[0]
        if ids is None:
            new_ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        else:
            new_ids = _ids_tensor(ids, n)
            dup = _duplicates(new_ids)
            if dup:
                raise ValueError(f"ids must be unique, got duplicates {dup}")
            present = new_ids[torch.isin(new_ids, self.ids.cpu())]
            if present.numel():
                raise ValueError(f"ids already in the index: {present[:10].tolist()}")
        rows = self._prepare(rows, "vectors")
        self._append(rows, new_ids.to(self.device))
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def _append(self, rows: Tensor, ids: Tensor) -> None:
        n = rows.shape[0]
        need = self._size + n
        if need > self._vectors.shape[0]:  # amortised growth: at least double
            capacity = max(need, 2 * self._vectors.shape[0], 1024)
            vectors = torch.empty(capacity, self.dim, dtype=self.dtype, device=self.device)
            new_ids = torch.empty(capacity, dtype=torch.int64, device=self.device)
            vectors[: self._size] = self.vectors
            new_ids[: self._size] = self.ids
            self._vectors, self._ids = vectors, new_ids
        self._vectors[self._size: need] = rows
        self._ids[self._size: need] = ids
        self._size = need

    def remove(self, ids) -> int:
        """Remove the rows with these ids (every id must be present); returns how many were removed."""
        gone = _ids_tensor(ids, -1)
        if gone.numel() == 0:
            return 0
        stored = self.ids.cpu()
        _check_present(gone, stored)
        keep = ~torch.isin(stored, gone)
        kept_vectors = self.vectors[keep.to(self.device)].clone()
        kept_ids = self.ids[keep.to(self.device)].clone()
        m = kept_ids.shape[0]
        self._vectors[:m] = kept_vectors
        self._ids[:m] = kept_ids
        removed = self._size - m
        self._size = m
        return removed

    def reset(self) -> None:
        """Remove everything (the id counter starts again at 0)."""
        self._vectors = torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._size = 0
        self._next_id = 0

    def to(self, device) -> "FlatIndex":
        """Move the index to ``device`` (in place); returns self."""
        device = torch.device(device)
        self._vectors = self.vectors.to(device)
        self._ids = self.ids.to(device)
        self.device = device
        return self

    # -- search
    def _mask(self, mask) -> Optional[Tensor]:
        if mask is None:
            return None
        m, _ = _to_torch(mask, "mask")
        if m.dtype != torch.bool or m.dim() != 1 or m.shape[0] != len(self):
            raise ValueError(f"mask must be a bool array of shape [{len(self)}] (len(index)), got dtype {m.dtype} "
                             f"and shape {tuple(m.shape)}")
        return m.to(self.device)

    def search(self, queries, k: int, mask=None):
        """The k best rows for each query: ``(scores, ids)``, each ``[Q, k]`` (``[k]`` for a 1-D query), best
        first, padded with id -1 and -inf/+inf; in the queries' array type."""
        return self._search(queries, k, mask)

    def _search(self, queries, k: int, mask, **options):
        """search(), with the subclass's search options (IVF: nprobe) passed down as arguments, never kept as
        state, so threads sharing an index can search with different options at once."""
        q, kind, squeeze = _rows(queries, self.dim, "queries")
        k = _check_k(k)
        m = self._mask(mask)
        values, positions = self._search_rows(q, k, m, **options)
        if self._size == 0:
            ids = torch.full_like(positions, -1)
        else:
            ids = torch.where(positions >= 0, self._ids[positions.clamp(min=0)], torch.full_like(positions, -1))
        if squeeze:
            values, ids = values[0], ids[0]
        return _from_torch(values, kind), _from_torch(ids, kind)

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(values, positions into storage) for [Q, dim] queries."""
        database = self.vectors
        q = q.to(self.device)
        if not self._normalised:
            return topk_search(q.to(self.dtype), database, k, self.metric, mask=mask)
        values, positions = topk_search(_unit_rows(q).to(self.dtype), database, k, "ip", mask=mask)
        if self.metric == "cosine_distance":
            values = _cosine_to_distance(values, positions)
        return values, positions

    # -- persistence
    def _metadata(self) -> dict:
        return {"format": self.FORMAT, "dim": self.dim, "metric": self.metric,
                "dtype": str(self.dtype).replace("torch.", ""), "next_id": self._next_id}

    def save(self, path) -> None:
        """Write the index to ``path`` (safetensors, with a checksum of its contents), atomically; the folder
        must exist."""
        _atomic_save({"vectors": self.vectors, "ids": self.ids}, self._metadata(), path)

    @classmethod
    def load(cls, path, device="cpu", *, verify: bool = True) -> "FlatIndex":
        """Read an index written by :meth:`save`; a truncated, corrupt or foreign file raises ValueError, a
        missing one FileNotFoundError.

        ``verify``: check the contents against the checksum :meth:`save` stored; a mismatch raises ValueError
        (the file is corrupt). It is one more pass over the data in memory, under a tenth of the time to load a
        file from the page cache and less next to a read from disk; ``verify=False`` skips it (e.g. for huge
        files on a trusted disk). Files written before xmodal stored checksums have none and load unchecked.
        """
        tensors, meta = _read(path, cls.FORMAT, verify)
        try:
            index = cls(int(meta["dim"]), meta["metric"], dtype=meta["dtype"], device=device)
            vectors, ids = tensors["vectors"], tensors["ids"]
            next_id = int(meta["next_id"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a valid {cls.FORMAT} file: {e}") from None
        if vectors.dim() != 2 or vectors.shape[1] != index.dim or ids.shape != (vectors.shape[0],) \
                or vectors.dtype != index.dtype or ids.dtype != torch.int64:
            raise ValueError(f"{os.fspath(path)!r} is not a valid {cls.FORMAT} file: tensor shapes or dtypes do not "
                             f"match")
        index._append(vectors.to(device), ids.to(device))
        index._next_id = next_id
        return index


# ------------------------------------------------------------------------------------------------ IVF

class IVFIndex(FlatIndex):
    """Inverted-file index: k-means centroids partition the rows into ``nlist`` lists; a search scores the
    queries against the centroids, then scans only the ``nprobe`` nearest lists of each query.

    ``train(vectors)`` runs k-means whose assignment step is :func:`topk_search` with k = 1. Rows are kept
    grouped by list (``ids``/``vectors`` follow that order, and so does a ``mask``).
    """

    FORMAT = "xmodal.IVFIndex/1"

    def __init__(self, dim: int, nlist: int, metric: str = "cosine", *, nprobe: int = 8, dtype=torch.float32,
                 device="cpu"):
        super().__init__(dim, metric, dtype=dtype, device=device)
        if metric == "kl":
            raise ValueError("IVFIndex does not support metric 'kl' (k-means needs a vector-space metric)")
        if not isinstance(nlist, int) or isinstance(nlist, bool) or nlist <= 0:
            raise ValueError(f"nlist must be a positive int, got {nlist!r}")
        self.nlist = nlist
        self.nprobe = _check_k(nprobe)
        self.centroids: Optional[Tensor] = None
        self._lists = torch.empty(0, dtype=torch.int64, device=self.device)  # list of each stored row
        self._offsets = torch.zeros(nlist + 1, dtype=torch.int64)

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def _coarse_metric(self) -> str:
        return "l2" if self.metric in ("l2", "sqeuclidean") else "ip"

    def _assign(self, rows: Tensor) -> Tensor:
        return topk_search(rows.to(self.centroids.dtype), self.centroids, 1, self._coarse_metric)[1][:, 0]

    def train(self, vectors, *, iterations: int = 10, seed: int = 0, max_points: int = 256 * 1024) -> None:
        """k-means on (a sample of at most ``max_points``) training vectors."""
        rows, _, _ = _rows(vectors, self.dim, "vectors")
        if rows.shape[0] < self.nlist:
            raise ValueError(f"training needs at least nlist = {self.nlist} vectors, got {rows.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        if rows.shape[0] > max_points:
            rows = rows[torch.randperm(rows.shape[0], generator=g)[:max_points].to(rows.device)]
        x = self._prepare(rows, "vectors").to(torch.float32)
        centroids = x[torch.randperm(x.shape[0], generator=g)[: self.nlist].to(x.device)].clone()
        for _ in range(iterations):
            self.centroids = centroids
            assign = self._assign(x)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=self.nlist).to(x.dtype)
            empty = counts == 0
            centroids = sums / counts.clamp(min=1)[:, None]
            if bool(empty.any()):  # re-seed empty lists from random points
                pick = torch.randint(0, x.shape[0], (int(empty.sum()),), generator=g).to(x.device)
                centroids[empty] = x[pick]
            if self._normalised:
                centroids = F.normalize(centroids, dim=1, eps=1e-12)
        self.centroids = centroids

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"IVFIndex.{what} needs a trained index: call train(vectors) first")

    def add(self, vectors, ids=None) -> Tensor:
        self._require_trained("add")
        return super().add(vectors, ids)

    def _append(self, rows: Tensor, ids: Tensor) -> None:
        lists = self._assign(rows) if rows.shape[0] else torch.empty(0, dtype=torch.int64, device=self.device)
        self._set_rows(torch.cat([self.vectors, rows.to(self.dtype)]), torch.cat([self.ids, ids]),
                       torch.cat([self._lists, lists.to(self.device)]))

    def _set_rows(self, vectors: Tensor, ids: Tensor, lists: Tensor) -> None:
        order = torch.argsort(lists, stable=True)
        self._vectors, self._ids, self._lists = vectors[order], ids[order], lists[order]
        self._size = self._vectors.shape[0]
        counts = torch.bincount(self._lists.cpu(), minlength=self.nlist)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])

    def remove(self, ids) -> int:
        gone = _ids_tensor(ids, -1)
        stored = self.ids.cpu()
        _check_present(gone, stored)
        keep = (~torch.isin(stored, gone)).to(self.device)
        before = self._size
        self._set_rows(self.vectors[keep], self.ids[keep], self._lists[keep])
        return before - self._size

    def reset(self) -> None:
        super().reset()
        self._lists = torch.empty(0, dtype=torch.int64, device=self.device)
        self._offsets = torch.zeros(self.nlist + 1, dtype=torch.int64)

    def to(self, device) -> "IVFIndex":
        super().to(device)
        self._lists = self._lists.to(device)
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)
        return self

    def search(self, queries, k: int, mask=None, *, nprobe: Optional[int] = None):
        """As :meth:`FlatIndex.search`, scanning the ``nprobe`` (default ``self.nprobe``) nearest lists."""
        self._require_trained("search")
        return self._search(queries, k, mask, nprobe=_check_k(self.nprobe if nprobe is None else nprobe))

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], nprobe: Optional[int] = None
                     ) -> Tuple[Tensor, Tensor]:
        q = q.to(self.device)
        nq = q.shape[0]
        larger = METRICS[self.metric]
        nprobe = min(self.nprobe if nprobe is None else nprobe, self.nlist)
        if self._normalised:  # rows are stored normalised: cosine is an inner-product search
            q = _unit_rows(q)
            op_metric, pad = "ip", float("-inf")
        else:
            op_metric, pad = self.metric, (float("-inf") if larger else float("inf"))
        probes = topk_search(q.float(), self.centroids, nprobe, self._coarse_metric)[1]  # [Q, nprobe]
        q = q.to(self.dtype)
        if self.device.type == "cpu" and op_metric in ("ip", "l2", "sqeuclidean"):
            # one op call scans every probed list (list-major, multi-threaded) and merges per query
            out_v, out_p = torch.ops.xmodal.ivf_scan(q, self._vectors, self._offsets, probes, k, op_metric, mask)
            if self.metric == "cosine_distance":
                out_v = _cosine_to_distance(out_v, out_p)
            return out_v, out_p
        # Group (query, probe rank) pairs by list, then search each probed list once for all its queries.
        # The loop works on list-sorted copies (slices are views, so each list costs little besides its
        # search); results are scattered back to (query, probe) order once at the end.
        flat_lists = probes.reshape(-1)
        order = torch.argsort(flat_lists, stable=True)
        q_sorted = q[order // nprobe]
        sorted_values = torch.full((nq * nprobe, k), pad, dtype=self.dtype, device=self.device)
        sorted_pos = torch.full((nq * nprobe, k), -1, dtype=torch.int64, device=self.device)
        row_offset = torch.zeros(nq * nprobe, 1, dtype=torch.int64)
        if flat_lists.numel():
            uniq, counts = torch.unique_consecutive(flat_lists[order].cpu(), return_counts=True)
            offsets = self._offsets.tolist()
            start = 0
            for lst, count in zip(uniq.tolist(), counts.tolist()):
                lo, hi = offsets[lst], offsets[lst + 1]
                if hi > lo:
                    v, p = topk_search(q_sorted[start: start + count], self._vectors[lo:hi], k, op_metric,
                                       mask=None if mask is None else mask[lo:hi])
                    sorted_values[start: start + count] = v
                    sorted_pos[start: start + count] = p
                    row_offset[start: start + count] = lo
                start += count
        sorted_pos = torch.where(sorted_pos >= 0, sorted_pos + row_offset.to(self.device), sorted_pos)
        cand_values = torch.empty_like(sorted_values)
        cand_pos = torch.empty_like(sorted_pos)
        cand_values[order] = sorted_values
        cand_pos[order] = sorted_pos
        # merge each query's nprobe x k candidates
        out_v, out_p = _merge_best(cand_values.reshape(nq, nprobe * k), cand_pos.reshape(nq, nprobe * k), k,
                                   larger or self._normalised, pad)
        if self.metric == "cosine_distance":
            out_v = _cosine_to_distance(out_v, out_p)
        return out_v, out_p

    # -- persistence
    def _metadata(self) -> dict:
        meta = super()._metadata()
        meta.update(nlist=self.nlist, nprobe=self.nprobe)
        return meta

    def save(self, path) -> None:
        self._require_trained("save")
        _atomic_save({"vectors": self.vectors, "ids": self.ids, "lists": self._lists, "centroids": self.centroids},
                     self._metadata(), path)

    @classmethod
    def load(cls, path, device="cpu", *, verify: bool = True) -> "IVFIndex":
        """As :meth:`FlatIndex.load`."""
        tensors, meta = _read(path, cls.FORMAT, verify)
        try:
            index = cls(int(meta["dim"]), int(meta["nlist"]), meta["metric"], nprobe=int(meta["nprobe"]),
                        dtype=meta["dtype"], device=device)
            vectors, ids, lists, centroids = tensors["vectors"], tensors["ids"], tensors["lists"], tensors["centroids"]
            next_id = int(meta["next_id"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a valid {cls.FORMAT} file: {e}") from None
        n = vectors.shape[0] if vectors.dim() == 2 else -1
        if n < 0 or vectors.shape[1] != index.dim or ids.shape != (n,) or lists.shape != (n,) \
                or centroids.shape != (index.nlist, index.dim) or bool(((lists < 0) | (lists >= index.nlist)).any()):
            raise ValueError(f"{os.fspath(path)!r} is not a valid {cls.FORMAT} file: tensor shapes do not match")
        index.centroids = centroids.to(device)
        index._set_rows(vectors.to(device), ids.to(device), lists.to(device))
        index._next_id = next_id
        return index


# ------------------------------------------------------------------------------------------------ sharded

class ShardedIndex:
    """One shard per rank of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    ``len(index)``, ``add``, ``remove``, ``search`` and ``load`` are collectives: every rank of the group must
    call them, in the same order, with arguments that pass their checks on every rank. A rank that calls one
    alone waits for the others until the process group's timeout (``init_process_group(timeout=...)``; 30
    minutes by default) and then raises a RuntimeError that says so. ``reset`` and ``save`` do not communicate
    but must be called on every rank too (each rank resets or writes its own shard). ``local``, ``dim`` and
    ``metric`` are this rank's, free to use alone.

    ``search`` is a local top-k on every rank, an ``all_gather`` and a merge, so every rank gets the answer
    one FlatIndex over all the data would give.
    ``add`` either keeps each rank's own rows (``route=False``: ranks may pass different batches) or, with
    ``route=True``, takes the same batch on every rank and keeps the rows whose id the rank owns
    (``id % world_size == rank``). Ids are global: by default a running counter over all ranks.
    """

    def __init__(self, local_index: FlatIndex, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs an initialised torch.distributed process group")
        self.local = local_index
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._next_id = 0
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def metric(self) -> str:
        return self.local.metric

    def _all_gather(self, t: Tensor, method: str) -> list:
        """all_gather for the collective ``method``: on failure, an error that says what the method is."""
        import torch.distributed as dist

        t = t.to(self._comm_device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, t, group=self.group)
        except RuntimeError as e:  # a timeout or a lost peer (DistBackendError is a RuntimeError)
            # the backend's own message says only that a receive timed out or a connection closed
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(
                f"ShardedIndex.{method} is a collective: every rank of the group must call it, in the same order "
                f"as the other collective methods (len, add, remove, search, load). Its all_gather failed on rank "
                f"{self.rank} of {self.world_size}, most likely because another rank did not call it (the wait "
                f"ends at the process group's timeout) or exited. The backend said: {said}"
            ) from e
        return out

    def _sum(self, value: int, method: str) -> int:
        return int(sum(int(t.item()) for t in self._all_gather(torch.tensor([value], dtype=torch.int64), method)))

    def _max(self, value: int, method: str) -> int:
        return max(int(t.item()) for t in self._all_gather(torch.tensor([value], dtype=torch.int64), method))

    def __len__(self) -> int:
        """The number of vectors over all shards. Collective: every rank must call it (``len(index)`` on one
        rank alone waits for the others until the process group times out, then raises RuntimeError)."""
        return self._sum(len(self.local), "__len__")

    def add(self, vectors, ids=None, *, route: bool = False) -> Tensor:
        """Add rows (see the class docstring for ``route``); returns the ids this rank keeps. Collective:
        every rank must call it; either every rank adds or, with an error on every rank, none does."""
        rows, _, _ = _rows(vectors, self.dim, "vectors")
        n = rows.shape[0]
        if route:
            new_ids = torch.arange(self._next_id, self._next_id + n) if ids is None else _ids_tensor(ids, n)
            mine = (new_ids % self.world_size) == self.rank
            local_rows, local_ids = rows[mine.to(rows.device)], new_ids[mine]
            all_ids = new_ids
        else:
            counts = [int(t.item()) for t in self._all_gather(torch.tensor([n], dtype=torch.int64), "add")]
            if ids is None:
                start = self._next_id + sum(counts[: self.rank])
                local_ids = torch.arange(start, start + n)
            else:
                local_ids = _ids_tensor(ids, n)
            local_rows = rows
            width = max(counts) if counts else 0
            padded = torch.full((width,), -1, dtype=torch.int64)
            padded[:n] = local_ids
            gathered = self._all_gather(padded, "add")
            all_ids = torch.cat([g.cpu()[:c] for g, c in zip(gathered, counts)])
        # global checks, so that either every rank adds or none does
        dup = _duplicates(all_ids)
        problem = f"ids must be unique, got duplicates {dup}" if dup else ""
        if not problem:
            clash = self._sum(int(torch.isin(all_ids, self.local.ids.cpu()).sum()), "add")
            if clash:
                problem = f"{clash} of the ids are already in the index"
        if problem:
            raise ValueError(problem)
        self.local.add(local_rows, local_ids)
        if all_ids.numel():
            top = int(all_ids.max()) + 1
            self._next_id = max(self._next_id, self._max(top, "add"))
        return local_ids

    def remove(self, ids) -> int:
        """Remove these ids wherever they are stored (every rank passes the same ids; each must be present on
        some rank); returns how many were removed over all ranks. Collective: every rank must call it."""
        gone = _ids_tensor(ids, -1)
        held = torch.isin(gone, self.local.ids.cpu()).to(torch.int64)
        total_held = torch.stack([g.cpu() for g in self._all_gather(held, "remove")]).sum(0) if gone.numel() else held
        missing = gone[total_held == 0]
        if missing.numel():
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        local = gone[held.bool()]
        return self._sum(self.local.remove(local), "remove")

    def reset(self) -> None:
        """Empty every shard. Call it on every rank: it does not communicate, but the ranks' id counters must
        stay equal."""
        self.local.reset()
        self._next_id = 0

    def search(self, queries, k: int, mask=None):
        """As :meth:`FlatIndex.search` over all shards. Every rank passes the same queries and k; ``mask``
        (optional) is this rank's mask over its shard. Collective: every rank must call it."""
        q, kind, squeeze = _rows(queries, self.dim, "queries")
        k = _check_k(k)
        values, ids = self.local.search(q, k, mask)  # an empty shard answers with padding
        all_values = torch.cat([v.to(values.device) for v in self._all_gather(values, "search")], dim=1)
        all_ids = torch.cat([i.to(values.device) for i in self._all_gather(ids, "search")], dim=1)
        larger = METRICS[self.metric]
        values, ids = _merge_best(all_values, all_ids, k, larger, float("-inf") if larger else float("inf"))
        if squeeze:
            values, ids = values[0], ids[0]
        return _from_torch(values, kind), _from_torch(ids, kind)

    def save(self, path) -> None:
        """Each rank writes its shard to ``{path}.rank{r}-of-{world}`` (call it on every rank)."""
        self.local.save(f"{path}.rank{self.rank}-of-{self.world_size}")

    @classmethod
    def load(cls, path, index_class=FlatIndex, group=None, device="cpu", *, verify: bool = True) -> "ShardedIndex":
        """Each rank reads its shard written by :meth:`save` (``verify``: as :meth:`FlatIndex.load`).
        Collective: every rank must call it."""
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        sharded = cls(index_class.load(f"{path}.rank{rank}-of-{world}", device=device, verify=verify), group)
        sharded._next_id = sharded._max(sharded.local._next_id, "load")
        return sharded


__all__ = ["FlatIndex", "IVFIndex", "ShardedIndex"]
