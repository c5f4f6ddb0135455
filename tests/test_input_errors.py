"""topk_search's argument types: NumPy arrays work as the indexes take them; anything else is one clear
TypeError naming the argument and what was given (not a multi-line dispatcher error)."""
import numpy as np
import pytest
import torch

import xmodal


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)


def test_numpy_in_numpy_out():
    queries, database = _inputs()
    want_v, want_i = xmodal.topk_search(queries, database, 4, "l2")
    for q, x in [(queries.numpy(), database.numpy()), (queries.numpy(), database)]:
        values, indices = xmodal.topk_search(q, x, 4, "l2")
        assert isinstance(values, np.ndarray) and isinstance(indices, np.ndarray) and indices.dtype == np.int64
        np.testing.assert_array_equal(indices, want_i.numpy())
        np.testing.assert_allclose(values, want_v.numpy(), rtol=1e-6)
    values, indices = xmodal.topk_search(queries[0].numpy(), database.numpy(), np.int64(4), "l2")  # a NumPy k, 1-D
    assert values.shape == (4,) and np.array_equal(indices, want_i[0].numpy())
    mask = np.arange(20) % 2 == 0
    _, indices = xmodal.topk_search(queries.numpy(), database.numpy(), 4, "l2", mask=mask)
    assert isinstance(indices, np.ndarray) and (indices % 2 == 0).all()
    _, indices = xmodal.topk_search(queries, database.numpy(), 4, "l2", mask=mask)  # the queries' type decides
    assert isinstance(indices, torch.Tensor) and (indices % 2 == 0).all()


@pytest.mark.parametrize("call, error, message", [
    (lambda q, x: xmodal.topk_search(q.tolist(), x, 2), TypeError,
     r"^queries must be a torch tensor, NumPy array or CuPy array, got list$"),
    (lambda q, x: xmodal.topk_search(q, tuple(x.tolist()), 2), TypeError,
     r"^database must be a torch tensor, NumPy array or CuPy array, got tuple$"),
    (lambda q, x: xmodal.topk_search(q, x, 2, mask=[True] * 20), TypeError,
     r"^mask must be a torch tensor, NumPy array or CuPy array, got list$"),
    (lambda q, x: xmodal.topk_search(q, x, 2.5), TypeError, r"^k must be an int, got float \(2.5\)$"),
    (lambda q, x: xmodal.topk_search(q, x, 2.0), TypeError, r"^k must be an int, got float \(2.0\)$"),
    (lambda q, x: xmodal.topk_search(q, x, True), TypeError, r"^k must be an int, got bool \(True\)$"),
    (lambda q, x: xmodal.topk_search(q, x, "3"), TypeError, r"^k must be an int, got str \('3'\)$"),
    (lambda q, x: xmodal.topk_search(q, x, torch.tensor(3)), TypeError, r"^k must be an int, got Tensor"),
    (lambda q, x: xmodal.topk_search(q, x, np.float32(3)), TypeError, r"^k must be an int, got float32"),
    (lambda q, x: xmodal.topk_search(q, x, 2, None), TypeError, r"^metric must be a str, got NoneType \(None\)$"),
    (lambda q, x: xmodal.topk_search(q, x, 2, tf32=1), TypeError, r"^tf32 must be a bool, got int \(1\)$"),
])
def test_wrong_argument_types_raise_one_clear_type_error(call, error, message):
    queries, database = _inputs()
    with pytest.raises(error, match=message):
        call(queries, database)


def test_values_are_still_the_ops_to_check():
    queries, database = _inputs()
    with pytest.raises(RuntimeError, match=r"k must be positive, got 0"):
        xmodal.topk_search(queries, database, np.int32(0))
    with pytest.raises(RuntimeError, match=r"metric must be one of .*got 'dot'"):
        xmodal.topk_search(queries.numpy(), database.numpy(), 2, "dot")
    with pytest.raises(RuntimeError, match=r"queries must be float32, float64, float16 or bfloat16, got Long"):
        xmodal.topk_search(np.ones((2, 8), dtype=np.int64), np.ones((20, 8), dtype=np.int64), 2)


def test_the_drop_in_matches_torch_topk_with_ip_and_returns_its_named_tuple():
    """``topk_search(q, X, k, "ip")`` is ``torch.topk(q @ X.T, k)``; the result has .values and .indices."""
    queries, database = torch.randn(16, 32), torch.randn(500, 32)
    want = torch.topk(queries @ database.T, 5)
    got = xmodal.topk_search(queries, database, 5, "ip")
    assert type(got) is type(want)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values)
    values, indices = got  # still unpacks as a pair
    assert values is got.values and indices is got.indices
    got = xmodal.topk_search(queries.numpy(), database.numpy(), 5, "ip")
    assert isinstance(got.values, np.ndarray) and np.array_equal(got.indices, want.indices.numpy())
    compiled = torch.compile(lambda q, x: xmodal.topk_search(q, x, 5, "ip").indices, fullgraph=True)
    assert torch.equal(compiled(queries, database), want.indices)


def test_the_similarity_measures_have_their_own_name():
    """xmodal.SEARCH_METRICS (name -> larger is better) is not the evaluation module xmodal.metrics; the old
    name still works for one release, with a DeprecationWarning."""
    assert xmodal.SEARCH_METRICS["ip"] is True and xmodal.SEARCH_METRICS["l2"] is False
    with pytest.warns(DeprecationWarning, match=r"xmodal.METRICS is now xmodal.SEARCH_METRICS"):
        assert xmodal.METRICS is xmodal.SEARCH_METRICS
    with pytest.warns(DeprecationWarning, match=r"xmodal.ops.METRICS is now xmodal.SEARCH_METRICS"):
        assert xmodal.ops.METRICS is xmodal.SEARCH_METRICS
