"""FlatIndex: exact search over every stored row with :func:`xmodal.topk_search`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import topk_search
from .base import Index, cosine_to_distance, unit_rows


class FlatIndex(Index):
    """Exact search over every stored vector with :func:`xmodal.topk_search`.

    Vectors are stored in ``dtype`` (bfloat16 halves memory) on ``device``. For ``cosine`` and
    ``cosine_distance`` rows are stored unit-normalised, so a search does no per-call work on the database
    (it runs an inner-product search); ``l2``/``sqeuclidean``/``ip``/``kl`` store rows as given.
    """

    FORMAT = "xmodal.FlatIndex/1"

    def __init__(self, dim: int, metric: str = "cosine", *, dtype=torch.float32, device="cpu"):
        super().__init__(dim, metric, dtype=dtype, device=device)
        self._clear()

    def __len__(self) -> int:
        return self._size

    @property
    def ids(self) -> Tensor:
        return self._ids[: self._size]

    @property
    def vectors(self) -> Tensor:
        return self._vectors[: self._size]

    @property
    def nbytes(self) -> int:
        return self._vectors.nbytes + self._ids.nbytes

    def _store(self, rows: Tensor, ids: Tensor) -> None:
        need = self._size + rows.shape[0]
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

    def _keep(self, keep: Tensor) -> None:
        keep = keep.to(self.device)
        kept_vectors, kept_ids = self.vectors[keep], self.ids[keep]  # copies: safe to write back in place
        m = kept_ids.shape[0]
        self._vectors[:m] = kept_vectors
        self._ids[:m] = kept_ids
        self._size = m

    def _clear(self) -> None:
        self._vectors = torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._size = 0

    def _move(self, device: torch.device) -> None:
        self._vectors = self.vectors.to(device)
        self._ids = self.ids.to(device)

    def _position_ids(self) -> Tensor:
        return self._ids

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if not self._normalised:
            return topk_search(q.to(self.dtype), self.vectors, k, self.metric, mask=mask)
        values, positions = topk_search(unit_rows(q).to(self.dtype), self.vectors, k, "ip", mask=mask)
        if self.metric == "cosine_distance":
            values = cosine_to_distance(values, positions)
        return values, positions

    def _tensors(self) -> dict:
        return {"vectors": self.vectors, "ids": self.ids}

    def _restore(self, tensors: dict, path: str) -> None:
        vectors, ids = tensors["vectors"], tensors["ids"]
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or ids.shape != (vectors.shape[0],) \
                or vectors.dtype != self.dtype or ids.dtype != torch.int64:
            raise self._invalid(path, "tensor shapes or dtypes do not match")
        self._store(vectors.to(self.device), ids.to(self.device))
