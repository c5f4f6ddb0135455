"""What makes the service's writes durable: an append-only, checksummed write-ahead log, and atomic files.

The log is a folder of segment files ``wal-<first sequence number>.log``. Each record is framed as

    b"XWAL" | body length (u32) | sequence number (u64) | BLAKE2b-128 of (sequence number, body) | body

and is acknowledged only after ``fsync``. Reading stops cleanly at a *torn tail* -- a last record cut short or
failing its checksum, what a process killed mid-write leaves -- which is reported and cut off so later appends
follow a whole record. A bad record anywhere else is corruption, and reading it raises
:class:`CorruptLogError` rather than start from a state that was never written.

With an encryption key each body is sealed with AES-256-GCM (:mod:`xmodal.encryption`), bound to its
sequence number, so records cannot be reordered or moved without detection.

A record's body is a small JSON header (operation, row count, dimension, payloads) followed by the ids as
int64 and the vectors as float32, little-endian: binary, so replaying 100,000 vectors takes well under a
second, and no pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np

from .. import encryption
from .._atomic import write_atomic

_MAGIC = b"XWAL"
_FRAME = struct.Struct("<4sIQ16s")  # magic, body length, sequence number, checksum
_SEGMENT = re.compile(r"^wal-(\d{20})\.log$")
# a body larger than this is not a record this service wrote (the request size limit is far below it)
MAX_RECORD_BYTES = 1 << 31


class CorruptLogError(RuntimeError):
    """A log record other than the last one is damaged: the service refuses to start from it."""


@dataclass
class Record:
    """One logged write: ``op`` is "upsert" (ids, vectors, payloads) or "delete" (ids)."""
    op: str
    ids: np.ndarray                       # int64 [n]
    vectors: Optional[np.ndarray] = None  # float32 [n, dim] (upsert)
    payloads: Optional[list] = None       # one JSON object (or None) per id (upsert), or None
    seq: int = 0

    def encode(self) -> bytes:
        ids = np.ascontiguousarray(self.ids, dtype="<i8")
        head = {"op": self.op, "n": int(ids.shape[0]), "payloads": self.payloads}
        parts = [ids.tobytes()]
        if self.vectors is not None:
            vectors = np.ascontiguousarray(self.vectors, dtype="<f4")
            head["dim"] = int(vectors.shape[1])
            parts.append(vectors.tobytes())
        header = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
        return struct.pack("<I", len(header)) + header + b"".join(parts)

    @classmethod
    def decode(cls, body: bytes, seq: int) -> "Record":
        (size,) = struct.unpack_from("<I", body)
        head = json.loads(body[4: 4 + size])
        n = int(head["n"])
        at = 4 + size
        ids = np.frombuffer(body, dtype="<i8", count=n, offset=at).astype(np.int64)
        at += 8 * n
        vectors = None
        if "dim" in head:
            dim = int(head["dim"])
            vectors = np.frombuffer(body, dtype="<f4", count=n * dim, offset=at).reshape(n, dim).copy()
            at += 4 * n * dim
        if at != len(body):
            raise ValueError(f"record body has {len(body) - at} bytes beyond its contents")
        return cls(head["op"], ids, vectors, head.get("payloads"), seq)


def _digest(seq: int, body: bytes) -> bytes:
    h = hashlib.blake2b(struct.pack("<Q", seq), digest_size=16)
    h.update(body)
    return h.digest()


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def fsync_folder(folder: str) -> None:
    """Make a rename or a new file in ``folder`` durable (the folder's entry itself is on disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """The log of one collection, in ``folder``. Not thread-safe: the collection serialises its writers."""

    def __init__(self, folder: str, encryption_key: Optional[bytes] = None):
        self.folder = folder
        self.key = encryption_key
        self._file = None
        self.next_seq = 1
        self.bytes = 0  # bytes in the segments on disk (what a snapshot would let go)

    def segments(self) -> List[str]:
        names = sorted(n for n in os.listdir(self.folder) if _SEGMENT.match(n))
        return [os.path.join(self.folder, n) for n in names]

    def replay(self, after_seq: int = 0) -> Iterator[Record]:
        """The records after ``after_seq``, in order; a torn tail of the last segment is reported (a warning)
        and cut off. Afterwards the log appends after the last whole record."""
        segments = self.segments()
        last_seq = after_seq
        self.bytes = 0
        for i, path in enumerate(segments):
            is_last = i == len(segments) - 1
            for record in self._read_segment(path, is_last):
                if record.seq <= last_seq and record.seq > after_seq:
                    raise CorruptLogError(f"write-ahead log {path!r}: sequence number {record.seq} repeats or goes "
                                          f"back (after {last_seq})")
                if record.seq > after_seq:
                    last_seq = record.seq
                    yield record
            self.bytes += os.path.getsize(path)
        self.next_seq = max(self.next_seq, last_seq + 1)

    def _read_segment(self, path: str, is_last: bool) -> Iterator[Record]:
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            problem = None
            if len(data) - at < _FRAME.size:
                problem, end = "cut short in its frame", len(data)
            else:
                magic, length, seq, digest = _FRAME.unpack_from(data, at)
                end = at + _FRAME.size + length
                if magic != _MAGIC or length > MAX_RECORD_BYTES:
                    problem = "no record frame"
                elif end > len(data):
                    problem, end = "cut short", len(data)
                elif _digest(seq, data[at + _FRAME.size: end]) != digest:
                    problem = "checksum mismatch"
            if problem is not None:
                if is_last and end >= len(data):
                    warnings.warn(f"write-ahead log {path!r}: ignoring a torn last record at byte {at} ({problem}, "
                                  f"{len(data) - at} bytes); it was never acknowledged", RuntimeWarning, stacklevel=2)
                    with open(path, "r+b") as f:
                        f.truncate(at)
                        os.fsync(f.fileno())
                    return
                raise CorruptLogError(f"write-ahead log {path!r} is corrupt at byte {at} ({problem}) with "
                                      f"{len(data) - end} bytes of later records: refusing to start from it")
            body = data[at + _FRAME.size: end]
            if self.key is not None:
                body = encryption.open_sealed(self.key, body, struct.pack("<Q", seq),
                                              f"write-ahead log record {seq} in {path!r}")
            try:
                yield Record.decode(body, seq)
            except (ValueError, KeyError, TypeError, struct.error) as e:
                raise CorruptLogError(f"write-ahead log {path!r}: record {seq} at byte {at} cannot be read: {e}") from None
            at = end

    def append(self, record: Record) -> int:
        """Write ``record`` and fsync it; returns its sequence number. Only then may the write be acknowledged."""
        seq = self.next_seq
        body = record.encode()
        if self.key is not None:
            body = encryption.seal(self.key, body, struct.pack("<Q", seq))
        if self._file is None:
            self._open(seq)
        self._file.write(_FRAME.pack(_MAGIC, len(body), seq, _digest(seq, body)) + body)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.next_seq = seq + 1
        self.bytes += _FRAME.size + len(body)
        record.seq = seq
        return seq

    def _open(self, first_seq: int) -> None:
        segments = self.segments()
        path = segments[-1] if segments else os.path.join(self.folder, _segment_name(first_seq))
        self._file = open(path, "ab")
        if not segments:
            fsync_folder(self.folder)

    def rotate(self) -> int:
        """Start a new segment for the records after this point; returns the last sequence number before it."""
        self.close()
        path = os.path.join(self.folder, _segment_name(self.next_seq))
        self._file = open(path, "ab")
        fsync_folder(self.folder)
        return self.next_seq - 1

    def drop_through(self, seq: int) -> None:
        """Delete the segments whose records all have sequence numbers <= ``seq`` (a snapshot holds them)."""
        segments = self.segments()
        for path, following in zip(segments, segments[1:]):
            first_of_next = int(_SEGMENT.match(os.path.basename(following)).group(1))
            if first_of_next - 1 <= seq:
                self.bytes -= os.path.getsize(path)
                os.remove(path)
        fsync_folder(self.folder)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_file(path: str, data: bytes, encryption_key: Optional[bytes] = None, context: bytes = b"") -> None:
    """Write ``data`` to ``path`` atomically and durably (sealed under ``encryption_key`` if given)."""
    if encryption_key is not None:
        data = encryption.seal(encryption_key, data, context)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def read_file(path: str, encryption_key: Optional[bytes] = None, context: bytes = b"") -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if encryption_key is not None:
        return encryption.open_sealed(encryption_key, data, context, repr(path))
    if encryption.is_sealed(data):
        raise ValueError(f"{path!r} is encrypted: start the service with its encryption key")
    return data
