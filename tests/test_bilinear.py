"""xmodal.bilinear / xmodal.nn.Bilinear against the float64 reference and torch.nn.Bilinear."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xmodal
from xmodal import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# error allowed relative to the sum of |terms| (sum_ij |x_i W_oij y_j|): 16-bit outputs are rounded to 16 bits,
# and on the GPU the outer-product tiles of 16-bit inputs are rounded too
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(shape1, shape2, out_features, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape1, generator=g, dtype=torch.float64)
    y = torch.randn(*shape2, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, shape1[-1], shape2[-1], generator=g, dtype=torch.float64) / shape1[-1]
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(y), cast(w), cast(b)


def assert_bilinear_close(out, x, y, w, b):
    d = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    ref = reference.bilinear(d(x), d(y), d(w), d(b))
    scale = reference.bilinear(d(x).abs(), d(y).abs(), d(w).abs(), None if b is None else d(b).abs())
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    err = (out.detach().cpu().double() - ref).abs()
    tol = REL_TOL[x.dtype] * scale + 1e-30
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, allowed {tol.min().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape1,shape2,out_features",
    [
        ((5, 7), (5, 6), 4),
        ((2, 3, 7), (2, 3, 6), 4),  # leading batch dims
        ((7,), (6,), 3),  # no batch dim
        ((1, 1), (1, 1), 1),
        ((600, 40), (600, 64), 7),  # several batch tiles and several input1 blocks
        ((33, 300), (33, 300), 9),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, dtype, shape1, shape2, out_features, bias):
    x, y, w, b = make(shape1, shape2, out_features, dtype, device, bias)
    assert_bilinear_close(xmodal.bilinear(x, y, w, b), x, y, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch_bilinear(device, dtype):
    x, y, w, b = make((9, 12), (9, 10), 5, dtype, device)
    torch.testing.assert_close(xmodal.bilinear(x, y, w, b), F.bilinear(x, y, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape1,shape2,out_features", [((6, 5), (6, 4), 3), ((600, 40), (600, 64), 7), ((2, 3, 9), (2, 3, 8), 4)])
def test_gradients_match_reference(device, dtype, shape1, shape2, out_features):
    x, y, w, b = make(shape1, shape2, out_features, dtype, device)
    params = [t.requires_grad_() for t in (x, y, w, b)]
    grad = torch.randn(*shape1[:-1], out_features, dtype=torch.float64).to(dtype).to(device)
    ours = torch.autograd.grad(xmodal.bilinear(*params), params, grad)
    ref_params = [t.detach().cpu().double().requires_grad_() for t in params]
    refs = torch.autograd.grad(reference.bilinear(*ref_params), ref_params, grad.cpu().double())
    # each gradient entry is a sum of products of three inputs' entries; judge errors against the sum of
    # their magnitudes, obtained the same way from absolute values
    abs_params = [t.detach().abs().requires_grad_() for t in ref_params]
    scales = torch.autograd.grad(reference.bilinear(*abs_params), abs_params, grad.cpu().double().abs())
    for name, o, r, s in zip(("input1", "input2", "weight", "bias"), ours, refs, scales):
        assert o.shape == r.shape and o.dtype == dtype, name
        err = (o.cpu().double() - r).abs()
        tol = REL_TOL[dtype] * 2 * s + 1e-30
        assert (err <= tol).all(), f"{name}: max error {err.max().item():.3g}"


def test_gradcheck(device):
    x, y, w, b = make((4, 3), (4, 5), 2, torch.float64, device)
    assert torch.autograd.gradcheck(xmodal.bilinear, [t.requires_grad_() for t in (x, y, w, b)])


def test_only_requested_gradients(device):
    x, y, w, b = make((8, 5), (8, 4), 3, torch.float32, device)
    w.requires_grad_()
    (gw,) = torch.autograd.grad(xmodal.bilinear(x, y, w, b).sum(), [w])
    ref = torch.autograd.grad(F.bilinear(x, y, w, b).sum(), [w])[0]
    torch.testing.assert_close(gw, ref, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs(device):
    x, y, w, b = make((10, 14), (10, 12), 6, torch.float32, device)
    xt = x.t().contiguous().t()  # column-major
    ys = torch.stack([y, y], dim=2)[..., 0]  # strided rows and columns
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    bs = torch.stack([b, b], dim=1)[:, 0]
    assert_bilinear_close(xmodal.bilinear(xt, ys, wt, bs), x, y, w, b)


def test_empty_shapes(device):
    x, y, w, b = make((0, 5), (0, 4), 3, torch.float32, device)
    assert xmodal.bilinear(x, y, w, b).shape == (0, 3)
    x, y, w, b = make((4, 5), (4, 4), 0, torch.float32, device)
    assert xmodal.bilinear(x, y, w, b).shape == (4, 0)
    x, y, w, b = make((4, 0), (4, 4), 3, torch.float32, device)
    torch.testing.assert_close(xmodal.bilinear(x, y, w, b), b.expand(4, 3))


def test_nan_and_inf_propagate(device):
    x, y, w, b = make((3, 4), (3, 5), 2, torch.float32, device)
    x[1, 2] = float("nan")
    y[2, 0] = float("inf")
    out = xmodal.bilinear(x, y, w, b)
    assert out[1].isnan().all()
    assert not out[2].isfinite().any()  # inf, or NaN where infinities of both signs meet (summation order)
    torch.testing.assert_close(out[0], F.bilinear(x, y, w, b)[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    dx=st.integers(1, 9),
    dy=st.integers(1, 9),
    o=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(batch, dx, dy, o, bias, seed):
    x, y, w, b = make((*batch, dx), (*batch, dy), o, torch.float32, "cpu", bias, seed)
    assert_bilinear_close(xmodal.bilinear(x, y, w, b), x, y, w, b)


def test_module_is_a_drop_in_for_torch_bilinear(device):
    torch.manual_seed(0)
    theirs = torch.nn.Bilinear(6, 5, 4).to(device)
    ours = xmodal.nn.Bilinear(6, 5, 4).to(device)
    assert isinstance(ours, torch.nn.Bilinear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x, y = torch.randn(7, 6, device=device), torch.randn(7, 5, device=device)
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    theirs.load_state_dict(xmodal.nn.Bilinear(6, 5, 4, bias=False).state_dict(), strict=False)
    no_bias = xmodal.nn.Bilinear(6, 5, 4, bias=False).to(device)
    assert no_bias.bias is None and no_bias(x, y).shape == (7, 4)


@pytest.mark.parametrize(
    "args,match",
    [
        (((3, 4), (3, 5), (2, 4, 5), None, torch.int64), "input1 must be float32, float64, float16 or bfloat16, got Long"),
        (((3, 4), (3, 5), (2, 5, 5), None, None), r"input1's last dimension must equal weight.size\(1\) \(in1_features\), got 4 and 5"),
        (((3, 4), (3, 5), (2, 4, 4), None, None), r"input2's last dimension must equal weight.size\(2\) \(in2_features\), got 5 and 4"),
        (((3, 4), (2, 5), (2, 4, 5), None, None), r"input1 and input2 must have the same leading \(batch\) shape, got shapes \[3, 4\] and \[2, 5\]"),
        (((3, 4), (3, 5), (8, 5), None, None), r"weight must be 3-D \[out_features, in1_features, in2_features\], got shape \[8, 5\]"),
        (((3, 4), (3, 5), (2, 4, 5), (3,), None), r"bias must be 1-D \[out_features\] = \[2\], got shape \[3\]"),
    ],
)
def test_bad_input_errors(args, match):
    s1, s2, sw, sb, dtype = args
    make_t = lambda s: torch.ones(s, dtype=dtype or torch.float32)  # noqa: E731
    with pytest.raises(RuntimeError, match=match):
        xmodal.bilinear(make_t(s1), make_t(s2), make_t(sw), None if sb is None else make_t(sb))


def test_dtype_mismatch_error():
    with pytest.raises(RuntimeError, match="weight must have the same dtype as input1, got Double and Float"):
        xmodal.bilinear(torch.ones(2, 3), torch.ones(2, 4), torch.ones(5, 3, 4, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_error():
    with pytest.raises(RuntimeError, match="weight must be on the same device as input1"):
        xmodal.bilinear(torch.ones(2, 3), torch.ones(2, 4), torch.ones(5, 3, 4, device="cuda"))


def test_opcheck(device):
    x, y, w, b = make((5, 4), (5, 3), 2, torch.float32, device)
    for args in ((x, y, w, b), (x, y, w, None)):
        torch.library.opcheck(torch.ops.xmodal.bilinear.default, [t if t is None else t.requires_grad_() for t in args])
    torch.library.opcheck(torch.ops.xmodal.bilinear_backward.default, (torch.randn(5, 2, device=device), x.detach(), y.detach(), w.detach(), [True, False, True]))


def test_torch_compile_fullgraph(device):
    x, y, w, b = make((5, 4), (5, 3), 2, torch.float32, device)
    module = xmodal.nn.Bilinear(4, 3, 2).to(device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    torch.testing.assert_close(out, module(x, y))
    out.sum().backward()
    assert module.weight.grad is not None and module.bias.grad is not None


def test_no_batch_by_features_intermediates():
    # B x dx x dy would be 4096 * 256 * 256 * 4 bytes = 1 GiB (and again for its gradient); the tiled op
    # must stay far below that in forward and backward.
    code = textwrap.dedent(
        """
        import resource, torch, xmodal
        torch.manual_seed(0)
        x = torch.randn(4096, 256, requires_grad=True); y = torch.randn(4096, 256, requires_grad=True)
        w = torch.randn(4, 256, 256, requires_grad=True)
        xmodal.bilinear(x, y, w).sum()  # warm up (thread pools, allocator)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        xmodal.bilinear(x, y, w).sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    extra_mib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert extra_mib < 200, f"forward + backward grew the peak RSS by {extra_mib} MiB"


def test_tile_settings_change_the_tiling_not_the_result():
    # tiny tiles (xmodal.settings): one batch row and 4 KiB per tile, so every call spans many tiles
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 12, 9, generator=g, dtype=torch.float64, requires_grad=True)
    expected = xmodal.bilinear(x, y, w)
    with xmodal.settings.override(bilinear_tile_kib=4, bilinear_max_rows=1):
        out = xmodal.bilinear(x, y, w)
        (grad_w,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_w, torch.autograd.grad(expected.sum(), w)[0])
    with pytest.raises(ValueError, match=r"bilinear_max_rows must be in \[1, "):
        xmodal.settings.set(bilinear_max_rows=0)
