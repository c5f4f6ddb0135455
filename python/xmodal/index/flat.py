"""FlatIndex: exact search over every stored row (floats), or search over compressed rows (codecs)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..pca import PCA
from .arrays import as_rows
from .base import ADD_CHUNK_ROWS, Index, check_positive, unit_rows
from .codecs import make_codec


class FlatIndex(Index):
    """Search over every stored vector.

    Without a codec, rows are stored in ``dtype`` (bfloat16 halves memory) and searched exactly with
    :func:`xmodal.topk_search`. For ``cosine`` and ``cosine_distance`` rows are stored unit-normalised, so a
    search does no per-call work on the database; ``l2``/``sqeuclidean``/``ip``/``kl`` store rows as given.

    ``codec="int8"`` stores one int8 code per dimension (about a quarter of float32's bytes) and
    ``codec="binary"`` one bit per dimension plus the int8 codes, whose best ``rescore * k`` Hamming matches
    are rescored (``rescore``: default for :meth:`search`). Scores are then approximate, in the metric's
    units; see :mod:`xmodal.index.codecs` for the metrics each codec supports. ``reduce_to`` applies a
    :class:`xmodal.PCA` to ``reduce_to`` dimensions before storing and searching (as faiss's
    IndexPreTransform); scores are then those of the reduced vectors.

    The codec and the PCA learn from :meth:`train`'s rows, or else from the first :meth:`add`'s (the PCA
    from all of them, the codec from the first ``max_points`` after the PCA); vectors added later that fall
    outside the trained int8 range are clamped to it.
    """

    FORMAT = "xmodal.FlatIndex/1"

    def __init__(self, dim: int, metric: str = "cosine", *, dtype=torch.float32, device="cpu",
                 codec: Optional[str] = None, reduce_to: Optional[int] = None, rescore: int = 4):
        super().__init__(dim, metric, dtype=dtype, device=device)
        if reduce_to is not None:
            check_positive(reduce_to, "reduce_to")
            if reduce_to > dim:
                raise ValueError(f"reduce_to must be at most dim = {dim}, got {reduce_to}")
        self.reduce_to = reduce_to
        self.rescore = check_positive(rescore, "rescore")
        self.pca: Optional[PCA] = None
        self._codec = make_codec(codec, reduce_to or dim, metric, self.dtype)
        self._clear()

    # -- storage: one growable column per codec column, plus ids
    @property
    def codec(self) -> Optional[str]:
        return self._codec.name

    @property
    def is_trained(self) -> bool:
        """Whether the PCA and codec (if any) have learnt their parameters."""
        return self._codec.trained and (self.reduce_to is None or self.pca is not None)

    def __len__(self) -> int:
        return self._size

    @property
    def _vectors(self) -> Tensor:
        """The first stored column, capacity included."""
        return next(iter(self._columns.values()))

    def _cols(self) -> Dict[str, Tensor]:
        return {name: col[: self._size] for name, col in self._columns.items()}

    @property
    def ids(self) -> Tensor:
        return self._ids[: self._size]

    @property
    def vectors(self) -> Tensor:
        """The stored rows (reduced, unit-normalised for cosine metrics; decoded from a codec's codes)."""
        return self._codec.decode(self._cols())

    @property
    def nbytes(self) -> int:
        state = list(self._codec.state().values()) + ([] if self.pca is None else
                                                      [t for t in self.pca.state_dict().values() if torch.is_tensor(t)])
        return sum(c.nbytes for c in self._columns.values()) + self._ids.nbytes + \
            sum(t.nbytes for t in state if t is not None)

    def _new_columns(self, capacity: int) -> Dict[str, Tensor]:
        return {name: torch.empty((capacity, width) if width else (capacity,), dtype=dtype, device=self.device)
                for name, (dtype, width) in self._codec.columns().items()}

    def _store(self, rows: Tensor, ids: Tensor) -> None:
        encoded = self._codec.encode(rows)
        need = self._size + rows.shape[0]
        if need > self._ids.shape[0]:  # amortised growth: at least double
            capacity = max(need, 2 * self._ids.shape[0], 1024)
            columns = self._new_columns(capacity)
            for name, col in columns.items():
                col[: self._size] = self._columns[name][: self._size]
            new_ids = torch.empty(capacity, dtype=torch.int64, device=self.device)
            new_ids[: self._size] = self.ids
            self._columns, self._ids = columns, new_ids
        for name, col in self._columns.items():
            col[self._size: need] = encoded[name]
        self._ids[self._size: need] = ids
        self._size = need

    def _keep(self, keep: Tensor) -> None:
        keep = keep.to(self.device)
        for col in self._columns.values():
            kept = col[: self._size][keep]  # a copy: safe to write back in place
            col[: kept.shape[0]] = kept
        kept_ids = self.ids[keep]
        self._ids[: kept_ids.shape[0]] = kept_ids
        self._size = kept_ids.shape[0]

    def _clear(self) -> None:
        self._columns = self._new_columns(0)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._size = 0

    def _move(self, device: torch.device) -> None:
        self._columns = {name: col.to(device) for name, col in self._cols().items()}
        self._ids = self.ids.to(device)
        for name, t in self._codec.state().items():
            setattr(self._codec, name, None if t is None else t.to(device))
        if self.pca is not None:
            self.pca.to(device)

    def _position_ids(self) -> Tensor:
        return self._ids

    # -- training: PCA and codec
    def _check_rows(self, rows: Tensor, name: str) -> None:
        super()._check_rows(rows, name)
        if self.codec is None and self.reduce_to is None:
            return
        for start in range(0, rows.shape[0], ADD_CHUNK_ROWS):
            bad = ~torch.isfinite(rows[start: start + ADD_CHUNK_ROWS]).all(1)
            if bool(bad.any()):
                row = start + int(torch.nonzero(bad)[0])
                raise ValueError(f"{name} must be finite to be reduced or quantised, found NaN or inf in row {row}")

    def train(self, vectors, *, max_points: int = 256 * 1024) -> None:
        """Learn the PCA (``reduce_to``) from ``vectors`` and the codec from (at most ``max_points`` of) them;
        a no-op for an index with neither. Replaces what an earlier train learnt: call it before adding."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        if rows.shape[0] < 2 and (self.codec is not None or self.reduce_to is not None):
            raise ValueError(f"training needs at least 2 vectors, got {rows.shape[0]}")
        self._check_rows(rows, "vectors")
        if len(self):
            raise RuntimeError("FlatIndex.train must come before add (stored codes would not match); call reset() "
                               "first to retrain")
        pca = None
        if self.reduce_to is not None:
            pca = PCA(self.reduce_to).fit(rows[i: i + ADD_CHUNK_ROWS] for i in range(0, rows.shape[0], ADD_CHUNK_ROWS))
        self.pca = pca
        sample = rows
        if rows.shape[0] > max_points:
            sample = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]]
        self._codec.fit(self._prepare(sample))

    def _before_store(self, rows: Tensor) -> None:
        if not self.is_trained and rows.shape[0]:
            self.train(rows)

    def _prepare(self, rows: Tensor) -> Tensor:
        rows = rows.to(self.device)
        if self.pca is not None:
            rows = self.pca.transform(rows.float())
        if self._normalised:
            rows = unit_rows(rows)
        return rows if self.codec is not None else rows.to(self.dtype)

    # -- search
    def search(self, queries, k: int, mask=None, *, rescore: Optional[int] = None):
        """The k best rows for each query: ``(scores, ids)``, each ``[Q, k]`` (``[k]`` for a 1-D query), best
        first, padded with id -1 and -inf/+inf; in the queries' array type. ``rescore`` (binary codec):
        how many times k Hamming matches to rescore (default ``self.rescore``)."""
        if not self.is_trained:
            raise RuntimeError(f"FlatIndex.search needs a trained index (codec={self.codec!r}, "
                               f"reduce_to={self.reduce_to}): call train(vectors) or add vectors first")
        return self._search(queries, k, mask,
                            rescore=check_positive(self.rescore if rescore is None else rescore, "rescore"))

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], rescore: int = 4) -> Tuple[Tensor, Tensor]:
        if self.codec is not None or self.reduce_to is not None:
            bad = ~torch.isfinite(q).all(1)
            if bool(bad.any()):
                raise ValueError(f"queries must be finite to be reduced or quantised, found NaN or inf in row "
                                 f"{int(torch.nonzero(bad)[0])}")
        return self._codec.search(self._prepare(q), self._cols(), k, mask, rescore=rescore)

    # -- persistence
    def _metadata(self) -> dict:
        meta = super()._metadata()
        meta.update(codec=self.codec or "", reduce_to=self.reduce_to or 0, rescore=self.rescore)
        if self.pca is not None:
            meta.update({f"pca.{k}": v for k, v in self.pca.state_dict().items() if not torch.is_tensor(v)})
        return meta

    @classmethod
    def _from_metadata(cls, meta: dict, device) -> "FlatIndex":
        return cls(int(meta["dim"]), meta["metric"], dtype=meta["dtype"], device=device,
                   codec=meta.get("codec") or None, reduce_to=int(meta.get("reduce_to", 0)) or None,
                   rescore=int(meta.get("rescore", 4)))

    def save(self, path) -> None:
        if not self.is_trained:
            raise RuntimeError("FlatIndex.save needs a trained index: call train(vectors) or add vectors first")
        super().save(path)

    def _tensors(self) -> dict:
        out = {("vectors" if name == "vectors" else name): col for name, col in self._cols().items()}
        out["ids"] = self.ids
        out.update({f"codec.{k}": v for k, v in self._codec.state().items()})
        if self.pca is not None:
            out.update({f"pca.{k}": v for k, v in self.pca.state_dict().items() if torch.is_tensor(v)})
        return out

    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        ids = tensors["ids"]
        n = ids.shape[0] if ids.dim() == 1 else -1
        expected = self._codec.columns()
        cols = {name: tensors[name] for name in expected}
        for name, (dtype, width) in expected.items():
            shape = (n, width) if width else (n,)
            if n < 0 or tuple(cols[name].shape) != shape or cols[name].dtype != dtype or ids.dtype != torch.int64:
                raise self._invalid(path, "tensor shapes or dtypes do not match")
        self._codec.load_state({k[len("codec."):]: v.to(self.device) for k, v in tensors.items()
                                if k.startswith("codec.")})
        if self.reduce_to is not None:
            state = {k[len("pca."):]: v for k, v in tensors.items() if k.startswith("pca.")}
            for key, value in meta.items():  # file metadata is text: "True" / "False" or an int
                if key.startswith("pca."):
                    state[key[len("pca."):]] = value == "True" if value in ("True", "False") else int(value)
            self.pca = PCA.from_state_dict(state, device=self.device)
        self._columns = {name: col.to(self.device) for name, col in cols.items()}
        self._ids = ids.to(self.device)
        self._size = n
