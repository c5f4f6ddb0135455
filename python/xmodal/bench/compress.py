"""``xmodal bench compress``: compressed search (FlatIndex with ``codec="int8"``, ``codec="binary"`` and
``reduce_to``) against exact float32 search and faiss-cpu's counterparts: recall@10 against the exact
answer, index bytes, build time, single-query latency (Q = 1) and batch throughput (Q = 256), then the
project's compression targets read off the run.

One case per data set (``clustered``: a seeded synthetic set with cluster structure; ``model``: embeddings of
rendered Shapes images by a CrossModalModel trained in-process). Every method of a case is built on the same
rows and timed interleaved with the others (one call of each per round, after a warm-up round; medians).

This module holds the cases, the timing of a case, the results, the targets, the reports, the recall / QPS
chart and the command; the data sets are in :mod:`.compress_data`, the methods in :mod:`.compress_methods`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import xmodal

from .compress_data import DATASETS, MODEL_STEPS, MODEL_STEPS_QUICK, make_data
from .compress_methods import (BASELINE, CHUNK, RESCORES, counterpart, faiss_methods, found_ids, import_faiss,
                               reduced_dim, xmodal_methods)
from .compress_methods import method_names  # noqa: F401  (compress.method_names: what a run reports, in order)
from .harness import (Case, Result, check_repeats, environment, fmt_ratio, format_markdown, format_text, markdown_table,
                      run_cases, time_call, time_interleaved)
from .._atomic import write_atomic
from ..metrics import knn_recall

DEFAULT_N, QUICK_N, DEFAULT_DIM = 1_000_000, 20_000, 512
K, Q_BATCH = 10, 256
Q_SINGLE, Q_SINGLE_QUICK = 100, 20     # queries timed one at a time (Q = 1)


@dataclass(frozen=True)
class CompressCase(Case):
    dataset: str
    n: int
    d: int
    k: int = K
    q_batch: int = Q_BATCH
    q_single: int = Q_SINGLE
    metric: str = "cosine"
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"{self.dataset} N={self.n} D={self.d} k={self.k}"


# --- results --------------------------------------------------------------------------------------------------

@dataclass
class CompressResult(Result):
    """``seconds``: median seconds of one Q = 256 batch per method; ``seconds_q1``: median over rounds of the
    mean seconds per single query; ``build_seconds`` (once: train + add), ``nbytes``, ``recall`` (recall@10 of
    the Q = 256 batch against the exact float32 answer), ``pca_fit_seconds`` (xmodal.PCA(D / 4).fit of the
    whole database), ``data`` (how the rows were made) and ``targets`` (read off this result)."""
    seconds_q1: Dict[str, float] = field(default_factory=dict)
    build_seconds: Dict[str, float] = field(default_factory=dict)
    nbytes: Dict[str, int] = field(default_factory=dict)
    recall: Dict[str, float] = field(default_factory=dict)
    pca_fit_seconds: Optional[float] = None
    data: str = ""
    targets: List[dict] = field(default_factory=list)

    def qps(self, name: str, q: int) -> Optional[float]:
        """Queries per second of method ``name`` at Q = 1 (one at a time) or at Q = the batch."""
        seconds = self.seconds_q1.get(name) if q == 1 else self.seconds.get(name)
        if seconds is None:
            return None
        return (1 if q == 1 else self.case.q_batch) / seconds

    def speedup(self, name: str, baseline: Optional[str], q: int) -> Optional[float]:
        """QPS of ``name`` / QPS of ``baseline`` (above 1: ``name`` is faster); None where either is missing."""
        a, b = self.qps(name, q), (self.qps(baseline, q) if baseline else None)
        return None if a is None or b is None else a / b

    def bytes_ratio(self, name: str) -> Optional[float]:
        return self.nbytes[name] / self.nbytes[BASELINE] if name in self.nbytes and BASELINE in self.nbytes else None

    @property
    def methods(self) -> List[str]:
        return list(self.recall)


def run_compress_case(case: CompressCase, repeats: int = 3, use_faiss: bool = True,
                      model_steps: int = MODEL_STEPS, seed: int = 0) -> CompressResult:
    """Builds every method on the case's rows, measures recall@k against the exact float32 FlatIndex, times
    Q = 1 (``case.q_single`` queries one at a time) and Q = ``case.q_batch`` (one batch) interleaved, and
    times xmodal.PCA(D / 4).fit of the database."""
    check_repeats(repeats)
    x, queries, text = make_data(case, model_steps, seed)
    methods = xmodal_methods(x, case.k)
    if use_faiss:
        methods.update(faiss_methods(x, case.k))
    exact = found_ids(methods[BASELINE].search(queries))
    recall = {name: knn_recall(found_ids(m.search(queries)), exact) for name, m in methods.items()}
    single = [queries[i:i + 1] for i in range(case.q_single)]

    def one_at_a_time(method):
        return lambda: [method.search(q) for q in single]

    q1 = time_interleaved({name: one_at_a_time(m) for name, m in methods.items()}, "cpu", repeats)
    batch = time_interleaved({name: (lambda m=m: m.search(queries)) for name, m in methods.items()}, "cpu", repeats)
    r = reduced_dim(case.d)
    pca_fit = time_call(lambda: xmodal.PCA(r).fit(x), "cpu", repeats)
    result = CompressResult(case, batch, {name: s / case.q_single for name, s in q1.items()},
                            {name: m.build_seconds for name, m in methods.items()},
                            {name: int(m.nbytes) for name, m in methods.items()}, recall, pca_fit, text)
    result.targets = compress_targets(result)
    return result


# --- the project's compression targets, read off one result -----------------------------------------------------

FULL_N = 1_000_000


def _row(target: str, goal: str, measured: str, met: Optional[bool], value: Optional[float] = None) -> dict:
    """met: True / False, or None for a figure reported without a goal or one this run cannot judge."""
    return {"target": target, "goal": goal, "measured": measured, "value": value, "met": met}


def binary_rescore(result: CompressResult, floor: float = 0.95) -> Tuple[Optional[int], bool]:
    """(rescore, reached): the smallest rescore whose xmodal binary recall@10 is at least ``floor``, or else
    the rescore with the best recall (reached False); (None, False) without binary results."""
    recalls = {s: result.recall.get(f"xmodal[binary r={s}]") for s in RESCORES}
    recalls = {s: v for s, v in recalls.items() if v is not None}
    if not recalls:
        return None, False
    for s in sorted(recalls):
        if recalls[s] >= floor:
            return s, True
    return max(sorted(recalls), key=lambda s: recalls[s]), False


def compress_targets(result: CompressResult) -> List[dict]:
    """The targets (met / not met computed from ``result``): int8 bytes, recall and speed against float32 and
    faiss SQ8; binary recall at some rescore <= 10 on the clustered set and its speed at that rescore against
    float32 and faiss IndexBinaryFlat + the same rescoring (on other data sets the recall curve is reported);
    PCA + int8 recall and speed (reported) and the PCA fit time (judged at N >= 1,000,000 only)."""
    c, rows = result.case, []
    rec = result.recall
    # The speed goals are set for 1,000,000 rows, where a float32 scan reads memory and codes read a quarter
    # of it; a smaller run (--quick: 20,000 rows, 41 MB of float32) is served from cache and per-call costs,
    # so it reports its speeds without judging them.
    judge_speed = c.n >= FULL_N
    unjudged = f" (n/a: speed goals are set at {FULL_N:,} rows; this run: {c.n:,})"

    def speed(name, baseline, q):
        return result.speedup(name, baseline, q)

    def judged(measured: str, met: bool):
        return (measured, met) if judge_speed else (measured + unjudged, None)

    i8 = "xmodal[int8]"
    if i8 in rec:
        ratio = result.bytes_ratio(i8)
        rows.append(_row("int8: index bytes / float32 FlatIndex bytes", "<= 0.26", f"{ratio:.3f}", ratio <= 0.26,
                         ratio))
        rows.append(_row("int8: recall@10 vs exact float32", ">= 0.97", f"{rec[i8]:.4f}", rec[i8] >= 0.97, rec[i8]))
        for q, goal in ((1, 3.0), (c.q_batch, 1.5)):
            v = speed(i8, BASELINE, q)
            rows.append(_row(f"int8: QPS / float32 FlatIndex QPS, Q={q}", f">= {goal:g}x", *judged(fmt_ratio(v), v >= goal),
                             v))
        sq8 = "faiss[sq8]"
        for q in (1, c.q_batch):
            if sq8 not in rec:
                rows.append(_row(f"int8: QPS / faiss SQ8 QPS at equal or better recall, Q={q}", ">= 1.0x",
                                 "faiss not run", None))
                continue
            v = speed(i8, sq8, q)
            rows.append(_row(f"int8: QPS / faiss SQ8 QPS at equal or better recall, Q={q}",
                             ">= 1.0x and recall >= faiss's",
                             *judged(f"{fmt_ratio(v)} (recall {rec[i8]:.4f} vs {rec[sq8]:.4f})",
                                     v >= 1.0 and rec[i8] >= rec[sq8]), v))
    s, reached = binary_rescore(result)
    if s is not None and c.dataset == "clustered":
        b = f"xmodal[binary r={s}]"
        how = f"rescore {s}" + ("" if reached else ", the best; none reaches 0.95")
        rows.append(_row("binary: recall@10 >= 0.95 at some rescore <= 10 (clustered)", ">= 0.95",
                         f"{rec[b]:.4f} at {how}", reached, rec[b]))
        v = speed(b, BASELINE, 1)
        rows.append(_row(f"binary: QPS / float32 FlatIndex QPS, Q=1, at rescore {s}", ">= 10x",
                         *judged(fmt_ratio(v), v >= 10), v))
        for q in (1, c.q_batch):
            f = f"faiss[binary r={s}]"
            v = speed(b, f, q) if f in rec else None
            rows.append(_row(f"binary: QPS / faiss IndexBinaryFlat + same rescoring QPS, Q={q}, at rescore {s}",
                             ">= 1.0x", *(("faiss not run", None) if v is None else judged(fmt_ratio(v), v >= 1.0)),
                             v))
    elif s is not None:
        curve = ", ".join(f"r={t}: {rec[f'xmodal[binary r={t}]']:.4f}" for t in RESCORES)
        rows.append(_row(f"binary: recall@10 curve on {c.dataset} embeddings", "report", curve, None))
        v = speed(f"xmodal[binary r={s}]", BASELINE, 1)
        rows.append(_row(f"binary: QPS / float32 FlatIndex QPS, Q=1, at rescore {s} (best recall)", "report",
                         fmt_ratio(v), None, v))
    p = f"xmodal[pca{reduced_dim(c.d)}+int8]"
    if p in rec:
        label = f"PCA {c.d}->{reduced_dim(c.d)} + int8"
        rows.append(_row(f"{label}: recall@10 vs exact float32", "report", f"{rec[p]:.4f}", None, rec[p]))
        for q in (1, c.q_batch):
            v = speed(p, BASELINE, q)
            rows.append(_row(f"{label}: QPS / float32 FlatIndex QPS, Q={q}", "report", fmt_ratio(v), None, v))
    if result.pca_fit_seconds is not None:
        t = result.pca_fit_seconds
        judged = c.n >= FULL_N and c.d == DEFAULT_DIM
        rows.append(_row(f"PCA({reduced_dim(c.d)}).fit of 1M x 512 (this run: {c.n:,} x {c.d})", "< 10 s",
                         f"{t:.2f} s" + ("" if judged else " (n/a: not 1M x 512)"), (t < 10) if judged else None, t))
    return rows


def _met(row: dict) -> str:
    if row["met"] is None:
        return "reported" if row["goal"] == "report" else "n/a"
    return "met" if row["met"] else "not met"


def targets_table(results: Sequence[CompressResult]) -> List[List[str]]:
    rows = [["data", "target", "goal", "measured", "met"]]
    for r in results:
        rows += [[r.case.dataset, t["target"], t["goal"], t["measured"], _met(t)] for t in r.targets]
    return rows


# --- reports --------------------------------------------------------------------------------------------------

def table(results: Sequence[CompressResult]) -> List[List[str]]:
    rows = [["data", "method", "build s", "MB", "bytes / f32", "recall@10", "Q=1 ms", "Q=1 QPS", "Q=1 vs f32",
             "Q=1 vs faiss", "Q=256 s", "Q=256 QPS", "Q=256 vs f32", "Q=256 vs faiss"]]
    for r in results:
        qb = r.case.q_batch
        for name in r.methods:
            other = counterpart(name)
            rows.append([r.case.dataset, name, f"{r.build_seconds[name]:.2f}", f"{r.nbytes[name] / 1e6:.1f}",
                         f"{r.bytes_ratio(name):.3f}", f"{r.recall[name]:.4f}", f"{r.seconds_q1[name] * 1e3:.3f}",
                         f"{r.qps(name, 1):.0f}", fmt_ratio(r.speedup(name, BASELINE, 1)),
                         fmt_ratio(r.speedup(name, other, 1)), f"{r.seconds[name]:.4f}", f"{r.qps(name, qb):.0f}",
                         fmt_ratio(r.speedup(name, BASELINE, qb)), fmt_ratio(r.speedup(name, other, qb))])
    return rows


def notes(results: Sequence[CompressResult], repeats: int) -> List[str]:
    c = results[0].case if results else CompressCase("clustered", 0, DEFAULT_DIM)
    r = reduced_dim(c.d)
    lines = [
        f"Compressed search, metric cosine, k = {c.k}. Recall@{c.k} is the share of the exact answer's ids found, "
        f"over the Q = {c.q_batch} batch; the exact answer is xmodal's float32 FlatIndex (so its recall is 1 by "
        "definition). Every method searches the same unit rows.",
        "",
        f"Timing: median of {repeats} interleaved round{'s' if repeats != 1 else ''} (one call of each method per "
        "round; a Q=1 call searches every single query in turn) after a warm-up round. "
        f"Q=1: {c.q_single} queries searched one at a time; `Q=1 ms` is the mean latency, `Q=1 QPS` = 1 / latency. "
        f"Q={c.q_batch}: one batch; QPS = {c.q_batch} / seconds. `vs f32`: QPS / QPS of xmodal[float32]; `vs faiss`: "
        "QPS / QPS of the faiss counterpart (above 1: faster). `build s`: one train + add, timed once. "
        f"Threads: torch {torch.get_num_threads()}, faiss set to the same (faiss.omp_set_num_threads).",
        "",
        "Methods:",
        "",
        "- xmodal[float32]: `FlatIndex(d, \"cosine\")`, exact; xmodal[int8]: `codec=\"int8\"`; xmodal[binary r=R]: one "
        "`codec=\"binary\"` index searched with `rescore=R` (Hamming top R*k, rescored against its int8 codes); "
        f"xmodal[pca{r}+int8]: `codec=\"int8\", reduce_to={r}`. Each built by one `add` of every row (which trains "
        "the codec / PCA).",
        "- faiss[flat]: IndexFlatIP; faiss[sq8]: IndexScalarQuantizer(d, QT_8bit, METRIC_INNER_PRODUCT), trained on "
        "every row; faiss[binary r=R]: IndexBinaryFlat on the signs of (row - mean of all rows), bits packed with "
        "numpy, then the best R*k Hamming candidates rescored in numpy against the faiss SQ8 index's decoded rows "
        "(`reconstruct_batch`) by cosine (dot / norm of the decoded row, as xmodal's binary codec rescoring); "
        f"query bits, decoding and rescoring are inside the timed call. faiss[pca{r}+sq8]: IndexPreTransform with "
        f"PCAMatrix({c.d}, {r}), then NormalizationTransform (L2, so the reduced rows are searched by cosine as xmodal "
        f"does), then SQ8 IP; trained with faiss's defaults (PCAMatrix subsamples to max_points_per_d * d rows). "
        f"Rows are added in chunks of {CHUNK:,}.",
        "- Bytes: xmodal: `index.nbytes` (codes, per-row terms, int64 ids, codec / PCA parameters; storage grows "
        "to at most ~1.15x what the rows need, and nbytes counts what is held). faiss: ntotal * code_size (faiss stores no ids) plus trained "
        "parameters (SQ ranges; PCA matrix A and bias b); binary + rescoring counts the bit codes, the mean and the "
        "whole SQ8 index it rescores with (its build time includes the SQ8 build too).",
        f"- PCA fit: `xmodal.PCA({r}).fit` of the whole database, timed separately (median of {repeats} after a "
        "warm-up); the fit target is judged only for a 1,000,000 x 512 database.",
        "",
        "Data:",
        "",
    ]
    lines += [f"- {res.data}" for res in results]
    return lines


def markdown(results: Sequence[CompressResult], env: dict, repeats: int) -> str:
    text = format_markdown(table(results), env, "Compressed search benchmark (cpu)", notes(results, repeats))
    rows = targets_table(results)
    return text + "\n## Targets\n\nmet / not met computed from the measurements above.\n\n" + \
        "\n".join(markdown_table(rows)) + "\n"


# --- the recall / QPS chart ---------------------------------------------------------------------------------------

_COLOURS = {"float32": (110, 110, 110), "int8": (40, 90, 200), "pca": (150, 60, 170),
            "binary r=1": (200, 230, 170), "binary r=2": (130, 200, 110), "binary r=4": (50, 160, 60),
            "binary r=10": (20, 100, 30)}


def _kind(name: str) -> str:
    inner = name[name.index("[") + 1:-1]
    if inner in ("float32", "flat"):
        return "float32"
    if inner in ("int8", "sq8"):
        return "int8"
    return "pca" if inner.startswith("pca") else inner


def write_recall_qps_chart(path: str, results: Sequence[CompressResult], title: str) -> None:
    """A PNG: one panel per (data set, Q), recall@10 against QPS (log axis); one marker per method, filled for
    xmodal and hollow for faiss, coloured by codec; binary rescore settings joined by a line per library."""
    from PIL import Image, ImageDraw

    qs = (1, results[0].case.q_batch) if results else (1, Q_BATCH)
    pw, ph, left, top, gap = 460, 300, 60, 40, 40
    legend_h = 70
    width = left + len(qs) * (pw + gap) + 10
    height = top + len(results) * (ph + gap + 20) + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    for row, r in enumerate(results):
        for col, q in enumerate(qs):
            x0, y0 = left + col * (pw + gap), top + row * (ph + gap + 20) + 20
            points = {n: (r.qps(n, q), r.recall[n]) for n in r.methods if r.qps(n, q)}
            if not points:
                continue
            lq = [math.log10(v[0]) for v in points.values()]
            lo, hi = math.floor(min(lq) * 2) / 2, math.ceil(max(lq) * 2) / 2 + (0.5 if min(lq) == max(lq) else 0)
            floor = min(0.9, math.floor(min(v[1] for v in points.values()) * 10) / 10)
            sx = lambda v: x0 + (math.log10(v) - lo) / (hi - lo) * pw  # noqa: E731
            sy = lambda v: y0 + ph - (v - floor) / (1.0 - floor) * (ph - 10)  # noqa: E731  (room above 1.0)
            draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(120, 120, 120))
            draw.text((x0, y0 - 16), f"{r.case.dataset}, N = {r.case.n:,}, Q = {q}: recall@{r.case.k} vs QPS",
                      fill="black")
            e = lo
            while e <= hi + 1e-9:
                x = x0 + (e - lo) / (hi - lo) * pw
                draw.line([x, y0 + ph, x, y0 + ph + 4], fill="black")
                v = 10 ** e
                draw.text((x - 12, y0 + ph + 6), f"{v:,.0f}" if v >= 10 else f"{v:.2g}", fill="black")
                e += 0.5
            for i in range(6):
                v = floor + (1.0 - floor) * i / 5
                draw.line([x0 - 4, sy(v), x0, sy(v)], fill="black")
                draw.line([x0, sy(v), x0 + pw, sy(v)], fill=(235, 235, 235))
                draw.text((x0 - 40, sy(v) - 6), f"{v:.2f}", fill="black")
            for lib in ("xmodal", "faiss"):
                curve = [points[f"{lib}[binary r={s}]"] for s in RESCORES if f"{lib}[binary r={s}]" in points]
                if len(curve) > 1:
                    draw.line([(sx(a), sy(b)) for a, b in curve], fill=(20, 100, 30), width=1)
            for name, (v, rc) in points.items():
                px, py, colour = sx(v), sy(rc), _COLOURS.get(_kind(name), (0, 0, 0))
                box = [px - 5, py - 5, px + 5, py + 5]
                if name.startswith("xmodal"):
                    draw.ellipse(box, fill=colour, outline="black")
                else:
                    draw.rectangle(box, outline=colour, width=2)
    y = height - legend_h + 5
    draw.text((10, y), "filled circle = xmodal, hollow square = faiss; x: queries per second (log), y: recall@10 "
                       "vs exact float32; the green line joins binary rescore 1, 2, 4, 10", fill="black")
    x = 10
    for label, colour in _COLOURS.items():
        draw.ellipse([x, y + 24, x + 10, y + 34], fill=colour, outline="black")
        shown = label if label != "pca" else "pca+int8/sq8"
        draw.text((x + 14, y + 23), shown, fill="black")
        x += 30 + 7 * len(shown)
    write_atomic(path, image.save, suffix=".png")


# --- the command --------------------------------------------------------------------------------------------------

def main(args) -> int:
    """``xmodal bench compress`` (called by :func:`xmodal.bench.main`)."""
    if getattr(args, "device", "cpu") != "cpu":
        print("xmodal bench compress: CPU only (compressed FlatIndex search and faiss-cpu); use --device cpu")
        return 2
    names = [s.strip() for s in (getattr(args, "datasets", None) or ",".join(DATASETS)).split(",") if s.strip()]
    bad = [s for s in names if s not in DATASETS]
    if bad or not names:
        print(f"xmodal bench compress: --datasets: unknown data set(s) {bad}; choose from {list(DATASETS)}")
        return 2
    quick = bool(getattr(args, "quick", False))
    n = getattr(args, "n", None) or (QUICK_N if quick else DEFAULT_N)
    d = getattr(args, "dim", None) or DEFAULT_DIM
    repeats = getattr(args, "repeats", 3)
    faiss = None if getattr(args, "no_faiss", False) else import_faiss()
    use_faiss = faiss is not None
    steps = MODEL_STEPS_QUICK if quick else MODEL_STEPS
    env = environment("cpu", faiss=True)
    if use_faiss:
        faiss.omp_set_num_threads(torch.get_num_threads())
        env["faiss_threads"] = faiss.omp_get_max_threads()
    cases = [CompressCase(name, n, d, K, Q_BATCH, Q_SINGLE_QUICK if quick else Q_SINGLE) for name in names]
    report_args = argparse.Namespace(**{**vars(args), "plot": None})  # the chart here is recall / QPS, drawn below
    results = run_cases(report_args, env, cases,
                        lambda case: run_compress_case(case, repeats, use_faiss, steps),
                        desc="bench compress", table=table, markdown=lambda rs: markdown(rs, env, repeats),
                        chart_title="", chart_bars=lambda rs: [])
    print()
    print(format_text(targets_table(results)))
    if getattr(args, "plot", None):
        write_recall_qps_chart(args.plot, results, f"xmodal compressed search vs faiss-cpu: recall@{K} against "
                                                   f"queries per second ({torch.get_num_threads()} threads)")
    return 0
