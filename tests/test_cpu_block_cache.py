"""The projection ops of factorized pooling and the CPU block cache their weight gradients come from."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import xmodal


def test_project_and_weight_grad_match_linear(device):
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (2, 3, 7), (7,), (0, 7)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
        w = torch.randn(4, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
        out = torch.ops.xmodal.cached_linear(x, w)
        torch.testing.assert_close(out, F.linear(x, w))
        grad = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), grad)
        ex, ew = torch.autograd.grad(F.linear(x, w), (x, w), grad)
        torch.testing.assert_close(gx, ex)
        torch.testing.assert_close(gw, ew)


def test_project_gradcheck_and_double_backward(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.xmodal.cached_linear, (x, w))
    assert torch.autograd.gradgradcheck(torch.ops.xmodal.cached_linear, (x, w))


def test_opcheck(device):
    x = torch.randn(6, 5, device=device)
    w = torch.randn(3, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.xmodal.cached_linear.default, (x.requires_grad_(), w))
    torch.library.opcheck(torch.ops.xmodal.cached_linear_weight_grad.default, (torch.randn(2, 6, 3, device=device),
                                                                        torch.randn(2, 6, 5, device=device)))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 5), torch.randn(3, 4)), "input's last dimension must be weight's in_features 4"),
        ((torch.randn(2, 5), torch.randn(3, 5, 1)), "weight must be 2-D"),
        ((torch.randn(2, 5), torch.randn(3, 5, dtype=torch.float64)), "dtype"),
    ],
)
def test_project_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.xmodal.cached_linear(*args)


def test_weight_grad_bad_input():
    with pytest.raises(RuntimeError, match="grad and input must share their leading dimensions"):
        torch.ops.xmodal.cached_linear_weight_grad(torch.randn(3, 4), torch.randn(2, 5))


def _factorized_step(leaves):
    x, y, wx, wy, bx, by = leaves
    for t in leaves:
        t.grad = None
    out = xmodal.factorized_bilinear(x, y, wx, wy, bx, by, factor=5)
    (out * torch.arange(out.shape[-1], dtype=out.dtype)).sum().backward()


def _factorized_leaves():
    g = torch.Generator().manual_seed(2)
    shapes = [(8, 512), (8, 256), (2000, 512), (2000, 256), (2000,), (2000,)]  # weight_x: 4 MB, weight_y: 2 MB
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def test_weight_gradient_blocks_are_reused_across_steps():
    xmodal.empty_cpu_cache()
    leaves = _factorized_leaves()
    wx, wy = leaves[2], leaves[3]
    _factorized_step(leaves)
    assert xmodal._C.cpu_cache_bytes() == 0  # the gradients are the cache's blocks (autograd kept them)...
    first = (wx.grad.data_ptr(), wy.grad.data_ptr())
    wx.grad = wy.grad = None
    assert xmodal._C.cpu_cache_bytes() == 2000 * (512 + 256) * 4  # ...which come back when freed
    _factorized_step(leaves)  # and are handed out again
    assert (wx.grad.data_ptr(), wy.grad.data_ptr()) == first
    assert xmodal._C.cpu_cache_bytes() == 0


def test_a_gradient_still_in_use_is_not_reused():
    leaves = _factorized_leaves()
    wx = leaves[2]
    _factorized_step(leaves)
    kept = wx.grad  # still referenced: its block must not be handed out again
    snapshot = kept.clone()
    _factorized_step(leaves)
    assert wx.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)
    torch.testing.assert_close(wx.grad, snapshot)  # same inputs, same gradient


def test_empty_cpu_cache_releases_the_blocks():
    leaves = _factorized_leaves()
    _factorized_step(leaves)
    for t in leaves:
        t.grad = None
    assert xmodal._C.cpu_cache_bytes() >= 2000 * (512 + 256) * 4
    assert xmodal.empty_cpu_cache() >= 2000 * (512 + 256) * 4
    assert xmodal._C.cpu_cache_bytes() == 0


def _run(code, **env):
    import os

    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_cache_can_be_turned_off_or_limited():
    code = """
        import torch, xmodal
        x = torch.randn(8, 1024, requires_grad=True)
        w = torch.randn(3000, 1024, requires_grad=True)  # 12 MB gradient
        torch.ops.xmodal.cached_linear(x, w).sum().backward()
        w.grad = None
        print(xmodal._C.cpu_cache_bytes())
    """
    assert int(_run(code)) == 3000 * 1024 * 4
    limited = code.replace("import torch, xmodal", "import torch, xmodal; xmodal.settings.set(cpu_cache_mb={mb})")
    assert int(_run(limited.format(mb=0))) == 0
    assert int(_run(limited.format(mb=8))) == 0  # over the limit: back to the system
    assert int(_run(limited.format(mb=16))) == 3000 * 1024 * 4


def test_training_steps_do_not_fault_in_fresh_gradient_pages():
    # the point of the cache: after the first step, a step's weight gradients (here 2 x 37 MB, above glibc's
    # largest mmap threshold) land in pages that are already mapped; eager F.linear faults them in every step
    code = """
        import resource, torch, xmodal
        from xmodal import reference
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 1024, generator=g), torch.randn(16, 1024, generator=g)
        wx, wy = torch.randn(9000, 1024, generator=g), torch.randn(9000, 1024, generator=g)
        leaves = [t.requires_grad_() for t in (x, y, wx, wy)]
        def faults(fn):
            counts = []
            for _ in range(4):
                for t in leaves:
                    t.grad = None
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                fn(*leaves, None, None, factor=5).sum().backward()
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return min(counts[1:])
        print(faults(xmodal.factorized_bilinear), faults(reference.factorized_bilinear))
    """
    ours, eager = map(int, _run(code).split())
    assert ours < 1000 < eager, (ours, eager)


def test_full_bicached_linear_weight_gradient_comes_from_the_cache():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    w = torch.randn(128, 64, 64, generator=g).requires_grad_()  # 2 MB gradient
    xmodal.bilinear(x, y, w).sum().backward()
    first = w.grad.data_ptr()
    expected = w.grad.clone()
    w.grad = None
    xmodal.bilinear(x, y, w).sum().backward()
    assert w.grad.data_ptr() == first
    torch.testing.assert_close(w.grad, expected)


def test_cache_is_shared_safely_between_threads():
    # threads free and take blocks of the same size concurrently; every gradient must still be right
    import threading

    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 512, generator=g)
        w = torch.randn(1024, 512, generator=g).requires_grad_()  # 2 MB gradient blocks
        expected = torch.autograd.grad(F.linear(x, w).square().sum(), w)[0]
        for _ in range(20):
            w.grad = None
            torch.ops.xmodal.cached_linear(x, w).square().sum().backward()
            if not torch.allclose(w.grad, expected, rtol=1e-5, atol=1e-5):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
