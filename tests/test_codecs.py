"""FlatIndex with codecs (int8, binary) and PCA reduction: recall against the exact float index, sizes,
files and bad input."""
import re

import pytest
import torch

import xmodal
from xmodal import FlatIndex


def _near_duplicates(n=6000, d=64, q=60, noise=0.05, seed=0):
    """Rows on a few directions, and queries near some rows: what embeddings of similar items look like."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, d, generator=g)
    x = centres[torch.randint(0, 40, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    queries = x[torch.randint(0, n, (q,), generator=g)] + noise * torch.randn(q, d, generator=g)
    return x, queries


def _recall(got, want):
    return sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(got, want)) / want.numel()


@pytest.mark.parametrize("metric", ["cosine", "cosine_distance", "ip", "l2", "sqeuclidean"])
def test_int8_recall_values_and_size(metric):
    x, queries = _near_duplicates()
    exact = FlatIndex(64, metric)
    exact.add(x)
    want_v, want_i = exact.search(queries, 10)
    index = FlatIndex(64, metric, codec="int8")
    index.add(x)
    v, i = index.search(queries, 10)
    assert _recall(i, want_i) >= 0.95
    # values are the metric against the decoded rows: close to the exact ones, best first
    spread = (want_v.max() - want_v.min()).item()
    assert (v - want_v).abs().max().item() < 0.05 * spread
    assert torch.equal(v, v.sort(dim=1, descending=xmodal.SEARCH_METRICS[metric]).values)
    assert index.vectors.shape == (6000, 64) and index.codec == "int8"
    assert index.nbytes <= 0.3 * exact.nbytes  # 64 + 1 + 4 + 8 bytes a row against 256 + 8


def test_int8_codes_are_residuals_from_learnt_centres():
    """Rows around 40 directions: codes relative to k-means centres step by a fraction of the rows' own range,
    and every decoded row is within half a step of the row in each dimension."""
    x, _ = _near_duplicates(n=20000)
    index = FlatIndex(64, "l2", codec="int8")
    index.add(x)
    codec = index._encoding.codec
    assert codec.centres.shape == (20000 // 256, 64)
    assert bool((codec.scale < 0.5 * (x.amax(0) - x.amin(0)) / 255).all())
    assert bool(((index.vectors - x).abs() <= codec.scale / 2 + 1e-6).all())
    few = FlatIndex(64, "l2", codec="int8")
    few.add(x[:300])  # fewer than 512 training rows: one centre
    assert few._encoding.codec.centres.shape == (1, 64)


def test_kmeans_plus_plus_gives_every_separated_group_a_centre():
    from xmodal.index.kmeans import assign, kmeans

    g = torch.Generator().manual_seed(1)
    centres = 10 * torch.randn(40, 16, generator=g)
    label = torch.cat([torch.zeros(3025, dtype=torch.long), torch.arange(975) % 39 + 1])  # one large group
    x = centres[label] + 0.1 * torch.randn(4000, 16, generator=g)
    # one centroid per group (random seeding puts many in the large group and shares some between small ones)
    pairs = {}
    for init in ("kmeans++", "random"):
        found = assign(x, kmeans(x, 40, metric="l2", init=init), "l2")
        pairs[init] = len(set(zip(found.tolist(), label.tolist())))  # (centroid, group) pairs that occur
    assert pairs["kmeans++"] == 40 and pairs["random"] > 40, pairs
    with pytest.raises(ValueError, match="init must be 'random' or 'kmeans\\+\\+', got 'best'"):
        kmeans(x, 4, metric="l2", init="best")


def test_int8_index_is_a_quarter_of_float32_at_512_dimensions():
    x = torch.randn(3000, 512)
    exact, index = FlatIndex(512, "cosine"), FlatIndex(512, "cosine", codec="int8")
    exact.add(x)
    index.add(x)
    assert index.nbytes <= 0.26 * exact.nbytes


def test_binary_rescoring_finds_near_duplicates():
    x, queries = _near_duplicates(d=128, noise=0.02)
    exact = FlatIndex(128, "cosine")
    exact.add(x)
    _, want = exact.search(queries, 10)
    index = FlatIndex(128, "cosine", codec="binary", rescore=10)
    index.add(x)
    _, got = index.search(queries, 10)
    assert (got[:, 0] == want[:, 0]).float().mean() >= 0.95
    # more rescoring never loses recall here, and rescore=1 still returns k results
    _, more = index.search(queries, 10, rescore=40)
    assert _recall(more, want) >= _recall(got, want) - 0.01
    assert bool((index.search(queries, 10, rescore=1)[1] >= 0).all())
    assert index.codec == "binary"


def test_pca_reduction_with_int8():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, 96, generator=g)
    x = torch.randn(5000, 16, generator=g) @ basis + 0.01 * torch.randn(5000, 96, generator=g)  # rank ~16
    exact = FlatIndex(96, "cosine")
    exact.add(x)
    _, want = exact.search(x[:50], 10)
    index = FlatIndex(96, "cosine", codec="int8", reduce_to=16)
    index.add(x)
    _, got = index.search(x[:50], 10)
    assert _recall(got, want) >= 0.9
    assert index.vectors.shape == (5000, 16) and index.pca.n_components == 16
    assert index.pca.explained_variance_ratio_.sum() > 0.99


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("codec", ["int8", "binary"])
def test_files_from_before_residual_codes_still_load(tmp_path, kind, codec):
    """An int8 file of the earlier layout (no centres: rows decoded as offset + scale * code) loads and
    answers as it did. Written here from a one-centre index, whose centre folds into the offset (an IVF
    index with one list: its codec's centre is the list's)."""
    from xmodal.index import io

    x, queries = _near_duplicates(n=400, d=16)
    cls = FlatIndex if kind == "flat" else xmodal.IVFIndex
    index = cls(16, "cosine", codec=codec) if kind == "flat" else cls(16, nlist=1, metric="cosine", codec=codec)
    if kind == "ivf":
        index.train(x)
    index.add(x)  # fewer than 512 rows: one centre
    index.save(tmp_path / "new.xm")
    tensors, meta = io.read(tmp_path / "new.xm", cls.FORMAT)
    assert tensors["codec.centres"].shape == (1, 16)
    tensors["codec.offset"] = tensors.pop("codec.centres")[0] + tensors["codec.offset"]
    del tensors["groups"], meta["checksum"]
    tensors.pop("list_groups", None)  # (files of that layout had none)
    meta["format"] = cls.OLDER_FORMATS[0]
    io.save(tensors, meta, tmp_path / "old.xm")
    old = cls.load(tmp_path / "old.xm")
    torch.testing.assert_close(old.vectors, index.vectors, rtol=0, atol=1e-6)
    want, got = index.search(queries, 5), old.search(queries, 5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    old.add(x[:3])  # and keeps working: new rows get the one centre
    assert len(old) == 403
    # a file from a newer xmodal is refused, not misread
    meta["format"] = cls.FORMAT.split("/")[0] + "/99"
    io.save(tensors, meta, tmp_path / "newer.xm")
    newer = f"holds an {meta['format']}, written by a newer xmodal: this one reads {', '.join((*cls.OLDER_FORMATS, cls.FORMAT))}"
    with pytest.raises(ValueError, match=re.escape(newer)):
        cls.load(tmp_path / "newer.xm")


@pytest.mark.parametrize("codec,reduce_to", [("int8", None), ("binary", None), ("int8", 12), (None, 12)])
def test_save_load_remove_ids_and_mask(tmp_path, codec, reduce_to):
    x, queries = _near_duplicates(n=2000, d=32)
    index = FlatIndex(32, "cosine", codec=codec, reduce_to=reduce_to)
    index.add(x, ids=torch.arange(2000) * 3)
    assert index.remove([0, 3, 6]) == 3 and len(index) == 1997
    mask = torch.zeros(len(index), dtype=torch.bool)
    mask[::2] = True
    v, i = index.search(queries, 5, mask)
    assert set(i.flatten().tolist()) <= set(index.ids[mask].tolist())
    index.save(tmp_path / "codes.xmodal")
    loaded = FlatIndex.load(tmp_path / "codes.xmodal")
    assert loaded.codec == codec and loaded.reduce_to == reduce_to and len(loaded) == 1997
    lv, li = loaded.search(queries, 5, mask)
    assert torch.equal(li, i) and torch.equal(lv, v)
    assert loaded.add(x[:1]).tolist() == [index._next_id]
    # a damaged file is refused
    data = bytearray((tmp_path / "codes.xmodal").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.xmodal").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt"):
        FlatIndex.load(tmp_path / "bad.xmodal")


def test_train_then_add_and_untrained_errors():
    x, queries = _near_duplicates(n=1000, d=16)
    index = FlatIndex(16, "l2", codec="int8")
    with pytest.raises(RuntimeError, match=r"FlatIndex.search needs a trained index \(codec='int8'"):
        index.search(queries, 3)
    index.train(x[:500])
    assert index.is_trained and len(index) == 0
    index.add(x)
    with pytest.raises(RuntimeError, match="FlatIndex.train must come before add"):
        index.train(x)
    assert len(index) == 1000


def test_bad_input_names_the_argument_and_leaves_the_index_unchanged():
    with pytest.raises(ValueError, match=r"codec 'binary' supports metrics \['cosine', 'cosine_distance'\], got metric 'l2'"):
        FlatIndex(8, "l2", codec="binary")
    with pytest.raises(ValueError, match=r"codec 'int8' supports metrics .* got metric 'kl'"):
        FlatIndex(8, "kl", codec="int8")
    with pytest.raises(ValueError, match=r"codec must be None, 'int8' or 'binary', got 'pq'"):
        FlatIndex(8, codec="pq")
    with pytest.raises(ValueError, match=r"reduce_to must be at most dim = 8, got 9"):
        FlatIndex(8, reduce_to=9)
    with pytest.raises(ValueError, match=r"rescore must be a positive int, got 0"):
        FlatIndex(8, codec="binary", rescore=0)
    x, queries = _near_duplicates(n=300, d=8)
    index = FlatIndex(8, "cosine", codec="binary")
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"vectors must be finite, found NaN or inf in row 7"):
        index.add(bad)
    assert len(index) == 0 and not index.is_trained
    index.add(x)
    with pytest.raises(ValueError, match=r"vectors must be finite, found NaN or inf in row 0"):
        index.add(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match="vectors must have dimension 8, got 9"):
        index.add(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"rescore must be a positive int, got 0"):
        index.search(queries, 3, rescore=0)
    with pytest.raises(ValueError, match=r"queries must be finite"):
        index.search(torch.full((1, 8), float("nan")), 3)
    with pytest.raises(TypeError, match="vectors must hold floating-point values"):
        index.add(torch.ones(2, 8, dtype=torch.int64))
    assert len(index) == 300


@pytest.mark.parametrize("codec,metric,reduce_to", [("int8", "cosine", None), ("int8", "l2", None),
                                                    ("binary", "cosine", None), ("int8", "ip", 24)])
def test_ivf_with_codecs_matches_the_flat_codec_when_every_list_is_probed(tmp_path, codec, metric, reduce_to):
    x, queries = _near_duplicates(n=4000, d=32)
    exact = xmodal.FlatIndex(32, metric)
    exact.add(x)
    ev, ei = exact.search(queries, 10)
    flat = xmodal.FlatIndex(32, metric, codec=codec, reduce_to=reduce_to)
    flat.train(x)
    flat.add(x)
    ivf = xmodal.IVFIndex(32, 16, metric, nprobe=4, codec=codec, reduce_to=reduce_to)
    with pytest.raises(RuntimeError, match="IVFIndex.add needs a trained index"):
        ivf.add(x)
    ivf.train(x)
    ivf.add(x)
    assert ivf.codec == codec and ivf.is_trained and len(ivf) == 4000
    fv, fi = flat.search(queries, 10)
    v, i = ivf.search(queries, 10, nprobe=16)
    # the same PCA, a codec whose centres are the lists' (the flat one learns its own), every list probed: as
    # close to the exact answers as the flat codec
    assert _recall(i, ei) >= _recall(fi, ei) - 0.02
    assert (v - ev).abs().max() <= 1.5 * (fv - ev).abs().max() + 1e-3
    # fewer lists: still most of them on clustered data
    assert _recall(ivf.search(queries, 10)[1], fi) >= 0.8
    ivf.remove(ivf.ids[:100])
    mask = torch.rand(len(ivf), generator=torch.Generator().manual_seed(1)) < 0.5
    mv, mi = ivf.search(queries, 10, mask)
    assert set(mi.flatten().tolist()) - {-1} <= set(ivf.ids[mask].tolist())
    ivf.save(tmp_path / "ivf.xmodal")
    loaded = xmodal.IVFIndex.load(tmp_path / "ivf.xmodal")
    lv, li = loaded.search(queries, 10, mask)
    assert torch.equal(li, mi) and torch.equal(lv, mv)
    assert loaded.nbytes > 0 and loaded.codec == codec


def test_ivf_codec_storage_is_compressed():
    x = torch.randn(4000, 256)
    plain, int8 = xmodal.IVFIndex(256, 8), xmodal.IVFIndex(256, 8, codec="int8")
    for index in (plain, int8):
        index.train(x)
        index.add(x)
    assert int8._lists.nbytes <= 0.3 * plain._lists.nbytes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("codec", ["int8", "binary"])
def test_codecs_on_cuda_match_the_cpu(codec):
    """On a GPU the ops run their plain-PyTorch kernels: the same answers as the CPU kernels."""
    x, queries = _near_duplicates(n=3000, d=64)
    for kind in ("flat", "ivf"):
        answers = []
        for device in ("cpu", "cuda"):
            index = FlatIndex(64, "cosine", codec=codec, device=device) if kind == "flat" else \
                xmodal.IVFIndex(64, 8, "cosine", codec=codec, nprobe=3, device=device)
            index.train(x)
            index.add(x)
            answers.append(index.search(queries.to(device), 10))
        (cv, ci), (gv, gi) = answers
        assert gi.device.type == "cuda"
        assert (gi.cpu() == ci).float().mean() > 0.97
        torch.testing.assert_close(gv.cpu(), cv, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("nlist", [8, 300])
def test_ivf_codec_centres_come_from_the_lists(tmp_path, nlist):
    """An IVF index's int8 codec takes its centres from the lists (the centroids, or a k-means of them past 256
    lists): every row's centre is its list's, so adding needs no second assignment; files keep the mapping,
    and files without it (older) still add by nearest centre."""
    from xmodal.index import io

    x, queries = _near_duplicates(n=6000, d=16)
    ivf = xmodal.IVFIndex(16, nlist, "l2", codec="int8")
    ivf.train(x)
    centres = ivf._encoding.codec.centres
    assert centres.shape[0] == min(nlist, 256) and ivf.list_groups.shape == (nlist,)
    if nlist <= 256:
        assert torch.equal(centres, ivf.centroids)
    ivf.add(x)
    lists = torch.repeat_interleave(torch.arange(nlist), ivf._lists.sizes)
    assert torch.equal(ivf._lists.rows()["groups"], ivf.list_groups[lists])
    ivf.save(tmp_path / "a.xm")
    loaded = xmodal.IVFIndex.load(tmp_path / "a.xm")
    assert torch.equal(loaded.list_groups, ivf.list_groups)
    assert torch.equal(loaded.search(queries, 5)[1], ivf.search(queries, 5)[1])
    tensors, meta = io.read(tmp_path / "a.xm", xmodal.IVFIndex.FORMAT)
    del meta["checksum"]
    older = dict(tensors)
    del older["list_groups"]
    io.save(older, meta, tmp_path / "older.xm")
    old = xmodal.IVFIndex.load(tmp_path / "older.xm")
    assert old.list_groups is None
    new = old.add(x[:50])
    at = {i: p for p, i in enumerate(old.ids.tolist())}
    stored = old._lists.rows()["groups"][[at[i] for i in new.tolist()]]
    assert torch.equal(stored, old._encoding.codec._groups(x[:50]))  # the nearest centre
    if nlist < 256:
        tensors["list_groups"] = torch.full((nlist,), nlist, dtype=torch.uint8)  # a centre the codec lacks
        io.save(tensors, meta, tmp_path / "bad.xm")
        with pytest.raises(ValueError, match="tensor shapes do not match"):
            xmodal.IVFIndex.load(tmp_path / "bad.xm")
