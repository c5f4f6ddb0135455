"""xmodal.factorized_bilinear / xmodal.nn.FactorizedBilinearPooling against the eager MFB formula."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xmodal
from xmodal import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 16-bit: the projections are 16-bit GEMM outputs, so the pooled values carry their rounding
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make(shape_x, shape_y, out_features, factor, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = out_features * factor
    x = torch.randn(*shape_x, generator=g, dtype=torch.float64)
    y = torch.randn(*shape_y, generator=g, dtype=torch.float64)
    wx = torch.randn(width, shape_x[-1], generator=g, dtype=torch.float64) / shape_x[-1] ** 0.5
    wy = torch.randn(width, shape_y[-1], generator=g, dtype=torch.float64) / shape_y[-1] ** 0.5
    bx = torch.randn(width, generator=g, dtype=torch.float64) if bias else None
    by = torch.randn(width, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(dtype).to(device) for t in (x, y, wx, wy, bx, by)]


def ref_of(args, factor, normalize):
    return reference.factorized_bilinear(
        *[None if t is None else t.detach().cpu().double() for t in args], factor=factor, normalize=normalize
    )


SHAPES = [
    ((6, 10), (6, 8), 4, 5),
    ((3, 1, 10), (3, 7, 8), 4, 5),  # one question against N regions
    ((10,), (7, 8), 3, 2),  # one x against a batch of y
    ((2, 3, 9), (2, 3, 9), 5, 1),  # MLB
    ((1, 4), (1, 4), 1, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_x,shape_y,out_features,factor", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, dtype, shape_x, shape_y, out_features, factor, normalize, bias):
    args = make(shape_x, shape_y, out_features, factor, dtype, device, bias)
    out = xmodal.factorized_bilinear(*args, factor=factor, normalize=normalize)
    ref = ref_of(args, factor, normalize)
    assert out.shape == ref.shape and out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out.cpu().double(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_x,shape_y,out_features,factor", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_gradients_match_reference(device, dtype, shape_x, shape_y, out_features, factor, normalize, recompute):
    args = [t.requires_grad_() for t in make(shape_x, shape_y, out_features, factor, dtype, device)]
    out = xmodal.factorized_bilinear(*args, factor=factor, normalize=normalize, recompute=recompute)
    grad = torch.randn(out.shape, dtype=torch.float64)
    ours = torch.autograd.grad(out, args, grad.to(dtype).to(device))
    ref_args = [t.detach().cpu().double().requires_grad_() for t in args]
    refs = torch.autograd.grad(
        reference.factorized_bilinear(*ref_args, factor=factor, normalize=normalize), ref_args, grad
    )
    for name, o, r in zip(("x", "y", "weight_x", "weight_y", "bias_x", "bias_y"), ours, refs):
        assert o.shape == r.shape and o.dtype == dtype, name
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.cpu().double(), r, atol=4 * ATOL[dtype] * scale, rtol=4 * ATOL[dtype], msg=name)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape_x,shape_y", [((3, 4), (3, 5)), ((2, 1, 4), (2, 3, 5))])
def test_gradcheck(device, normalize, shape_x, shape_y):
    args = [t.requires_grad_() for t in make(shape_x, shape_y, 3, 2, torch.float64, device)]
    fn = lambda *a: xmodal.factorized_bilinear(*a, factor=2, normalize=normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_finite_at_zero(device):
    # all-zero input: s = 0 everywhere, so both the square root and the norm sit at their eps
    args = make((2, 4), (2, 5), 3, 2, torch.float32, device, bias=False)
    args[0] = torch.zeros_like(args[0]).requires_grad_()
    args[2].requires_grad_()
    out = xmodal.factorized_bilinear(*args, factor=2)
    assert torch.equal(out, torch.zeros_like(out))
    gx, gw = torch.autograd.grad(out.sum(), [args[0], args[2]])
    assert gx.isfinite().all() and gw.isfinite().all()


def test_broadcast_does_not_expand_x(device):
    # the x projection is computed once per row of x: its gradient comes back in x's shape, summed over N
    args = [t.requires_grad_() for t in make((4, 1, 6), (4, 9, 5), 3, 2, torch.float32, device)]
    out = xmodal.factorized_bilinear(*args, factor=2)
    assert out.shape == (4, 9, 3)
    gx = torch.autograd.grad(out.sum(), args[0])[0]
    assert gx.shape == (4, 1, 6)
    expanded = args[0].detach().expand(4, 9, 6).clone().requires_grad_()
    out_e = reference.factorized_bilinear(expanded, *args[1:], factor=2)
    torch.testing.assert_close(gx, torch.autograd.grad(out_e.sum(), expanded)[0].sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs(device):
    args = make((5, 6), (5, 7), 3, 2, torch.float32, device)
    x, y, wx, wy, bx, by = args
    strided = [x.t().contiguous().t(), torch.stack([y, y], 2)[..., 0], wx.t().contiguous().t(), wy, bx, by]
    torch.testing.assert_close(
        xmodal.factorized_bilinear(*strided, factor=2), xmodal.factorized_bilinear(*args, factor=2)
    )


def test_empty_batch(device):
    args = make((0, 4), (0, 5), 3, 2, torch.float32, device)
    assert xmodal.factorized_bilinear(*args, factor=2).shape == (0, 3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 4),
    n=st.integers(1, 4),
    dx=st.integers(1, 6),
    dy=st.integers(1, 6),
    o=st.integers(1, 4),
    factor=st.integers(1, 4),
    broadcast=st.booleans(),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(b, n, dx, dy, o, factor, broadcast, normalize, seed):
    args = make((b, 1 if broadcast else n, dx), (b, n, dy), o, factor, torch.float64, "cpu", seed=seed)
    out = xmodal.factorized_bilinear(*args, factor=factor, normalize=normalize)
    torch.testing.assert_close(out, ref_of(args, factor, normalize))
    if normalize:
        norms = out.norm(dim=-1)
        assert ((norms - 1).abs() < 1e-9).logical_or(norms == 0).all()


def test_module(device):
    torch.manual_seed(0)
    m = xmodal.nn.FactorizedBilinearPooling(6, 5, 4, factor=3).to(device)
    assert set(m.state_dict()) == {"proj_x.weight", "proj_x.bias", "proj_y.weight", "proj_y.bias"}
    x, y = torch.randn(7, 6, device=device), torch.randn(7, 5, device=device)
    ref = reference.factorized_bilinear(x, y, m.proj_x.weight, m.proj_y.weight, m.proj_x.bias, m.proj_y.bias, factor=3)
    torch.testing.assert_close(m(x, y), ref)
    # dropout acts in training only; eval is deterministic
    md = xmodal.nn.FactorizedBilinearPooling(6, 5, 4, factor=3, dropout=0.5).to(device)
    md.load_state_dict(m.state_dict())
    md.eval()
    torch.testing.assert_close(md(x, y), ref)
    md.train()
    torch.manual_seed(1)
    a = md(x, y)
    torch.manual_seed(2)
    assert not torch.allclose(a, md(x, y))
    a.sum().backward()
    assert all(p.grad is not None for p in md.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(factor=3), r"factor must divide the projection width weight_x.shape\[0\] = 8, got factor 3"),
        (dict(factor=0), "factor must be a positive int, got 0"),
        (dict(wx=(8, 4, 1)), r"weight_x must be 2-D \[out_features \* factor, dim_x\], got shape \(8, 4, 1\)"),
        (dict(wy=(6, 5)), r"weight_x and weight_y must have the same number of rows \(out_features \* factor\), got 8 and 6"),
        (dict(x=(3, 5)), r"x's last dimension must equal weight_x.shape\[1\] = 4, got shape \(3, 5\)"),
        (dict(y=(3, 4)), r"y's last dimension must equal weight_y.shape\[1\] = 5, got shape \(3, 4\)"),
        (dict(y=(2, 5)), r"the leading \(batch\) shapes of x and y must broadcast against each other, got \[3\] and \[2\]"),
        (dict(bx=(5,)), r"bias_x must be 1-D \[out_features \* factor\] = \[8\], got shape \[5\]"),
        (dict(ydtype=torch.float64), "y must have the same dtype as x, got torch.float64 and torch.float32"),
    ],
)
def test_bad_input_errors(kwargs, match):
    shapes = dict(x=(3, 4), y=(3, 5), wx=(8, 4), wy=(8, 5), bx=(8,))
    shapes.update({k: v for k, v in kwargs.items() if k in shapes})
    t = {k: torch.ones(v) for k, v in shapes.items()}
    if "ydtype" in kwargs:
        t["y"] = t["y"].to(kwargs["ydtype"])
    with pytest.raises((ValueError, RuntimeError), match=match):
        xmodal.factorized_bilinear(t["x"], t["y"], t["wx"], t["wy"], t["bx"], None, factor=kwargs.get("factor", 2))


def test_opcheck(device):
    px, py = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    bx = torch.randn(6, device=device)
    for args in ((px, py, bx, None, 3, True), (px[:1], py, None, bx, 2, False)):
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.xmodal.factorized_bilinear.default, args)
    torch.library.opcheck(
        torch.ops.xmodal.factorized_bilinear_backward.default, (torch.randn(4, 2, device=device), px, py, bx, None, 3, True)
    )


def test_torch_compile_fullgraph(device):
    m = xmodal.nn.FactorizedBilinearPooling(6, 5, 4, factor=3).to(device)
    x, y = torch.randn(7, 6, device=device), torch.randn(7, 5, device=device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    torch.testing.assert_close(out, m(x, y))
    out.sum().backward()
    assert m.proj_x.weight.grad is not None


# --- recompute=True: one projection kept, the other recomputed in backward ---------------------------------


@pytest.mark.parametrize("shape_x,shape_y,kept_rows", [((64, 96), (64, 48), 64), ((4, 1, 32), (4, 30, 48), 4),
                                                       ((4, 30, 48), (4, 1, 32), 4)])
def test_recompute_keeps_one_projection(shape_x, shape_y, kept_rows):
    # saved for backward: the kept projection only (inputs and weights are not activations): the smaller
    # side (x for regions), or for equal row counts the one with the wider input (y's is cheaper to redo)
    args = [t.requires_grad_() for t in make(shape_x, shape_y, 10, 5, torch.float32, "cpu")]
    leaves = {t.untyped_storage().data_ptr() for t in args}

    def saved(recompute):
        from xmodal.bench import activation_bytes

        return activation_bytes(lambda: xmodal.factorized_bilinear(*args, factor=5, recompute=recompute), args)

    assert leaves
    assert saved(True) == kept_rows * 50 * 4
    assert saved(False) > saved(True)
    out = xmodal.factorized_bilinear(*args, factor=5, recompute=True)
    torch.testing.assert_close(out, xmodal.factorized_bilinear(*args, factor=5))


def test_recompute_gradcheck_and_opcheck(device):
    args = [t.requires_grad_() for t in make((3, 1, 6), (3, 4, 5), 3, 2, torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *a: xmodal.factorized_bilinear(*a, factor=2, recompute=True), args)
    px = torch.ops.xmodal.cached_linear(args[0], args[2]).detach().requires_grad_()
    torch.library.opcheck(torch.ops.xmodal.factorized_bilinear_recompute.default,
                          (px, args[1], args[3], args[4], args[5], 2, True))


def test_recompute_module_with_dropout_matches_keeping_both(device):
    torch.manual_seed(0)
    keep = xmodal.nn.FactorizedBilinearPooling(12, 10, 4, factor=3, dropout=0.3).to(device)
    again = xmodal.nn.FactorizedBilinearPooling(12, 10, 4, factor=3, dropout=0.3, recompute=True).to(device)
    again.load_state_dict(keep.state_dict())
    assert "recompute=True" in repr(again)
    x, y = torch.randn(5, 1, 12, device=device), torch.randn(5, 7, 10, device=device)
    grads = []
    for module in (keep, again):
        torch.manual_seed(1)  # the same dropout mask
        out = module(x, y)
        grads.append(torch.autograd.grad(out.square().sum(), list(module.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_recompute_under_torch_compile(device):
    args = make((4, 8), (4, 6), 3, 2, torch.float32, device)
    fn = torch.compile(lambda *a: xmodal.factorized_bilinear(*a, factor=2, recompute=True), fullgraph=True,
                       backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(fn(*args), xmodal.factorized_bilinear(*args, factor=2))


@pytest.mark.parametrize("training", [False, True])
def test_module_errors_name_its_arguments_in_every_mode(training):
    # with dropout in training mode the module calls the projection op directly: its errors must still
    # speak of x / y and the module's dimensions
    mfb = xmodal.nn.FactorizedBilinearPooling(16, 8, 4, factor=2, dropout=0.1).train(training)
    with pytest.raises(ValueError, match=r"x's last dimension must be dim_x = 16, got shape \(3, 1, 8\)"):
        mfb(torch.randn(3, 1, 8), torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match=r"y's last dimension must be dim_y = 8, got shape \(3, 5, 16\)"):
        mfb(torch.randn(3, 1, 16), torch.randn(3, 5, 16))
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        mfb(torch.randn(3, 16), [1.0] * 8)
    assert mfb(torch.randn(3, 1, 16), torch.randn(3, 5, 8)).shape == (3, 5, 4)
