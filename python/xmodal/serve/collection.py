"""Collections: an xmodal index plus JSON payloads, made durable by a write-ahead log and snapshots.

A collection lives in ``DIR/<name>/``:

    config.json                    what it is (dim, metric, index kind, codec), written once, atomically
    manifest.json                  which snapshot is current and the last log record it holds (atomic)
                                   (these two are never encrypted: they hold no data)
    snapshot-<seq>.index           the index (``Index.save``: safetensors, checksummed, optionally encrypted)
    snapshot-<seq>.payloads.json   {id: payload}
    wal-<first seq>.log            the write-ahead log (see :mod:`.storage`)

On open: load the manifest's snapshot, then replay the log records after it (coalesced into one removal and
one add, so 100,000 logged rows apply in one pass). A write is logged and fsynced before it changes the index,
and acknowledged after both; a snapshot rotates the log, saves the index and payloads under new names,
switches the manifest (the atomic step), and only then deletes the old snapshot and the log it covers. A
process killed at any moment therefore restarts from a whole snapshot plus every acknowledged record.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from .. import FlatIndex, IVFIndex
from ..index.base import check_metric
from .storage import Record, WriteAheadLog, fsync_folder, read_file, write_file

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INDEX_KINDS = {"flat": FlatIndex, "ivf": IVFIndex}
CODECS = (None, "int8", "binary")
# a snapshot is taken (in the background) once the log holds this many bytes
DEFAULT_SNAPSHOT_BYTES = 256 << 20


SNAPSHOT_FILES = (".index", ".payloads.json")


def _save_snapshot(folder: str, seq: int, index, payloads: "Payloads", key: Optional[bytes]) -> str:
    """Write the index and payloads as snapshot ``seq`` in ``folder``; returns its base name."""
    base = f"snapshot-{seq:020d}"
    index.save(os.path.join(folder, base + ".index"), encryption_key=key)
    write_file(os.path.join(folder, base + ".payloads.json"), payloads.to_json(), key, b"payloads")
    return base


def _write_manifest(folder: str, base: str, seq: int) -> None:
    """Make snapshot ``base`` (holding the log up to ``seq``) the current one: the atomic step."""
    write_file(os.path.join(folder, "manifest.json"), json.dumps({"snapshot": base, "seq": seq}).encode())


def _new_collection_folder(parent: str, name: str, config: dict, fill=None) -> str:
    """Create ``parent/name`` whole or not at all: its config (and whatever ``fill(folder)`` writes) go into a
    staging folder that is renamed into place; an interrupted one is removed on the next start."""
    staging = os.path.join(parent, f".new-{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    write_file(os.path.join(staging, "config.json"), json.dumps(config).encode())
    if fill is not None:
        fill(staging)
    final = os.path.join(parent, name)
    os.rename(staging, final)
    fsync_folder(parent)
    return final


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"collection name must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
                         f"digit, got {name!r}")
    return name


class ReadWriteLock:
    """Many readers (searches) or one writer (an index change) at a time; writers are not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _filter_key(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Payloads:
    """Each id's JSON payload, and for payload filters an inverted index of (key, scalar value) -> ids."""

    def __init__(self):
        self.by_id: Dict[int, dict] = {}
        self._postings: Dict[Tuple[str, str], set] = {}

    def _postings_of(self, payload: dict):
        for key, value in payload.items():
            for v in (value if isinstance(value, list) else [value]):
                if not isinstance(v, (dict, list)):
                    yield key, _filter_key(v)

    def set(self, id_: int, payload: Optional[dict]) -> None:
        self.drop(id_)
        if payload:
            self.by_id[id_] = payload
            for posting in self._postings_of(payload):
                self._postings.setdefault(posting, set()).add(id_)

    def drop(self, id_: int) -> None:
        old = self.by_id.pop(id_, None)
        if old:
            for posting in self._postings_of(old):
                ids = self._postings.get(posting)
                if ids is not None:
                    ids.discard(id_)
                    if not ids:
                        del self._postings[posting]

    def matching(self, filter_: dict) -> set:
        """Ids whose payload matches every key of ``filter_``: a scalar value must equal the payload's value
        (or be one of its list's items); a list of scalars matches any of them."""
        result = None
        for key, wanted in filter_.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            ids = set()
            for v in options:
                ids |= self._postings.get((key, _filter_key(v)), set())
            result = ids if result is None else result & ids
            if not result:
                return set()
        return result

    def to_json(self) -> bytes:
        return json.dumps({str(k): v for k, v in self.by_id.items()}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Payloads":
        p = cls()
        for k, v in json.loads(data).items():
            p.set(int(k), v)
        return p


class Collection:
    """One collection: thread-safe search (many at once), upsert and delete (one at a time, durable)."""

    def __init__(self, folder: str, config: dict, encryption_key: Optional[bytes] = None,
                 snapshot_bytes: int = DEFAULT_SNAPSHOT_BYTES):
        self.folder = folder
        self.name = os.path.basename(folder)
        self.config = config
        self.key = encryption_key
        self.snapshot_bytes = snapshot_bytes
        self.lock = ReadWriteLock()           # searches vs. index changes
        self.writer = threading.Lock()        # one writer at a time: log order = apply order
        self.snapshotting = threading.Lock()  # one snapshot at a time
        self.log = WriteAheadLog(folder, encryption_key)
        self.payloads = Payloads()
        self.index = self._new_index()
        self.removed = False

    # -- configuration
    @staticmethod
    def check_config(config: dict) -> dict:
        """The validated config (ValueError naming the field otherwise)."""
        dim = config.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 65536:
            raise ValueError(f"dim must be an int in [1, 65536], got {dim!r}")
        metric = config.get("metric", "cosine")
        check_metric(metric)
        kind = config.get("index", "flat")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {list(INDEX_KINDS)}, got {kind!r}")
        codec = config.get("codec")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
        out = {"dim": dim, "metric": metric, "index": kind, "codec": codec}
        if kind == "ivf":
            nlist = config.get("nlist", 1024)
            nprobe = config.get("nprobe", 16)
            for field, value in (("nlist", nlist), ("nprobe", nprobe)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{field} must be a positive int, got {value!r}")
            out.update(nlist=nlist, nprobe=nprobe)
        unknown = set(config) - {"dim", "metric", "index", "codec", "nlist", "nprobe"}
        if unknown:
            raise ValueError(f"unknown collection options {sorted(unknown)}")
        return out

    def _new_index(self):
        c = self.config
        if c["index"] == "ivf":
            return IVFIndex(c["dim"], c["nlist"], c["metric"], nprobe=c["nprobe"], codec=c["codec"])
        return FlatIndex(c["dim"], c["metric"], codec=c["codec"])

    # -- opening
    @classmethod
    def open(cls, folder: str, encryption_key: Optional[bytes] = None, **options) -> "Collection":
        """Load the current snapshot and replay the log after it."""
        config = json.loads(read_file(os.path.join(folder, "config.json")))
        col = cls(folder, cls.check_config(config), encryption_key, **options)
        manifest_path = os.path.join(folder, "manifest.json")
        after = 0
        if os.path.exists(manifest_path):
            manifest = json.loads(read_file(manifest_path))
            after = int(manifest["seq"])
            base = os.path.join(folder, manifest["snapshot"])
            col.index = INDEX_KINDS[col.config["index"]].load(base + ".index", encryption_key=encryption_key)
            col.payloads = Payloads.from_json(read_file(base + ".payloads.json", encryption_key, b"payloads"))
        col.log.next_seq = after + 1
        col._replay(col.log.replay(after))
        return col

    def _replay(self, records: Iterable[Record]) -> None:
        """Apply logged records, coalesced: the net effect of every record is one removal and one add."""
        present = set(self.index.ids.tolist())
        to_remove = set()
        pending: Dict[int, Tuple[np.ndarray, int]] = {}  # id -> (record's vectors, row)
        payloads: Dict[int, Optional[dict]] = {}
        for record in records:
            ids = record.ids.tolist()
            if record.op == "upsert" and not self.index.is_trained:
                # learn from exactly the rows the live service learnt from (its first write)
                self.index.train(torch.from_numpy(record.vectors))
            if record.op == "upsert":
                for row, i in enumerate(ids):
                    if i in present:
                        present.discard(i)
                        to_remove.add(i)
                    pending[i] = (record.vectors, row)
                    payloads[i] = record.payloads[row] if record.payloads else None
            elif record.op == "delete":
                for i in ids:
                    if pending.pop(i, None) is not None:
                        payloads[i] = None
                    elif i in present:
                        present.discard(i)
                        to_remove.add(i)
                        payloads[i] = None
            else:
                raise ValueError(f"unknown log operation {record.op!r} in record {record.seq}")
        if to_remove:
            self.index.remove(sorted(to_remove))
        if pending:
            ids = np.fromiter(pending.keys(), dtype=np.int64, count=len(pending))
            rows = np.stack([vectors[row] for vectors, row in pending.values()])
            self.index.add(torch.from_numpy(rows), torch.from_numpy(ids))
        for i, payload in payloads.items():
            self.payloads.set(i, payload)

    # -- writes (durable before they are visible, and before they are acknowledged)
    def check_rows(self, vectors: np.ndarray, name: str = "vectors") -> None:
        """ValueError naming ``name`` unless the rows can be stored (every check comes before the log, so a logged
        record always applies)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.config["dim"]:
            raise ValueError(f"{name} must be [n, {self.config['dim']}], got shape {list(vectors.shape)}")
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise ValueError(f"{name}[{int(np.flatnonzero(bad)[0])}] holds NaN or infinity")
        if self.config["metric"] == "kl" and (vectors < 0).any():
            raise ValueError(f"{name} must be non-negative with metric 'kl', found a negative entry")

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads: Optional[List[Optional[dict]]] = None) -> int:
        """Add or replace rows; returns how many existed before (replaced). An untrained index (a codec, IVF)
        learns from the first rows written, before they are logged, so a batch it cannot learn from is refused
        with nothing changed; replay learns from the same rows."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.check_rows(vectors)
        t = torch.from_numpy(vectors)
        with self.writer:
            self._check_open()
            if not self.index.is_trained:
                with self.lock.write():
                    self.index.train(t)
            new = torch.from_numpy(ids)
            replaced = new[torch.isin(new, self.index.ids)]
            self.log.append(Record("upsert", ids, vectors, payloads))
            with self.lock.write():
                if replaced.numel():
                    self.index.remove(replaced)
                self.index.add(t, new)
                for row, i in enumerate(ids.tolist()):
                    self.payloads.set(i, payloads[row] if payloads else None)
        self._maybe_snapshot()
        return int(replaced.numel())

    def delete(self, ids: np.ndarray) -> int:
        """Remove the rows with these ids (absent ids are ignored); returns how many were removed."""
        with self.writer:
            self._check_open()
            gone = torch.from_numpy(ids)
            present = gone[torch.isin(gone, self.index.ids)]
            self.log.append(Record("delete", ids))
            with self.lock.write():
                if present.numel():
                    self.index.remove(present)
                for i in present.tolist():
                    self.payloads.drop(i)
        self._maybe_snapshot()
        return int(present.numel())

    def _check_open(self) -> None:
        if self.removed:
            raise KeyError(f"collection {self.name!r} was deleted")

    # -- reads
    def __len__(self) -> int:
        return len(self.index)

    def get(self, id_: int) -> Optional[Tuple[np.ndarray, Optional[dict]]]:
        """(stored vector, payload) of one id, or None. The vector is as stored: unit-normalised for cosine
        metrics, decoded for codecs."""
        with self.lock.read():
            try:
                vector = self.index.reconstruct([id_])[0]
            except KeyError:
                return None
            return vector.float().numpy().copy(), self.payloads.by_id.get(id_)

    def allow_mask(self, allow_ids: Optional[List[int]], filter_: Optional[dict]) -> Optional[torch.Tensor]:
        """A bool mask over the index rows (call under the read lock) from an id allow-list and a payload
        filter, or None when there is neither."""
        allowed = None
        if filter_:  # (an empty filter constrains nothing)
            allowed = self.payloads.matching(filter_)
        if allow_ids is not None:
            allowed = set(allow_ids) if allowed is None else allowed & set(allow_ids)
        if allowed is None:
            return None
        wanted = torch.tensor(sorted(allowed), dtype=torch.int64)
        return torch.isin(self.index.ids, wanted)

    def search(self, queries: np.ndarray, k: int, allow_ids=None, filter_=None) -> Tuple[np.ndarray, np.ndarray]:
        with self.lock.read():
            if not self.index.is_trained:  # (nothing written yet to learn the codec from)
                n = queries.shape[0]
                pad = -np.inf if self.index.metric in ("ip", "cosine") else np.inf
                return np.full((n, k), pad, np.float32), np.full((n, k), -1, np.int64)
            mask = self.allow_mask(allow_ids, filter_)
            scores, ids = self.index.search(torch.from_numpy(queries), k, mask)
        return scores.float().numpy(), ids.numpy()

    # -- snapshots
    def _maybe_snapshot(self) -> None:
        if self.log.bytes >= self.snapshot_bytes and not self.snapshotting.locked():
            threading.Thread(target=self.snapshot, name=f"snapshot-{self.name}", daemon=True).start()

    def snapshot(self) -> Optional[int]:
        """Write a snapshot of the current state and drop the log it covers; returns its sequence number (None if
        another snapshot is running or there is nothing to save)."""
        if not self.snapshotting.acquire(blocking=False):
            return None
        try:
            # writers wait while the state is saved (searches go on): the snapshot is exactly the log up to seq
            with self.writer:
                self._check_open()
                if not self.index.is_trained:
                    return None
                seq = self.log.rotate()
                base = _save_snapshot(self.folder, seq, self.index, self.payloads, self.key)
            old = self._manifest_snapshot()
            _write_manifest(self.folder, base, seq)
            if old and old != base:
                for suffix in SNAPSHOT_FILES:
                    path = os.path.join(self.folder, old + suffix)
                    if os.path.exists(path):
                        os.remove(path)
            self.log.drop_through(seq)
            return seq
        finally:
            self.snapshotting.release()

    def _manifest_snapshot(self) -> Optional[str]:
        path = os.path.join(self.folder, "manifest.json")
        return json.loads(read_file(path))["snapshot"] if os.path.exists(path) else None

    def close(self) -> None:
        with self.writer:
            self.log.close()


class Catalog:
    """The collections in a folder (``xmodal serve DIR``)."""

    def __init__(self, folder: str, encryption_key: Optional[bytes] = None,
                 snapshot_bytes: int = DEFAULT_SNAPSHOT_BYTES):
        self.folder = os.fspath(folder)
        self.key = encryption_key
        self.snapshot_bytes = snapshot_bytes
        self.collections: Dict[str, Collection] = {}
        self.lock = threading.Lock()

    def open_all(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if name.startswith(".deleted-") or name.startswith(".new-"):
                shutil.rmtree(path, ignore_errors=True)  # a create or delete that was interrupted
            elif os.path.isdir(path) and NAME.match(name):
                self.collections[name] = Collection.open(path, self.key, snapshot_bytes=self.snapshot_bytes)

    def get(self, name: str) -> Collection:
        col = self.collections.get(name)
        if col is None:
            raise KeyError(f"no collection {name!r}")
        return col

    def create(self, name: str, config: dict) -> Collection:
        check_name(name)
        config = Collection.check_config(config)
        with self.lock:
            if name in self.collections:
                raise FileExistsError(f"collection {name!r} exists")
            final = _new_collection_folder(self.folder, name, config)
            col = Collection(final, config, self.key, self.snapshot_bytes)
            self.collections[name] = col
            return col

    def delete(self, name: str) -> None:
        with self.lock:
            col = self.get(name)
            with col.writer:
                col.removed = True
                col.log.close()
            del self.collections[name]
            doomed = os.path.join(self.folder, f".deleted-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(col.folder, doomed)
            fsync_folder(self.folder)
        shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        for col in list(self.collections.values()):
            col.close()


def write_collection(folder: str, name: str, index, payloads: Optional[Dict[int, dict]] = None,
                     encryption_key: Optional[bytes] = None) -> None:
    """Put an index built in Python (a :class:`FlatIndex` or :class:`IVFIndex`) into a service folder as
    collection ``name``, with optional ``{id: payload}``; ``xmodal serve folder`` then serves it. The service
    must not be running on the folder."""
    check_name(name)
    kind = {FlatIndex: "flat", IVFIndex: "ivf"}.get(type(index))
    if kind is None:
        raise TypeError(f"index must be a FlatIndex or IVFIndex, got {type(index).__name__}")
    config = {"dim": index.dim, "metric": index.metric, "index": kind, "codec": index.codec}
    if kind == "ivf":
        config.update(nlist=index.nlist, nprobe=index.nprobe)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, name)
    if os.path.exists(final):
        raise FileExistsError(f"collection {name!r} already exists in {folder!r}")
    store = Payloads()
    for i, p in (payloads or {}).items():
        store.set(int(i), p)

    def fill(staging: str) -> None:
        _write_manifest(staging, _save_snapshot(staging, 0, index, store, encryption_key), 0)

    _new_collection_folder(folder, name, Collection.check_config(config), fill)
