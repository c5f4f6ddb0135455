"""What an index does to rows between ``add`` and storage, and to queries before a search: an optional
:class:`xmodal.PCA` (``reduce_to``), unit normalisation for the cosine metrics, then the codec
(:mod:`.codecs`). Shared by every index kind, so a FlatIndex and an IVFIndex encode rows alike."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..metrics import knn_recall
from ..ops import normalises_rows, topk_search
from ..pca import PCA
from .._checks import check_positive
from ._rows import ADD_CHUNK_ROWS, unit_rows
from .codecs import FlatScan, make_codec

# The recall estimate of a lossy encoding (Encoding.estimate_recall): at most this many training rows are each
# searched among at most RECALL_DATABASE others, for their RECALL_K nearest. Fewer training rows than
# RECALL_MIN_ROWS give no estimate (too few to say anything).
RECALL_QUERIES, RECALL_DATABASE, RECALL_K, RECALL_MIN_ROWS = 256, 256 * 1024, 10, 1000
#: below this estimated recall@10, training warns with the figure
RECALL_WARNING = 0.9


class LossyEncodingWarning(UserWarning):
    """Training found that a codec or PCA loses much of the exact search's answer on these rows."""


class Encoding:
    def __init__(self, dim: int, metric: str, dtype: torch.dtype, device: torch.device, *,
                 codec: Optional[str] = None, reduce_to: Optional[int] = None, rescore: int = 4):
        if reduce_to is not None:
            check_positive(reduce_to, "reduce_to")
            if reduce_to > dim:
                raise ValueError(f"reduce_to must be at most dim = {dim}, got {reduce_to}")
        self.dim, self.metric, self.dtype, self.device = dim, metric, dtype, device
        self.reduce_to = reduce_to
        self.rescore = check_positive(rescore, "rescore")
        self.pca: Optional[PCA] = None
        self.codec = make_codec(codec, reduce_to or dim, metric, dtype)
        self.estimated_recall: Optional[float] = None

    @property
    def stored_dim(self) -> int:
        return self.reduce_to or self.dim

    @property
    def learns(self) -> bool:
        """Whether anything here is learnt from data (a PCA or a codec)."""
        return self.codec.name is not None or self.reduce_to is not None

    @property
    def trained(self) -> bool:
        return self.codec.trained and (self.reduce_to is None or self.pca is not None)

    def fit_pca(self, rows: Tensor) -> None:
        """Learn the PCA (if any) from every row, a chunk at a time."""
        self.pca = None
        if self.reduce_to is not None:
            self.pca = PCA(self.reduce_to).fit(rows[i: i + ADD_CHUNK_ROWS] for i in range(0, rows.shape[0], ADD_CHUNK_ROWS))

    def fit(self, rows: Tensor, max_points: int, owner: str, learn_codec=None) -> None:
        """Learn the PCA (if any) from every row and the codec from at most ``max_points`` of them, then estimate
        the recall a lossy encoding keeps (:meth:`estimate_recall`). ``learn_codec(prepared)``: how the codec
        learns, when an index kind does more than ``codec.fit`` (IVF learns its lists first)."""
        self.fit_pca(rows)
        learn = self.sample(rows, max_points)
        prepared = self.prepare(learn)
        (learn_codec or self.codec.fit)(prepared)
        self.estimated_recall = None
        if self.learns and learn.shape[0] >= RECALL_MIN_ROWS:
            self.estimate_recall(learn, prepared, owner)

    @staticmethod
    def sample(rows: Tensor, max_points: int) -> Tensor:
        """At most ``max_points`` rows, drawn at random (seeded) when there are more."""
        if rows.shape[0] <= max_points:
            return rows
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        return rows[pick.to(rows.device)]

    def estimate_recall(self, learnt_from: Tensor, prepared: Tensor, owner: str) -> None:
        """Search up to ``RECALL_QUERIES`` of the rows the encoding learnt from, each among (up to
        ``RECALL_DATABASE`` of) the others, as the index will (PCA, codec, rescoring at the default
        ``rescore``), against the exact search of the original rows; keep the share of the exact ``RECALL_K``
        nearest found in :attr:`estimated_recall`, and warn when it is below ``RECALL_WARNING``. Search-time
        losses of an index kind (IVF's probing) are not part of it. ``prepared``: ``learnt_from`` as
        :meth:`prepare` gives it (already computed to learn from)."""
        database, prepared = learnt_from[:RECALL_DATABASE], prepared[:RECALL_DATABASE]
        n = database.shape[0]
        held = min(RECALL_QUERIES, n // 10)
        at = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:held].to(database.device)
        k = min(RECALL_K, n - 1)
        # k + 1 answers, then each query's own row dropped: its neighbours among the others
        exact = topk_search(database[at], database, k + 1, self.metric).indices
        cols = self.codec.encode(prepared)
        _, found = self.codec.search(FlatScan(), prepared[at.to(prepared.device)], cols, k + 1, None,
                                     rescore=self.rescore)

        def others(ids: Tensor) -> Tensor:
            own = (ids == at[:, None]).to(torch.int8)
            return ids.gather(1, torch.sort(own, dim=1, stable=True).indices)[:, :k].cpu()

        self.estimated_recall = knn_recall(others(found), others(exact))
        if self.estimated_recall < RECALL_WARNING:
            lossy = ", ".join(part for part in (
                f"codec={self.codec.name!r}" + (f" (rescore={self.rescore})" if self.codec.name == "binary" else "")
                if self.codec.name else "", f"reduce_to={self.reduce_to}" if self.reduce_to else "") if part)
            warnings.warn(
                f"{owner}: with {lossy}, an estimated recall@{k} of {self.estimated_recall:.3f} (exact search: 1.0), "
                f"measured on {held} training rows each searched among {n - 1} others; these rows do not suit that "
                f"encoding (try codec='int8', a larger reduce_to or rescore, or none)",
                LossyEncodingWarning, stacklevel=5)

    def prepare(self, rows: Tensor) -> Tensor:
        """Rows as stored and searched: reduced, unit-normalised for cosine metrics; in the index's dtype when
        stored as floats (a codec takes them in float32)."""
        rows = rows.to(self.device)
        if self.pca is not None:
            rows = self.pca.transform(rows.float())
        if normalises_rows(self.metric):
            rows = unit_rows(rows)
        return rows if self.codec.name is not None else rows.to(self.dtype)

    # -- state
    def nbytes(self) -> int:
        tensors = list(self.codec.state().values())
        if self.pca is not None:
            tensors += [t for t in self.pca.state_dict().values() if torch.is_tensor(t)]
        return sum(t.nbytes for t in tensors if t is not None)

    def move(self, device: torch.device) -> None:
        self.device = device
        if self.codec.trained:
            self.codec.load_state({name: t.to(device) for name, t in self.codec.state().items()})
        if self.pca is not None:
            self.pca.to(device)

    def metadata(self) -> dict:
        meta = {"codec": self.codec.name or "", "reduce_to": self.reduce_to or 0, "rescore": self.rescore}
        if self.estimated_recall is not None:
            meta["estimated_recall"] = repr(self.estimated_recall)
        if self.pca is not None:
            meta.update({f"pca.{k}": v for k, v in self.pca.state_dict().items() if not torch.is_tensor(v)})
        return meta

    @staticmethod
    def options(meta: dict) -> dict:
        """The constructor keywords stored by :meth:`metadata` (absent from older files: defaults)."""
        return {"codec": meta.get("codec") or None, "reduce_to": int(meta.get("reduce_to", 0)) or None,
                "rescore": int(meta.get("rescore", 4))}

    def tensors(self) -> dict:
        out = {f"codec.{k}": v for k, v in self.codec.state().items()}
        if self.pca is not None:
            out.update({f"pca.{k}": v for k, v in self.pca.state_dict().items() if torch.is_tensor(v)})
        return out

    def restore(self, tensors: dict, meta: dict) -> None:
        self.estimated_recall = float(meta["estimated_recall"]) if "estimated_recall" in meta else None
        ids = tensors.get("ids")
        self.codec.upgrade_file(tensors, ids.shape[0] if ids is not None and ids.dim() == 1 else 0)
        state = {k[len("codec."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("codec.")}
        if self.codec.name is not None:
            self.codec.load_state(state)
        if self.reduce_to is not None:
            pca = {k[len("pca."):]: v for k, v in tensors.items() if k.startswith("pca.")}
            for key, value in meta.items():  # file metadata is text: "True" / "False" or an int
                if key.startswith("pca."):
                    pca[key[len("pca."):]] = value == "True" if value in ("True", "False") else int(value)
            self.pca = PCA.from_state_dict(pca, device=self.device)
