"""The CPU searches whose threads take work from a shared counter (tiled_topk.h, ivf_scan_cpu.cpp): the same
answers on one thread as on two, on odd sizes, with every thread in use however small the problem."""
import pytest
import torch

import xmodal


@pytest.fixture
def every_thread():
    before = torch.get_num_threads()
    with xmodal.settings.override(cpu_min_thread_us=0):
        yield
    torch.set_num_threads(before)


def on_threads(fn):
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(fn())
    return out


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("q", [1, 5, 37])
def test_flat_searches_same_on_one_and_two_threads(every_thread, q):
    g = torch.Generator().manual_seed(0)
    n, d = 9_001, 40
    x = torch.randn(n, d, generator=g)
    x[4_000:4_050] = x[:50]  # ties across parts
    queries = torch.randn(q, d, generator=g)
    codes = (x * 20).round().clamp(-127, 127).to(torch.int8)
    bits = torch.randint(0, 256, (n, 16), dtype=torch.uint8, generator=g)
    bits[7_000:7_100] = bits[:100]
    qbits = torch.randint(0, 256, (q, 16), dtype=torch.uint8, generator=g)
    for fn in (lambda: xmodal.topk_search(queries, x, 13, "ip"), lambda: xmodal.topk_search(queries, x, 13, "l2"),
               lambda: torch.ops.xmodal.topk_int8(queries, codes, 13),
               lambda: torch.ops.xmodal.topk_hamming(qbits, bits, 13)):
        assert_same(*on_threads(fn))


@pytest.mark.parametrize("q", [1, 16])
def test_later_parts_skip_what_earlier_parts_beat_and_keep_ties(every_thread, q):
    """With 8 parts on 2 threads, a part that starts after others takes only keys at or above their k-th best
    (tiled_topk.h); rows tied with it, in a later part or an earlier one, are answered as on one thread (the
    smaller index first): rows of 5 patterns, so every key is tied thousands of times."""
    from xmodal import reference

    g = torch.Generator().manual_seed(4)
    n = 40_000
    which = torch.randint(0, 5, (n,), generator=g)
    bits = torch.randint(0, 256, (5, 16), dtype=torch.uint8, generator=g)[which]
    codes = torch.randint(-127, 128, (5, 24), dtype=torch.int8, generator=g)[which]
    qbits = torch.randint(0, 256, (q, 16), dtype=torch.uint8, generator=g)
    queries = torch.randn(q, 24, generator=g)
    one, two = on_threads(lambda: torch.ops.xmodal.topk_hamming(qbits, bits, 20))
    assert_same(one, two)
    want = reference.topk_from_scores(reference.hamming(qbits, bits).double(), 20, "l2")
    assert torch.equal(two[1], want[1]) and torch.equal(two[0].double(), want[0])
    assert_same(*on_threads(lambda: torch.ops.xmodal.topk_int8(queries, codes, 20)))


@pytest.mark.parametrize("codes", ["float", "int8", "bits"])
@pytest.mark.parametrize("q", [1, 29])
def test_ivf_scan_same_on_one_and_two_threads(every_thread, codes, q):
    g = torch.Generator().manual_seed(1)
    n, d, nlist, nprobe = 5_003, 32, 37, 7
    offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                         torch.randint(0, n, (nlist - 1,), generator=g).sort().values, torch.tensor([n])])
    if codes == "bits":
        vectors = torch.randint(0, 256, (n, d), dtype=torch.uint8, generator=g)
        queries, metric = torch.randint(0, 256, (q, d), dtype=torch.uint8, generator=g), "hamming"
    else:
        vectors = torch.randn(n, d, generator=g)
        if codes == "int8":
            vectors = (vectors * 20).round().to(torch.int8)
        queries, metric = torch.randn(q, d, generator=g), "ip"
    probes = torch.randint(0, nlist, (q, nprobe), generator=g)
    assert_same(*on_threads(lambda: torch.ops.xmodal.ivf_scan(queries, vectors, offsets, probes, 11, metric)))


def _hamming_search(seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (50_000, 32), dtype=torch.uint8, generator=g)
    queries = torch.randint(0, 256, (3, 32), dtype=torch.uint8, generator=g)
    return torch.ops.xmodal.topk_hamming(queries, bits, 10)


def test_searches_from_several_threads_and_after_a_fork(every_thread):
    """xmodal's pool serves one call at a time (the others run on their own thread); a forked child, which has
    none of the parent's pool threads, searches without waiting for them."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(2)
    want = [_hamming_search(seed) for seed in range(6)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(_hamming_search, range(6)))
    for a, b in zip(want, got):
        assert_same(a, b)
    with multiprocessing.get_context("fork").Pool(1) as children:
        child = children.apply_async(_hamming_search, (0,)).get(timeout=120)
    assert_same(child, want[0])


def test_aten_on_this_thread_holds_aten_alone_and_keeps_xmodal_threads():
    """Index searches run their tensor work around the ops on the calling thread alone (an OpenMP region
    would leave threads spinning on the cores the ops' pool then needs), while the ops keep their threads."""
    import threading

    from xmodal import _C

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, q = torch.randn(3000, 64), torch.randn(7, 64)
        outside = xmodal.topk_search(q, x, 5)
        with _C.AtenOnThisThread():
            assert torch.get_num_threads() == 1 and _C.xmodal_threads() == 2
            with _C.AtenOnThisThread():  # nested: still the outermost count
                assert torch.get_num_threads() == 1 and _C.xmodal_threads() == 2
            assert torch.get_num_threads() == 1
            seen = []  # another thread is not held
            worker = threading.Thread(target=lambda: seen.append((torch.get_num_threads(), _C.xmodal_threads())))
            worker.start()
            worker.join()
            assert seen == [(2, 2)]
            assert_same(xmodal.topk_search(q, x, 5), outside)
        assert torch.get_num_threads() == 2 and _C.xmodal_threads() == 2
        held = _C.AtenOnThisThread()
        with held:
            with pytest.raises(RuntimeError, match="already entered"):
                held.__enter__()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
