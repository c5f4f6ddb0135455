"""What every ``xmodal bench`` benchmark shares: timing (interleaved rounds, medians, CUDA synchronised), the
machine the run is on, the result shape, and the reports (text table, markdown, JSON, ratio chart).

A benchmark module supplies its cases, a function that times one case into a :class:`Result`, a table of
the results and the notes its markdown report opens with; :func:`run_cases` does the rest.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

import xmodal
from xmodal._atomic import write_atomic


# --- timing -----------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_repeats(repeats) -> int:
    """repeats, which must be a positive int (a median of no times does not exist)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats <= 0:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return repeats


def time_interleaved(calls: Dict[str, Callable[[], object]], device: str, repeats: int,
                     warmup: bool = True) -> Dict[str, float]:
    """Median wall time of each call over ``repeats`` rounds of one call of each (after a warm-up round
    unless ``warmup`` is False), so that drift in the machine's speed during a run affects them alike."""
    check_repeats(repeats)
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1 if warmup else repeats):
        for name, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ or not warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_call(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up; CUDA work is synchronised."""
    return time_interleaved({"call": fn}, device, repeats)["call"]


# --- the machine ------------------------------------------------------------------------------------------

# the instruction sets that matter for xmodal's CPU kernels, as /proc/cpuinfo names them
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
             "amx_int8", "amx_fp16", "asimd", "sve")


def _cpuinfo_field(prefixes: tuple) -> Optional[str]:
    """The value of the first /proc/cpuinfo line starting with one of ``prefixes``, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(prefixes):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field(("model name",)) or platform.processor()


def cpu_flags() -> str:
    have = set((_cpuinfo_field(("flags", "Features")) or "").split())
    return " ".join(w for w in CPU_FLAGS if w in have)


def nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def read_bandwidth(nbytes: int = 400 << 20) -> float:
    """CPU memory read bandwidth in GB/s: the best of 7 sums of a 400 MB float32 tensor on every thread."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / seconds / 1e9


def faiss_version() -> Optional[str]:
    try:
        import faiss
    except ImportError:
        return None
    return faiss.__version__


def faiss_simd_level() -> Optional[str]:
    """The instruction level faiss dispatches to (its FAISS_SIMD_LEVEL environment variable caps it, as
    an emulated AVX2-only run needs), or None where faiss or its dispatch is not there."""
    try:
        import faiss
        return str(faiss.SIMDConfig.get_level_name())
    except (ImportError, AttributeError):
        return None


def environment(device: str, faiss: bool = True) -> dict:
    """Date, versions and the machine: CPU model, instruction sets, threads, and the bandwidth the targets are
    measured against (CPU: read bandwidth; CUDA: GPU, driver and copy bandwidth); with ``faiss``, last, the
    version of faiss (None when it is not installed) and the instructions it uses, for the reports that
    compare against it."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "xmodal": xmodal.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["driver"] = nvidia_driver()
        env["cuda"] = torch.version.cuda
        env["copy_bandwidth_GBps"] = round(copy_bandwidth(device), 1)
    else:
        env["cpu_flags"] = cpu_flags()
        env["search_cpu_kind"] = xmodal._C.device_facts("cpu")["cpu_kind"]
        env["read_bandwidth_GBps"] = round(read_bandwidth(), 1)
    if faiss:
        env["faiss"] = faiss_version()
        simd = faiss_simd_level()
        if simd:
            env["faiss_simd"] = simd
    return env


def cuda_missing(device: str) -> bool:
    """True (after saying so) when a CUDA device is asked for and none is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("xmodal bench: --device cuda asked for, but no CUDA GPU is visible")
        return True
    return False


# --- results ----------------------------------------------------------------------------------------------

class Case:
    """Base of the benchmarks' case dataclasses, which have a ``dtype`` field named as torch names it and a
    ``name`` property for tables and progress."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Result:
    """One case's median seconds per implementation: ``"xmodal"``, its variants ``"xmodal[name]"`` and the
    baselines. Subclasses add their own measurements as further fields; every field goes into the JSON."""
    case: object
    seconds: Dict[str, float] = field(default_factory=dict)

    def ratio(self, baseline: str, impl: str = "xmodal") -> Optional[float]:
        """baseline time / impl time (above 1: impl is faster); None when the baseline was not timed."""
        if baseline not in self.seconds or impl not in self.seconds:
            return None
        return self.seconds[baseline] / self.seconds[impl]

    @property
    def impls(self) -> List[str]:
        """xmodal and its variants, in the order timed."""
        return [n for n in self.seconds if n.startswith("xmodal")]

    @property
    def baselines(self) -> List[str]:
        return [n for n in self.seconds if not n.startswith("xmodal")]

    def as_json(self) -> dict:
        return {"case": asdict(self.case), **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "case"}}


def variant_names(results: Iterable[Result]) -> List[str]:
    """The variants ``xmodal[name]`` any of the results timed, sorted."""
    return sorted({n for r in results for n in r.seconds if n.startswith("xmodal[")})


# --- reports ----------------------------------------------------------------------------------------------

def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_text(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def markdown_table(rows: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def format_markdown(rows: List[List[str]], env: dict, title: str, notes: Sequence[str]) -> str:
    """A report: the title, the environment as a list, the notes that say what the columns mean, the table."""
    lines = [f"# {title}", ""] + [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", *notes, ""] + markdown_table(rows)
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def publish(text: str, data: dict, markdown: Optional[str] = None, json_path: Optional[str] = None) -> None:
    """A standalone benchmark's ending: print the markdown report, write it to ``markdown`` and ``data`` to
    ``json_path`` (each only when given)."""
    print(text)
    if markdown:
        _write_text(markdown, text)
    if json_path:
        _write_text(json_path, json.dumps(data, indent=2))


def write_reports(args, env: dict, results: List[Result], markdown: Callable[[List[Result]], str]) -> None:
    """The JSON (``--json``: environment and every result's fields) and markdown (``--markdown``) reports."""
    if args.json:
        _write_text(args.json, json.dumps({"environment": env, "results": [r.as_json() for r in results]}, indent=2))
    if args.markdown:
        _write_text(args.markdown, markdown(results))


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


def run_cases(args, env: dict, cases: list, run_case: Callable[[object], Result], desc: str,
              table: Callable[[List[Result]], List[List[str]]], markdown: Callable[[List[Result]], str],
              chart_title: str, chart_bars: Callable[[List[Result]], List[tuple]]) -> List[Result]:
    """Times every case, rewriting the reports after each (so a cut-off run still reports), then prints the
    table and, with ``--plot``, draws the chart."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    results = []
    progress = tqdm(cases, desc=desc, unit="case") if tqdm else cases
    for case in progress:
        if tqdm:
            progress.set_postfix_str(case.name)
        results.append(run_case(case))
        write_reports(args, env, results, markdown)
    print(format_text(table(results)))
    if args.plot:
        write_ratio_chart(args.plot, chart_title, chart_bars(results))
    return results
