"""``xmodal bench search``: :func:`xmodal.topk_search` against naive PyTorch and faiss, also used by the
pytest-benchmark suite ``benchmarks/test_bench_search.py``.

Every case times xmodal and its baselines side by side in one process, on the same synthetic data, and
reports ratios (baseline time / xmodal time: above 1 means xmodal is faster), then reads the project's
search targets off the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

import xmodal
from xmodal import reference

from .harness import (Case, Result, check_repeats, environment, fmt_ratio, format_markdown, markdown_table, run_cases,
                      time_interleaved, variant_names)


@dataclass(frozen=True)
class SearchCase(Case):
    q: int
    n: int
    d: int
    k: int
    dtype: str = "float32"
    metric: str = "ip"

    @property
    def database_bytes(self) -> int:
        return self.n * self.d * torch.tensor([], dtype=self.torch_dtype).element_size()

    @property
    def name(self) -> str:
        return f"{self.metric} Q={self.q} N={self.n} D={self.d} k={self.k} {self.dtype}"


def search_grid(quick: bool = False, device: str = "cpu") -> List[SearchCase]:
    """The cases the search targets are stated for (N = 200,000 on the CPU; 1,000,000 on a GPU)."""
    if quick:
        return [SearchCase(q, 20_000, 128, 10, dt) for q in (1, 64) for dt in ("float32", "bfloat16")]
    if device == "cuda":
        cases = [
            SearchCase(q, 1_000_000, d, k, dt)
            for dt in ("float32", "bfloat16")
            for d in (128, 512)
            for q in (1, 16, 256, 4096)
            for k in (1, 10, 100, 1024)
        ]
        cases += [SearchCase(q, 1_000_000, 128, 256, dt) for dt in ("float32", "bfloat16") for q in (1, 16, 256, 4096)]
        cases += [SearchCase(256, 1_000_000, d, 10, "bfloat16") for d in (256, 768)]
        # bounded workspace: naive would need 640 GB of scores
        cases.append(SearchCase(16384, 10_000_000, 128, 10, "bfloat16"))
        return cases
    # N = 200,000, k = 10: every Q x D x dtype x metric the CPU targets are stated for
    return [
        SearchCase(q, 200_000, d, 10, dt, metric)
        for metric in ("ip", "l2")
        for dt in ("float32", "bfloat16", "float16")
        for d in (128, 512)
        for q in (1, 16, 256, 1024)
    ]


_database_cache: dict = {}


def make_data(case: SearchCase, device: str = "cpu", seed: int = 0):
    """Gaussian queries and database, generated on the device; the last database is kept for the next
    case with the same (N, D, dtype, device), since making a 1M x 512 one costs more than searching it."""
    key = (case.n, case.d, case.dtype, device, seed)
    if key not in _database_cache:
        _database_cache.clear()
        g = torch.Generator(device=device).manual_seed(seed)
        _database_cache[key] = torch.randn(case.n, case.d, generator=g, device=device).to(case.torch_dtype)
    database = _database_cache[key]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    queries = torch.randn(case.q, case.d, generator=g, device=device).to(case.torch_dtype)
    return queries, database


def naive_search(queries, database, k, metric):
    """What a PyTorch user writes without xmodal: materialise every score, then ``torch.topk`` in the
    direction xmodal's metric table (``xmodal.reference.SEARCH_METRICS``) gives. The scores are the one-liners the
    reports name, in the inputs' dtype: ``q @ X.T`` (ip), ``torch.cdist(q, X)`` (l2); every other metric
    scores through ``xmodal.reference.scores_by_matmul`` (float64; no case of the grids uses one)."""
    if metric == "ip":
        scores = queries @ database.T
    elif metric == "l2":
        scores = torch.cdist(queries, database)
    else:
        scores = reference.scores_by_matmul(queries, database, metric)  # raises for an unknown metric
    return torch.topk(scores, min(k, database.shape[0]), dim=1, largest=reference.SEARCH_METRICS[metric])


def faiss_index(database, metric):
    """A faiss-cpu flat index over the database (float32), or None when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    if metric not in ("ip", "l2") or database.device.type != "cpu":
        return None
    x = database.float().numpy()
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index


@dataclass
class SearchResult(Result):
    @property
    def gflops(self) -> float:
        c = self.case
        return 2 * c.q * c.n * c.d / self.seconds["xmodal"] / 1e9

    def gbytes_of(self, name: str) -> float:
        """Database bytes read per second by implementation ``name``."""
        return self.case.database_bytes / self.seconds[name] / 1e9

    @property
    def gbytes(self) -> float:
        return self.gbytes_of("xmodal")


# Variants timed beside "xmodal" (strategy "auto") as "xmodal[name]": a strategy forced by name, or on the
# CPU "tiled:<gemm>", the tiled strategy with one way of scoring tiles (xmodal.settings' cpu_tile_gemm).
STRATEGIES = ("tiled", "aten", "filtered", "tensor_core", "fused_scan")


def variant_call(name: str, search: Callable[..., object]) -> Callable[[], object]:
    """A call of ``search(strategy=...)`` that runs variant ``name`` (see STRATEGIES and settings.TILE_GEMMS)."""
    TILE_GEMMS = xmodal.settings.TILE_GEMMS
    strategy, _, gemm = name.partition(":")
    if strategy not in STRATEGIES or (gemm and (strategy != "tiled" or gemm not in TILE_GEMMS)):
        raise ValueError(f"unknown variant {name!r}: a strategy {list(STRATEGIES)} or tiled:<gemm> with gemm in "
                         f"{list(TILE_GEMMS)}")
    if not gemm:
        return lambda: search(strategy=strategy)

    def call():
        with xmodal.settings.override(cpu_tile_gemm=gemm):
            return search(strategy=strategy)
    return call


def run_search_case(case: SearchCase, device: str = "cpu", repeats: int = 3, use_faiss: bool = True,
                    variants: tuple = ()) -> SearchResult:
    """Times xmodal and its baselines interleaved (one call of each per round, after a warm-up round), so
    that drift in the machine's speed during a run affects them alike; reports each one's median. Cases of
    over 1e11 scores run once, without a warm-up round."""
    check_repeats(repeats)
    queries, database = make_data(case, device)
    search = lambda strategy="auto": xmodal.topk_search(queries, database, case.k, case.metric, strategy=strategy)  # noqa: E731
    calls = {"xmodal": search}
    for name in variants:
        calls[f"xmodal[{name}]"] = variant_call(name, search)
    # the naive baseline needs Q x N scores; skip it where they would not fit comfortably
    if case.q * case.n * 4 <= (8 << 30 if device == "cpu" else 32 << 30):
        calls["naive"] = lambda: naive_search(queries, database, case.k, case.metric)
    if use_faiss and device == "cpu":
        index = faiss_index(database, case.metric)
        if index is not None:
            qn = queries.float().numpy()
            calls["faiss"] = lambda: index.search(qn, case.k)
    if case.q * case.n > 1e11:
        return SearchResult(case, time_interleaved(calls, device, 1, warmup=False))
    return SearchResult(case, time_interleaved(calls, device, repeats))


def table(results: List[SearchResult]) -> List[List[str]]:
    variants = variant_names(results)
    rows = [["case", "xmodal ms", "naive ms", "faiss ms", "vs naive", "vs faiss", "GFLOP/s", "GB/s"]]
    for name in variants:
        rows[0] += [f"{name} ms", f"{name} vs naive", f"{name} GB/s"]
    ms = lambda r, name: f"{r.seconds[name] * 1e3:.2f}" if name in r.seconds else "-"  # noqa: E731
    for r in results:
        row = [r.case.name, ms(r, "xmodal"), ms(r, "naive"), ms(r, "faiss"), fmt_ratio(r.ratio("naive")),
               fmt_ratio(r.ratio("faiss")), f"{r.gflops:.0f}", f"{r.gbytes:.1f}"]
        for name in variants:
            found = name in r.seconds
            row += [ms(r, name), fmt_ratio(r.ratio("naive", name)) if found else "-",
                    f"{r.gbytes_of(name):.1f}" if found else "-"]
        rows.append(row)
    return rows


def notes(variants: List[str]) -> List[str]:
    """What the report's columns mean: the ratios, the baselines, xmodal and each variant timed."""
    lines = ["Ratios are baseline time / xmodal time, measured side by side in one run (above 1: xmodal is faster).",
             "naive = `torch.topk(q @ X.T, k)` (ip) or `torch.topk(torch.cdist(q, X), k, largest=False)` (l2);",
             "faiss = faiss-cpu IndexFlatIP / IndexFlatL2 on float32 data (faiss has no bf16 flat index).",
             "xmodal = `topk_search(..., strategy=\"auto\")`, the planner's choice (`xmodal.search_plan`)."]
    for name in variants:
        strategy, _, gemm = name[len("xmodal["):-1].partition(":")
        lines.append(f"{name} = `strategy=\"{strategy}\"`" + (f" with `settings.cpu_tile_gemm=\"{gemm}\"`" if gemm else "")
                     + ", timed in the same rounds.")
    return lines


# --- the project's search targets, read off one run -------------------------------------------------------

def _worst(results, name, select, value, use_max=False):
    """The worst (least, or with use_max the largest) of value(result) over the results that timed
    implementation `name` on a case `select` accepts; None when there are none."""
    values = [value(r) for r in results if name in r.seconds and select(r.case)]
    values = [v for v in values if v is not None]
    return (max(values) if use_max else min(values)) if values else None


def _target_rows(results, targets):
    """A targets table: a row per (label, goal, measure, ok) target, a column per implementation timed
    (xmodal and any variant), each cell "yes (value)" / "NO (value)" for the worst case of the run, or "-"
    where the run has none of the target's cases."""
    names = ["xmodal"] + variant_names(results)
    rows = [["target", "goal"] + names]
    for label, goal, measure, ok in targets:
        row = [label, goal]
        for name in names:
            v = measure(name)
            row.append("-" if v is None else f"{'yes' if ok(v) else 'NO'} ({v:.2f})")
        rows.append(row)
    return rows


def _vs_naive(name):
    return lambda r: r.ratio("naive", name)


def _share_of(bandwidth, name):
    """Database bytes per second of implementation ``name`` as a share of ``bandwidth`` (GB/s)."""
    return lambda r: r.gbytes_of(name) / bandwidth if bandwidth else None


def cuda_targets(results: List[SearchResult], env: dict) -> List[List[str]]:
    """The CUDA search targets: per implementation timed, the worst case of each."""
    copy = env.get("copy_bandwidth_GBps")
    grid = lambda c: (c.metric == "ip" and c.n == 1_000_000 and c.q in (1, 16, 256, 4096)  # noqa: E731
                      and c.k in (1, 10, 100, 1024) and c.d in (128, 512))

    def k_growth(name):
        def value(r):
            c = r.case
            match = [o for o in results if o.case == SearchCase(c.q, c.n, c.d, 10, c.dtype, c.metric) and name in o.seconds]
            return r.seconds[name] / match[0].seconds[name] if match else None
        return value

    def bf16_1m(d_ok):
        return lambda c: c.metric == "ip" and c.n == 1_000_000 and c.q >= 256 and c.dtype == "bfloat16" and d_ok(c.d)

    targets = [
        ("Q = 1, 16; N = 1M; D = 128, 512; fp32, bf16; k = 10: database bytes / time, share of the copy bandwidth",
         ">= 0.70", lambda n: _worst(results, n, lambda c: c.metric == "ip" and c.n == 1_000_000 and c.q in (1, 16)
                                     and c.k == 10 and c.d in (128, 512), _share_of(copy, n)), lambda v: v >= 0.70),
        ("Q >= 256, bf16, N = 1M, D <= 256: vs naive", ">= 3x",
         lambda n: _worst(results, n, bf16_1m(lambda d: d <= 256), _vs_naive(n)), lambda v: v >= 3),
        ("Q >= 256, bf16, N = 1M, D >= 768: vs naive", ">= 1.5x",
         lambda n: _worst(results, n, bf16_1m(lambda d: d >= 768), _vs_naive(n)), lambda v: v >= 1.5),
        ("never slower than naive: Q 1/16/256/4096 x k 1/10/100/1024 x D 128/512 x fp32/bf16", ">= 1x",
         lambda n: _worst(results, n, grid, _vs_naive(n)), lambda v: v >= 1.0),
        ("time at k = 256 / time at k = 10 (D = 128, N = 1M)", "<= 1.5",
         lambda n: _worst(results, n, lambda c: c.metric == "ip" and c.k == 256, k_growth(n), use_max=True),
         lambda v: v <= 1.5),
        ("Q = 16384, N = 10M, D = 128, bf16 runs (bounded workspace): seconds", "runs",
         lambda n: _worst(results, n, lambda c: c.q == 16384 and c.n == 10_000_000, lambda r: r.seconds[n]),
         lambda v: True),
    ]
    return _target_rows(results, targets)


def cpu_targets(results: List[SearchResult], env: dict) -> List[List[str]]:
    """The CPU search targets: per implementation timed, the worst case of each."""
    bandwidth = env.get("read_bandwidth_GBps")
    targets = [
        ("never below naive: every case", ">= 1.0x",
         lambda n: _worst(results, n, lambda c: True, _vs_naive(n)), lambda v: v >= 1.0),
        ("Q <= 16: database bytes / time, share of the read bandwidth", ">= 0.80",
         lambda n: _worst(results, n, lambda c: c.q <= 16, _share_of(bandwidth, n)), lambda v: v >= 0.80),
        ("bf16, Q = 1, D = 512, ip: vs naive", ">= 1.5x",
         lambda n: _worst(results, n, lambda c: c.dtype == "bfloat16" and c.q == 1 and c.d == 512 and c.metric == "ip",
                          _vs_naive(n)), lambda v: v >= 1.5),
    ]
    return _target_rows(results, targets)


def markdown(results: List[SearchResult], env: dict, device: str) -> str:
    """The markdown report: environment, notes, the table, then the targets read off the run."""
    text = format_markdown(table(results), env, f"topk_search benchmark ({device})", notes(variant_names(results)))
    rows = cuda_targets(results, env) if device.startswith("cuda") else cpu_targets(results, env)
    return text + "\n## Targets, worst case of this run\n\n" + "\n".join(markdown_table(rows)) + "\n"


def main(args) -> int:
    """``xmodal bench search`` (called by :func:`xmodal.bench.main`, which has checked the device)."""
    device = args.device
    variants = tuple(v for v in (getattr(args, "variants", None) or "").split(",") if v)
    for name in variants:
        try:
            variant_call(name, lambda strategy: None)
        except ValueError as e:
            print(f"xmodal bench: --variants: {e}")
            return 2
    env = environment(device)
    run_cases(args, env, search_grid(quick=args.quick, device="cuda" if device.startswith("cuda") else "cpu"),
              lambda case: run_search_case(case, device, repeats=args.repeats, use_faiss=not args.no_faiss,
                                           variants=variants),
              desc="bench search", table=table, markdown=lambda results: markdown(results, env, device),
              chart_title=f"xmodal topk_search vs naive PyTorch ({device}): speed-up",
              chart_bars=lambda results: [(r.case.name, r.ratio("naive")) for r in results])
    return 0
