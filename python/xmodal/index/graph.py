"""GraphIndex: a proximity graph over the rows; a search walks it from a few entry rows (``csrc/graph/``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._checks import check_positive
from ..ops import topk_search
from ._rows import ADD_CHUNK_ROWS, cosine_to_distance, non_finite_rows
from .arrays import as_rows, from_torch
from .codecs import FlatScan
from .flat import FlatIndex

#: the metrics a graph searches (the rows' geometry is l2 or, for unit rows, cosine)
GRAPH_METRICS = ("cosine", "cosine_distance", "ip", "l2", "sqeuclidean")
#: the most neighbours a row may list
MAX_DEGREE = 1024

# graph_search's metric for each of GRAPH_METRICS (values converted after)
_OP_METRIC = {"cosine": "cosine", "cosine_distance": "cosine", "ip": "ip", "l2": "l2", "sqeuclidean": "l2"}

# removal and projection re-prune with at least this alpha: a repaired list draws on few candidates, and
# keeping the longer ones among them held recall@10 after removing 30% of the rows (0.966 at alpha 1, 0.997 at
# 1.2, 0.972 at 1.5); projected lists: recall@10 at ef 64 0.95 at 1.2 against 0.92 at 1
_REPAIR_ALPHA = 1.2

# removal repairs the graph around the removed rows while those removed since it was last built are at most this
# share of the rows; past it the kept rows are linked again from scratch. Removing a share of 300,000 clustered
# rows, recall@10 at ef 64 of the repaired graph against one built afresh: 5% 0.973 / 0.976, 10% 0.969 / 0.981,
# 20% 0.944 / 0.981, 30% 0.925 / 0.987; re-linking only the rows that lost neighbours cost more than building
# afresh (a walk each, nearly every row at 30%) and recalled less.
_REBUILD_SHARE = 0.1

# cross-modal projection: each sample query's nearest rows that re-link (hubs) and the rows they draw on
# (neighbours). On a two-cone set (100,000 rows and sample queries) hubs 1 / 4 / 16 gave recall@10 at ef 64
# 0.90 / 0.94 / 0.93 (0.88 without a sample), and 50 / 100 / 200 neighbours 0.93 / 0.95 / 0.92.
_PROJECT_HUBS = 4
_PROJECT_NEIGHBOURS = 100
# sample queries whose exact neighbours are computed at once (a [chunk, N] score tile at most), and that one
# projection step re-links from (a hub's candidates are those of its queries in one step: 52 MB of lists)
_SEARCH_CHUNK = 1024
_PROJECT_QUERIES = 65536
# the sample queries an index keeps (bf16: 16 MiB at D = 128), to re-link around them when remove() builds
# the graph afresh
_KEPT_QUERIES = 65536


# what graph_plan weighs, in nanoseconds per row (measured on 2 cores of an AMD EPYC Zen 4, 200,000 x 128; only
# their ratios matter): a row a walk meets (a scattered read and the heaps' bookkeeping), an allowed row copied
# out for an exact scan, a mask entry read to find the allowed rows, and an allowed row scored for one query
# alone (a matrix-vector product) or for each query of a batch (a matrix product)
_WALK_NS, _GATHER_NS, _MASK_NS = 45.0, 40.0, 1.25
_SCAN_ONE_NS, _SCAN_BATCH_NS = 9.0, 4.0


def graph_plan(rows: int, allowed: int, ef: int, degree: int, queries: int = 1) -> str:
    """How a search answers: ``"graph"`` (walk the graph) or ``"exact"`` (score every allowed row), whichever
    costs less. A walk meets about ``ef * degree / 2`` rows, and with a filter that lets a share s of the rows
    through, 1/s times as many before it has found ef allowed ones; each query walks alone. An exact scan
    finds and copies the allowed rows once, then scores them for all the queries at once, each row faster (in
    order, a matrix product). With these weights a filtered batch of 1,000 queries at 10% of 200,000 rows scans
    (measured 80 against 298 us a query), one query walks (0.40 ms against 1.2)."""
    if allowed == 0:
        return "exact"
    walk = queries * ef * degree / 2 * rows / allowed * _WALK_NS
    scan = _SCAN_ONE_NS if queries == 1 else _SCAN_BATCH_NS
    exact = allowed * queries * scan
    if allowed < rows:  # (a filtered scan first finds and copies the allowed rows)
        exact += allowed * _GATHER_NS + rows * _MASK_NS
    return "exact" if exact <= walk else "graph"


class GraphIndex(FlatIndex):
    """A proximity graph: each row lists up to ``degree`` neighbours, and a search walks from the best of a few
    entry rows (the one nearest the rows' mean, and 64 spread over the rows) towards the query, keeping the
    ``ef`` best rows found (more: higher recall, slower).

    Built by inserting rows one at a time, in parallel over the cores: a walk to the new row finds candidates,
    pruned to its neighbours (a candidate is dropped when a neighbour already picked is closer to it than the
    new row is by the factor ``alpha``: 1 keeps short edges only, as HNSW's bottom layer; more keeps some long
    ones, as DiskANN's Vamana), then the neighbours link back, re-pruning full lists. ``build_ef``: the
    insertion walk's breadth. Adding never rebuilds: rows join the graph as they come, also after ``load``.

    **Cross-modal construction**: ``add(rows, queries=sample)`` also re-links the graph around a sample of the
    modality that will search (captions for image rows), after RoarGraph (VLDB 2024): each sample query's
    nearest rows (exact search) are the candidates of its first few, pruned as in insertion, so that walks for
    such queries, which lie outside the rows' distribution (the modality gap), find edges towards the rest of
    an answer. On a synthetic two-cone set (100,000 rows and sample queries) this raised recall@10 at ef 64
    from 0.88 to 0.95 and at ef 128 from 0.96 to 0.98, at the same cost per step.

    **Filters**: a ``mask`` is applied inside the walk (rows outside it are walked through, never answered);
    where few rows pass, an exact scan of them is faster, and the search takes it (:meth:`search_plan`).

    **Removal** repairs the graph at once: each row that pointed to a removed row takes the removed row's
    neighbours as candidates (FreshDiskANN's consolidation), and the rows are renumbered; nothing is left
    behind as a tombstone. Repairs lose a little recall each, so once the rows removed since the graph was
    built pass a tenth of the rows, ``remove`` links the kept rows afresh instead (the time of a build; a
    service replacing rows pays it once for every tenth of the rows replaced). The index keeps the last
    ``queries`` sample (bfloat16, up to 65,536 of its queries, saved in its file: 256 bytes a query at D = 128)
    and a fresh build re-links around it again, at the cost of the sample's exact search; a repair keeps the
    cross-modal edges that do not point at removed rows. ``add`` of no rows with ``queries=`` re-links alone
    (and keeps that sample instead).

    Rows are float32 or bfloat16 (``dtype``), on the CPU; metrics :data:`GRAPH_METRICS` (cosine rows are
    stored unit-normalised). Memory: the rows, 4 bytes per neighbour slot (``degree``), 4 for each row's
    squared norm and 8 for its id, plus room for appends as in :class:`FlatIndex`.
    """

    FORMAT = "xmodal.GraphIndex/1"
    OLDER_FORMATS: Tuple[str, ...] = ()

    def __init__(self, dim: int, metric: str = "cosine", *, degree: int = 32, build_ef: int = 200, ef: int = 64,
                 alpha: float = 1.0, dtype=torch.float32, device="cpu"):
        if metric not in GRAPH_METRICS:
            raise ValueError(f"GraphIndex supports metrics {list(GRAPH_METRICS)}, got {metric!r}")
        if torch.device(device).type != "cpu":
            raise ValueError(f"GraphIndex runs on the CPU, got device={device!r}")
        self.degree = check_positive(degree, "degree")
        if degree > MAX_DEGREE:
            raise ValueError(f"degree must be at most {MAX_DEGREE}, got {degree}")
        self.build_ef = check_positive(build_ef, "build_ef")
        self.ef = check_positive(ef, "ef")
        if not float(alpha) >= 1.0:
            raise ValueError(f"alpha must be at least 1, got {alpha}")
        self.alpha = float(alpha)
        self._entry = 0
        self._removed_since_build = 0  # rows removed by repair since the graph was last built
        self._sample: Optional[Tensor] = None  # the last add's query sample (bf16), for a fresh build's re-linking
        # _graph_columns' views and the (row count, columns dict) they belong to
        self._views: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._views_of: Optional[tuple] = None
        super().__init__(dim, metric, dtype=dtype, device=device)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"GraphIndex stores float32 or bfloat16 rows, got dtype={self.dtype}")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", degree={self.degree})"

    # -- storage: FlatIndex's columns, plus each row's squared norm and neighbour list
    def _column_specs(self) -> Dict[str, Tuple[torch.dtype, int]]:
        return {**super()._column_specs(), "norms": (torch.float32, 0), "graph": (torch.int32, self.degree)}

    def _graph_columns(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The stored rows, norms and lists (views of the first len(self) rows), kept until the storage or the
        row count changes: slicing them anew costs a one-query search several microseconds."""
        key = (self._size, self._columns)
        if self._views_of is None or self._views_of[0] != key[0] or self._views_of[1] is not key[1]:
            cols = self._cols()
            self._views = (cols["vectors"], cols["norms"], cols["graph"])
            self._views_of = key
        return self._views

    def _move(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"GraphIndex runs on the CPU, got device={device}")

    def _store(self, rows: Tensor, ids: Tensor) -> None:
        start = self._size
        super()._store(rows, ids)
        vectors, norms, graph = self._graph_columns()
        added = vectors[start:].float()
        norms[start:] = (added * added).sum(1)
        graph[start:] = -1
        if start == 0:
            self._entry = self._medoid()
        torch.ops.xmodal.graph_insert(vectors, norms, graph, start, self._entry, self.build_ef, self.alpha)

    def _medoid(self) -> int:
        """The row nearest the rows' mean: where walks start (the shortest way, on average, to any row)."""
        vectors = self._cols()["vectors"]
        if vectors.shape[0] == 0:
            return 0
        total = torch.zeros(self._vectors.shape[1], dtype=torch.float64)
        for start in range(0, vectors.shape[0], ADD_CHUNK_ROWS):
            total += vectors[start: start + ADD_CHUNK_ROWS].double().sum(0)
        mean = (total / vectors.shape[0]).to(vectors.dtype)
        return int(topk_search(mean[None], vectors, 1, metric="l2")[1][0, 0])

    def add(self, vectors, ids=None, *, queries=None) -> Tensor:
        """Add rows (see :meth:`xmodal.index.Index.add`). ``queries``: a sample of the modality that will
        search (e.g. 10,000 caption embeddings for image rows): after the rows are added, the graph is re-linked
        around each sample query's 100 nearest rows (exact search over every row, so it costs about as much as
        that search). Edges already there stay where the pruning keeps them."""
        sample = None
        if queries is not None:
            sample, _, _ = as_rows(queries, self.dim, "queries")
            self._check_rows(sample, "queries")
        new_ids = super().add(vectors, ids)
        if sample is not None and sample.shape[0]:
            prepared = self._prepare(sample)
            if len(self) > 1:
                self._project(prepared)
            step = -(-prepared.shape[0] // _KEPT_QUERIES)  # (every step-th query, at most _KEPT_QUERIES)
            self._sample = prepared[::step].to(torch.bfloat16).contiguous()
        return new_ids

    def _project(self, sample: Tensor) -> None:
        vectors, norms, graph = self._graph_columns()
        k = min(_PROJECT_NEIGHBOURS, vectors.shape[0])
        metric = "l2" if self.metric in ("l2", "sqeuclidean") else "ip"
        alpha = max(self.alpha, _REPAIR_ALPHA)
        for start in range(0, sample.shape[0], _PROJECT_QUERIES):
            part = sample[start: start + _PROJECT_QUERIES].to(vectors.dtype)
            neighbours = torch.cat([topk_search(part[i: i + _SEARCH_CHUNK], vectors, k, metric=metric)[1]
                                    for i in range(0, part.shape[0], _SEARCH_CHUNK)])
            torch.ops.xmodal.graph_project(vectors, norms, graph, neighbours, _PROJECT_HUBS, alpha)

    def _keep(self, keep: Tensor) -> None:
        removed = self._removed_since_build + self._size - int(keep.sum())
        repaired = None
        if removed <= _REBUILD_SHARE * self._size:
            vectors, norms, graph = self._graph_columns()
            repaired = torch.ops.xmodal.graph_repair(vectors, norms, graph, keep, max(self.alpha, _REPAIR_ALPHA))
        super()._keep(keep)
        self._views_of = self._views = None  # (the old views may hold storage _keep just replaced)
        self._entry = self._medoid()
        vectors, norms, graph = self._graph_columns()
        if repaired is not None:
            graph.copy_(repaired)
            self._removed_since_build = removed
        else:
            graph.fill_(-1)
            torch.ops.xmodal.graph_insert(vectors, norms, graph, 0, self._entry, self.build_ef, self.alpha)
            if self._sample is not None and self._size > 1:  # (the cross-modal edges, re-linked)
                self._project(self._sample.float())
            self._removed_since_build = 0

    def _clear(self) -> None:
        super()._clear()
        self._views_of = self._views = None
        self._entry = 0
        self._sample = None
        self._removed_since_build = 0

    # -- search
    def search(self, queries, k: int, mask=None, *, ef: Optional[int] = None):
        """The k best rows for each query: ``(scores, ids)`` as :meth:`xmodal.index.Index.search`. ``ef``: how
        many rows the walk keeps (default ``self.ef``; raised to k when smaller): higher finds more of the
        true k best, in proportionally more time. A ``mask`` restricts the answers; where it lets few rows
        through the search scores them all instead (exact; see :meth:`search_plan`)."""
        if mask is None and self._mapped is None:
            # the common case in a few Python steps: the walk answers ids itself (a one-query search spent as
            # long in the general path's tensor steps as in the walk)
            q, kind, squeeze = as_rows(queries, self.dim, "queries")
            k = check_positive(k, "k")
            ef = self._ef(k, ef)
            if q.device.type == "cpu" and graph_plan(self._size, self._size, ef, self.degree, q.shape[0]) == "graph":
                values, ids = self._walk(q, k, ef, None, self._ids)
                values, ids = from_torch(values, kind), from_torch(ids, kind)
                return (values[0], ids[0]) if squeeze else (values, ids)
        return self._search(queries, k, mask, ef=ef)

    def _walk(self, q: Tensor, k: int, ef: int, mask: Optional[Tensor], ids: Optional[Tensor] = None):
        """(values in the index's metric, answers) of graph_search: row positions, or ``ids[position]`` with
        ``ids``. The op normalises cosine queries itself (a walk ranks alike for any positive scale of q)."""
        vectors, norms, graph = self._graph_columns()
        # (the op's kernel without the dispatcher: a one-query search spends ~2.7 us less per call)
        values, answers = _C.graph_search(q.float(), vectors, norms, graph, self._entry, k, ef, _OP_METRIC[self.metric],
                                          mask, ids)
        return self._metric_values(values, answers), answers

    def _metric_values(self, values: Tensor, answers: Tensor) -> Tensor:
        """graph_search's values (inner products, cosines or squared l2) in the index's metric."""
        if self.metric == "l2":
            return values.sqrt()
        if self.metric == "cosine_distance":
            return cosine_to_distance(values, answers)
        return values

    def _ef(self, k: int, ef: Optional[int]) -> int:
        return max(check_positive(self.ef if ef is None else ef, "ef"), k)

    def search_plan(self, k: int, mask=None, *, ef: Optional[int] = None, queries: int = 1) -> dict:
        """How :meth:`search` would answer ``queries`` queries at once: ``{"path": "graph" | "exact", "rows",
        "allowed", "ef"}``."""
        k = check_positive(k, "k")
        queries = check_positive(queries, "queries")
        m = self._mask(mask)
        allowed = len(self) if m is None else int(m.sum())
        ef = self._ef(k, ef)
        return {"path": graph_plan(len(self), allowed, ef, self.degree, queries), "rows": len(self),
                "allowed": allowed, "ef": ef}

    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], ef: Optional[int] = None):
        self._check_file()
        ef = self._ef(k, ef)
        allowed = self._size if mask is None else int(mask.sum())
        if graph_plan(self._size, allowed, ef, self.degree, q.shape[0]) == "exact":
            bad = non_finite_rows(q)  # (the walk checks its queries itself)
            if bad.numel():
                raise ValueError(f"queries must be finite, found NaN or inf in row {int(bad[0])}")
            return self._exact(self._prepare(q).float(), k, mask, self._graph_columns()[0])
        return self._walk(q, k, ef, mask)

    def _exact(self, q: Tensor, k: int, mask: Optional[Tensor], vectors: Tensor):
        """Score every allowed row (gathered first when a mask leaves some out)."""
        codec = self._encoding.codec
        if mask is None:
            return codec.search(FlatScan(), q, {"vectors": vectors}, k, None)
        rows = torch.nonzero(mask).flatten()
        # (index_select: several times faster than vectors[rows] for scattered rows)
        values, at = codec.search(FlatScan(), q, {"vectors": vectors.index_select(0, rows)}, k, None)
        if rows.numel() == 0:
            return values, at
        return values, torch.where(at >= 0, rows[at.clamp(min=0)], at)

    # -- persistence
    def _metadata(self) -> dict:
        return {**super()._metadata(), "degree": self.degree, "build_ef": self.build_ef, "ef": self.ef,
                "alpha": self.alpha, "entry": self._entry, "removed_since_build": self._removed_since_build}

    def _tensors(self) -> dict:
        return {**super()._tensors(), **({} if self._sample is None else {"query_sample": self._sample})}

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self._sample is None else self._sample.nbytes)

    @classmethod
    def _from_metadata(cls, meta: dict, device) -> "GraphIndex":
        return cls(int(meta["dim"]), meta["metric"], degree=int(meta["degree"]), build_ef=int(meta["build_ef"]),
                   ef=int(meta["ef"]), alpha=float(meta["alpha"]), dtype=meta["dtype"], device=device)

    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        super()._restore(tensors, path, meta)
        graph = self._cols()["graph"]
        entry = int(meta["entry"])
        if graph.numel():
            low, high = torch.aminmax(graph)
            if int(low) < -1 or int(high) >= self._size:
                raise self._invalid(path, f"neighbour rows must be in [-1, {self._size}), found [{int(low)}, "
                                          f"{int(high)}]")
        if self._size and not 0 <= entry < self._size:
            raise self._invalid(path, f"entry row {entry} is not in [0, {self._size})")
        removed = int(meta.get("removed_since_build", 0))  # (absent from files written before it was kept)
        if removed < 0:
            raise self._invalid(path, f"removed_since_build must not be negative, got {removed}")
        self._entry = entry
        self._removed_since_build = removed
        sample = tensors.get("query_sample")  # (absent from files written before indexes kept it)
        width = self._cols()["vectors"].shape[1]
        if sample is not None and (sample.dim() != 2 or sample.shape[1] != width or sample.dtype != torch.bfloat16):
            raise self._invalid(path, f"query_sample must be bfloat16 [n, {width}], got {sample.dtype} "
                                      f"{list(sample.shape)}")
        self._sample = sample
