"""Index files opened memory-mapped: the rows stay in the file (the page cache) until a search reads them.

Opening reads the header, the block sums the file stores and each tensor's last partial block, checks them
against the checksum (so the metadata and the sums themselves are known good) and checks small tensors whole;
it does not read the rows. Each 64 KiB block of a large tensor is then compared with its stored sum the first
time anything reads it (:meth:`MappedFile.check_rows`, :meth:`MappedFile.check_all`): damage raises
ValueError naming the file and the bytes when it is read, and no answer is computed from a damaged block.
A file is mapped copy-on-write: writes to the index change private pages, never the file. xmodal replaces
index files by renaming new ones over them, which leaves a mapped file intact; truncating or rewriting a
mapped file in place is what must not happen (the process would fault on the missing pages).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import encryption
from . import io
from ._rows import concatenated_ranges

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16,
          torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
          torch.uint8: np.uint8, torch.bool: np.bool_}
_TORCH = {name: dtype for dtype, name in io.DTYPES.items()}
_SMALL = 4 << 20      # tensors up to this many bytes are checked whole when the file is opened
_MAX_HEADER = 100 << 20
_CHECK_BLOCKS = 1024  # blocks summed per step (64 MiB)


def _map(path: str, offset: int, dtype: torch.dtype, shape: Tuple[int, ...]) -> Tensor:
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return torch.empty(shape, dtype=dtype)
    array = np.memmap(path, dtype=_NUMPY[dtype], mode="c", offset=offset, shape=shape)
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _entries(path: str, header: dict, data_bytes: int) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int]]:
    """name -> (dtype, shape, offset in the data) of a safetensors header, checked against the file's size."""
    entries, end = {}, 0
    for name, spec in header.items():
        try:
            dtype = _TORCH[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            begin, stop = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise io.unreadable(path, ValueError(f"bad header entry for {name!r}: {e}")) from None
        if min(shape, default=0) < 0 or stop - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise io.unreadable(path, ValueError(f"header entry {name!r} does not fit its shape"))
        entries[name] = (dtype, shape, begin)
        end = max(end, stop)
    if end > data_bytes:
        raise ValueError(f"{path!r} is truncated: its header describes {end} bytes of tensors, the file holds "
                         f"{max(data_bytes, 0)}")
    return entries


class MappedFile:
    """The checks still owed on a memory-mapped index file: which blocks of each large tensor have not been
    compared with their stored sums yet (see the module docstring). A tensor leaves ``unchecked`` once every
    block of it is checked, and the file is ``done`` when none is left."""

    def __init__(self, path: str, tensors: Dict[str, Tensor], sums: Dict[str, Tensor]):
        self.path, self.tensors, self.sums = path, tensors, sums
        self.unchecked = {name: torch.ones(sums[name].numel(), dtype=torch.bool) for name in tensors
                          if sums[name].numel()}

    @property
    def done(self) -> bool:
        return not self.unchecked

    def _bytes(self, name: str) -> Tensor:
        return self.tensors[name].reshape(-1).view(torch.uint8)

    def _check_blocks(self, name: str, blocks: Tensor) -> None:
        """Compare these blocks (sorted indices) of tensor ``name`` with their stored sums."""
        words = self._bytes(name)[: self.sums[name].numel() * io.BLOCK].view(torch.int64).view(-1, io.BLOCK // 8)
        for at in range(0, blocks.numel(), _CHECK_BLOCKS):
            step = blocks[at: at + _CHECK_BLOCKS]
            if step.numel() > 1 and int(step[-1] - step[0]) + 1 == step.numel():  # a run: no gather
                found = words[int(step[0]): int(step[-1]) + 1].sum(1)
            else:
                found = words.index_select(0, step).sum(1)
            bad = step[found != self.sums[name].index_select(0, step)]
            if bad.numel():
                first = int(bad[0]) * io.BLOCK
                raise ValueError(f"{self.path!r} is corrupt: bytes {first}..{first + io.BLOCK} of tensor {name!r} do "
                                 f"not match the checksum stored when it was saved")
            self.unchecked[name][step] = False
        if not bool(self.unchecked[name].any()):
            del self.unchecked[name]

    def check_rows(self, name: str, begins: Tensor, ends: Tensor) -> None:
        """Check the blocks holding rows ``begins[i] .. ends[i]`` (dim 0) of tensor ``name``, if not yet."""
        pending = self.unchecked.get(name)
        if pending is None:
            return
        t = self.tensors[name]
        row_bytes = (t[0].numel() if t.dim() > 1 else 1) * t.element_size()
        first = begins.to(torch.int64) * row_bytes // io.BLOCK
        last = torch.minimum((ends.to(torch.int64) * row_bytes + io.BLOCK - 1) // io.BLOCK,
                             torch.tensor(pending.numel()))  # the partial last block was checked at open
        blocks = torch.unique(concatenated_ranges(first, (last - first).clamp(min=0)))
        self._check_blocks(name, blocks[pending[blocks]])

    def check_all(self) -> None:
        """Check every block not checked yet."""
        for name, pending in list(self.unchecked.items()):
            self._check_blocks(name, torch.nonzero(pending).flatten())


def read_mapped(path, expected_format: str, verify: Optional[bool] = None,
                older_formats: Tuple[str, ...] = ()) -> Tuple[dict, dict, Optional[MappedFile]]:
    """(tensors mapped from the file, metadata, the checks still owed). ``verify``: None checks as the module
    docstring says; True checks every block now; False checks nothing. Files without stored block sums are
    checked whole now unless ``verify`` is False."""
    path = os.fspath(path)
    io.check_path(path)
    try:
        with open(path, "rb") as f:
            if encryption.is_sealed(f.read(len(encryption.MAGIC))):
                raise ValueError(f"{path!r} is encrypted: an encrypted index file is decrypted in memory and cannot "
                                 f"be memory-mapped; load it with mmap=False and its encryption_key")
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path!r} is truncated: {size} bytes, shorter than a safetensors header")
            (header_bytes,) = struct.unpack("<Q", head)
            if header_bytes > min(size - 8, _MAX_HEADER):
                raise ValueError(f"{path!r} is truncated or not a safetensors file: its header would be "
                                 f"{header_bytes} bytes, the file holds {size}")
            header = json.loads(f.read(header_bytes))
    except OSError as e:
        raise io.path_error(e, f"cannot load index from {path!r}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise io.unreadable(path, e) from None
    if not isinstance(header, dict):
        raise io.unreadable(path, ValueError("the header is not a JSON object"))
    metadata = dict(header.pop("__metadata__", None) or {})
    io.check_format(path, metadata, expected_format, older_formats)
    data_start = 8 + header_bytes
    entries = _entries(path, header, size - data_start)
    tensors = {name: _map(path, data_start + begin, dtype, shape) for name, (dtype, shape, begin) in entries.items()}
    sums = {name[len(io.SUMS_PREFIX):]: tensors.pop(name) for name in list(tensors) if name.startswith(io.SUMS_PREFIX)}
    kind = io.checksum_kind(path, metadata) if verify is not False else None
    if kind is None:
        return tensors, metadata, None
    if kind == io.CHECKSUM_KIND or verify or set(sums) != set(tensors):  # no stored sums, or asked to: whole now
        if io.checksum(tensors, metadata, kind) != metadata["checksum"]:
            raise io.corrupt(path)
        return tensors, metadata, None
    parts, large, expected_sums = {}, {}, {}
    for name, t in tensors.items():
        whole = t.nbytes // io.BLOCK
        if sums[name].shape != (whole,):
            raise io.corrupt(path)
        tail = io.as_bytes(t)[whole * io.BLOCK:].clone()
        expected_sums[name] = sums[name].clone()
        parts[name] = (t.dtype, tuple(t.shape), expected_sums[name], tail)
        if t.nbytes > _SMALL:
            large[name] = t
    if f"{kind}:{io.digest(metadata, parts)}" != metadata["checksum"]:
        raise io.corrupt(path)
    small = MappedFile(path, {n: t for n, t in tensors.items() if n not in large}, expected_sums)
    small.check_all()
    return tensors, metadata, MappedFile(path, large, expected_sums) if large else None
