"""Large indexes on one machine: streamed saves, memory-mapped loads whose blocks are checked when first read,
and IVF adds that grow the lists once (small sizes here; the 10M runs live in benchmarks/scale.py)."""
import io as bytes_io
import json

import pytest
import torch

from xmodal import FlatIndex, IVFIndex
from xmodal.index import inverted_lists, io, mapped


@pytest.fixture
def small_blocks(monkeypatch):
    """Treat tensors above 64 KiB as large, so these small files have rows left to check after opening."""
    monkeypatch.setattr(mapped, "_SMALL", 1 << 16)


def _data(n=20000, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _filled(index, x):
    index.train(x)
    index.add(x)
    return index


def _ivf(x, codec="int8", nlist=16):
    return _filled(IVFIndex(x.shape[1], nlist, "cosine", codec=codec, nprobe=4), x)


INDEXES = {
    "ivf-int8": lambda x: _ivf(x),
    "ivf-bf16": lambda x: _filled(IVFIndex(x.shape[1], 16, "l2", dtype=torch.bfloat16), x),
    "flat-float": lambda x: _filled(FlatIndex(x.shape[1], "ip"), x),
    "flat-binary": lambda x: _filled(FlatIndex(x.shape[1], "cosine", codec="binary"), x),
}


@pytest.mark.filterwarnings("ignore::xmodal.index.LossyEncodingWarning")  # random rows suit binary codes badly
@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_a_mapped_index_answers_as_the_loaded_one(tmp_path, small_blocks, kind):
    x = _data()
    index = INDEXES[kind](x)
    path = tmp_path / "index.xm"
    index.save(path)
    loaded, mapped_index = type(index).load(path), type(index).load(path, mmap=True)
    assert mapped_index._mapped is not None  # rows left unchecked at open
    want = index.search(x[:50], 10)
    for other in (loaded, mapped_index):
        got = other.search(x[:50], 10)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert torch.equal(mapped_index.ids, index.ids)
    # changes go to private pages: the file is untouched, and the index goes on like a loaded one
    before = path.read_bytes()
    mapped_index.remove(index.ids[:100])
    mapped_index.add(_data(500, seed=1))
    assert path.read_bytes() == before and len(mapped_index) == len(index) + 400
    mapped_index.save(path)  # over the file it maps: a new file renamed over it
    assert len(type(index).load(path)) == len(index) + 400


def test_an_ivf_search_checks_only_the_lists_it_reads(tmp_path, small_blocks):
    x = _data(40000)
    index = _ivf(x, nlist=64)
    index.save(tmp_path / "index.xm")
    m = IVFIndex.load(tmp_path / "index.xm", mmap=True)
    checks = m._mapped
    unchecked = lambda: int(checks.unchecked["codes"].sum()) if "codes" in checks.unchecked else 0  # noqa: E731
    blocks = unchecked()
    assert blocks == checks.sums["codes"].numel() > 4
    m.search(x[:1], 5, nprobe=1)
    assert 0 < unchecked() < blocks
    m.search(x[:8], 5, nprobe=64)
    assert unchecked() == 0


def test_an_ivf_search_checks_each_list_once(tmp_path, small_blocks, monkeypatch):
    """A list's rows and ids are checked the first time a search probes it, never again; once every block is
    checked the index owes nothing (and searches take the unchecked path)."""
    x = _data(40000)
    index = _ivf(x, nlist=64)
    index.save(tmp_path / "index.xm")
    m = IVFIndex.load(tmp_path / "index.xm", mmap=True)
    read = []
    check_rows = mapped.MappedFile.check_rows
    monkeypatch.setattr(mapped.MappedFile, "check_rows",
                        lambda self, name, begins, ends: read.append(name) or check_rows(self, name, begins, ends))
    want = index.search(x[:20], 5, nprobe=2)
    assert torch.equal(m.search(x[:20], 5, nprobe=2)[1], want[1])
    assert sorted(read) == ["codes", "groups", "ids", "row_terms"]  # (cosine: each row's 1 / |row|)
    assert torch.equal(m.search(x[:20], 5, nprobe=2)[1], want[1]) and len(read) == 4  # the same lists: no checks
    m.search(x[20:40], 5, nprobe=64)
    assert m._mapped is None and len(read) == 8
    assert torch.equal(m.search(x[:20], 5, nprobe=2)[1], want[1]) and len(read) == 8


def _damage(path, tensor, offset_in_tensor, out):
    """A copy of the index file at ``path`` with one byte of ``tensor`` flipped."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8: 8 + header])[tensor]["data_offsets"][0]
    data[8 + header + begin + offset_in_tensor] ^= 0x5A
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("tensor", ["codes", "ids"])
def test_damage_is_an_error_when_the_damaged_block_is_read(tmp_path, small_blocks, tensor):
    x = _data(40000)
    index = _ivf(x, nlist=64)
    index.save(tmp_path / "index.xm")
    bad = _damage(tmp_path / "index.xm", tensor, 3 * io.BLOCK + 17, tmp_path / "bad.xm")
    m = IVFIndex.load(bad, mmap=True)  # opens: the rows are not read
    with pytest.raises(ValueError, match=rf"bad.xm' is corrupt: bytes {3 * io.BLOCK}\.\.{4 * io.BLOCK} of tensor "
                                         rf"'{tensor}' do not match the checksum"):
        m.search(x[:200], 10, nprobe=64)
    with pytest.raises(ValueError, match="is corrupt"):  # and again: no block is taken as checked
        m.search(x[:200], 10, nprobe=64)
    with pytest.raises(ValueError, match="is corrupt"):  # reading every row checks the rest first
        IVFIndex.load(bad, mmap=True).ids
    with pytest.raises(ValueError, match="is corrupt"):
        IVFIndex.load(bad, mmap=True, verify=True)  # every block, at open
    with pytest.raises(ValueError, match="is corrupt"):
        IVFIndex.load(bad)
    assert len(IVFIndex.load(bad, mmap=True, verify=False).search(x[:2], 3)[1]) == 2  # asked not to check


def test_damage_to_what_opening_reads_and_truncation_fail_at_open(tmp_path, small_blocks):
    x = _data(40000)
    index = _ivf(x, nlist=64)
    path = tmp_path / "index.xm"
    index.save(path)
    for tensor in ("centroids", "list_sizes", "blocksums/codes"):
        bad = _damage(path, tensor, 5, tmp_path / "bad.xm")
        with pytest.raises(ValueError, match="bad.xm' is corrupt"):
            IVFIndex.load(bad, mmap=True)
    data = path.read_bytes()
    (tmp_path / "short.xm").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"short.xm' is truncated: its header describes \d+ bytes of tensors, the "
                                         r"file holds \d+"):
        IVFIndex.load(tmp_path / "short.xm", mmap=True)
    (tmp_path / "stub.xm").write_bytes(data[:5])
    with pytest.raises(ValueError, match="stub.xm' is truncated"):
        IVFIndex.load(tmp_path / "stub.xm", mmap=True)
    with pytest.raises(ValueError, match="holds an xmodal.IVFIndex/3, not an xmodal.FlatIndex/2"):
        FlatIndex.load(path, mmap=True)


def test_mmap_refuses_encrypted_files_and_other_devices(tmp_path):
    index = FlatIndex(8, "ip")
    index.add(_data(10, 8))
    key = bytes(range(32))
    index.save(tmp_path / "sealed.xm", encryption_key=key)
    with pytest.raises(ValueError, match="sealed.xm' is encrypted: an encrypted index file is decrypted in memory"):
        FlatIndex.load(tmp_path / "sealed.xm", mmap=True)
    with pytest.raises(ValueError, match="cannot be memory-mapped"):
        FlatIndex.load(tmp_path / "sealed.xm", mmap=True, encryption_key=key)
    with pytest.raises(ValueError, match="mmap=True maps the file into CPU memory, got device='cuda'"):
        FlatIndex.load(tmp_path / "sealed.xm", "cuda", mmap=True)
    assert len(FlatIndex.load(tmp_path / "sealed.xm", encryption_key=key)) == 10


def test_files_without_stored_block_sums_are_checked_whole(tmp_path):
    """Files from xmodal before block sums were stored carry only the hash: a mapped load checks it at open."""
    index = FlatIndex(8, "ip")
    index.add(_data(3000, 8))
    tensors = {"vectors": index.vectors, "ids": index.ids}
    meta = {key: str(value) for key, value in index._metadata().items()}
    meta["checksum"] = io.checksum(tensors, meta)
    assert meta["checksum"].startswith("blocksum64-blake2b:")
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "old.xm"), metadata=meta)
    old = FlatIndex.load(tmp_path / "old.xm", mmap=True)
    assert old._mapped is None and torch.equal(old.ids, index.ids)
    save_file(tensors, str(tmp_path / "edited.xm"), metadata={**meta, "next_id": "7"})
    with pytest.raises(ValueError, match="edited.xm' is corrupt"):
        FlatIndex.load(tmp_path / "edited.xm", mmap=True)


@pytest.mark.parametrize("chunk_rows", [7, 1000, 10**6])
def test_streamed_writes_give_the_same_file_and_checksum_for_any_chunking(chunk_rows):
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(3001, 7, generator=g), "b": torch.randint(-128, 127, (2100, 100), dtype=torch.int8),
               "c": torch.randn(10, generator=g).bfloat16(), "empty": torch.empty(0, 4)}
    meta = {"format": "x", "n": "1"}
    whole = bytes_io.BytesIO()
    io.write(whole, tensors, meta)
    streamed = {name: io.TensorStream(t.dtype, tuple(t.shape),
                                      lambda t=t: (t[i: i + chunk_rows] for i in range(0, max(len(t), 1), chunk_rows)))
                for name, t in tensors.items()}
    out = bytes_io.BytesIO()
    io.write(out, streamed, meta)
    assert out.getvalue() == whole.getvalue()
    from safetensors.torch import load

    back = load(out.getvalue())
    assert all(torch.equal(back[name], t) for name, t in tensors.items())
    header = int.from_bytes(out.getvalue()[:8], "little")
    assert (8 + header) % 64 == 0  # the data starts aligned: mapped tensors of any dtype are aligned
    stored = json.loads(out.getvalue()[8: 8 + header])["__metadata__"]["checksum"]
    assert stored == io.checksum(tensors, meta, io.SUMS_KIND)


def test_an_ivf_save_streams_the_lists_without_copying_them_all(tmp_path, monkeypatch):
    x = _data(20000)
    index = _ivf(x)
    largest = []
    chunks = inverted_lists.InvertedLists.chunks

    def recording(self, name, rows=1 << 16):
        for chunk in chunks(self, name, rows=1000):
            largest.append(chunk.shape[0])
            yield chunk

    monkeypatch.setattr(inverted_lists.InvertedLists, "chunks", recording)
    index.save(tmp_path / "index.xm")
    biggest_list = int(index._lists.sizes.max())
    assert len(largest) > 10 and max(largest) <= max(1000, biggest_list)
    monkeypatch.undo()
    back = IVFIndex.load(tmp_path / "index.xm")
    assert torch.equal(back.ids, index.ids) and torch.equal(back.vectors, index.vectors)


def test_an_ivf_add_grows_the_lists_once_and_writes_chunks_in_place(monkeypatch):
    """The memory bound of a large add: one buffer of the final size, chunks encoded straight into it (the
    encoded rows are never all held beside it)."""
    from xmodal.index import base

    monkeypatch.setattr(base, "ADD_CHUNK_ROWS", 1000)
    x = _data(12000)
    index = IVFIndex(32, 16, "cosine", codec="int8")
    index.train(x)
    rebuilds = []
    rebuild = inverted_lists.InvertedLists._rebuild
    monkeypatch.setattr(inverted_lists.InvertedLists, "_rebuild",
                        lambda self, capacities, tail: (rebuilds.append(int(capacities.sum())), rebuild(self, capacities, tail)))
    index.add(x)
    assert len(rebuilds) == 1 and rebuilds[0] < 1.15 * 12000 + 16
    assert index._lists.slots <= index._lists.max_slots(12000)
    assert torch.equal(torch.sort(index.ids).values, torch.arange(12000))
    flat = FlatIndex(32, "cosine", codec="int8")
    flat.train(x)
    flat._encoding = index._encoding
    flat.add(x)
    want = flat.search(x[:20], 5)
    got = index.search(x[:20], 5, nprobe=16)
    assert torch.equal(got[1], want[1])
