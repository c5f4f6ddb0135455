"""Encryption at rest: AES-256-GCM (from the ``cryptography`` package) for index files, the service's
snapshots and its write-ahead log.

A key is 32 random bytes. A key file holds them raw or as 64 hex characters; make one with
``python -c "import os, sys; sys.stdout.buffer.write(os.urandom(32))" > key`` and keep it away from the data.
Each sealed blob is ``MAGIC + 12-byte random nonce + ciphertext + 16-byte tag``; GCM's tag authenticates it,
so a wrong key, a flipped bit or a blob moved to another place (``context`` differs) fails to open.
"""
from __future__ import annotations

import os

MAGIC = b"XMODAL-AESGCM-1\n"
KEY_BYTES = 32
_NONCE_BYTES = 12


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ImportError("encryption at rest needs the 'cryptography' package: pip install cryptography") from None
    return AESGCM(check_key(key))


def check_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        what = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"encryption_key must be {KEY_BYTES} bytes (AES-256), got {what}")
    return bytes(key)


def read_key(path) -> bytes:
    """The key in a key file: 32 raw bytes, or 64 hex characters (surrounding whitespace ignored)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        raise OSError(e.errno, f"cannot read encryption key file {path!r}: {e.strerror}") from None
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ValueError(f"encryption key file {path!r} must hold {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex "
                     f"characters, found {len(data)} bytes")


def is_sealed(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def seal(key: bytes, data: bytes, context: bytes = b"") -> bytes:
    """``data`` encrypted and authenticated under ``key``; ``context`` (not stored) must match to open it."""
    nonce = os.urandom(_NONCE_BYTES)
    return MAGIC + nonce + _aesgcm(key).encrypt(nonce, bytes(data), context)


def open_sealed(key: bytes, blob: bytes, context: bytes = b"", what: str = "data") -> bytes:
    """The plaintext of a :func:`seal` blob; ValueError naming ``what`` for a wrong key or damaged blob."""
    from cryptography.exceptions import InvalidTag

    if not is_sealed(blob):
        raise ValueError(f"{what} is not encrypted (no xmodal encryption header)")
    body = memoryview(blob)[len(MAGIC):]
    try:
        return _aesgcm(key).decrypt(bytes(body[:_NONCE_BYTES]), bytes(body[_NONCE_BYTES:]), context)
    except InvalidTag:
        raise ValueError(f"cannot decrypt {what}: wrong encryption key, or the data is corrupt") from None
