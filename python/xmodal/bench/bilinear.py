"""``xmodal bench bilinear``: the fused bilinear ops against the ways people write them in plain PyTorch, also
used by the pytest-benchmark suite ``benchmarks/test_bench_bilinear.py``.

Full bilinear: ``F.bilinear`` and the usual rewrite ``outer(x, y) @ W``. Factorized (MFB): the eager formula
(every intermediate materialised; for the broadcast form, ``x`` expanded to ``y``'s rows before projecting).
Forward alone and forward + backward, timed interleaved (one call of each per round), medians reported;
peak extra memory per call (CPU: the process's RSS high-water mark, reset before each call; GPU:
``max_memory_allocated``) and, for forward + backward, the bytes the autograd graph keeps for backward
(activation memory: saved tensors that are not the inputs or parameters).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import xmodal
from xmodal import reference

from .harness import (Case, Result, check_repeats, environment, fmt_ratio, format_markdown, run_cases,
                      time_interleaved)


@dataclass(frozen=True)
class BilinearCase(Case):
    kind: str  # "full" or "factorized"
    batch: int
    dx: int
    dy: int
    out: int
    dtype: str = "float32"
    factor: int = 1
    regions: int = 0  # factorized broadcast form: x [B, 1, dx] against y [B, regions, dy]
    backward: bool = True

    @property
    def name(self) -> str:
        shape = f"B={self.batch}" + (f" N={self.regions}" if self.regions else "")
        shape += f" dx={self.dx} dy={self.dy} o={self.out}" + (f" f={self.factor}" if self.kind == "factorized" else "")
        return f"{self.kind} {shape} {self.dtype} {'fwd+bwd' if self.backward else 'fwd'}"


def bilinear_grid(quick: bool = False, device: str = "cpu") -> List[BilinearCase]:
    if device == "cuda":
        full = [BilinearCase("full", b, d, d, d, "bfloat16") for b, d in ((1024, 128), (1024, 256), (4096, 256), (1024, 512))]
        full += [BilinearCase("full", 1024, 256, 256, 256, "float32")]
        fact = [
            BilinearCase("factorized", 64, 2048, 1024, 1000, "bfloat16", 5),
            BilinearCase("factorized", 8, 2048, 1024, 1000, "bfloat16", 5, regions=100),
        ]
    else:
        full = [BilinearCase("full", 256, 128, 128, 128), BilinearCase("full", 64, 300, 300, 300)]
        fact = [
            BilinearCase("factorized", 64, 2048, 1024, 1000, "float32", 5),
            BilinearCase("factorized", 8, 2048, 1024, 1000, "float32", 5, regions=100),
        ]
    if quick:
        full = [BilinearCase("full", 32, 64, 64, 32, full[0].dtype)]
        fact = [BilinearCase("factorized", 16, 256, 128, 64, fact[0].dtype, 5), BilinearCase("factorized", 4, 256, 128, 64, fact[0].dtype, 5, regions=10)]
    cases = []
    for c in full + fact:
        cases += [c, BilinearCase(**{**asdict(c), "backward": False})]
    return cases


def make_problem(case: BilinearCase, device: str, seed: int = 0):
    """Inputs and parameters (leaves requiring grad) for one case, and the calls to compare."""
    g = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device).requires_grad_(case.backward)

    if case.kind == "full":
        x, y = leaf(case.batch, case.dx), leaf(case.batch, case.dy)
        w, b = leaf(case.out, case.dx, case.dy, scale=case.dx**-0.5), leaf(case.out)
        w2 = w.view(case.out, -1)

        def outer_w():
            z = (x.unsqueeze(2) * y.unsqueeze(1)).reshape(case.batch, -1)
            return torch.addmm(b, z, w2.t())

        calls = {
            "xmodal": lambda: xmodal.bilinear(x, y, w, b),
            "F.bilinear": lambda: F.bilinear(x, y, w, b),
            "outer@W": outer_w,
        }
        return (x, y, w, b), calls
    width = case.out * case.factor
    if case.regions:
        x, y = leaf(case.batch, 1, case.dx), leaf(case.batch, case.regions, case.dy)
    else:
        x, y = leaf(case.batch, case.dx), leaf(case.batch, case.dy)
    wx, wy = leaf(width, case.dx, scale=case.dx**-0.5), leaf(width, case.dy, scale=case.dy**-0.5)
    bx, by = leaf(width), leaf(width)
    f = case.factor
    xe = (lambda: x.expand(-1, case.regions, -1)) if case.regions else (lambda: x)
    calls = {
        "xmodal": lambda: xmodal.factorized_bilinear(x, y, wx, wy, bx, by, factor=f),
        "eager": lambda: reference.factorized_bilinear(xe(), y, wx, wy, bx, by, factor=f),
    }
    if case.backward:  # keeping one projection for backward instead of two: less memory, one more GEMM
        calls["xmodal[recompute]"] = lambda: xmodal.factorized_bilinear(x, y, wx, wy, bx, by, factor=f, recompute=True)
    return (x, y, wx, wy, bx, by), calls


def step(fn: Callable[[], torch.Tensor], leaves, backward: bool):
    """One step of ``fn``: forward alone (no grad), or forward, a scalar loss and backward to every leaf."""
    if not backward:
        with torch.no_grad():
            return fn()
    for t in leaves:
        t.grad = None
    fn().float().square().sum().backward()


# --- memory -----------------------------------------------------------------------------------------------

def _status_bytes(name: str) -> int:
    """A memory figure of this process from /proc/self/status: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak memory above what was in use before the call (CUDA: exact, from the caching allocator)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not _reset_rss_peak():
        return None
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def peak_child(case_json: str, impl: str) -> None:
    """Runs in a fresh process: one step of ``impl`` on ``case``, printing its peak extra RSS in bytes."""
    case = BilinearCase(**json.loads(case_json))
    # load and initialise the libraries on a problem tiny in every dimension first: with the case's own
    # weight shapes, the allocator would keep the warm-up's freed blocks resident and the step would reuse
    # them unseen by the high-water mark
    small = BilinearCase(**{**asdict(case), "batch": 2, "regions": min(case.regions, 2), "dx": 4, "dy": 4, "out": 4,
                            "factor": 1})
    leaves, calls = make_problem(small, "cpu")
    step(calls[impl], leaves, case.backward)
    leaves, calls = make_problem(case, "cpu")
    xmodal.empty_cpu_cache()
    print(peak_extra_bytes(lambda: step(calls[impl], leaves, case.backward), "cpu"))


def cpu_peak_extra_bytes(case: BilinearCase, impl: str, processes: int = 3) -> Optional[int]:
    """CPU peak extra memory of one step, measured in a fresh process: in a warm process the allocator
    reuses memory that is already resident, which hides transient buffers from the RSS high-water mark.
    The smallest of `processes` runs: when threads hold temporaries at once varies from run to run
    (F.bilinear's backward measured 19 to 50 MiB on the same case)."""
    code = f"from xmodal.bench.bilinear import peak_child; peak_child({json.dumps(json.dumps(asdict(case)))}, {impl!r})"
    values = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        value = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "None"
        if value != "None":
            values.append(int(value))
    return min(values) if values else None


def activation_bytes(forward: Callable[[], torch.Tensor], leaves) -> int:
    """Bytes of the tensors autograd saves for backward during ``forward()``, inputs and parameters excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in leaves}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# --- running a case and reporting -------------------------------------------------------------------------

@dataclass
class BilinearResult(Result):
    peak_bytes: Dict[str, Optional[int]] = field(default_factory=dict)
    activation_bytes: Dict[str, int] = field(default_factory=dict)


def run_bilinear_case(
    case: BilinearCase, device: str = "cpu", repeats: int = 3, measure_memory: bool = True, memory_processes: int = 3
) -> BilinearResult:
    check_repeats(repeats)
    leaves, calls = make_problem(case, device)
    # F.bilinear's backward loops over output features with a B x dx x dy temporary each: on big shapes it
    # takes minutes; time it only where that stays reasonable
    if case.kind == "full" and case.batch * case.dx * case.dy * case.out > (1 << 34 if device == "cuda" else 1 << 32):
        calls.pop("F.bilinear")
    steps = {name: (lambda fn=fn: step(fn, leaves, case.backward)) for name, fn in calls.items()}
    result = BilinearResult(case)
    for name, run in steps.items():
        run()  # warm-up
        if device.startswith("cuda"):
            result.peak_bytes[name] = peak_extra_bytes(run, device)
        elif measure_memory:
            result.peak_bytes[name] = cpu_peak_extra_bytes(case, name, memory_processes)
        if case.backward:
            result.activation_bytes[name] = activation_bytes(calls[name], leaves)
    result.seconds = time_interleaved(steps, device, repeats, warmup=False)  # warmed up above
    return result


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def table(results: List[BilinearResult]) -> List[List[str]]:
    rows = [["case", "xmodal", "ms", "baseline", "baseline ms", "speed-up", "peak MiB (x / base)",
             "saved MiB (x / base)"]]
    for r in results:
        for impl in r.impls:
            for base in r.baselines:
                rows.append([
                    r.case.name,
                    impl,
                    f"{r.seconds[impl] * 1e3:.2f}",
                    base,
                    f"{r.seconds[base] * 1e3:.2f}",
                    fmt_ratio(r.ratio(base, impl)),
                    f"{_mib(r.peak_bytes.get(impl))} / {_mib(r.peak_bytes.get(base))}",
                    f"{_mib(r.activation_bytes.get(impl))} / {_mib(r.activation_bytes.get(base))}"
                    if r.activation_bytes else "-",
                ])
    return rows


def notes(memory_processes: int = 3) -> List[str]:
    """What the report's columns and baselines mean."""
    fresh = f"the least of {memory_processes} fresh processes" if memory_processes > 1 else "one fresh process"
    return [
        "speed-up = baseline time / xmodal time, measured side by side in one run (above 1: xmodal is faster).",
        "fwd+bwd = forward, a scalar loss and backward to every input and parameter. peak = memory above what",
        f"was in use before the call (CPU: RSS high-water mark, {fresh}; GPU: max_memory_allocated). saved = bytes the",
        "autograd graph keeps for backward, inputs and parameters excluded (activation memory).",
        "Baselines: `F.bilinear`; `outer@W` = `addmm(b, (x[:, :, None] * y[:, None, :]).reshape(B, -1), W.view(o, -1).T)`;",
        "`eager` = the MFB formula in plain PyTorch (xmodal.reference.factorized_bilinear, x expanded for the",
        "broadcast form). `xmodal[recompute]` = `factorized_bilinear(..., recompute=True)`: one projection kept",
        "for backward, the other recomputed.",
    ]


def chart_bars(results: List[BilinearResult]) -> List[tuple]:
    """A bar per (case, xmodal or variant, baseline): its speed-up."""
    return [(f"{r.case.name} {impl[len('xmodal'):]} vs {base}".replace("  ", " "), r.ratio(base, impl))
            for r in results for impl in r.impls for base in r.baselines]


def main(args) -> int:
    """``xmodal bench bilinear`` (called by :func:`xmodal.bench.main`, which has checked the device)."""
    device = args.device
    # --quick: one fresh process per CPU peak-memory figure instead of three (each costs an import of torch)
    processes = 1 if args.quick else 3
    env = environment(device, faiss=False)
    run_cases(args, env, bilinear_grid(quick=args.quick, device="cuda" if device.startswith("cuda") else "cpu"),
              lambda case: run_bilinear_case(case, device, repeats=args.repeats, memory_processes=processes),
              desc="bench bilinear", table=table,
              markdown=lambda results: format_markdown(table(results), env, f"bilinear benchmark ({device})",
                                                       notes(processes)),
              chart_title=f"xmodal bilinear ops vs plain PyTorch ({device}): speed-up", chart_bars=chart_bars)
    return 0
