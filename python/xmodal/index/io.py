"""Index files: safetensors (tensors + JSON metadata, no pickle), written atomically, read back validated.

``save`` writes to a temporary file in the same folder, fsyncs it and renames it over the target, so an
interrupted save leaves the old file intact. The metadata holds a checksum of the contents, which ``read``
verifies. With an encryption key the whole file is sealed with AES-256-GCM (:mod:`xmodal.encryption`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Tuple

import torch

from .. import encryption
from .._atomic import write_atomic

_SEAL_CONTEXT = b"xmodal index file"

# The checksum: for each tensor, the wrapping sums of its 64-bit words over 64 KiB blocks, hashed (BLAKE2b)
# together with its name, dtype and shape and with the metadata. Summing runs at memory speed (a 200k x 256
# float32 index: ~5 ms of a ~60 ms load) where a byte hash costs far more (zlib.crc32 ~35 ms, BLAKE2b ~170
# ms); per-block sums keep where a change is, so moved blocks are caught too, and any one changed byte
# changes its block's sum. It guards against damage, not against deliberate tampering.
CHECKSUM_KIND = "blocksum64-blake2b"
_CHECKSUM_BLOCK = 1 << 16  # bytes


def checksum(tensors: dict, metadata: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        b = t.contiguous().view(-1).view(torch.uint8)
        whole = b.numel() // _CHECKSUM_BLOCK * _CHECKSUM_BLOCK
        h.update(b[:whole].view(torch.int64).view(-1, _CHECKSUM_BLOCK // 8).sum(1).numpy().tobytes())
        h.update(b[whole:].numpy().tobytes())
    return f"{CHECKSUM_KIND}:{h.hexdigest()}"


def _path_error(e: OSError, message: str) -> OSError:
    """An OSError of e's kind (FileNotFoundError, PermissionError, ...; from its errno) whose message names the
    user's path, not whatever file the failing call was on."""
    return OSError(e.errno, f"{message}: {e.strerror}") if e.errno and e.strerror else OSError(f"{message}: {e}")


def save(tensors: dict, metadata: dict, path, encryption_key=None) -> None:
    """Write ``tensors`` and ``metadata`` (values become strings) to ``path``, atomically, with a checksum;
    sealed under ``encryption_key`` when one is given."""
    from safetensors.torch import save as to_bytes, save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = f"cannot save index to {path!r}"
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{problem}: folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{problem}: {folder!r} is not a folder")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata["checksum"] = checksum(tensors, metadata)

    if encryption_key is not None:
        encryption.check_key(encryption_key)

    def write(tmp: str) -> None:
        if encryption_key is None:
            save_file(tensors, tmp, metadata=metadata)
        else:
            with open(tmp, "wb") as f:
                f.write(encryption.seal(encryption_key, to_bytes(tensors, metadata=metadata), _SEAL_CONTEXT))
        with open(tmp, "rb") as f:  # on disk before the rename makes it the index
            os.fsync(f.fileno())

    try:
        write_atomic(path, write)
    except OSError as e:  # the error would name the temporary file, which is gone
        raise _path_error(e, problem) from e


def _from_bytes(data: bytes) -> Tuple[dict, dict]:
    """Tensors and metadata of safetensors bytes (the format: 8-byte little-endian header size, JSON header)."""
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", data[:8])
    metadata = dict(json.loads(data[8: 8 + size]).get("__metadata__") or {})
    return load(data), metadata


def read(path, expected_format: str, verify: bool = True, encryption_key=None,
         older_formats: Tuple[str, ...] = ()) -> Tuple[dict, dict]:
    """The tensors and metadata of an index file of ``expected_format`` (or one of ``older_formats``, which
    the caller upgrades); with ``verify``, checked against the checksum stored at save time (files written
    before xmodal stored one load unchecked). An encrypted file needs its ``encryption_key``."""
    from safetensors import safe_open

    path = os.fspath(path)
    problem = f"cannot load index from {path!r}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{problem}: it is a folder, not an index file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{problem}: no such file")
    if encryption_key is not None:
        encryption.check_key(encryption_key)
    try:
        with open(path, "rb") as f:
            sealed = encryption.is_sealed(f.read(len(encryption.MAGIC)))
        if sealed and encryption_key is None:
            raise ValueError(f"{path!r} is encrypted: pass its encryption_key to load it")
        if not sealed and encryption_key is not None:
            raise ValueError(f"{path!r} is not encrypted, but an encryption_key was given")
        if sealed:
            with open(path, "rb") as f:
                blob = f.read()
            tensors, metadata = _from_bytes(encryption.open_sealed(encryption_key, blob, _SEAL_CONTEXT,
                                                                   f"index file {path!r}"))
        else:
            tensors = {}
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
    except ValueError as e:
        if "encrypt" in str(e):
            raise
        raise ValueError(f"{path!r} is not a readable xmodal index file: truncated, corrupt or not a safetensors "
                         f"file ({e})") from None
    except OSError as e:
        raise _path_error(e, problem) from e
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt files
        raise ValueError(f"{path!r} is not a readable xmodal index file: truncated, corrupt or not a safetensors "
                         f"file ({type(e).__name__}: {e})") from None
    found = metadata.get("format")
    if found != expected_format and found not in older_formats:
        if not (found or "").startswith("xmodal."):
            raise ValueError(f"{path!r} is not an xmodal index file (no xmodal format in its metadata)")
        if found.split("/")[0] == expected_format.split("/")[0]:
            raise ValueError(f"{path!r} holds an {found}, written by a newer xmodal: this one reads "
                             f"{', '.join((*older_formats, expected_format))}")
        raise ValueError(f"{path!r} holds an {found}, not an {expected_format}: load it with "
                         f"{found[len('xmodal.'):].split('/')[0]}.load")
    stored = metadata.get("checksum")
    if verify and stored is not None:
        if not stored.startswith(CHECKSUM_KIND + ":"):
            raise ValueError(f"{path!r} has a checksum of a kind this xmodal does not know ({stored.split(':')[0]!r}); "
                             f"load it with verify=False to skip the check")
        if checksum(tensors, metadata) != stored:
            raise ValueError(f"{path!r} is corrupt: its contents do not match the checksum stored when it was saved "
                             f"(load it with verify=False to read it anyway)")
    return tensors, metadata
