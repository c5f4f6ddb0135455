"""IVFIndex: k-means lists, each query scans only the lists nearest to it."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from ..ops import topk_search
from .arrays import as_rows
from .._checks import check_positive
from .base import Index
from .codecs import Int8Codes, ListScan
from .inverted_lists import InvertedLists
from .io import TensorStream
from .kmeans import assign, kmeans


#: lists a query scans unless a search says otherwise (the service's collections use it too)
DEFAULT_NPROBE = 8


class IVFIndex(Index):
    """Inverted-file index: k-means centroids partition the rows into ``nlist`` lists; a search scores the
    queries against the centroids, then scans only the ``nprobe`` nearest lists of each query (one
    ``torch.ops.xmodal.ivf_scan`` call for all of them).

    ``train(vectors)`` runs k-means whose assignment step is :func:`topk_search` with k = 1 (after the PCA,
    if ``reduce_to``), and learns the codec if any (``codec``, ``reduce_to``, ``rescore``: as for
    :class:`FlatIndex`). Rows are kept grouped by list (``ids``/``vectors`` follow that order, and so does a
    ``mask``); adding rows costs time in proportion to the rows added, amortised, and the lists keep at most
    about 14% more slots than rows as room for appends (see :class:`.inverted_lists.InvertedLists`;
    ``nbytes`` counts them).
    """

    # /2: int8 codes relative to centres (codecs.Int8Codes.upgrade_file reads /1); /3: each list's size
    # rather than each row's list (rows in list order either way)
    FORMAT = "xmodal.IVFIndex/3"
    OLDER_FORMATS = ("xmodal.IVFIndex/1", "xmodal.IVFIndex/2")

    def __init__(self, dim: int, nlist: int, metric: str = "cosine", *, nprobe: int = DEFAULT_NPROBE, dtype=torch.float32,
                 device="cpu", codec: Optional[str] = None, reduce_to: Optional[int] = None, rescore: int = 4):
        super().__init__(dim, metric, dtype=dtype, device=device, codec=codec, reduce_to=reduce_to, rescore=rescore)
        if metric == "kl":
            raise ValueError("IVFIndex does not support metric 'kl' (k-means needs a vector-space metric)")
        self.nlist = check_positive(nlist, "nlist")
        self.nprobe = check_positive(nprobe, "nprobe")
        self.centroids: Optional[Tensor] = None
        # a codec with centres (int8, binary): each list's centre (uint8 [nlist]), so a row's centre is its
        # list's and adding needs no second assignment; None in files from before it (nearest centre then)
        self.list_groups: Optional[Tensor] = None
        self._lists = InvertedLists(nlist, self._encoding.codec.columns(), self.device)
        self._checked_lists: Optional[Tensor] = None  # of a memory-mapped file: the lists searches have checked

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None and super().is_trained

    @property
    def _coarse_metric(self) -> str:
        return "l2" if self.metric in ("l2", "sqeuclidean") else "ip"

    def __len__(self) -> int:
        return len(self._lists)

    @property
    def ids(self) -> Tensor:
        self._check_file()
        return self._lists.ids[self._lists.positions().to(self.device)]

    @property
    def vectors(self) -> Tensor:
        """The stored rows in list order (reduced, unit-normalised for cosine metrics; decoded from codes)."""
        self._check_file()
        return self._encoding.codec.decode(self._lists.rows())

    def _columns_at(self, positions: Tensor) -> Dict[str, Tensor]:
        slots = self._lists.positions().to(self.device)[positions]
        return {name: t[slots] for name, t in self._lists.data.items()}

    @property
    def nbytes(self) -> int:
        return self._lists.nbytes + self._encoding.nbytes() + (0 if self.centroids is None else self.centroids.nbytes)

    def train(self, vectors, *, iterations: int = 10, seed: int = 0, max_points: int = 256 * 1024) -> None:
        """k-means on (a sample of at most ``max_points``) training vectors, after the PCA (fitted on all of
        them) if any; the codec learns from the same sample."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        if rows.shape[0] < self.nlist:
            raise ValueError(f"training needs at least nlist = {self.nlist} vectors, got {rows.shape[0]}")
        self._check_rows(rows, "vectors")
        if len(self):
            raise RuntimeError("IVFIndex.train must come before add (stored rows would not match); call reset() "
                               "first to retrain")

        def learn(sample: Tensor) -> None:
            self.centroids = kmeans(sample.float(), self.nlist, metric=self._coarse_metric,
                                    spherical=self._normalised, iterations=iterations, seed=seed,
                                    max_points=max_points)
            self._fit_codec(sample)

        self._encoding.fit(rows, max_points, "IVFIndex", learn)

    def _fit_codec(self, sample: Tensor) -> None:
        """A codec with centres takes them from the lists: the centroids themselves when there are at most as
        many lists as it has centres, else a k-means of the centroids; every list then has one centre."""
        codec = self._encoding.codec
        if not isinstance(codec, Int8Codes):
            codec.fit(sample)
            self.list_groups = None
            return
        if self.nlist <= codec.max_centres:
            centres, self.list_groups = self.centroids, torch.arange(self.nlist, device=self.device).to(torch.uint8)
        else:
            centres = kmeans(self.centroids, codec.max_centres, metric="l2", init="kmeans++", seed=0)
            self.list_groups = assign(self.centroids, centres, "l2").to(torch.uint8)
        lists = assign(sample.float(), self.centroids, self._coarse_metric)
        codec.fit(sample, centres, self.list_groups[lists])

    def _before_store(self, rows: Tensor) -> None:
        if not self.is_trained:  # the lists need centroids: no training on the first add
            self._require_trained("add")

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"IVFIndex.{what} needs a trained index: call train(vectors) first")

    def _assign(self, rows: Tensor) -> Tensor:
        """The list of each prepared row (CPU int64)."""
        if not rows.shape[0]:
            return torch.empty(0, dtype=torch.int64)
        return assign(rows.float(), self.centroids, self._coarse_metric).cpu()

    def _store_rows(self, rows: Tensor, ids: Tensor) -> None:
        # Two passes over the rows: the first assigns them to lists, so the lists grow once, to their final
        # size; the second encodes a chunk at a time straight into its slots. An add thus holds the index, one
        # chunk and 8 bytes a row of assignments, never the encoded rows twice (10M rows: ~1.05x the final
        # nbytes, not 2x). Rows are prepared (normalised, reduced) twice, a small cost next to the assignment.
        chunks = self._chunks(rows.shape[0])
        lists = [self._assign(self._prepare(rows[chunk])) for chunk in chunks]
        before = self._lists.sizes.clone()
        self._lists.reserve(torch.bincount(torch.cat(lists), minlength=self.nlist) if lists else before * 0)
        try:
            for chunk, chunk_lists in zip(chunks, lists):
                self._store(self._prepare(rows[chunk]), ids[chunk].to(self.device), chunk_lists)
        except BaseException:  # all or nothing
            self._lists.truncate(before)
            raise

    def _store(self, rows: Tensor, ids: Tensor, lists: Optional[Tensor] = None) -> None:
        """Append prepared rows to their ``lists`` (assigned here when not given)."""
        lists = self._assign(rows) if lists is None else lists
        groups = None if self.list_groups is None else self.list_groups[lists.to(self.device)]
        self._lists.append(self._encoding.codec.encode(rows, groups), ids, lists)

    def _keep(self, keep: Tensor) -> None:
        self._lists.keep(keep)

    def _clear(self) -> None:
        self._lists.clear()

    def _move(self, device: torch.device) -> None:
        self._lists.move(device)
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)
        if self.list_groups is not None:
            self.list_groups = self.list_groups.to(device)

    def _position_ids(self) -> Tensor:
        return self._lists.ids

    def search(self, queries, k: int, mask=None, *, nprobe: Optional[int] = None, rescore: Optional[int] = None):
        """As :meth:`FlatIndex.search`, scanning the ``nprobe`` (default ``self.nprobe``) nearest lists."""
        self._require_trained("search")
        return self._search(queries, k, mask, nprobe=check_positive(self.nprobe if nprobe is None else nprobe,
                                                                    "nprobe"), rescore=self._rescore(rescore))

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], nprobe: Optional[int] = None,
                     rescore: int = 4) -> Tuple[Tensor, Tensor]:
        nprobe = min(self.nprobe if nprobe is None else nprobe, self.nlist)
        q = self._prepare(q)
        probes = None
        if self._mapped is not None:  # check the lists this search reads before it reads them
            probes = self._probes(q, nprobe)
            self._check_lists(probes)
        slot_mask = self._slot_mask(mask)
        codec, cols = self._encoding.codec, self._lists.data
        if codec.name in (None, "int8") and self.device.type == "cpu":  # the lines below in one C++ call
            int8 = codec.name == "int8"
            return _C.ivf_search(q, self.centroids, nprobe, probes, self._lists.ranges(),
                                 cols["codes" if int8 else "vectors"], cols.get("groups"), cols.get("row_terms"),
                                 codec.scale if int8 else None, codec.bases() if int8 else None, k, self.metric,
                                 slot_mask)
        if probes is None:
            probes = self._probes(q, nprobe)
        return codec.search(ListScan(self._lists.ranges(), probes), q, cols, k, slot_mask, rescore=rescore)

    def _slot_mask(self, mask: Optional[Tensor]) -> Optional[Tensor]:
        """A mask over the rows (in list order) as the scan wants it: one per buffer slot."""
        if mask is None:
            return None
        slot_mask = torch.zeros(self._lists.slots, dtype=torch.bool, device=self.device)
        slot_mask[self._lists.positions().to(self.device)] = mask
        return slot_mask

    def _check_lists(self, probes: Tensor) -> None:
        """Check the file blocks of the probed lists' rows and ids (in list order in the file) the first time a
        search reads them. A list checked once is not looked at again: going through the blocks of every
        probed list on every search cost a one-query search at 10M rows ~0.8 ms until the whole file was read."""
        if self._checked_lists is None:
            self._checked_lists = torch.zeros(self.nlist, dtype=torch.bool)
        probed = torch.unique(probes.cpu())
        probed = probed[probed >= 0]
        probed = probed[~self._checked_lists[probed]]
        if probed.numel():
            begins = self._lists.starts[probed]
            ends = begins + self._lists.sizes[probed]
            for name in (*self._lists.data, "ids"):
                self._mapped.check_rows(name, begins, ends)
            self._checked_lists[probed] = True
        if self._mapped.done:  # every block checked: later searches owe nothing
            self._mapped = None

    def _check_answers(self, positions: Tensor) -> None:
        pass  # (their ids were checked with their lists, before the scan)

    def _probes(self, q: Tensor, nprobe: int) -> Tensor:
        """The ``nprobe`` lists nearest each prepared query ([Q, nprobe] list ids)."""
        return topk_search(q.float(), self.centroids, nprobe, self._coarse_metric)[1]

    # -- persistence
    def _metadata(self) -> dict:
        meta = super()._metadata()
        meta.update(nlist=self.nlist, nprobe=self.nprobe)
        return meta

    @classmethod
    def _from_metadata(cls, meta: dict, device) -> "IVFIndex":
        from .encoding import Encoding

        return cls(int(meta["dim"]), int(meta["nlist"]), meta["metric"], nprobe=int(meta["nprobe"]),
                   dtype=meta["dtype"], device=device, **Encoding.options(meta))

    def _tensors(self) -> dict:
        # the rows in list order, streamed a few lists at a time (never a copy of them all)
        n = len(self._lists)
        streams = {name: TensorStream(dtype, (n, width) if width else (n,),
                                      lambda name=name: self._lists.chunks(name))
                   for name, (dtype, width) in self._lists.columns.items()}
        streams["ids"] = TensorStream(torch.int64, (n,), lambda: self._lists.chunks("ids"))
        groups = {} if self.list_groups is None else {"list_groups": self.list_groups}
        return {**streams, "list_sizes": self._lists.sizes, "centroids": self.centroids, **groups}

    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        ids, centroids = tensors["ids"], tensors["centroids"]
        n = ids.shape[0] if ids.dim() == 1 else -1
        if "list_sizes" in tensors:
            sizes = tensors["list_sizes"]
            fits = sizes.shape == (self.nlist,) and bool((sizes >= 0).all()) and int(sizes.sum()) == n
        else:  # files before /3: each row's list, in list order
            lists = tensors["lists"]
            fits = lists.shape == (n,) and bool(((lists >= 0) & (lists < self.nlist)).all()) and \
                bool((lists[1:] >= lists[:-1]).all())
            sizes = torch.bincount(lists, minlength=self.nlist) if fits else None
        columns = {name: tensors[name] for name in self._lists.columns}
        fits = fits and n >= 0 and centroids.shape == (self.nlist, self._encoding.stored_dim) and all(
            tuple(columns[name].shape) == ((n, width) if width else (n,))
            for name, (_, width) in self._lists.columns.items())
        groups = tensors.get("list_groups")
        if groups is not None:
            centres = getattr(self._encoding.codec, "centres", None)
            fits = fits and centres is not None and groups.shape == (self.nlist,) and \
                groups.dtype == torch.uint8 and int(groups.max()) < centres.shape[0]
        if not fits:
            raise self._invalid(path, "tensor shapes do not match")
        self.centroids = centroids.to(self.device)
        self.list_groups = None if groups is None else groups.to(self.device)
        rows = {name: t.to(self.device, self._lists.columns[name][0]) for name, t in columns.items()}
        self._lists.adopt(rows, ids.to(self.device), sizes.to(torch.int64))  # the file's rows, as they are
