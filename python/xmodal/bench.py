"""Benchmarks of the fused ops against naive PyTorch and faiss, shared by ``xmodal bench`` and the
pytest-benchmark suites in ``benchmarks/``.

Every case times xmodal and its baselines side by side in one process, on the same synthetic data, and
reports ratios (baseline time / xmodal time: above 1 means xmodal is faster).
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import xmodal
from xmodal._atomic import write_atomic


@dataclass(frozen=True)
class SearchCase:
    q: int
    n: int
    d: int
    k: int
    dtype: str = "float32"
    metric: str = "ip"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

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
    """What a PyTorch user writes without xmodal: materialise every score, then torch.topk."""
    if metric == "ip":
        return torch.topk(queries @ database.T, min(k, database.shape[0]), dim=1)
    if metric == "l2":
        return torch.topk(torch.cdist(queries, database), min(k, database.shape[0]), dim=1, largest=False)
    if metric == "cosine":
        qn = torch.nn.functional.normalize(queries, dim=1)
        xn = torch.nn.functional.normalize(database, dim=1)
        return torch.topk(qn @ xn.T, min(k, database.shape[0]), dim=1)
    raise ValueError(f"no naive baseline for metric {metric!r}")


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


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_repeats(repeats) -> int:
    """repeats, which must be a positive int (a median of no times does not exist)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats <= 0:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return repeats


def time_call(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up; CUDA work is synchronised."""
    check_repeats(repeats)
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class SearchResult:
    case: SearchCase
    seconds: Dict[str, float] = field(default_factory=dict)

    def ratio(self, baseline: str) -> Optional[float]:
        if baseline not in self.seconds:
            return None
        return self.seconds[baseline] / self.seconds["xmodal"]

    @property
    def gflops(self) -> float:
        c = self.case
        return 2 * c.q * c.n * c.d / self.seconds["xmodal"] / 1e9

    @property
    def gbytes(self) -> float:
        c = self.case
        return c.n * c.d * torch.tensor([], dtype=c.torch_dtype).element_size() / self.seconds["xmodal"] / 1e9


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
    times = {name: [] for name in calls}
    rounds = range(1, 2) if case.q * case.n > 1e11 else range(repeats + 1)
    for round_ in rounds:
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return SearchResult(case, {name: statistics.median(t) for name, t in times.items()})


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "xmodal": xmodal.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if not device.startswith("cuda"):
        env["cpu_flags"] = _cpu_flags()
        env["search_cpu_kind"] = xmodal._C.device_facts("cpu")["cpu_kind"]
        env["read_bandwidth_GBps"] = round(read_bandwidth(), 1)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["driver"] = _nvidia_driver()
        env["cuda"] = torch.version.cuda
        env["copy_bandwidth_GBps"] = round(copy_bandwidth(device), 1)
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    return env


def _nvidia_driver() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(results: List[SearchResult]) -> List[List[str]]:
    variants = sorted({name for r in results for name in r.seconds if name.startswith("xmodal[")})
    rows = [["case", "xmodal ms", "naive ms", "faiss ms", "vs naive", "vs faiss", "GFLOP/s", "GB/s"]]
    for name in variants:
        rows[0] += [f"{name} ms", f"{name} vs naive", f"{name} GB/s"]
    for r in results:
        s = r.seconds
        row = [
            r.case.name,
            f"{s['xmodal'] * 1e3:.2f}",
            f"{s['naive'] * 1e3:.2f}" if "naive" in s else "-",
            f"{s['faiss'] * 1e3:.2f}" if "faiss" in s else "-",
            _fmt_ratio(r.ratio("naive")),
            _fmt_ratio(r.ratio("faiss")),
            f"{r.gflops:.0f}",
            f"{r.gbytes:.1f}",
        ]
        for name in variants:
            if name in s:
                ratio = s["naive"] / s[name] if "naive" in s else None
                row += [f"{s[name] * 1e3:.2f}", _fmt_ratio(ratio), f"{r.gbytes * s['xmodal'] / s[name]:.1f}"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    return rows


def format_text(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def format_markdown(rows: List[List[str]], env: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "Ratios are baseline time / xmodal time, measured side by side in one run (above 1: xmodal is faster).",
              "naive = `torch.topk(q @ X.T, k)` (ip) or `torch.topk(torch.cdist(q, X), k, largest=False)` (l2);",
              "faiss = faiss-cpu IndexFlatIP / IndexFlatL2 on float32 data (faiss has no bf16 flat index)."]
    variants = [c[: -len(" ms")] for c in rows[0] if c.startswith("xmodal[") and c.endswith(" ms")]
    lines.append("xmodal = `topk_search(..., strategy=\"auto\")`, the planner's choice (`xmodal.search_plan`).")
    for name in variants:
        strategy, _, gemm = name[len("xmodal["):-1].partition(":")
        lines.append(f"{name} = `strategy=\"{strategy}\"`" + (f" with `settings.cpu_tile_gemm=\"{gemm}\"`" if gemm else "")
                     + ", timed in the same rounds.")
    lines.append("")
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _element_size(dtype: str) -> int:
    return torch.tensor([], dtype=getattr(torch, dtype)).element_size()


def cuda_targets(results: List[SearchResult], env: dict) -> List[List[str]]:
    """The CUDA search targets read off one run: a row per target, a column per implementation timed
    (xmodal and any opt-in variant), each cell the worst case's figure and whether it meets the target
    ("-": the run has none of the target's cases)."""
    names = ["xmodal"] + sorted({n for r in results for n in r.seconds if n.startswith("xmodal[")})
    copy = env.get("copy_bandwidth_GBps")
    grid = lambda c: (c.metric == "ip" and c.n == 1_000_000 and c.q in (1, 16, 256, 4096)  # noqa: E731
                      and c.k in (1, 10, 100, 1024) and c.d in (128, 512))

    def worst(name, select, value, use_max=False):
        return _worst(results, name, select, value, use_max)

    def vs_naive(name):
        return lambda r: r.seconds["naive"] / r.seconds[name] if "naive" in r.seconds else None

    def k_growth(name):
        def value(r):
            c = r.case
            match = [o for o in results if o.case == SearchCase(c.q, c.n, c.d, 10, c.dtype, c.metric) and name in o.seconds]
            return r.seconds[name] / match[0].seconds[name] if match else None
        return value

    targets = [
        ("Q = 1, 16; N = 1M; D = 128, 512; fp32, bf16; k = 10: database bytes / time, share of the copy bandwidth",
         ">= 0.70", lambda n: worst(n, lambda c: c.metric == "ip" and c.n == 1_000_000 and c.q in (1, 16) and c.k == 10
                                    and c.d in (128, 512),
                                    lambda r: (r.case.n * r.case.d * _element_size(r.case.dtype) / r.seconds[n] / 1e9 / copy)
                                    if copy else None), lambda v: v >= 0.70),
        ("Q >= 256, bf16, N = 1M, D <= 256: vs naive", ">= 3x",
         lambda n: worst(n, lambda c: c.metric == "ip" and c.n == 1_000_000 and c.q >= 256 and c.dtype == "bfloat16"
                         and c.d <= 256, vs_naive(n)), lambda v: v >= 3),
        ("Q >= 256, bf16, N = 1M, D >= 768: vs naive", ">= 1.5x",
         lambda n: worst(n, lambda c: c.metric == "ip" and c.n == 1_000_000 and c.q >= 256 and c.dtype == "bfloat16"
                         and c.d >= 768, vs_naive(n)), lambda v: v >= 1.5),
        ("never slower than naive: Q 1/16/256/4096 x k 1/10/100/1024 x D 128/512 x fp32/bf16", ">= 1x",
         lambda n: worst(n, grid, vs_naive(n)), lambda v: v >= 1.0),
        ("time at k = 256 / time at k = 10 (D = 128, N = 1M)", "<= 1.5",
         lambda n: worst(n, lambda c: c.metric == "ip" and c.k == 256, k_growth(n), use_max=True), lambda v: v <= 1.5),
        ("Q = 16384, N = 10M, D = 128, bf16 runs (bounded workspace): seconds", "runs",
         lambda n: worst(n, lambda c: c.q == 16384 and c.n == 10_000_000, lambda r: r.seconds[n]), lambda v: True),
    ]
    return _target_rows(names, targets)


def _write_reports(args, env, results, device):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": [{"case": asdict(r.case), "seconds": r.seconds} for r in results]},
                      f, indent=2)
    if args.markdown:
        text = format_markdown(table(results), env, f"topk_search benchmark ({device})")
        rows = cuda_targets(results, env) if device.startswith("cuda") else cpu_targets(results, env)
        if rows:
            text += "\n## Targets, worst case of this run\n\n| " + " | ".join(rows[0]) + " |\n|"
            text += "---|" * len(rows[0]) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])
        with open(args.markdown, "w") as f:
            f.write(text)


def read_bandwidth(nbytes: int = 400 << 20) -> float:
    """CPU memory read bandwidth in GB/s: the best of 7 sums of a 400 MB float32 tensor on every thread."""
    x = torch.ones(nbytes // 4)
    best = min(_timed(x.sum) for _ in range(7))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu_flags() -> str:
    """The instruction sets that matter for search, from /proc/cpuinfo."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
              "amx_int8", "amx_fp16", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in wanted if w in have)
    except OSError:
        pass
    return ""


def _worst(results, name, select, value, use_max=False):
    """The worst (least, or with use_max the largest) of value(result) over the results that timed
    implementation `name` on a case `select` accepts; None when there are none."""
    values = [value(r) for r in results if name in r.seconds and select(r.case)]
    values = [v for v in values if v is not None]
    return (max(values) if use_max else min(values)) if values else None


def _target_rows(names, targets):
    """A targets table: a row per (label, goal, measure, ok) target, a column per implementation, each cell
    "yes (value)" / "NO (value)", or "-" where the run has none of the target's cases."""
    rows = [["target", "goal"] + names]
    for label, goal, measure, ok in targets:
        row = [label, goal]
        for name in names:
            v = measure(name)
            row.append("-" if v is None else f"{'yes' if ok(v) else 'NO'} ({v:.2f})")
        rows.append(row)
    return rows


def cpu_targets(results: List[SearchResult], env: dict) -> List[List[str]]:
    """The CPU search targets read off one run: per implementation timed, the worst case of each."""
    names = ["xmodal"] + sorted({n for r in results for n in r.seconds if n.startswith("xmodal[")})
    bandwidth = env.get("read_bandwidth_GBps")

    def worst(name, select, value):
        return _worst(results, name, select, value)

    def share_of_bandwidth(name):
        return lambda r: (r.case.n * r.case.d * _element_size(r.case.dtype) / r.seconds[name] / 1e9 / bandwidth
                          if bandwidth else None)

    targets = [
        ("never below naive: every case", ">= 1.0x",
         lambda n: worst(n, lambda c: True, lambda r: r.seconds["naive"] / r.seconds[n] if "naive" in r.seconds else None),
         lambda v: v >= 1.0),
        ("Q <= 16: database bytes / time, share of the read bandwidth", ">= 0.80",
         lambda n: worst(n, lambda c: c.q <= 16, share_of_bandwidth(n)), lambda v: v >= 0.80),
        ("bf16, Q = 1, D = 512, ip: vs naive", ">= 1.5x",
         lambda n: worst(n, lambda c: c.dtype == "bfloat16" and c.q == 1 and c.d == 512 and c.metric == "ip",
                         lambda r: r.seconds["naive"] / r.seconds[n] if "naive" in r.seconds else None),
         lambda v: v >= 1.5),
    ]
    return _target_rows(names, targets)


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / seconds / 1e9


def write_ratio_chart(path: str, title: str, bars: List[tuple]) -> None:
    """A PNG bar chart of speed-ups: one horizontal bar per (label, ratio), a line at 1x (parity)."""
    from PIL import Image, ImageDraw

    bars = [(label, r) for label, r in bars if r is not None]
    label_w, bar_w, row_h, pad = 430, 420, 18, 10
    top = max([r for _, r in bars] + [1.0]) * 1.05
    width, height = label_w + bar_w + 80, pad * 3 + 16 + row_h * max(1, len(bars))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill="black")
    y0 = pad * 2 + 16
    for n, (label, r) in enumerate(bars):
        y = y0 + n * row_h
        draw.text((pad, y + 3), label[:70], fill="black")
        colour = (40, 150, 70) if r >= 1 else (200, 60, 50)
        draw.rectangle([label_w, y + 3, label_w + int(bar_w * r / top), y + row_h - 3], fill=colour)
        draw.text((label_w + int(bar_w * r / top) + 4, y + 3), f"{r:.2f}x", fill="black")
    x1 = label_w + int(bar_w / top)
    draw.line([x1, y0 - 4, x1, height - pad], fill=(90, 90, 90), width=1)
    write_atomic(path, image.save, suffix=".png")


def cuda_missing(device: str) -> bool:
    """True (after saying so) when a CUDA device is asked for and none is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("xmodal bench: --device cuda asked for, but no CUDA GPU is visible")
        return True
    return False


def main(args) -> int:
    device = args.device
    if cuda_missing(device):
        return 2
    cases = search_grid(quick=args.quick, device="cuda" if device.startswith("cuda") else "cpu")
    variants = tuple(v for v in (getattr(args, "variants", None) or "").split(",") if v)
    for name in variants:
        try:
            variant_call(name, lambda strategy: None)
        except ValueError as e:
            print(f"xmodal bench: --variants: {e}")
            return 2
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    results = []
    env = environment(device)
    progress = tqdm(cases, desc="bench search", unit="case") if tqdm else cases
    for case in progress:
        if tqdm:
            progress.set_postfix_str(case.name)
        results.append(run_search_case(case, device, repeats=args.repeats, use_faiss=not args.no_faiss,
                                       variants=variants))
        _write_reports(args, env, results, device)  # after every case, so a cut-off run still reports
    print(format_text(table(results)))
    if args.plot:
        write_ratio_chart(args.plot, f"xmodal topk_search vs naive PyTorch ({device}): speed-up",
                          [(r.case.name, r.ratio("naive")) for r in results])
    return 0
