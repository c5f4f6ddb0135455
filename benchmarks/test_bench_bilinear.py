"""pytest-benchmark suite for the bilinear ops against plain PyTorch (F.bilinear, outer(x, y) @ W, the eager
MFB formula), forward and forward + backward. Not part of the default run:

    python -m pytest benchmarks/test_bench_bilinear.py --benchmark-only [--device cuda]

Each result's extra_info has the activation memory (bytes saved for backward, inputs and parameters
excluded) and, on the GPU, the peak extra memory. ``xmodal bench bilinear`` prints the same comparison as
one table with ratios.
"""
import pytest
import torch

from xmodal.bench import BilinearCase, activation_bytes, bilinear_grid, make_problem, peak_extra_bytes, step


def _cases(device):
    return [c for c in bilinear_grid(device=device)]


CPU_CASES = _cases("cpu")
GPU_CASES = _cases("cuda")


def _impls(case: BilinearCase):
    if case.kind == "full":
        return ["xmodal", "F.bilinear", "outer@W"]
    return ["xmodal", "xmodal[recompute]", "eager"] if case.backward else ["xmodal", "eager"]


def _params(cases, marks=()):
    return [pytest.param(c, impl, id=f"{c.name}-{impl}".replace(" ", "_"), marks=marks) for c in cases for impl in _impls(c)]


def _run(benchmark, case, impl, device):
    if impl == "F.bilinear" and case.backward and case.batch * case.dx * case.dy * case.out > (1 << 32):
        pytest.skip("F.bilinear's backward takes minutes on this shape")
    leaves, calls = make_problem(case, device)
    fn = calls[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def synced_step():
        step(fn, leaves, case.backward)
        sync()

    benchmark.group = case.name
    if case.backward:
        benchmark.extra_info["activation_bytes"] = activation_bytes(fn, leaves)
    if device == "cuda":
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(synced_step, device)
    benchmark.pedantic(synced_step, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("case,impl", _params(CPU_CASES))
def test_bilinear_cpu(benchmark, case, impl):
    _run(benchmark, case, impl, "cpu")


@pytest.mark.parametrize("case,impl", _params(GPU_CASES, marks=[pytest.mark.cuda]))
def test_bilinear_cuda(benchmark, case, impl):
    _run(benchmark, case, impl, "cuda")
