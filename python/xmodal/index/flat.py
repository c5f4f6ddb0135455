"""FlatIndex: search over every stored row, exact for float rows, approximate for compressed ones."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .base import Index
from .codecs import FlatScan

_ROOM = 8  # storage grows by 1/_ROOM of the rows (+ _ROOM_ROWS) when an add fits in less (see _reserve)
_ROOM_ROWS = 64


class FlatIndex(Index):
    """Search over every stored vector.

    Without a codec, rows are stored in ``dtype`` (bfloat16 halves memory) and searched exactly with
    :func:`xmodal.topk_search`. For ``cosine`` and ``cosine_distance`` rows are stored unit-normalised, so a
    search does no per-call work on the database; ``l2``/``sqeuclidean``/``ip``/``kl`` store rows as given.

    ``codec="int8"`` stores one int8 code per dimension (about a quarter of float32's bytes) and
    ``codec="binary"`` one bit per dimension plus the int8 codes, whose best ``rescore * k`` Hamming matches
    are rescored (``rescore``: the default for :meth:`search`). Scores are then approximate, in the metric's
    units; :mod:`xmodal.index.codecs` lists the metrics each codec supports. ``reduce_to`` applies an
    :class:`xmodal.PCA` to ``reduce_to`` dimensions before storing and searching (as faiss's
    IndexPreTransform); scores are then those of the reduced vectors.

    The PCA and codec learn from :meth:`train`'s rows, or else from the first :meth:`add`'s (the PCA from
    all of them, the codec from at most ``max_points``); later rows outside the learnt int8 range are
    clamped to it.
    """

    FORMAT = "xmodal.FlatIndex/2"  # /2: int8 codes relative to centres (codecs.Int8Codes.upgrade_file reads /1)
    OLDER_FORMATS = ("xmodal.FlatIndex/1",)

    def __init__(self, dim: int, metric: str = "cosine", *, dtype=torch.float32, device="cpu",
                 codec: Optional[str] = None, reduce_to: Optional[int] = None, rescore: int = 4):
        super().__init__(dim, metric, dtype=dtype, device=device, codec=codec, reduce_to=reduce_to, rescore=rescore)
        self._clear()

    # -- storage: one growable tensor per codec column, plus ids; at most 1/8 (+ 64) rows of room after an add
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
        self._check_file()
        return self._ids[: self._size]

    @property
    def vectors(self) -> Tensor:
        """The stored rows (reduced, unit-normalised for cosine metrics; decoded from a codec's codes)."""
        self._check_file()
        return self._encoding.codec.decode(self._cols())

    def _columns_at(self, positions: Tensor) -> Dict[str, Tensor]:
        return {name: col[positions] for name, col in self._cols().items()}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._columns.values()) + self._ids.nbytes + self._encoding.nbytes()

    def _column_specs(self) -> Dict[str, Tuple[torch.dtype, int]]:
        """The stored columns: name -> (dtype, width; 0 for one value per row). The codec's, first."""
        return self._encoding.codec.columns()

    def _new_columns(self, capacity: int) -> Dict[str, Tensor]:
        return {name: torch.empty((capacity, width) if width else (capacity,), dtype=dtype, device=self.device)
                for name, (dtype, width) in self._column_specs().items()}

    def _resize(self, capacity: int) -> None:
        """Move the rows to new storage of ``capacity`` rows."""
        columns = self._new_columns(capacity)
        for name, col in columns.items():
            col[: self._size] = self._columns[name][: self._size]
        ids = torch.empty(capacity, dtype=torch.int64, device=self.device)
        ids[: self._size] = self.ids
        self._columns, self._ids = columns, ids

    def _reserve(self, need: int) -> None:
        """Room for ``need`` rows: exactly that when it is more than an eighth above the rows stored (one add
        of many rows), else an eighth of room (+ 64 rows), so that small adds copy the rows O(1) times each,
        amortised. Storage thus never holds more than 1/8 (+ 64) rows more than it stores after an add."""
        if need > self._ids.shape[0]:
            self._resize(max(need, self._size + self._size // _ROOM + _ROOM_ROWS))

    def _before_store(self, rows: Tensor) -> None:
        super()._before_store(rows)
        self._reserve(self._size + rows.shape[0])  # once per add, for all its rows

    def _store(self, rows: Tensor, ids: Tensor) -> None:
        encoded = self._encoding.codec.encode(rows)
        need = self._size + rows.shape[0]
        self._reserve(need)
        for name, values in encoded.items():
            self._columns[name][self._size: need] = values
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
        if self._ids.shape[0] > self._size + self._size // _ROOM + _ROOM_ROWS:  # removals left too much room
            self._resize(self._size + self._size // (2 * _ROOM))

    def _clear(self) -> None:
        self._columns = self._new_columns(0)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._size = 0

    def _move(self, device: torch.device) -> None:
        if device == self._ids.device:
            return  # (a slice .to() the same device would be a view holding the whole storage)
        self._columns = {name: col.to(device) for name, col in self._cols().items()}
        self._ids = self.ids.to(device)

    def _position_ids(self) -> Tensor:
        return self._ids

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], rescore: int = 4) -> Tuple[Tensor, Tensor]:
        self._check_file()  # a search reads every row
        return self._encoding.codec.search(FlatScan(), self._prepare(q), self._cols(), k, mask, rescore=rescore)

    # -- persistence
    def _tensors(self) -> dict:
        return {**self._cols(), "ids": self.ids}

    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        ids = tensors["ids"]
        n = ids.shape[0] if ids.dim() == 1 else -1
        expected = self._column_specs()
        cols = {name: tensors[name] for name in expected}
        for name, (dtype, width) in expected.items():
            shape = (n, width) if width else (n,)
            if n < 0 or tuple(cols[name].shape) != shape or cols[name].dtype != dtype or ids.dtype != torch.int64:
                raise self._invalid(path, "tensor shapes or dtypes do not match")
        self._columns = {name: col.to(self.device) for name, col in cols.items()}
        self._ids = ids.to(self.device)
        self._size = n
