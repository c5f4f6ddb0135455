"""The report of benchmarks/scale.py: tables from the per-case JSON files ``run`` leaves in its folder."""
from __future__ import annotations

import glob
import json
import math
import os

GB = 1e9
LABELS = {"xmodal-int8": "xmodal IVF int8", "xmodal-bf16": "xmodal IVF bf16", "faiss-sq8": "faiss IVF SQ8",
          "faiss-pqfs": "faiss IVF PQ4 FastScan"}


def _cases(folder: str) -> dict:
    out = {}
    for path in glob.glob(os.path.join(folder, "result-*.json")):
        with open(path) as f:
            r = json.load(f)
        out[(r["kind"], r["rows"])] = r
    return out


def _at(curve: list, nprobe: int) -> dict:
    return next(p for p in curve if p["nprobe"] == nprobe)


def _reaching(curve: list, target: float):
    """The first point (smallest nprobe) whose recall@10 reaches ``target``, or None."""
    return next((p for p in curve if p["recall"] >= target), None)


def growth(sizes: list, values: list) -> float:
    """The exponent b of value ~ size^b (least squares in log-log)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-12)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _gb(v) -> str:
    return "-" if v is None else f"{v / GB:.2f}"


def on_paper(int8: dict, bf16) -> str:
    """What 10^8 and 10^9 rows would take, from the bytes per row and the add rate measured at the largest size."""
    per_row = int8["nbytes"] / int8["rows"]
    per_row16 = bf16["nbytes"] / bf16["rows"] if bf16 else 2 * per_row
    rate = int8["rows"] / int8["add_s"]  # rows per second on this machine's cores, at nlist = int8["nlist"]
    lines = ["## 10^8 and 10^9 rows, on paper", "",
             f"Bytes per row measured here: int8 {per_row:.0f}, bf16 {per_row16:.0f} (float32 would be about "
             f"{per_row16 * 2 - 8:.0f}; `reduce_to=64` with int8 about {per_row - 192:.0f}). At 10^8 rows int8 needs "
             f"{1e8 * per_row / GB:.0f} GB and bf16 {1e8 * per_row16 / GB:.0f} GB: one machine with 64 GB holds the "
             f"int8 index in memory, with 128 GB the bf16 one. Adding grows linearly (b = 1 above): "
             f"{1e8 / rate / 60:.0f} minutes on these 2 cores at nlist {int8['nlist']}, but nlist should grow "
             f"with the rows (about 4 sqrt(N): 40,000 at 10^8) to keep lists short, and the assignment costs in "
             f"proportion to nlist, so a build at 10^8 wants tens of cores, or a GPU for the assignment. At 10^9 "
             f"rows int8 is {1e9 * per_row / GB:.0f} GB: beyond one ordinary machine's memory. Memory-mapped, the "
             f"index opens at once, but every probed list not in the page cache is read from disk (nprobe 16 "
             f"lists of 8,000 rows at nlist 125,000: 33 MB a query, tens of milliseconds from NVMe); so shard "
             f"it: `ShardedIndex` over 4-8 machines of 64-128 GB (each holding 1.25-2.5 x 10^8 rows), or reduce "
             f"first (`reduce_to=64`, ~{1e9 * (per_row - 192) / GB:.0f} GB) where the recall estimate allows. "
             f"Shard when the index (nbytes) passes about half a machine's memory, leaving the rest for the page "
             f"cache, the queries and a rebuild, which briefly holds two buffers."]
    return "\n".join(lines)


def report(folder: str, markdown=None, json_path=None, note: str = "") -> str:
    from xmodal.bench import environment, publish

    cases = _cases(folder)
    env = environment("cpu")
    ours = sorted((r for (kind, _), r in cases.items() if kind == "xmodal-int8"), key=lambda r: r["rows"])
    probe = 16
    lines = ["# Ten million rows on one machine: IVF build, files, search and service as the rows grow", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- memory: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB; data: "
              f"{ours[-1]['dim'] if ours else '?'}-dimensional unit rows (benchmarks/scale.py), metric inner product, "
              f"nlist {ours[-1]['nlist'] if ours else '?'} at every size, k = 10, 1,000 queries; every index trained "
              f"on the same 262,144-row sample"] + ([f"- note: {note}"] if note else []) + [""]
    lines += ["## How each cost grows (xmodal IVFIndex, codec int8)", "",
              "Peak add memory: the most anonymous memory the process held during `add` above what it held before "
              "(the rows being added are read from a memory-mapped file and are page cache). Loads with a warm page "
              "cache and after dropping it; a mapped open reads the header, block sums and small tensors only. "
              f"Recall and queries/s at nprobe = {probe}.", "",
              "| rows | train s | add s | add peak GB | peak / nbytes | nbytes GB | file GB | save s | load s (warm / "
              "cold) | mapped open s (warm / cold) | R@10 | QPS Q=1 | QPS Q=256 |", "|" + "---|" * 13]
    for r in ours:
        p = _at(r["curve"], probe)
        lines.append(f"| {r['rows']:,} | {_s(r['train_s'])} | {_s(r['add_s'])} | {_gb(r['add_peak_bytes'])} | "
                     f"{r['add_peak_bytes'] / r['nbytes']:.2f} | {_gb(r['nbytes'])} | {_gb(r['file_bytes'])} | "
                     f"{_s(r['save_s'])} | {_s(r['load_whole_warm_s'])} / {_s(r.get('load_whole_cold_s'))} | "
                     f"{r['load_mapped_warm_s']:.3f} / {_s(r.get('load_mapped_cold_s'))} | {p['recall']:.3f} | "
                     f"{p['qps_1']:,.0f} | {p['qps_256']:,.0f} |")
    fits = {}
    if len(ours) >= 2:
        sizes = [r["rows"] for r in ours]
        series = {"add s": [r["add_s"] for r in ours], "nbytes": [r["nbytes"] for r in ours],
                  "save s": [r["save_s"] for r in ours], "load s (warm)": [r["load_whole_warm_s"] for r in ours],
                  "mapped open s (warm)": [r["load_mapped_warm_s"] for r in ours],
                  f"search time per query, Q=256, nprobe {probe}": [1 / _at(r["curve"], probe)["qps_256"] for r in ours]}
        fits = {name: growth(sizes, values) for name, values in series.items()}
        lines += ["", "Fitted growth, cost ~ rows^b over these sizes (b = 1: linear; the train step is on a fixed "
                      "sample, so it does not grow):", ""]
        lines += [f"- {name}: b = {b:.2f}" for name, b in fits.items()]
        per_row = ours[-1]["nbytes"] / ours[-1]["rows"]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        lines += ["", f"Bytes per row at {ours[-1]['rows']:,} rows: {per_row:.0f} (256 int8 codes, one uint8 centre "
                      f"number, a float32 correction and an int64 id, with ~10% room for appends). This machine "
                      f"({memory / GB:.0f} GB) would hold about {0.8 * memory / per_row / 1e6:.0f} million such rows in "
                      f"memory at 80% of its RAM; the build needs the index plus one chunk, so that is also where an add "
                      f"runs out. Memory-mapped, the index may exceed RAM, but then searches read lists from disk."]
    if ours:
        lines += ["", on_paper(ours[-1], cases.get(("xmodal-bf16", ours[-1]["rows"])))]
    top = max((rows for _, rows in cases), default=0)
    compared = {kind: cases[(kind, top)] for kind in LABELS if (kind, top) in cases}
    if len(compared) > 1:
        base = compared.get("faiss-sq8")
        lines += ["", f"## {top:,} rows: xmodal against faiss-cpu (same nlist, same training sample, same threads)", "",
                  "| index | bytes/row (file) | train s | add s | build s | build vs faiss SQ8 | add peak GB | save s | "
                  "load s (warm) | mapped open s (warm) |", "|" + "---|" * 10]
        for kind, r in compared.items():
            ratio = "" if base is None else f"{r['build_s'] / base['build_s']:.2f}x"
            lines.append(f"| {LABELS[kind]} | {r['file_bytes'] / r['rows']:.0f} | {_s(r['train_s'])} | {_s(r['add_s'])} | "
                         f"{_s(r['build_s'])} | {ratio} | {_gb(r['add_peak_bytes'])} | {_s(r['save_s'])} | "
                         f"{_s(r['load_whole_warm_s'])} | {r['load_mapped_warm_s']:.3f} |")
        lines += ["", "Queries per second at equal recall: for each target, the smallest nprobe (of 1, 2, 4, ..., 128) "
                      "whose recall@10 reaches it; the ratio is xmodal's queries/s over faiss SQ8's at their own such "
                      "nprobe.", "",
                  "| target R@10 | index | nprobe | R@10 | QPS Q=1 | QPS Q=256 | Q=1 vs SQ8 | Q=256 vs SQ8 |",
                  "|" + "---|" * 8]
        for target in (0.9, 0.95, 0.99):
            anchor = _reaching(base["curve"], target) if base else None
            for kind, r in compared.items():
                p = _reaching(r["curve"], target)
                if p is None:
                    lines.append(f"| {target} | {LABELS[kind]} | not reached (best {max(q['recall'] for q in r['curve']):.3f}) "
                                 f"| | | | | |")
                    continue
                vs = ("", "") if anchor is None else (f"{p['qps_1'] / anchor['qps_1']:.2f}x", f"{p['qps_256'] / anchor['qps_256']:.2f}x")
                lines.append(f"| {target} | {LABELS[kind]} | {p['nprobe']} | {p['recall']:.3f} | {p['qps_1']:,.0f} | "
                             f"{p['qps_256']:,.0f} | {vs[0]} | {vs[1]} |")
        lines += ["", "Every nprobe:", "", "| index | nprobe | R@10 | QPS Q=1 | p50 ms Q=1 | QPS Q=256 |", "|" + "---|" * 6]
        for kind, r in compared.items():
            lines += [f"| {LABELS[kind]} | {p['nprobe']} | {p['recall']:.3f} | {p['qps_1']:,.0f} | {p['p50_ms_1']:.2f} | "
                      f"{p['qps_256']:,.0f} |" for p in r["curve"]]
    served = [r for r in ours if "service" in r]
    if served:
        r = served[-1]
        s = r["service"]
        lines += ["", f"## The service at {r['rows']:,} rows (`xmodal serve`, IVF int8, nprobe {s['nprobe']}, k = 10)", "",
                  "Clients share the machine with the server (one process of asyncio clients); resident memory: "
                  "anonymous (the process's own) and file-backed (pages of the mapped snapshot).", "",
                  "| measure | value |", "|---|---|",
                  f"| start (snapshot opened mapped) to ready | {s['start_s']:.1f} s |",
                  f"| one client: p50 / p99 | {s['one_client']['p50_ms']:.1f} / {s['one_client']['p99_ms']:.1f} ms "
                  f"({s['one_client']['qps']:,.0f} queries/s) |",
                  f"| 64 clients: queries/s, p50 / p99 | {s['64_clients']['qps']:,.0f}, {s['64_clients']['p50_ms']:.0f} / "
                  f"{s['64_clients']['p99_ms']:.0f} ms |",
                  f"| resident memory after the load: anonymous / file | {_gb(s['memory'].get('RssAnon'))} / "
                  f"{_gb(s['memory'].get('RssFile'))} GB |",
                  f"| restart after SIGKILL, 1,000 rows in the log, to ready | {s['restart_s']:.1f} s |",
                  f"| resident memory after the restart: anonymous / file | {_gb(s['restart_memory'].get('RssAnon'))} / "
                  f"{_gb(s['restart_memory'].get('RssFile'))} GB |",
                  f"| a row from the replayed log found after restart | {s['replayed_row_found']} |"]
    text = "\n".join(lines) + "\n"
    publish(text, {"environment": env, "cases": list(cases.values()), "growth": fits}, markdown, json_path)
    return text
