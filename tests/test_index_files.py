"""Index files: save / load round trips, atomic saves, corrupt, truncated and foreign files, checksums."""
import json
import os

import pytest
import torch

from xmodal import FlatIndex, IVFIndex

from search_helpers import make_inputs


def _data(n=500, d=16, q=7, metric="cosine", seed=0):
    return make_inputs(q, n, d, metric, torch.float32, "cpu", seed=seed)


def _clustered(n, d, centres, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 4
    x = c[torch.randint(0, centres, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("cls", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, cls):
    queries, database = _data(metric="cosine")
    if cls == "flat":
        index = FlatIndex(16, "cosine", dtype=torch.float16)
    else:
        index = IVFIndex(16, 8, "cosine", nprobe=8, dtype=torch.float16)
        index.train(database)
    index.add(database, torch.arange(500) * 7)
    index.remove([0, 7])
    path = tmp_path / "index.xmodal"
    index.save(path)
    loaded = type(index).load(path)
    assert len(loaded) == 498 and loaded.metric == "cosine" and loaded.dtype == torch.float16
    assert torch.equal(loaded.ids, index.ids) and torch.equal(loaded.vectors, index.vectors)
    a, b = index.search(queries, 5), loaded.search(queries, 5)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert loaded.add(torch.randn(1, 16)).tolist() == [index._next_id]


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    index = FlatIndex(4, "ip")
    index.add(torch.randn(3, 4))
    path = tmp_path / "index.xmodal"
    index.save(path)
    original = path.read_bytes()
    index.add(torch.randn(3, 4))

    from xmodal.index import io

    def broken(f, tensors, metadata):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["index.xmodal"]  # no temporary file left behind
    assert len(FlatIndex.load(path)) == 3


def test_load_rejects_truncated_corrupt_and_foreign_files(tmp_path):
    index = FlatIndex(4, "ip")
    index.add(torch.randn(3, 4))
    path = tmp_path / "index.xmodal"
    index.save(path)
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="is not a readable xmodal index file"):
        FlatIndex.load(tmp_path / "truncated")
    with pytest.raises(ValueError, match="is not a readable xmodal index file"):
        FlatIndex.load(tmp_path / "garbage")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors' is not an xmodal index file \(no xmodal format in its "
                                         r"metadata\)"):
        FlatIndex.load(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"index.xmodal' holds an xmodal.FlatIndex/2, not an xmodal.IVFIndex/3: "
                                         r"load it with FlatIndex.load"):
        IVFIndex.load(path)
    with pytest.raises(FileNotFoundError, match=r"cannot load index from '.*missing': no such file"):
        FlatIndex.load(tmp_path / "missing")
    with pytest.raises(IsADirectoryError, match=r"cannot load index from '.*': it is a folder, not an index file"):
        FlatIndex.load(tmp_path)


def _data_offset(path, tensor=None) -> int:
    """Where a safetensors file's tensor bytes (or one tensor's) start: after the 8-byte header length and
    the JSON header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return 8 + size + (header[tensor]["data_offsets"][0] if tensor else 0)


@pytest.mark.parametrize("cls", ["flat", "ivf"])
def test_load_detects_a_flipped_byte_and_verify_false_skips_the_check(tmp_path, cls):
    x = _clustered(300, 8, 4)
    index = FlatIndex(8, "l2") if cls == "flat" else IVFIndex(8, 4, "l2")
    if cls == "ivf":
        index.train(x)
    index.add(x)
    path = tmp_path / "index.xmodal"
    index.save(path)
    data = bytearray(path.read_bytes())
    start = _data_offset(path)
    for where in (start, start + 1000, len(data) - 1):  # first byte of the data, one inside, the last
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        path.write_bytes(flipped)
        with pytest.raises(ValueError, match=r"index.xmodal' is corrupt: its contents do not match the checksum"):
            type(index).load(path)
    flipped = bytearray(data)
    flipped[_data_offset(path, "vectors") + 4 * 8 * 7 + 2] ^= 0x01  # a byte of vector 7
    path.write_bytes(flipped)
    with pytest.raises(ValueError, match="is corrupt"):
        type(index).load(path)
    loaded = type(index).load(path, verify=False)  # the opt-out reads it, flipped byte and all
    assert len(loaded) == 300 and torch.equal(loaded.ids, index.ids)
    assert ((loaded.vectors != index.vectors).sum(1) > 0).nonzero().flatten().tolist() == [7]


def test_checksum_covers_the_metadata_and_files_without_one_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = FlatIndex(4, "ip")
    index.add(torch.randn(5, 4))
    path = tmp_path / "index.xmodal"
    index.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert meta["checksum"].startswith("blocksum64-blake2b+sums:")
    save_file(tensors, str(tmp_path / "edited"), metadata={**meta, "next_id": "3"})  # would reuse ids 3 and 4
    with pytest.raises(ValueError, match=r"edited' is corrupt"):
        FlatIndex.load(tmp_path / "edited")
    save_file(tensors, str(tmp_path / "newer"), metadata={**meta, "checksum": "sha3:00"})
    with pytest.raises(ValueError, match=r"newer' has a checksum of a kind this xmodal does not know \('sha3'\)"):
        FlatIndex.load(tmp_path / "newer")
    # written before xmodal stored checksums: loads, unchecked
    save_file(tensors, str(tmp_path / "older"), metadata={k: v for k, v in meta.items() if k != "checksum"})
    older = FlatIndex.load(tmp_path / "older")
    assert torch.equal(older.vectors, index.vectors) and older._next_id == 5


def test_save_errors_name_the_target_and_leave_no_temporary_file(tmp_path, monkeypatch):
    index = FlatIndex(4, "ip")
    index.add(torch.randn(3, 4))
    target = tmp_path / "no" / "such" / "index.xmodal"
    with pytest.raises(FileNotFoundError, match=rf"cannot save index to '{target}': folder '{target.parent}' does not "
                                                r"exist"):
        index.save(target)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"cannot save index to '.*file/index.xmodal': '.*file' is not a "
                                                 r"folder"):
        index.save(tmp_path / "file" / "index.xmodal")
    with pytest.raises(IsADirectoryError, match=r"cannot save index to '.*': it is a folder"):
        index.save(tmp_path)

    def refused(src, dst):  # e.g. a read-only target on a network file system
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError, match=r"cannot save index to '.*index.xmodal': Permission denied") as info:
        index.save(tmp_path / "index.xmodal")
    assert ".xmodal-" not in str(info.value)  # the temporary file is not the user's business
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
