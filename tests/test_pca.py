"""xmodal PCA against a plain float64 SVD of the centred data, plus its error messages and state round trip."""
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmodal import pca as pca_module
from xmodal.pca import PCA

# tolerance on values of unit scale for what transform / inverse_transform return in each dtype
DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_data(n, d, seed=0, offset=0.0, dtype=torch.float64, decay=0.8):
    """Rows with well-separated variances (so components are well defined), rotated, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = decay ** torch.arange(d, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T
    return (x + offset + torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)


def reference(x):
    """(mean, components, explained variance, ratio) from the SVD of the centred data, in float64."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    sq = s.square()
    return mean, vh, sq / (x.shape[0] - 1), sq / sq.sum()


def align(comps, ref):
    """ref's rows with their signs flipped to match comps (eigenvectors are defined up to sign)."""
    signs = torch.sign((comps * ref).sum(1, keepdim=True))
    return ref * signs


def assert_matches_reference(p, x, k, rtol):
    mean, vh, ev, ratio = reference(x)
    torch.testing.assert_close(p.mean_, mean, rtol=rtol, atol=rtol * mean.abs().max().item())
    torch.testing.assert_close(p.explained_variance_, ev[:k], rtol=rtol, atol=rtol * ev[0].item())
    torch.testing.assert_close(p.explained_variance_ratio_, ratio[:k], rtol=rtol, atol=rtol)
    torch.testing.assert_close(p.components_, align(p.components_, vh[:k]), rtol=0, atol=rtol * 10)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_matches_svd_reference(dtype, rtol, k):
    x = make_data(500, 16, dtype=dtype)
    p = PCA(k).fit(x)
    assert p.fit(x) is p
    assert p.n_features_in_ == 16 and p.n_samples_seen_ == 500 and p.n_components_ == k
    assert p.components_.shape == (k, 16) and p.explained_variance_.shape == (k,)
    assert_matches_reference(p, x, k, rtol)


def test_large_offset_keeps_float32_precision():
    # |mean| = 1e4 against unit spread: a float32 x^T x without centring would lose every digit of the covariance
    x = make_data(3000, 8, offset=1e4, dtype=torch.float32, decay=0.7)
    assert_matches_reference(PCA(8).fit(x), x, 8, rtol=1e-4)


def test_sign_convention_largest_entry_positive():
    p = PCA(6).fit(make_data(200, 6, seed=3))
    c = p.components_
    assert (c.gather(1, c.abs().argmax(1, keepdim=True)) > 0).all()
    torch.testing.assert_close(c @ c.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_chunked_fit_equals_one_shot(dtype, atol):
    x = make_data(1000, 12, seed=1, offset=5.0, dtype=dtype)
    one = PCA(7).fit(x)
    pieces = [x[:1], x[1:300], x[300:300], x[300:999].numpy(), x[999:]]
    for chunks in (pieces, iter(pieces), (x[i:i + 64] for i in range(0, 1000, 64))):
        p = PCA(7).fit(chunks)
        assert p.n_samples_seen_ == 1000
        for name in ("mean_", "components_", "explained_variance_", "explained_variance_ratio_"):
            torch.testing.assert_close(getattr(p, name), getattr(one, name), rtol=atol, atol=atol, msg=name)


def test_internal_steps_equal_one_step(monkeypatch):
    # a single big tensor is processed in steps of rows; force small steps to cover the step combination
    x = make_data(2000, 10, seed=2, offset=3.0)
    one = PCA(10).fit(x)
    monkeypatch.setattr(pca_module, "_MAX_STEP_ROWS", 37)
    stepped = PCA(10).fit(x)
    torch.testing.assert_close(stepped.components_, one.components_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stepped.explained_variance_, one.explained_variance_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_full_rank_round_trip_is_identity(dtype, whiten):
    x = make_data(400, 16, seed=4, decay=0.9).to(dtype)
    p = PCA(16, whiten=whiten).fit(x)
    z = p.transform(x)
    back = p.inverse_transform(z)
    assert z.dtype == dtype and back.dtype == dtype and z.shape == (400, 16) and back.shape == x.shape
    tol = DTYPE_TOL[dtype] * (20 if whiten else 4)  # whitened z carries relative rounding of the small components
    torch.testing.assert_close(back.double(), x.double(), rtol=tol, atol=tol * x.double().abs().max().item())


def test_transform_matches_reference_projection():
    x = make_data(300, 10, seed=5, offset=2.0)
    mean, vh, ev, _ = reference(x)
    p = PCA(4).fit(x)
    expected = (x - mean) @ align(p.components_, vh[:4]).T
    torch.testing.assert_close(p.transform(x), expected, rtol=1e-9, atol=1e-9)
    pw = PCA(4, whiten=True).fit(x)
    torch.testing.assert_close(pw.transform(x), expected / ev[:4].sqrt(), rtol=1e-9, atol=1e-9)
    # a reduced round trip is the projection onto the leading components
    v = align(p.components_, vh[:4])
    torch.testing.assert_close(p.inverse_transform(p.transform(x)), (x - mean) @ v.T @ v + mean, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_whiten_gives_unit_variance_on_training_data(dtype, tol):
    x = make_data(800, 12, seed=6, offset=1.0, dtype=dtype, decay=0.6)
    z = PCA(8, whiten=True).fit_transform(x).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(8, dtype=torch.float64), rtol=0, atol=tol * 10)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(8, dtype=torch.float64), rtol=0, atol=tol * 10)


def test_whiten_zero_variance_stays_finite():
    x = make_data(100, 6, seed=7)
    x[:, 2] = 4.0  # one direction with no variance at all
    p = PCA(6, whiten=True).fit(x)
    assert p.explained_variance_[-1] < 1e-20
    assert torch.isfinite(p.transform(x)).all() and torch.isfinite(p.inverse_transform(p.transform(x))).all()
    const = PCA(3, whiten=True).fit(torch.full((10, 3), 2.5))
    assert torch.equal(const.explained_variance_ratio_, torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(const.transform(torch.full((10, 3), 2.5))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype):
    x = make_data(600, 16, seed=8, offset=1.0, decay=0.85).to(dtype)
    p = PCA(6).fit(x)
    # the fit sees the 16-bit values exactly (converted to float32), so it matches the reference on them closely
    assert_matches_reference(p, x, 6, rtol=1e-4)
    z = p.transform(x)
    assert z.dtype == dtype
    mean, vh, _, _ = reference(x)
    expected = (x.double() - mean) @ align(p.components_, vh[:6]).T
    tol = DTYPE_TOL[dtype]
    torch.testing.assert_close(z.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_numpy_and_1d_inputs():
    x = make_data(120, 9, seed=9, dtype=torch.float32)
    p = PCA(3).fit(x.numpy())
    q = PCA(3).fit(x)
    torch.testing.assert_close(p.components_, q.components_, rtol=0, atol=0)
    z = p.transform(x)
    torch.testing.assert_close(p.transform(x.numpy()), z, rtol=0, atol=0)
    assert p.transform(x[5]).shape == (3,)
    torch.testing.assert_close(p.transform(x[5]), z[5], rtol=1e-6, atol=1e-6)
    assert p.inverse_transform(z[5]).shape == (9,)
    torch.testing.assert_close(p.inverse_transform(z[5]), p.inverse_transform(z)[5], rtol=1e-6, atol=1e-6)
    # batched leading dimensions
    assert p.transform(x.reshape(4, 30, 9)).shape == (4, 30, 3)
    # read-only arrays (memory maps) are accepted without warnings
    ro = x.numpy().copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PCA(3).fit(ro)


def test_transform_is_differentiable():
    x = make_data(50, 5, seed=10, dtype=torch.float32)
    p = PCA(2).fit(x)
    xr = x.clone().requires_grad_(True)
    p.transform(xr).sum().backward()
    torch.testing.assert_close(xr.grad, p.components_.float().sum(0).expand(50, 5))


@pytest.mark.parametrize("whiten", [False, True])
def test_state_dict_round_trip(tmp_path, whiten):
    from safetensors.torch import load_file, save_file

    x = make_data(300, 12, seed=11, offset=2.0, dtype=torch.float32)
    p = PCA(5, whiten=whiten).fit(x)
    state = p.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert set(tensors) == {"mean", "components", "explained_variance", "explained_variance_ratio"}
    assert all(type(v) in (int, bool) for v in meta.values())
    # what an index does: tensors into safetensors, metadata as JSON
    save_file(tensors, str(tmp_path / "pca.safetensors"), metadata={"pca": json.dumps(meta)})
    loaded = {**load_file(str(tmp_path / "pca.safetensors")), **meta}
    for q in (PCA.from_state_dict(loaded), PCA(5, whiten=whiten).load_state_dict(state)):
        assert q.n_samples_seen_ == 300 and q.n_features_in_ == 12 and q.whiten == whiten
        assert torch.equal(q.transform(x), p.transform(x))
        assert torch.equal(q.inverse_transform(p.transform(x)), p.inverse_transform(p.transform(x)))
        assert torch.equal(q.explained_variance_ratio_, p.explained_variance_ratio_)
    # the state is a copy: changing it does not change the PCA
    state["mean"].add_(1.0)
    assert not torch.equal(state["mean"], p.mean_)


def test_state_dict_errors():
    p = PCA(3).fit(make_data(40, 6))
    state = p.state_dict()
    with pytest.raises(ValueError, match=r"missing \['components'\]"):
        PCA.from_state_dict({k: v for k, v in state.items() if k != "components"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        PCA.from_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match=r"state_dict\['components'\] must be a float tensor of shape \(3, 6\)"):
        PCA.from_state_dict({**state, "components": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=r"state_dict\['n_samples_seen'\] must be an int; got 'x'"):
        PCA.from_state_dict({**state, "n_samples_seen": "x"})
    with pytest.raises(ValueError, match="state_dict has n_components=3, whiten=False; this PCA has n_components=4"):
        PCA(4).load_state_dict(state)
    with pytest.raises(RuntimeError, match="call fit before state_dict"):
        PCA(3).state_dict()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4", None])
def test_bad_n_components(bad):
    with pytest.raises(ValueError, match=f"n_components must be a positive int; got {bad!r}"):
        PCA(bad)


def test_bad_whiten():
    with pytest.raises(ValueError, match="whiten must be a bool; got 'yes'"):
        PCA(2, whiten="yes")


def test_n_components_exceeds_dimension():
    with pytest.raises(ValueError, match="n_components=600 exceeds the data's dimension 512"):
        PCA(600).fit(torch.randn(4, 512))


@pytest.mark.parametrize("x,rows", [(torch.randn(1, 5), "1 row;"), (torch.randn(0, 5), "0 rows;"),
                                    ([torch.randn(1, 5), torch.randn(0, 5)], "1 row;"), ([], "0 rows;")])
def test_fewer_than_two_rows(x, rows):
    with pytest.raises(ValueError, match=f"x has {rows} PCA needs at least 2"):
        PCA(2).fit(x)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(value):
    x = torch.randn(50, 4)
    x[17, 2] = value
    with pytest.raises(ValueError, match=r"^x contains NaN or inf \(first at row 17\)"):
        PCA(2).fit(x)
    with pytest.raises(ValueError, match=r"^x chunk 1 contains NaN or inf \(first at row 7\)"):
        PCA(2).fit([x[:10], x[10:]])
    with pytest.raises(ValueError, match=r"^x contains NaN or inf"):
        PCA(2).fit(x.to(torch.float16))


def test_not_fitted():
    p = PCA(2)
    with pytest.raises(RuntimeError, match="not fitted yet; call fit before transform"):
        p.transform(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="not fitted yet; call fit before inverse_transform"):
        p.inverse_transform(torch.randn(3, 2))


def test_dimension_mismatch():
    p = PCA(3).fit(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"x has dimension 6 \(shape \(5, 6\)\); this PCA was fitted on dimension 8"):
        p.transform(torch.randn(5, 6))
    with pytest.raises(ValueError, match="x has a scalar; this PCA was fitted on dimension 8"):
        p.transform(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"z has 4 components \(shape \(5, 4\)\); this PCA has n_components=3"):
        p.inverse_transform(torch.randn(5, 4))
    with pytest.raises(ValueError, match="x chunk 1 has dimension 7, but earlier rows of x had 8"):
        PCA(3).fit([torch.randn(5, 8), torch.randn(5, 7)])
    with pytest.raises(ValueError, match=r"x must be 2-D \[N, D\]; got shape \(8,\)"):
        PCA(3).fit(torch.randn(8))


def test_non_float_inputs():
    with pytest.raises(TypeError, match="x must be floating point .* got torch.int64"):
        PCA(2).fit(torch.arange(12).reshape(4, 3))
    with pytest.raises(TypeError, match="x must be floating point .* got NumPy dtype int32"):
        PCA(2).fit(np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="x chunk 0 must be a torch tensor or NumPy array; got list"):
        PCA(2).fit([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="x must be a torch tensor, a NumPy array or an iterable of them; got int"):
        PCA(2).fit(5)
    p = PCA(2).fit(torch.randn(10, 3))
    with pytest.raises(TypeError, match="x must be floating point .* got torch.bool"):
        p.transform(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="z must be floating point .* got torch.int32"):
        p.inverse_transform(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="fit_transform needs x as one torch tensor or NumPy array; got list"):
        PCA(2).fit_transform([torch.randn(10, 3)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 60), d=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), offset=st.sampled_from([0.0, 10.0]))
def test_properties_random_shapes(n, d, data, seed, scale, offset):
    k = data.draw(st.integers(1, d), label="k")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + offset)
    p = PCA(k).fit(x)
    c, ev = p.components_, p.explained_variance_
    _, _, ref_ev, ref_ratio = reference(x)
    ref_ev = torch.cat([ref_ev, ref_ev.new_zeros(d)])[:k]  # fewer rows than dimensions: the rest are zeros
    ref_ratio = torch.cat([ref_ratio, ref_ratio.new_zeros(d)])[:k]
    top = ref_ev[0].item()
    # eigenvalues are well conditioned even where the eigenvectors are not (equal variances)
    torch.testing.assert_close(ev, ref_ev, rtol=1e-8, atol=1e-10 * top)
    torch.testing.assert_close(p.explained_variance_ratio_, ref_ratio, rtol=1e-8, atol=1e-10)
    assert (ev[:-1] >= ev[1:]).all() and (ev >= 0).all()
    torch.testing.assert_close(c @ c.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (c.gather(1, c.abs().argmax(1, keepdim=True)) > 0).all()
    # each component is an eigenvector of the covariance with its variance
    cov = torch.cov(x.T).reshape(d, d)
    torch.testing.assert_close(c @ cov, ev[:, None] * c, rtol=0, atol=1e-9 * max(top, 1e-300))
    # the projections of the training data are uncorrelated with those variances
    z = p.transform(x)
    torch.testing.assert_close(torch.cov(z.T).reshape(k, k), torch.diag(ev), rtol=0, atol=1e-9 * max(top, 1e-300))


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")
def test_matches_sklearn():
    from sklearn.decomposition import PCA as SkPCA

    x = make_data(400, 20, seed=12, offset=1.0)
    ours = PCA(7).fit(x)
    sk = SkPCA(n_components=7, svd_solver="full").fit(x.numpy())
    np.testing.assert_allclose(ours.explained_variance_ratio_.numpy(), sk.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(ours.explained_variance_.numpy(), sk.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(ours.mean_.numpy(), sk.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.abs(ours.components_.numpy()), np.abs(sk.components_), atol=1e-8)


def test_devices(device):
    x = make_data(300, 8, seed=13, dtype=torch.float32).to(device)
    p = PCA(4, whiten=True).fit(x)
    assert p.device.type == device and p.components_.device.type == device
    cpu = PCA(4, whiten=True).fit(x.cpu())
    torch.testing.assert_close(p.components_.cpu(), cpu.components_, rtol=1e-5, atol=1e-5)
    z = p.transform(x)
    assert z.device.type == device
    torch.testing.assert_close(z.cpu(), cpu.transform(x.cpu()), rtol=1e-4, atol=1e-4)
    # parameters elsewhere than the input are copied to the input's device on first use
    torch.testing.assert_close(cpu.transform(x).cpu(), cpu.transform(x.cpu()), rtol=1e-5, atol=1e-5)
    assert p.to("cpu").components_.device.type == "cpu"
    torch.testing.assert_close(p.transform(x.cpu()), cpu.transform(x.cpu()), rtol=1e-4, atol=1e-4)
    assert PCA.from_state_dict(p.to(device).state_dict(), device="cpu").device.type == "cpu"
    # chunks on other devices are moved to the first chunk's device
    mixed = PCA(4, whiten=True).fit([x[:100], x[100:].cpu()])
    assert mixed.device.type == device
    torch.testing.assert_close(mixed.components_.cpu(), cpu.components_, rtol=1e-5, atol=1e-5)
