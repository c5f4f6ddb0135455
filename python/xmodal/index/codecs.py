"""How an index stores its rows: as floats, as int8 codes, or as binary codes (with int8 codes for rescoring).

A codec owns the per-row columns it stores (``columns``: name -> dtype and width), learns what it needs from
sample rows (``fit``), turns prepared rows (normalised for cosine metrics) into column values (``encode``)
and back (``decode``), and searches stored columns (``search``) with the fused ops:

========  ==========================================  ==============================================
codec     stores per row (dim d)                      metrics
========  ==========================================  ==============================================
None      ``d`` values in the index's dtype           all
"int8"    ``d`` int8 codes, a uint8 centre (+ one       ip, cosine, cosine_distance, l2, sqeuclidean
          float32 term)
"binary"  ``d`` bits + the int8 codes and term         cosine, cosine_distance (the bits rank by angle;
                                                      the best ``rescore * k`` are rescored with int8)
========  ==========================================  ==============================================

int8 is per-dimension scalar quantisation of residuals: training finds up to 256 centres (k-means, about one
per 256 training rows), and each row is stored as its nearest centre plus int8 codes of what is left, each
dimension's range of those residuals over the training rows cut into 256 steps (values outside it clamp to
its ends). Residuals span a few times less than the rows themselves, so the steps are finer: on embeddings
with many near-duplicates (1M renderings of 192 kinds of Shapes image) recall@10 went 0.962 -> 0.984 at one
more byte per row. Scores are the metric of the query against the decoded rows, so they are approximate, in
the metric's units. Binary codes are the signs of the rows after centring on
the training mean, searched by Hamming distance (popcount).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..ops import SEARCH_METRICS, normalises_rows, topk_search
from ._rows import ADD_CHUNK_ROWS, cosine_to_distance
from .kmeans import assign, kmeans

CODECS = {"int8": ("ip", "cosine", "cosine_distance", "l2", "sqeuclidean"),
          "binary": ("cosine", "cosine_distance")}


def check_codec(codec: Optional[str], metric: str) -> None:
    if codec is None:
        return
    if codec not in CODECS:
        names = [repr(name) for name in CODECS]
        raise ValueError(f"codec must be None, {', '.join(names[:-1])} or {names[-1]}, got {codec!r}")
    if metric not in CODECS[codec]:
        raise ValueError(f"codec {codec!r} supports metrics {list(CODECS[codec])}, got metric {metric!r}")


class FlatScan:
    """Searches every stored row: the flat ops."""

    def float(self, q: Tensor, vectors: Tensor, k: int, metric: str, mask: Optional[Tensor]):
        return topk_search(q, vectors, k, metric, mask=mask)

    def int8(self, q: Tensor, codes: Tensor, k: int, query_bias, row_scale, row_bias, mask: Optional[Tensor],
             row_group: Tensor):
        return torch.ops.xmodal.topk_int8(q, codes, k, query_bias, row_scale, row_bias, mask, row_group=row_group)

    def hamming(self, q: Tensor, bits: Tensor, k: int, mask: Optional[Tensor]):
        return torch.ops.xmodal.topk_hamming(q, bits, k, mask)


class ListScan:
    """Searches the inverted lists each query probes (``ranges``: the lists' rows, ``probes`` [Q, nprobe]):
    the ``ivf_scan`` op for every row encoding. ``mask``: one per stored slot."""

    def __init__(self, ranges: Tensor, probes: Tensor):
        self.ranges, self.probes = ranges, probes

    def float(self, q: Tensor, vectors: Tensor, k: int, metric: str, mask: Optional[Tensor]):
        return torch.ops.xmodal.ivf_scan(q, vectors, self.ranges, self.probes, k, metric, mask)

    def int8(self, q: Tensor, codes: Tensor, k: int, query_bias, row_scale, row_bias, mask: Optional[Tensor],
             row_group: Tensor):
        return torch.ops.xmodal.ivf_scan(q, codes, self.ranges, self.probes, k, "ip", mask, query_bias=query_bias,
                                         row_scale=row_scale, row_bias=row_bias, row_group=row_group)

    def hamming(self, q: Tensor, bits: Tensor, k: int, mask: Optional[Tensor]):
        return torch.ops.xmodal.ivf_scan(q, bits, self.ranges, self.probes, k, "hamming", mask)


def _pad(values: Tensor, positions: Tensor, metric: str) -> Tensor:
    fill = float("-inf") if SEARCH_METRICS[metric] else float("inf")
    return torch.where(positions >= 0, values, torch.full_like(values, fill))


class FloatRows:
    """Rows kept as they are, in the index's dtype; searched exactly with :func:`topk_search`."""

    name = None

    def __init__(self, dim: int, metric: str, dtype: torch.dtype):
        self.dim, self.metric, self.dtype = dim, metric, dtype

    @property
    def trained(self) -> bool:
        return True

    def columns(self) -> Dict[str, Tuple[torch.dtype, int]]:
        return {"vectors": (self.dtype, self.dim)}

    def fit(self, rows: Tensor) -> None:
        pass

    def encode(self, rows: Tensor, groups: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The stored columns of prepared ``rows``; ``groups``: each row's centre for the codecs that have
        centres (:meth:`Int8Codes.encode`), ignored by float rows."""
        return {"vectors": rows.to(self.dtype)}

    def decode(self, cols: Dict[str, Tensor]) -> Tensor:
        return cols["vectors"]

    def search(self, scan, q: Tensor, cols: Dict[str, Tensor], k: int, mask: Optional[Tensor], **options):
        """(values, positions) of the k best stored rows for prepared queries ``q``, with ``scan`` (FlatScan or
        ListScan) over the stored columns ``cols``."""
        vectors = cols["vectors"]
        if not normalises_rows(self.metric):
            return scan.float(q.to(self.dtype), vectors, k, self.metric, mask)
        values, positions = scan.float(q.to(self.dtype), vectors, k, "ip", mask)
        if self.metric == "cosine_distance":
            values = cosine_to_distance(values, positions)
        return values, positions

    def state(self) -> Dict[str, Tensor]:
        return {}

    def load_state(self, state: Dict[str, Tensor]) -> None:
        pass

    def upgrade_file(self, tensors: Dict[str, Tensor], rows: int) -> None:
        """Bring the tensors of a file written by an older xmodal (``rows`` stored rows) to this layout, in
        place, before they are loaded."""


class Int8Codes(FloatRows):
    """Residuals from k-means centres, quantised per dimension to int8; searched by ``torch.ops.xmodal.topk_int8``
    with each query's score against every centre as the bias of that centre's rows."""

    name = "int8"
    max_centres = 256        # a row's centre is one uint8
    rows_per_centre = 256    # training rows per centre: fewer rows, fewer centres

    def __init__(self, dim: int, metric: str, dtype: torch.dtype):
        super().__init__(dim, metric, dtype)
        self.centres: Optional[Tensor] = None  # [G, dim]; decoded row = centres[group] + offset + scale * code
        self.offset: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None
        self._bases: Tuple[Optional[Tensor], ...] = (None, None, None)

    @property
    def trained(self) -> bool:
        return self.scale is not None

    def columns(self):
        cols = {"codes": (torch.int8, self.dim), "groups": (torch.uint8, 0)}
        if self.metric != "ip":
            cols["row_terms"] = (torch.float32, 0)  # cosine: 1 / |decoded row|; l2: -|decoded row|^2
        return cols

    def fit(self, rows: Tensor, centres: Optional[Tensor] = None, groups: Optional[Tensor] = None) -> None:
        """Learn the centres (k-means of ``rows``) or take ``centres`` (at most 256), then the range of the
        rows' residuals from their centres: the nearest one, or the given ``groups`` (uint8, one per row)."""
        x = rows.float()
        if centres is None:
            count = min(self.max_centres, max(1, x.shape[0] // self.rows_per_centre))
            centres = kmeans(x, count, metric="l2", max_points=128 * count, init="kmeans++")
        self.centres = centres.float()
        low = torch.full((self.dim,), float("inf"), device=x.device)
        high = torch.full((self.dim,), float("-inf"), device=x.device)
        for start in range(0, x.shape[0], ADD_CHUNK_ROWS):
            chunk = x[start: start + ADD_CHUNK_ROWS]
            chunk_groups = self._groups(chunk) if groups is None else groups[start: start + ADD_CHUNK_ROWS]
            residual = chunk - self.centres[chunk_groups.long()]
            low, high = torch.minimum(low, residual.amin(0)), torch.maximum(high, residual.amax(0))
        scale = ((high - low) / 255).clamp_min(1e-12)
        self.scale, self.offset = scale, low + 128 * scale

    def _groups(self, rows: Tensor) -> Tensor:
        """Each row's nearest centre (uint8)."""
        return assign(rows, self.centres, "l2").to(torch.uint8)

    def _decoded(self, codes: Tensor, groups: Tensor) -> Tensor:
        return torch.addcmul(self.centres[groups.long()] + self.offset, codes.float(), self.scale)

    def encode(self, rows: Tensor, groups: Optional[Tensor] = None) -> Dict[str, Tensor]:
        rows = rows.float()
        groups = self._groups(rows) if groups is None else groups.to(torch.uint8)
        codes = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
        sq = torch.empty(rows.shape[0], device=rows.device)
        for start in range(0, rows.shape[0], 4096):  # blocks that stay in cache through every step (2x faster)
            part = slice(start, start + 4096)
            base = self.centres[groups[part].long()].add_(self.offset)
            steps = (rows[part] - base).div_(self.scale).round_().clamp_(-128, 127)
            codes[part] = steps.to(torch.int8)
            if self.metric != "ip":
                sq[part] = base.addcmul_(steps, self.scale).square_().sum(1)  # |decoded row|^2
        out = {"codes": codes, "groups": groups}
        if self.metric != "ip":
            out["row_terms"] = -sq if self.metric in ("l2", "sqeuclidean") else sq.sqrt().clamp_min(1e-12).reciprocal()
        return out

    def decode(self, cols):
        return self._decoded(cols["codes"], cols["groups"]).to(self.dtype)

    def _values(self, keys: Tensor, positions: Tensor, q: Tensor) -> Tensor:
        """Metric values from topk_int8's keys (see search)."""
        if self.metric in ("l2", "sqeuclidean"):
            sq = (q.square().sum(1, keepdim=True) - keys).clamp_min(0)
            keys = sq.sqrt() if self.metric == "l2" else sq
        elif self.metric == "cosine_distance":
            keys = cosine_to_distance(keys, positions)
        return _pad(keys, positions, self.metric)

    def _key_terms(self, q: Tensor, cols) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """topk_int8's queries, query_bias, row_scale and row_bias for float32 queries ``q``:
        q . decoded = (q * scale) . code + q . (centre + offset), the second a bias per query and centre; l2 ranks
        by 2 q . x - |x|^2 (|q|^2 added back after)."""
        two = 2.0 if self.metric in ("l2", "sqeuclidean") else 1.0
        terms = cols.get("row_terms")
        return ((q * (two * self.scale)).contiguous(), (q @ self.bases().T) * two,
                terms if normalises_rows(self.metric) else None,
                terms if self.metric in ("l2", "sqeuclidean") else None)

    def search(self, scan, q: Tensor, cols, k: int, mask: Optional[Tensor], **options):
        q = q.float()
        scaled, bias, row_scale, row_bias = self._key_terms(q, cols)
        keys, positions = scan.int8(scaled, cols["codes"], k, bias, row_scale, row_bias, mask, cols["groups"])
        return self._values(keys, positions, q), positions

    def bases(self) -> Tensor:
        """centres + offset (each centre's decoded zero), kept while both stay the same tensors: adding them on
        every search was an ATen op large enough to start OpenMP threads, whose spinning afterwards slowed a
        one-query search 1.8x when another process held a core."""
        if self._bases[0] is not self.centres or self._bases[1] is not self.offset:
            self._bases = (self.centres, self.offset, self.centres + self.offset)
        return self._bases[2]

    def state(self):
        return {"centres": self.centres, "offset": self.offset, "scale": self.scale}

    def upgrade_file(self, tensors, rows):
        # files from before residual codes have no centres: their rows decode as offset + scale * code, which
        # is one centre at zero that every row belongs to
        if "codec.scale" in tensors and "codec.centres" not in tensors:
            tensors["codec.centres"] = torch.zeros(1, self.dim)
            tensors["groups"] = torch.zeros(rows, dtype=torch.uint8)

    def load_state(self, state):
        self.centres, self.offset, self.scale = (state[name].float() for name in ("centres", "offset", "scale"))


class BinaryCodes(Int8Codes):
    """One bit per dimension (the sign after centring), searched by Hamming distance; the best
    ``rescore * k`` rows are rescored against int8 codes kept beside the bits."""

    name = "binary"

    def __init__(self, dim: int, metric: str, dtype: torch.dtype):
        super().__init__(dim, metric, dtype)
        self.mean: Optional[Tensor] = None
        self.nbytes_bits = (dim + 63) // 64 * 8  # whole 64-bit words per row
        self._weights = 2 ** torch.arange(8, dtype=torch.uint8)

    @property
    def trained(self) -> bool:
        return self.mean is not None

    def columns(self):
        cols = super().columns()
        cols["bits"] = (torch.uint8, self.nbytes_bits)
        return cols

    def fit(self, rows: Tensor, centres: Optional[Tensor] = None, groups: Optional[Tensor] = None) -> None:
        super().fit(rows, centres, groups)
        self.mean = rows.float().mean(0)

    def bits(self, rows: Tensor) -> Tensor:
        """Packed signs of ``rows - mean``: uint8 [n, nbytes_bits], unused bits 0."""
        positive = rows.float() > self.mean
        padded = torch.zeros(rows.shape[0], self.nbytes_bits * 8, dtype=torch.uint8, device=rows.device)
        padded[:, : self.dim] = positive
        return (padded.view(-1, self.nbytes_bits, 8) * self._weights.to(rows.device)).sum(-1, dtype=torch.uint8)

    def encode(self, rows: Tensor, groups: Optional[Tensor] = None):
        out = super().encode(rows, groups)
        out["bits"] = self.bits(rows)
        return out

    def search(self, scan, q: Tensor, cols, k: int, mask: Optional[Tensor], *, rescore: int = 4, **options):
        n = cols["codes"].shape[0]
        wide = min(max(rescore * k, k), max(n, 1))
        _, candidates = scan.hamming(self.bits(q), cols["bits"], wide, mask)
        # the candidates rescored against their int8 codes inside the op, as Int8Codes.search scores rows: no
        # ATen work here large enough to wake OpenMP's threads (which then spin on a core another process needs)
        q = q.float()
        scaled, bias, row_scale, row_bias = self._key_terms(q, cols)
        keys, positions = torch.ops.xmodal.topk_int8(scaled, cols["codes"], k, bias, row_scale, row_bias,
                                                     row_group=cols["groups"], candidates=candidates)
        return self._values(keys, positions, q), positions

    def state(self):
        return {**super().state(), "mean": self.mean}

    def load_state(self, state):
        super().load_state(state)
        self.mean = state["mean"].float()


def make_codec(codec: Optional[str], dim: int, metric: str, dtype: torch.dtype) -> FloatRows:
    check_codec(codec, metric)
    return {None: FloatRows, "int8": Int8Codes, "binary": BinaryCodes}[codec](dim, metric, dtype)
