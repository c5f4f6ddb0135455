"""A collection: an xmodal index plus JSON payloads (:mod:`.payloads`), made durable by a write-ahead log and snapshots.

A collection lives in ``DIR/<name>/``:

    config.json                    what it is (dim, metric, index kind, codec), written once, atomically
    manifest.json                  which snapshot is current and the last log record it holds (atomic)
                                   (these two are never encrypted: they hold no data)
    snapshot-<seq>.index           the index (``Index.save``: safetensors, checksummed, optionally encrypted)
    snapshot-<seq>.payloads.json   {id: payload}
    wal-<first seq>.log            the write-ahead log (see :mod:`.storage`)

The folder of collections, and creating and deleting them, is :mod:`.catalog`'s.

On open: load the manifest's snapshot, then replay the log records after it (coalesced into one removal and
one add, so 100,000 logged rows apply in one pass). A write is logged and fsynced before it changes the index,
and acknowledged after both; a snapshot rotates the log, saves the index and payloads under new names,
switches the manifest (the atomic step), and only then deletes the old snapshot and the log it covers. A
process killed at any moment therefore restarts from a whole snapshot plus every acknowledged record.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from .. import FlatIndex, GraphIndex, IVFIndex
from ..index.base import check_metric
from ..index.codecs import check_codec
from .._checks import check_positive
from ..index.graph import GRAPH_METRICS, MAX_DEGREE
from ..index.io import plain_bytes
from ..index.ivf import DEFAULT_NPROBE
from ..ops import SEARCH_METRICS
from .payloads import Payloads
from .storage import Record, WriteAheadLog, read_file, write_file

INDEX_KINDS = {"flat": FlatIndex, "ivf": IVFIndex, "graph": GraphIndex}
# each index kind's own options and their defaults
KIND_OPTIONS = {"flat": {}, "ivf": {"nlist": 1024, "nprobe": DEFAULT_NPROBE}, "graph": {"degree": 32, "ef": 64}}
# a snapshot is taken (in the background) once the log holds this many bytes
DEFAULT_SNAPSHOT_BYTES = 256 << 20


SNAPSHOT_FILES = (".index", ".payloads.json")


def learns(config: dict) -> bool:
    """Whether a collection of this config learns from data before it holds rows (IVF lists, a codec)."""
    return config["index"] == "ivf" or config.get("codec") is not None


def save_snapshot(folder: str, seq: int, index, payloads: Payloads, key: Optional[bytes]) -> str:
    """Write the index and payloads as snapshot ``seq`` in ``folder``; returns its base name."""
    base = f"snapshot-{seq:020d}"
    index.save(os.path.join(folder, base + ".index"), encryption_key=key)
    write_file(os.path.join(folder, base + ".payloads.json"), payloads.to_json(), key, b"payloads")
    return base


def write_manifest(folder: str, base: str, seq: int) -> None:
    """Make snapshot ``base`` (holding the log up to ``seq``) the current one: the atomic step."""
    write_file(os.path.join(folder, "manifest.json"), json.dumps({"snapshot": base, "seq": seq}).encode())


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
        check_codec(codec, metric)
        out = {"dim": dim, "metric": metric, "index": kind, "codec": codec}
        if kind == "graph" and metric not in GRAPH_METRICS:
            raise ValueError(f"metric must be one of {list(GRAPH_METRICS)} with index 'graph', got {metric!r}")
        if kind == "graph" and codec is not None:
            raise ValueError(f"codec must be null with index 'graph' (it stores float32 rows), got {codec!r}")
        for field, default in KIND_OPTIONS[kind].items():
            out[field] = check_positive(config.get(field, default), field)
        if kind == "graph" and out["degree"] > MAX_DEGREE:
            raise ValueError(f"degree must be at most {MAX_DEGREE}, got {out['degree']}")
        unknown = set(config) - {"dim", "metric", "index", "codec"} - set(KIND_OPTIONS[kind])
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]} is not an option of index {kind!r} (its options: "
                             f"{list(KIND_OPTIONS[kind])})")
        return out

    def _new_index(self):
        c = self.config
        if c["index"] == "ivf":
            return IVFIndex(c["dim"], c["nlist"], c["metric"], nprobe=c["nprobe"], codec=c["codec"])
        if c["index"] == "graph":
            return GraphIndex(c["dim"], c["metric"], degree=c["degree"], ef=c["ef"])
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
            # mapped (unencrypted snapshots): opening costs the header, not the rows; blocks are checked when first
            # read (Index.load), and a replayed write first checks the rest
            col.index = INDEX_KINDS[col.config["index"]].load(base + ".index", encryption_key=encryption_key,
                                                              mmap=encryption_key is None)
            col.payloads = Payloads.from_json(read_file(base + ".payloads.json", encryption_key, b"payloads"))
        col.log.next_seq = after + 1
        col._replay(col.log.replay(after))
        return col

    def _replay(self, records: Iterable[Record]) -> None:
        """Apply logged records, coalesced: the net effect of every record is one removal and one add."""
        records = list(records)
        if not records:
            return
        mentioned = torch.from_numpy(np.unique(np.concatenate([record.ids for record in records])))
        present = set(mentioned[torch.isin(mentioned, self.index.ids)].tolist()) if len(self.index) else set()
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

    # -- training: an index with lists or a codec learns them once, before it holds rows
    def train(self, vectors: np.ndarray) -> None:
        """Learn the index's lists and codec from ``vectors`` (rows it does not store), instead of from the
        first rows written. FileExistsError if it has learnt already (or needs nothing); ValueError if it cannot
        learn from these. Durable when it returns: the learnt state is saved as a snapshot."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.check_rows(vectors)
        if self.index.is_trained:
            raise FileExistsError(self._trained_message())
        index = self._new_index()
        index.train(torch.from_numpy(vectors))  # (no lock held: searches and writes go on meanwhile)
        self._install(index)

    def trained_state(self) -> bytes:
        """What the index has learnt, as the file of an empty index (:meth:`Index.save`; sealed under the
        collection's encryption key when it has one, so that it is never on a disk in the clear); ValueError if
        it has learnt nothing yet."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trained.xmodal")
            with self.lock.read():
                if not self.index.is_trained:
                    raise ValueError(f"collection {self.name!r} has learnt nothing yet (no rows or training)")
                self.index.save(path, encryption_key=self.key)
            empty = INDEX_KINDS[self.config["index"]].load(path, encryption_key=self.key)
            empty.reset()  # (rows and id counter gone, what it learnt kept)
            empty.save(path, encryption_key=self.key)
            with open(path, "rb") as f:
                return f.read()

    def install_trained(self, state: bytes) -> bool:
        """Take what another collection learnt (its :meth:`trained_state`); returns False when this one holds
        the same already. ValueError if ``state`` is not an empty index of this collection's kind and settings;
        FileExistsError if this one learnt something else."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trained.xmodal")
            with open(path, "wb") as f:
                f.write(state)
            try:
                index = INDEX_KINDS[self.config["index"]].load(path, encryption_key=self.key)
            except ValueError as e:
                raise ValueError(str(e).replace(repr(path), "the trained state")) from None
        expected = self._new_index()
        settings = ("dim", "metric", "codec", *KIND_OPTIONS[self.config["index"]])
        differ = [f for f in settings if getattr(index, f) != getattr(expected, f)]
        if differ or len(index) or not index.is_trained:
            what = f"{differ[0]} {getattr(index, differ[0])!r}" if differ else "rows or no training"
            raise ValueError(f"the trained state must be an empty trained {self.config['index']} index with this "
                             f"collection's settings, got one with {what}")
        try:
            self._install(index)
            return True
        except FileExistsError:
            if plain_bytes(self.trained_state(), self.key) == plain_bytes(state, self.key):
                return False
            raise FileExistsError(f"collection {self.name!r} learnt from other rows already") from None

    def _install(self, index) -> None:
        with self.snapshotting, self.writer:
            self._check_open()
            if self.index.is_trained:
                raise FileExistsError(self._trained_message())
            with self.lock.write():
                self.index = index
            seq = self.log.rotate()
            base = save_snapshot(self.folder, seq, self.index, self.payloads, self.key)
            self._switch_snapshot(base, seq)

    def _trained_message(self) -> str:
        if not learns(self.config):
            return f"collection {self.name!r} needs no training ({self.config['index']} index without a codec)"
        return f"collection {self.name!r} has learnt already (from its training or first rows)"

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
                pad = -np.inf if SEARCH_METRICS[self.index.metric] else np.inf
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
                base = save_snapshot(self.folder, seq, self.index, self.payloads, self.key)
            return self._switch_snapshot(base, seq)
        finally:
            self.snapshotting.release()

    def _switch_snapshot(self, base: str, seq: int) -> int:
        """Make the saved snapshot ``base`` current, then delete the one before it and the log it covers."""
        old = self._manifest_snapshot()
        write_manifest(self.folder, base, seq)
        if old and old != base:
            for suffix in SNAPSHOT_FILES:
                path = os.path.join(self.folder, old + suffix)
                if os.path.exists(path):
                    os.remove(path)
        self.log.drop_through(seq)
        return seq

    def _manifest_snapshot(self) -> Optional[str]:
        path = os.path.join(self.folder, "manifest.json")
        return json.loads(read_file(path))["snapshot"] if os.path.exists(path) else None

    def close(self) -> None:
        with self.writer:
            self.log.close()
