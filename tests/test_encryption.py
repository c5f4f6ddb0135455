"""Index files sealed with AES-256-GCM: round trip, and every way of opening one wrongly is a clear error."""
import os

import pytest
import torch

import xmodal
from xmodal import encryption

pytest.importorskip("cryptography")


@pytest.mark.parametrize("cls, kwargs", [(xmodal.FlatIndex, {}), (xmodal.FlatIndex, {"codec": "int8"}),
                                         (xmodal.IVFIndex, {"nlist": 4})])
def test_an_encrypted_index_file_round_trips_and_hides_its_contents(tmp_path, cls, kwargs):
    key = os.urandom(32)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    index = cls(16, metric="l2", **kwargs)
    if cls is xmodal.IVFIndex:
        index.train(x)
    index.add(x)
    path = tmp_path / "index"
    index.save(path, encryption_key=key)
    raw = path.read_bytes()
    assert raw.startswith(encryption.MAGIC) and b"xmodal." not in raw and x.numpy().tobytes()[:32] not in raw
    loaded = cls.load(path, encryption_key=key)
    assert torch.equal(loaded.ids, index.ids)
    assert torch.equal(loaded.search(x[:5], 3)[1], index.search(x[:5], 3)[1])


def test_opening_an_encrypted_index_wrongly_is_a_clear_error(tmp_path):
    key = os.urandom(32)
    index = xmodal.FlatIndex(4, "ip")
    index.add(torch.randn(10, 4))
    sealed, plain = tmp_path / "sealed", tmp_path / "plain"
    index.save(sealed, encryption_key=key)
    index.save(plain)
    with pytest.raises(ValueError, match="is encrypted: pass its encryption_key"):
        xmodal.FlatIndex.load(sealed)
    with pytest.raises(ValueError, match="wrong encryption key"):
        xmodal.FlatIndex.load(sealed, encryption_key=os.urandom(32))
    with pytest.raises(ValueError, match="is not encrypted, but an encryption_key was given"):
        xmodal.FlatIndex.load(plain, encryption_key=key)
    with pytest.raises(ValueError, match="encryption_key must be 32 bytes"):
        index.save(tmp_path / "x", encryption_key=b"short")
    damaged = bytearray(sealed.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="wrong encryption key, or the data is corrupt"):
        xmodal.FlatIndex.load(tmp_path / "damaged", encryption_key=key)
    (tmp_path / "cut").write_bytes(sealed.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt"):
        xmodal.FlatIndex.load(tmp_path / "cut", encryption_key=key)


def test_key_files_hold_raw_or_hex_keys(tmp_path):
    key = os.urandom(32)
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "bad").write_text("not a key")
    assert encryption.read_key(tmp_path / "raw") == key == encryption.read_key(tmp_path / "hex")
    with pytest.raises(ValueError, match="must hold 32 raw bytes or 64 hex characters, found 9 bytes"):
        encryption.read_key(tmp_path / "bad")
    with pytest.raises(OSError, match="cannot read encryption key file"):
        encryption.read_key(tmp_path / "missing")
