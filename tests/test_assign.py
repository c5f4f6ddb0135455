"""The k-means / IVF assignment through a bf16 shortlist (xmodal.index.kmeans.assign): the float32 search's
answer, whatever the rows; and the candidate_dots op it rescores the shortlist with, against plain PyTorch."""
import pytest
import torch

from xmodal.index.kmeans import assign


def unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered(n, d, seed, groups=20):
    g = torch.Generator().manual_seed(seed)
    centres = unit(groups, d, seed + 1)
    return torch.nn.functional.normalize(centres[torch.randint(0, groups, (n,), generator=g)]
                                         + 0.1 * torch.randn(n, d, generator=g), dim=1)


def assert_nearest(x, centroids, labels):
    """Each label is a nearest centroid (by float64 inner product, up to float32 rounding)."""
    scores = x.double() @ centroids.double().T
    got = scores.gather(1, labels[:, None])[:, 0]
    assert (scores.max(1).values - got).max() <= 1e-6


@pytest.mark.parametrize("rows, centroids", [
    (lambda: clustered(6000, 64, 0), lambda: unit(600, 64, 5)),         # spread centroids: most rows sure
    (lambda: clustered(6000, 64, 0), lambda: clustered(600, 64, 7)),    # centroids in clusters: near ties
    (lambda: unit(6000, 64, 2), lambda: clustered(600, 64, 9, 3)),      # most rows too close to call
    (lambda: unit(300, 48, 3), lambda: unit(6, 48, 4)),                 # fewer centroids than the shortlist
])
def test_the_shortlist_answers_as_the_float32_search(rows, centroids):
    x, c = rows(), centroids()
    plain = assign(x, c, "ip", shortlist=False)
    short = assign(x, c, "ip", shortlist=True)
    assert_nearest(x, c, short)
    assert (plain == short).float().mean() > 0.999
    assert assign(x, c, "ip").tolist() in (plain.tolist(), short.tolist())  # (the automatic choice)


def test_the_shortlist_takes_inner_products_only():
    with pytest.raises(ValueError, match="metric 'ip'"):
        assign(unit(10, 8, 0), unit(4, 8, 1), "l2", shortlist=True)
    # the automatic choice keeps l2, bf16 and small centroid sets on the float32 search
    x, c = unit(100, 8, 0), unit(600, 8, 1)
    assert torch.equal(assign(x, c, "l2"), assign(x, c, "l2", shortlist=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidate_dots_matches_plain_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    q, rows = torch.randn(37, 20, generator=g), torch.randn(500, 20, generator=g).to(dtype)
    cand = torch.randint(-1, 500, (37, 9), generator=g)
    want = torch.where(cand >= 0, (q[:, None, :] * rows.float()[cand.clamp(min=0)]).sum(-1),
                       torch.tensor(-float("inf")))
    got = torch.ops.xmodal.candidate_dots(q, rows, cand)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4)
    strided = torch.ops.xmodal.candidate_dots(q.T.contiguous().T, rows, cand.T.contiguous().T)  # non-contiguous
    assert torch.equal(strided, got)
    assert torch.ops.xmodal.candidate_dots(q[:0], rows, cand[:0]).shape == (0, 9)
    assert torch.ops.xmodal.candidate_dots(q, rows, cand[:, :0]).shape == (37, 0)
    torch.library.opcheck(torch.ops.xmodal.candidate_dots.default, (q, rows, cand))
    # the plain-PyTorch kernel other devices run: the same values
    from xmodal._fallback_kernels import candidate_dots

    assert torch.allclose(candidate_dots(q, rows, cand), got, atol=1e-4)


def test_candidate_dots_names_bad_arguments():
    q, rows, cand = torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(IndexError, match=r"candidates must be rows in \[0, 10\) or -1, got 10 at \[1, 0\]"):
        torch.ops.xmodal.candidate_dots(q, rows, torch.tensor([[0, 1], [10, 2], [3, 4]]))
    with pytest.raises(RuntimeError, match="rows must have D = 8"):
        torch.ops.xmodal.candidate_dots(q, torch.randn(10, 7), cand)
    with pytest.raises(RuntimeError, match="queries must be float32"):
        torch.ops.xmodal.candidate_dots(q.double(), rows, cand)
    with pytest.raises(RuntimeError, match="candidates must be an int64"):
        torch.ops.xmodal.candidate_dots(q, rows, cand.int())
    with pytest.raises(RuntimeError, match="with Q = 3 rows"):
        torch.ops.xmodal.candidate_dots(q, rows, cand[:2])
