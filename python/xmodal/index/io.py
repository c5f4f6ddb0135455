"""Index files: safetensors (tensors + JSON metadata, no pickle), written atomically and a chunk at a time,
read back validated, or memory-mapped.

``save`` streams each tensor to a temporary file in the same folder (a stored index is never copied whole in
memory), fsyncs it and renames it over the target, so an interrupted save leaves the old file intact. With an
encryption key the whole file is sealed with AES-256-GCM (:mod:`xmodal.encryption`), in memory.

The checksum: for each tensor, the wrapping sums of its 64-bit words over 64 KiB blocks, hashed (BLAKE2b)
together with its name, dtype and shape, the bytes after its last whole block and the metadata. Summing runs
at memory speed (a 200k x 256 float32 index: ~5 ms of a ~60 ms load) where a byte hash costs far more (zlib.crc32
~35 ms, BLAKE2b ~170 ms); per-block sums keep where a change is, so moved blocks are caught too, and any one
changed byte changes its block's sum. It guards against damage, not against deliberate tampering. Files also
store the block sums themselves (tensors ``blocksums/<name>``, 1/8192 of the data), so a memory-mapped file
(:mod:`.mapped`) can check each block the first time it is read rather than read every row at open.
"""
from __future__ import annotations

import hashlib
import io as _bytes_io
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .. import encryption
from .._atomic import write_atomic

_SEAL_CONTEXT = b"xmodal index file"

CHECKSUM_KIND = "blocksum64-blake2b"       # the hash (files of xmodal before block sums were stored)
SUMS_KIND = "blocksum64-blake2b+sums"      # the same hash, with each tensor's block sums stored beside it
SUMS_PREFIX = "blocksums/"
BLOCK = 1 << 16  # bytes
_DIGEST_HEX = 32
_ALIGN = 64      # the data starts at a multiple of this (header padded with spaces, as safetensors allows)
_CHUNK_BYTES = 64 << 20  # a tensor is written (and checked) this many bytes at a time

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


@dataclass
class TensorStream:
    """A tensor to write a chunk of rows at a time: ``chunks()`` yields tensors (any device) whose concatenation
    along dim 0 is the tensor of ``dtype`` and ``shape``. Lets an index write rows it does not hold in that
    order (an IVF index's lists) without a copy of them all."""
    dtype: torch.dtype
    shape: Tuple[int, ...]
    chunks: Callable[[], Iterator[Tensor]]


def row_chunks(t: Tensor) -> Iterator[Tensor]:
    """``t`` in slices of whole rows of about 64 MiB."""
    row_bytes = max(1, t[0].numel() * t.element_size()) if t.dim() and t.shape[0] else 1
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, t.shape[0] if t.dim() else 1, step):
        yield t[start: start + step] if t.dim() else t


def as_bytes(t: Tensor) -> Tensor:
    """A tensor's bytes, as a flat CPU uint8 tensor (a view when it is contiguous on the CPU)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def block_sums(b: Tensor) -> Tensor:
    """The wrapping int64 sum of each whole 64 KiB block of the uint8 tensor ``b`` (length a multiple of it)."""
    if b.storage_offset() % 8:
        b = b.clone()
    return b.view(torch.int64).view(-1, BLOCK // 8).sum(1)


class _Sums:
    """Block sums of bytes that arrive in pieces of any length."""

    def __init__(self):
        self.sums, self.pending = [], torch.empty(0, dtype=torch.uint8)

    def update(self, b: Tensor) -> None:
        if self.pending.numel():
            need = BLOCK - self.pending.numel()
            self.pending, b = torch.cat([self.pending, b[:need]]), b[need:]
            if self.pending.numel() < BLOCK:
                return
            self.sums.append(block_sums(self.pending))
        whole = b.numel() // BLOCK * BLOCK
        if whole:
            self.sums.append(block_sums(b[:whole]))
        self.pending = b[whole:].clone()

    def result(self) -> Tuple[Tensor, Tensor]:
        """(block sums, the bytes after the last whole block)."""
        return (torch.cat(self.sums) if self.sums else torch.empty(0, dtype=torch.int64)), self.pending


def digest(metadata: dict, parts: Dict[str, Tuple[torch.dtype, Tuple[int, ...], Tensor, Tensor]]) -> str:
    """The hash of the metadata and of each tensor's (dtype, shape, block sums, tail bytes), in name order."""
    h = hashlib.blake2b(digest_size=_DIGEST_HEX // 2)
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(parts):
        dtype, shape, sums, tail = parts[name]
        h.update(f"{name}:{dtype}:{list(shape)}\n".encode())
        h.update(sums.numpy().tobytes())
        h.update(tail.numpy().tobytes())
    return h.hexdigest()


def tensor_sums(t: Tensor) -> Tuple[Tensor, Tensor]:
    """(block sums, tail bytes) of a whole tensor, a chunk at a time."""
    sums = _Sums()
    for chunk in row_chunks(t):
        sums.update(as_bytes(chunk))
    return sums.result()


def checksum(tensors: dict, metadata: dict, kind: str = CHECKSUM_KIND) -> str:
    return f"{kind}:" + digest(metadata, {name: (t.dtype, tuple(t.shape), *tensor_sums(t))
                                          for name, t in tensors.items()})


def path_error(e: OSError, message: str) -> OSError:
    """An OSError of e's kind (FileNotFoundError, PermissionError, ...; from its errno) whose message names the
    user's path, not whatever file the failing call was on."""
    return OSError(e.errno, f"{message}: {e.strerror}") if e.errno and e.strerror else OSError(f"{message}: {e}")


def _header(entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]], metadata: dict) -> bytes:
    header = {"__metadata__": metadata}
    header.update({name: {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
                   for name, (dtype, shape, begin, end) in entries.items()})
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-(8 + len(text)) % _ALIGN)


def write(f, tensors: dict, metadata: dict) -> None:
    """Write ``tensors`` (Tensor or :class:`TensorStream`) and ``metadata`` (strings) as safetensors to the
    seekable binary file ``f``, a chunk at a time, with a checksum and each tensor's block sums."""
    specs = {}
    for name, t in tensors.items():
        if name.startswith(SUMS_PREFIX):
            raise ValueError(f"tensor names starting {SUMS_PREFIX!r} are reserved, got {name!r}")
        if isinstance(t, TensorStream):
            specs[name] = (t.dtype, tuple(t.shape), t.chunks)
        else:
            specs[name] = (t.dtype, tuple(t.shape), lambda t=t: row_chunks(t))
    sizes = {name: dtype.itemsize * int(torch.Size(shape).numel()) for name, (dtype, shape, _) in specs.items()}
    # the block sums (int64) first, then the data by element size, largest first: every tensor stays aligned
    order = [SUMS_PREFIX + name for name in sorted(specs)]
    order += sorted(specs, key=lambda name: (-specs[name][0].itemsize, name))
    entries, at = {}, 0
    for name in order:
        if name.startswith(SUMS_PREFIX):
            blocks = sizes[name[len(SUMS_PREFIX):]] // BLOCK
            dtype, shape, nbytes = torch.int64, (blocks,), 8 * blocks
        else:
            dtype, shape, nbytes = specs[name][0], specs[name][1], sizes[name]
        entries[name] = (dtype, shape, at, at + nbytes)
        at += nbytes
    metadata = {**metadata, "checksum": f"{SUMS_KIND}:" + "0" * _DIGEST_HEX}
    header = _header(entries, metadata)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    data_start = 8 + len(header)
    parts = {}
    for name in order:
        if name.startswith(SUMS_PREFIX):
            continue
        dtype, shape, chunks = specs[name]
        f.seek(data_start + entries[name][2])
        sums, written = _Sums(), 0
        for chunk in chunks():
            b = as_bytes(chunk.to(dtype))
            f.write(b.numpy())
            sums.update(b)
            written += b.numel()
        if written != sizes[name]:
            raise RuntimeError(f"tensor {name!r} streamed {written} bytes, expected {sizes[name]}")
        parts[name] = (dtype, shape, *sums.result())
    for name, (_, _, block, _) in parts.items():
        f.seek(data_start + entries[SUMS_PREFIX + name][2])
        f.write(block.numpy().tobytes())
    metadata["checksum"] = f"{SUMS_KIND}:{digest(metadata, parts)}"
    final = _header(entries, metadata)
    assert len(final) == len(header)  # the checksum's length is fixed
    f.seek(8)
    f.write(final)


def save(tensors: dict, metadata: dict, path, encryption_key=None) -> None:
    """Write ``tensors`` (Tensor or :class:`TensorStream`) and ``metadata`` (values become strings) to ``path``,
    atomically, with a checksum; sealed under ``encryption_key`` when one is given."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = f"cannot save index to {path!r}"
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{problem}: folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{problem}: {folder!r} is not a folder")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder")
    metadata = {key: str(value) for key, value in metadata.items()}
    if encryption_key is not None:
        encryption.check_key(encryption_key)

    def write_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if encryption_key is None:
                write(f, tensors, metadata)
            else:
                plain = _bytes_io.BytesIO()
                write(plain, tensors, metadata)
                f.write(encryption.seal(encryption_key, plain.getvalue(), _SEAL_CONTEXT))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the index

    try:
        write_atomic(path, write_file)
    except OSError as e:  # the error would name the temporary file, which is gone
        raise path_error(e, problem) from e


def plain_bytes(data: bytes, encryption_key=None) -> bytes:
    """An index file's bytes as :func:`save` writes them unencrypted: ``data`` itself, or, under
    ``encryption_key``, ``data`` opened in memory (the same contents give the same bytes either way)."""
    if encryption_key is None:
        return data
    return encryption.open_sealed(encryption_key, data, _SEAL_CONTEXT, "an index file")


def _from_bytes(data: bytes) -> Tuple[dict, dict]:
    """Tensors and metadata of safetensors bytes (the format: 8-byte little-endian header size, JSON header)."""
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    metadata = dict(json.loads(data[8: 8 + size]).get("__metadata__") or {})
    return load(data), metadata


def check_path(path: str) -> None:
    problem = f"cannot load index from {path!r}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder, not an index file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{problem}: no such file")


def is_sealed(path: str, encryption_key) -> bool:
    """Whether the file at ``path`` is encrypted; raises when that does not match ``encryption_key``."""
    if encryption_key is not None:
        encryption.check_key(encryption_key)
    with open(path, "rb") as f:
        sealed = encryption.is_sealed(f.read(len(encryption.MAGIC)))
    if sealed and encryption_key is None:
        raise ValueError(f"{path!r} is encrypted: pass its encryption_key to load it")
    if not sealed and encryption_key is not None:
        raise ValueError(f"{path!r} is not encrypted, but an encryption_key was given")
    return sealed


def unreadable(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path!r} is not a readable xmodal index file: truncated, corrupt or not a safetensors "
                      f"file ({type(e).__name__}: {e})")


def check_format(path: str, metadata: dict, expected_format: str, older_formats: Tuple[str, ...]) -> None:
    found = metadata.get("format")
    if found == expected_format or found in older_formats:
        return
    if not (found or "").startswith("xmodal."):
        raise ValueError(f"{path!r} is not an xmodal index file (no xmodal format in its metadata)")
    if found.split("/")[0] == expected_format.split("/")[0]:
        raise ValueError(f"{path!r} holds an {found}, written by a newer xmodal: this one reads "
                         f"{', '.join((*older_formats, expected_format))}")
    raise ValueError(f"{path!r} holds an {found}, not an {expected_format}: load it with "
                     f"{found[len('xmodal.'):].split('/')[0]}.load")


def checksum_kind(path: str, metadata: dict) -> Optional[str]:
    """The kind of checksum the file stores (None: written before xmodal stored one)."""
    stored = metadata.get("checksum")
    if stored is None:
        return None
    kind = stored.split(":")[0]
    if kind not in (CHECKSUM_KIND, SUMS_KIND):
        raise ValueError(f"{path!r} has a checksum of a kind this xmodal does not know ({kind!r}); load it with "
                         f"verify=False to skip the check")
    return kind


def corrupt(path: str) -> ValueError:
    return ValueError(f"{path!r} is corrupt: its contents do not match the checksum stored when it was saved "
                      f"(load it with verify=False to read it anyway)")


def read(path, expected_format: str, verify: bool = True, encryption_key=None,
         older_formats: Tuple[str, ...] = ()) -> Tuple[dict, dict]:
    """The tensors and metadata of an index file of ``expected_format`` (or one of ``older_formats``, which
    the caller upgrades), read into memory; with ``verify``, checked against the checksum stored at save time
    (files written before xmodal stored one load unchecked). An encrypted file needs its ``encryption_key``."""
    from safetensors import safe_open

    path = os.fspath(path)
    check_path(path)
    try:
        if is_sealed(path, encryption_key):
            with open(path, "rb") as f:
                blob = f.read()
            tensors, metadata = _from_bytes(encryption.open_sealed(encryption_key, blob, _SEAL_CONTEXT,
                                                                   f"index file {path!r}"))
        else:
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
    except ValueError as e:
        if "encrypt" in str(e):
            raise
        raise unreadable(path, e) from None
    except OSError as e:
        raise path_error(e, f"cannot load index from {path!r}") from e
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise unreadable(path, e) from None
    # the stored block sums serve mapped loads (mapped.py); a whole read checks the hash of the data itself
    tensors = {name: t for name, t in tensors.items() if not name.startswith(SUMS_PREFIX)}
    check_format(path, metadata, expected_format, older_formats)
    kind = checksum_kind(path, metadata) if verify else None
    if kind is not None and checksum(tensors, metadata, kind) != metadata["checksum"]:
        raise corrupt(path)
    return tensors, metadata
