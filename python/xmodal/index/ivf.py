"""IVFIndex: k-means lists, each query scans only the lists nearest to it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import topk_search
from .arrays import as_rows
from .base import Index, check_positive, cosine_to_distance, unit_rows
from .inverted_lists import InvertedLists
from .kmeans import assign, kmeans


class IVFIndex(Index):
    """Inverted-file index: k-means centroids partition the rows into ``nlist`` lists; a search scores the
    queries against the centroids, then scans only the ``nprobe`` nearest lists of each query (one
    ``torch.ops.xmodal.ivf_scan`` call for all of them).

    ``train(vectors)`` runs k-means whose assignment step is :func:`topk_search` with k = 1. Rows are kept
    grouped by list (``ids``/``vectors`` follow that order, and so does a ``mask``); adding rows costs time in
    proportion to the rows added, not to the index.
    """

    FORMAT = "xmodal.IVFIndex/1"

    def __init__(self, dim: int, nlist: int, metric: str = "cosine", *, nprobe: int = 8, dtype=torch.float32,
                 device="cpu"):
        super().__init__(dim, metric, dtype=dtype, device=device)
        if metric == "kl":
            raise ValueError("IVFIndex does not support metric 'kl' (k-means needs a vector-space metric)")
        self.nlist = check_positive(nlist, "nlist")
        self.nprobe = check_positive(nprobe, "nprobe")
        self.centroids: Optional[Tensor] = None
        self._lists = InvertedLists(nlist, dim, self.dtype, self.device)

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def _coarse_metric(self) -> str:
        return "l2" if self.metric in ("l2", "sqeuclidean") else "ip"

    def __len__(self) -> int:
        return len(self._lists)

    @property
    def ids(self) -> Tensor:
        return self._lists.ids[self._lists.positions().to(self.device)]

    @property
    def vectors(self) -> Tensor:
        return self._lists.vectors[self._lists.positions().to(self.device)]

    @property
    def nbytes(self) -> int:
        return self._lists.nbytes + (0 if self.centroids is None else self.centroids.nbytes)

    def train(self, vectors, *, iterations: int = 10, seed: int = 0, max_points: int = 256 * 1024) -> None:
        """k-means on (a sample of at most ``max_points``) training vectors."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        if rows.shape[0] < self.nlist:
            raise ValueError(f"training needs at least nlist = {self.nlist} vectors, got {rows.shape[0]}")
        self.centroids = kmeans(rows, self.nlist, metric=self._coarse_metric, spherical=self._normalised,
                                iterations=iterations, seed=seed, max_points=max_points,
                                prepare=self._prepare)

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"IVFIndex.{what} needs a trained index: call train(vectors) first")

    def add(self, vectors, ids=None) -> Tensor:
        self._require_trained("add")
        return super().add(vectors, ids)

    def _store(self, rows: Tensor, ids: Tensor) -> None:
        lists = assign(rows, self.centroids, self._coarse_metric) if rows.shape[0] \
            else torch.empty(0, dtype=torch.int64)
        self._lists.append(rows, ids, lists.cpu())

    def _keep(self, keep: Tensor) -> None:
        self._lists.keep(keep)

    def _clear(self) -> None:
        self._lists.clear()

    def _move(self, device: torch.device) -> None:
        self._lists.move(device)
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)

    def _position_ids(self) -> Tensor:
        return self._lists.ids

    def search(self, queries, k: int, mask=None, *, nprobe: Optional[int] = None):
        """As :meth:`FlatIndex.search`, scanning the ``nprobe`` (default ``self.nprobe``) nearest lists."""
        self._require_trained("search")
        return self._search(queries, k, mask, nprobe=check_positive(self.nprobe if nprobe is None else nprobe,
                                                                    "nprobe"))

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], nprobe: Optional[int] = None
                     ) -> Tuple[Tensor, Tensor]:
        nprobe = min(self.nprobe if nprobe is None else nprobe, self.nlist)
        if self._normalised:  # rows are stored normalised: cosine is an inner-product search
            q, op_metric = unit_rows(q), "ip"
        else:
            op_metric = self.metric
        probes = topk_search(q.float(), self.centroids, nprobe, self._coarse_metric)[1]  # [Q, nprobe]
        slot_mask = None
        if mask is not None:  # masks follow list order; the scan wants one per buffer slot
            slot_mask = torch.zeros(self._lists.vectors.shape[0], dtype=torch.bool, device=self.device)
            slot_mask[self._lists.positions().to(self.device)] = mask
        values, slots = torch.ops.xmodal.ivf_scan(q.to(self.dtype), self._lists.vectors, self._lists.ranges(),
                                                  probes, k, op_metric, slot_mask)
        if self.metric == "cosine_distance":
            values = cosine_to_distance(values, slots)
        return values, slots

    # -- persistence
    def _metadata(self) -> dict:
        meta = super()._metadata()
        meta.update(nlist=self.nlist, nprobe=self.nprobe)
        return meta

    @classmethod
    def _from_metadata(cls, meta: dict, device) -> "IVFIndex":
        return cls(int(meta["dim"]), int(meta["nlist"]), meta["metric"], nprobe=int(meta["nprobe"]),
                   dtype=meta["dtype"], device=device)

    def save(self, path) -> None:
        self._require_trained("save")
        super().save(path)

    def _tensors(self) -> dict:
        return {"vectors": self.vectors, "ids": self.ids, "lists": self._lists.lists(), "centroids": self.centroids}

    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        vectors, ids, lists, centroids = tensors["vectors"], tensors["ids"], tensors["lists"], tensors["centroids"]
        n = vectors.shape[0] if vectors.dim() == 2 else -1
        if n < 0 or vectors.shape[1] != self.dim or ids.shape != (n,) or lists.shape != (n,) \
                or centroids.shape != (self.nlist, self.dim) or bool(((lists < 0) | (lists >= self.nlist)).any()):
            raise self._invalid(path, "tensor shapes do not match")
        self.centroids = centroids.to(self.device)
        self._lists.append(vectors.to(self.device, self.dtype), ids.to(self.device), lists.to(torch.int64))
