"""What every index shares: the ``Index`` base class (argument checks, ids, masks, search and file
plumbing). Subclasses say how rows are stored and scanned. Argument checks come from ``xmodal._checks``, row helpers
from ``index._rows``."""
from __future__ import annotations

import abc
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._checks import check_dtype, check_metric, check_non_negative_ids, check_positive
from ..ops import normalises_rows
from . import io, mapped
from .encoding import Encoding
from ._rows import ADD_CHUNK_ROWS, duplicates, non_finite_rows
from .arrays import as_ids, as_rows, from_torch, to_torch


class Index(abc.ABC):
    """An index of ``dim``-dimensional vectors under ``metric``, each with an int64 id.

    Subclasses store rows (``_store``, ``_keep``, ``_clear``, ``_move``), scan them (``_search_rows``,
    answering positions that ``_position_ids`` maps to ids) and name their file contents (``_tensors``,
    ``_restore``). Everything else -- argument checks, ids, masks, array types, files -- lives here, so every
    index follows the same conventions (see the package docstring).
    """

    FORMAT = ""  # "xmodal.<Class>/<version>", stored in files
    OLDER_FORMATS: Tuple[str, ...] = ()  # earlier versions load() still reads (upgraded on the way in)

    def __init__(self, dim: int, metric: str = "cosine", *, dtype=torch.float32, device="cpu",
                 codec: Optional[str] = None, reduce_to: Optional[int] = None, rescore: int = 4):

        check_positive(dim, "dim")
        check_metric(metric)
        self.dim = dim
        self.metric = metric
        self.dtype = check_dtype(dtype)
        self.device = torch.device(device)
        self._encoding = Encoding(dim, metric, self.dtype, self.device, codec=codec, reduce_to=reduce_to,
                                  rescore=rescore)
        self._next_id = 0
        self._mapped: Optional[mapped.MappedFile] = None  # checks owed on a memory-mapped file (load(mmap=True))

    # -- the encoding (codec, PCA) every index kind shares
    @property
    def codec(self) -> Optional[str]:
        """None (float rows), "int8" or "binary" (see :mod:`xmodal.index.codecs`)."""
        return self._encoding.codec.name

    @property
    def reduce_to(self) -> Optional[int]:
        """The PCA's output dimension, or None."""
        return self._encoding.reduce_to

    @property
    def rescore(self) -> int:
        """Binary codec: Hamming matches rescored per result (``rescore * k``), unless a search says otherwise."""
        return self._encoding.rescore

    @property
    def pca(self):
        """The fitted :class:`xmodal.PCA` (``reduce_to``), or None."""
        return self._encoding.pca

    @property
    def is_trained(self) -> bool:
        """Whether what the index learns from data (PCA, codec; IVF: centroids) has been learnt."""
        return self._encoding.trained

    @property
    def estimated_recall(self) -> Optional[float]:
        """With a codec or ``reduce_to``: the recall@10 training estimated the encoding keeps (the share of the
        exact 10 nearest found, searching up to 256 training rows each among up to 262,144 others, as
        :meth:`search` would with the default ``rescore``). Below 0.9, training warns
        (:class:`xmodal.index.LossyEncodingWarning`). None without a lossy encoding or with under 1,000
        training rows. The estimate leaves out what an index kind loses at search time (IVF: ``nprobe``), and
        queries of another modality may fare differently from rows of the collection."""
        return self._encoding.estimated_recall

    # -- what subclasses provide
    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def ids(self) -> Tensor:
        """The stored ids, in storage order (the order a ``mask`` follows)."""

    @property
    @abc.abstractmethod
    def vectors(self) -> Tensor:
        """The stored rows (unit-normalised for cosine metrics), aligned with ``ids``."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the index holds for its rows and ids, spare room for appends included (what a machine must
        have for it)."""

    @abc.abstractmethod
    def _columns_at(self, positions: Tensor) -> dict:
        """The stored columns (float rows or codes) of these storage positions (aligned with ``ids``)."""

    @abc.abstractmethod
    def _store(self, rows: Tensor, ids: Tensor) -> None:
        """Append prepared rows and their ids."""

    @abc.abstractmethod
    def _keep(self, keep: Tensor) -> None:
        """Keep only the rows where the CPU bool ``keep`` (aligned with ``ids``) is True."""

    @abc.abstractmethod
    def _clear(self) -> None: ...

    @abc.abstractmethod
    def _move(self, device: torch.device) -> None: ...

    @abc.abstractmethod
    def _search_rows(self, q: Tensor, k: int, mask: Optional[Tensor], **options) -> Tuple[Tensor, Tensor]:
        """(values, storage positions) of the k best rows for ``[Q, dim]`` queries; ``mask`` aligned with
        ``ids``."""

    @abc.abstractmethod
    def _position_ids(self) -> Tensor:
        """The id of each storage position ``_search_rows`` answers with."""

    @abc.abstractmethod
    def _tensors(self) -> dict: ...

    @abc.abstractmethod
    def _restore(self, tensors: dict, path: str, meta: dict) -> None:
        """Fill a new index from a file's tensors (and metadata); raise ValueError naming ``path`` if they do not
        fit."""

    # -- shared behaviour
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, dtype={self.dtype}, "
                f"device={self.device}, len={len(self)})")

    @property
    def _normalised(self) -> bool:
        """Rows are stored unit-normalised, so a cosine search is an inner-product search."""
        return normalises_rows(self.metric)

    def _prepare(self, rows: Tensor) -> Tensor:
        """Rows as stored and searched (see :class:`.encoding.Encoding`); checked rows only (``_check_rows``)."""
        return self._encoding.prepare(rows)

    def _check_rows(self, rows: Tensor, name: str) -> None:
        """Raise before anything changes if ``rows`` cannot be stored (a chunk at a time: no full-size copy).
        Every index kind refuses NaN / inf: a codec or PCA cannot encode them, and a stored NaN row would rank
        unpredictably in every search."""
        bad = non_finite_rows(rows)
        if bad.numel():
            raise ValueError(f"{name} must be finite, found NaN or inf in row {int(bad[0])}")
        if self.metric != "kl":
            return
        for start in range(0, rows.shape[0], ADD_CHUNK_ROWS):
            if bool((rows[start: start + ADD_CHUNK_ROWS] < 0).any()):
                raise ValueError(f"{name} must be non-negative with metric 'kl', found a negative entry")

    def train(self, vectors, *, max_points: int = 256 * 1024) -> None:
        """Learn what the index learns from data (the PCA from every row; the codec from at most
        ``max_points``); a no-op for an index that learns nothing. Must come before the first add."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        if rows.shape[0] < 2 and self._encoding.learns:
            raise ValueError(f"training needs at least 2 vectors, got {rows.shape[0]}")
        self._check_rows(rows, "vectors")
        if len(self):
            raise RuntimeError(f"{type(self).__name__}.train must come before add (stored rows would not match); "
                               f"call reset() first to retrain")
        self._encoding.fit(rows, max_points, type(self).__name__)

    def _check_file(self) -> None:
        """Before reading every row or changing any (memory-mapped from a file): check the blocks not checked
        yet; the index is then on its own."""
        if self._mapped is not None:
            self._mapped.check_all()
            self._mapped = None

    def _before_store(self, rows: Tensor) -> None:
        """Called once per ``add`` after the checks, before the first chunk is stored: an untrained index
        learns from the first rows added."""
        if not self.is_trained and rows.shape[0]:
            self.train(rows)

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"{type(self).__name__}.{what} needs a trained index (codec={self.codec!r}, "
                               f"reduce_to={self.reduce_to}): call train(vectors) or add vectors first")

    def add(self, vectors, ids=None) -> Tensor:
        """Add rows (finite values); returns their ids. ``ids``: optional int64 per row, non-negative (search
        answers pad with -1), unique and not already present."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        n = rows.shape[0]
        if ids is None:
            new_ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        else:
            new_ids = as_ids(ids, n)
            check_non_negative_ids(new_ids)
            dup = duplicates(new_ids)
            if dup:
                raise ValueError(f"ids must be unique, got duplicates {dup}")
            present = new_ids[torch.isin(new_ids, self.ids.cpu())]
            if present.numel():
                raise ValueError(f"ids already in the index: {present[:10].tolist()}")
        self._check_rows(rows, "vectors")
        self._check_file()
        self._before_store(rows)
        self._store_rows(rows, new_ids)
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def _store_rows(self, rows: Tensor, ids: Tensor) -> None:
        """Store checked rows and their (CPU) ids: a chunk at a time, so preparing (normalising, encoding) never
        copies the whole batch."""
        for chunk in self._chunks(rows.shape[0]):
            self._store(self._prepare(rows[chunk]), ids[chunk].to(self.device))

    @staticmethod
    def _chunks(n: int) -> list:
        """The slices of ``n`` rows an add prepares and stores one at a time."""
        return [slice(start, start + ADD_CHUNK_ROWS) for start in range(0, n, ADD_CHUNK_ROWS)]

    def remove(self, ids) -> int:
        """Remove the rows with these ids (every id must be present); returns how many were removed."""
        gone = as_ids(ids, -1)
        if gone.numel() == 0:
            return 0
        self._check_file()
        stored = self.ids.cpu()
        missing = gone[~torch.isin(gone, stored)]
        if missing.numel():
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        before = len(self)
        self._keep(~torch.isin(stored, gone))
        return before - len(self)

    def reconstruct(self, ids) -> Tensor:
        """The stored rows of these ids, in the order given, as :attr:`vectors` holds them (reduced,
        unit-normalised for cosine metrics, decoded from a codec's codes): ``[n, dim or reduce_to]``. Decodes
        only those rows. KeyError naming the ids that are not in the index."""
        wanted = as_ids(ids, -1)
        self._check_file()
        stored = self.ids.cpu()
        order = torch.argsort(stored)
        at = torch.searchsorted(stored[order], wanted).clamp(max=max(len(stored) - 1, 0))
        found = stored[order][at] == wanted if len(stored) else torch.zeros_like(wanted, dtype=torch.bool)
        if not bool(found.all()):
            raise KeyError(f"ids not in the index: {wanted[~found][:10].tolist()}")
        return self._encoding.codec.decode(self._columns_at(order[at].to(self.device)))

    def reset(self) -> None:
        """Remove everything (the id counter starts again at 0)."""
        self._mapped = None
        self._clear()
        self._next_id = 0

    def to(self, device):
        """Move the index to ``device`` (in place); returns self."""
        device = torch.device(device)
        self._check_file()
        self._move(device)
        self._encoding.move(device)
        self.device = device
        return self

    def _mask(self, mask) -> Optional[Tensor]:
        if mask is None:
            return None
        m, _ = to_torch(mask, "mask")
        if m.dtype != torch.bool or m.dim() != 1 or m.shape[0] != len(self):
            raise ValueError(f"mask must be a bool array of shape [{len(self)}] (len(index)), got dtype {m.dtype} "
                             f"and shape {tuple(m.shape)}")
        return m.to(self.device)

    def search(self, queries, k: int, mask=None, *, rescore: Optional[int] = None):
        """The k best rows for each query: ``(scores, ids)``, each ``[Q, k]`` (``[k]`` for a 1-D query), best
        first, padded with id -1 and -inf/+inf; in the queries' array type. ``rescore`` (binary codec): how
        many times k Hamming matches to rescore (default ``self.rescore``)."""
        self._require_trained("search")
        return self._search(queries, k, mask, rescore=self._rescore(rescore))

    def _rescore(self, rescore: Optional[int]) -> int:
        return check_positive(self.rescore if rescore is None else rescore, "rescore")

    def _search(self, queries, k: int, mask, **options):
        """search(), with the subclass's search options (IVF: nprobe) passed down as arguments, never kept as
        state, so threads sharing an index can search with different options at once."""
        q, kind, squeeze = as_rows(queries, self.dim, "queries")
        k = check_positive(k, "k")
        m = self._mask(mask)
        if self._encoding.learns:
            bad = non_finite_rows(q)
            if bad.numel():
                raise ValueError(f"queries must be finite to be reduced or quantised, found NaN or inf in row "
                                 f"{int(bad[0])}")
        with _C.AtenOnThisThread():  # the tensor work around the ops starts no OpenMP threads (parallel.h)
            values, positions = self._search_rows(q.to(self.device), k, m, **options)
        if self._mapped is not None:
            self._check_answers(positions)
        if len(self) == 0:
            ids = torch.full_like(positions, -1)
        else:  # (take + fill: half the per-call cost of where() on a one-query search)
            ids = torch.take(self._position_ids(), positions.clamp(min=0)).masked_fill_(positions < 0, -1)
        if squeeze:
            values, ids = values[0], ids[0]
        return from_torch(values, kind), from_torch(ids, kind)

    def _check_answers(self, positions: Tensor) -> None:
        """Check the file blocks of the ids of a search's answers (``positions``) on a memory-mapped index."""
        found = positions[positions >= 0].cpu()
        self._mapped.check_rows("ids", found, found + 1)
        if self._mapped.done:  # every block checked: later searches owe nothing
            self._mapped = None

    # -- persistence
    def _metadata(self) -> dict:
        return {"format": self.FORMAT, "dim": self.dim, "metric": self.metric,
                "dtype": str(self.dtype).replace("torch.", ""), "next_id": self._next_id,
                **self._encoding.metadata()}

    @classmethod
    def _from_metadata(cls, meta: dict, device) -> "Index":

        return cls(int(meta["dim"]), meta["metric"], dtype=meta["dtype"], device=device, **Encoding.options(meta))

    def save(self, path, *, encryption_key: Optional[bytes] = None) -> None:
        """Write the index to ``path`` (safetensors, with a checksum of its contents), atomically; the folder
        must exist. ``encryption_key`` (32 bytes, see :mod:`xmodal.encryption`): seal the file with
        AES-256-GCM."""
        self._require_trained("save")
        self._check_file()
        io.save({**self._tensors(), **self._encoding.tensors()}, self._metadata(), path, encryption_key)

    @classmethod
    def load(cls, path, device="cpu", *, verify: Optional[bool] = None, encryption_key: Optional[bytes] = None,
             mmap: bool = False):
        """Read an index written by :meth:`save`; a truncated, corrupt or foreign file raises ValueError, a
        missing one FileNotFoundError.

        ``verify``: check the contents against the checksum :meth:`save` stored; a mismatch raises ValueError
        (the file is corrupt). It is one more pass over the data in memory, under a tenth of the time to load a
        file from the page cache and less next to a read from disk; ``verify=False`` skips it (e.g. for huge
        files on a trusted disk). Files written before xmodal stored checksums have none and load unchecked.
        An encrypted file needs the ``encryption_key`` it was saved with (a wrong one raises ValueError).

        ``mmap=True`` (CPU, unencrypted files) maps the file instead of reading it: opening costs the header,
        the small tensors and the block sums the file stores, not the rows, which stay in the page cache (the
        operating system's to keep or drop) until searches read them. What it gives up is the check at open:
        each 64 KiB block of the rows is checked against the file's checksum the first time it is read (by
        default; ``verify=True`` checks every block at open, ``verify=False`` none), so damage raises ValueError
        when a search first reads it, never a wrong answer. Anything that reads or changes every row (``add``,
        ``remove``, ``save``, ``ids``, ``vectors``, ...) checks the rest first and then holds the rows in memory
        as a loaded index would. The file must not be changed in place while mapped (``save`` replaces it).
        """
        checks = None
        if mmap:
            if torch.device(device).type != "cpu":
                raise ValueError(f"mmap=True maps the file into CPU memory, got device={device!r}")
            if encryption_key is not None:
                raise ValueError("an encrypted index file is decrypted in memory and cannot be memory-mapped: load it "
                                 "with mmap=False")
            tensors, meta, checks = mapped.read_mapped(path, cls.FORMAT, verify, cls.OLDER_FORMATS)
        else:
            tensors, meta = io.read(path, cls.FORMAT, verify is not False, encryption_key, cls.OLDER_FORMATS)
        where = os.fspath(path)
        try:
            index = cls._from_metadata(meta, device)
            next_id = int(meta["next_id"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{where!r} is not a valid {cls.FORMAT} file: {e}") from None
        try:
            index._encoding.restore(tensors, meta)
            index._restore(tensors, where, meta)
        except KeyError as e:
            raise ValueError(f"{where!r} is not a valid {cls.FORMAT} file: no tensor {e}") from None
        index._next_id = next_id
        index._mapped = checks
        return index

    def _invalid(self, path: str, why: str) -> ValueError:
        return ValueError(f"{path!r} is not a valid {self.FORMAT} file: {why}")
