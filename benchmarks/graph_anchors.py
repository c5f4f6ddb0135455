"""GraphIndex against the graph indexes users would pick instead: hnswlib, faiss IndexHNSWFlat and usearch,
on the same rows and queries in one process. For each: build time (2 threads), bytes per vector (the saved
file, and the resident memory the build added), and over a sweep of search breadths (ef): recall@10 against
exact search, queries/s for a batch of queries and the median latency of one query per call, both with one
search thread. The summary takes, for each recall target, the fastest setting that reaches it.

    python benchmarks/graph_anchors.py [--n 200000] [--d 128] [--sets clustered,gap,shapes] [--sample 50000] [--write]

Sets: "clustered" (in-distribution: rows and queries from the same 200 Gaussian centres, unit rows), "gap" (a
modality gap: rows and queries from the same centres, each side shifted along its own random direction, so
queries lie in another cone than the rows, as text queries against image rows do) and "shapes" (cross-modal:
the demo model's image embeddings of Shapes renderings as rows, its embeddings of other renderings' captions
as queries). Each set also draws --sample more queries, which "xmodal GraphIndex + query sample" is built
with (``add(rows, queries=sample)``); the other indexes cannot use them.
--write saves benchmarks/results/<date>_graph_anchors_cpu_<kind>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import xmodal
from xmodal.bench import environment

EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGETS = (0.9, 0.95, 0.99)
K = 10


def make_set(name: str, n: int, nq: int, d: int, seed: int = 0):
    """(rows [n, d], queries [nq, d]) of a set (main splits the queries into measured ones and a sample)."""
    if name == "shapes":
        return shapes_set(n, nq, d)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(200, d, generator=g)
    shift = centres.norm(dim=1).mean()

    def draw(m, direction):
        z = centres[torch.randint(0, 200, (m,), generator=g)] + 0.7 * torch.randn(m, d, generator=g)
        return torch.nn.functional.normalize(z + direction, dim=1).contiguous()

    if name == "clustered":
        return draw(n, 0.0), draw(nq, 0.0)
    row_dir, query_dir = (torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 2 * shift
                          for _ in range(2))
    return draw(n, row_dir), draw(nq, query_dir)


def shapes_set(n: int, nq: int, d: int, chunk: int = 16384):
    """The demo model (CrossModalModel.default(embed_dim=d), trained as ``xmodal bench compress`` trains it) on
    Shapes: rows encode_image of n renderings (ShapesDataset(16384, seed=10_000 + i) for chunk i), queries
    encode_text of the captions of nq other renderings (seed 20_000, caption i % 5 of rendering i)."""
    from xmodal.bench.compress_data import MODEL_STEPS, trained_model
    from xmodal.demo.shapes import ShapesDataset

    model, _ = trained_model(d, MODEL_STEPS)
    rows, queries = torch.empty(n, d), torch.empty(nq, d)
    with torch.inference_mode():
        for i, start in enumerate(range(0, n, chunk)):
            images = ShapesDataset(min(chunk, n - start), seed=10_000 + i).images
            for b in range(0, images.shape[0], 4096):
                rows[start + b: start + b + 4096] = model.encode_image(images[b: b + 4096])
        for i, start in enumerate(range(0, nq, chunk)):
            captions = ShapesDataset(min(chunk, nq - start), seed=20_000 + i).captions
            texts = [c[j % len(c)] for j, c in enumerate(captions)]
            for b in range(0, len(texts), 4096):
                queries[start + b: start + b + 4096] = model.encode_text(texts[b: b + 4096])
    return rows, queries


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def recall(got, exact) -> float:
    got = torch.as_tensor(np.asarray(got, dtype=np.int64))
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact)) / exact.numel()


class Xmodal:
    name = "xmodal GraphIndex (degree 32, build_ef 200)"

    def build(self, x, sample):
        self.index = xmodal.GraphIndex(x.shape[1], "cosine", degree=32, build_ef=200)
        self.index.add(x)

    def search(self, q, ef):
        return self.index.search(q, K, ef=ef)[1]

    def save(self, path):
        self.index.save(path)


class XmodalSample(Xmodal):
    name = "xmodal GraphIndex + query sample"

    def build(self, x, sample):
        self.index = xmodal.GraphIndex(x.shape[1], "cosine", degree=32, build_ef=200)
        self.index.add(x, queries=sample)


class Hnswlib:
    name = "hnswlib (M 16, ef_construction 200)"

    def build(self, x, sample):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=x.shape[0], ef_construction=200, M=16)
        self.index.set_num_threads(2)
        self.index.add_items(x.numpy())
        self.index.set_num_threads(1)

    def search(self, q, ef):
        self.index.set_ef(max(ef, K))
        return self.index.knn_query(q, k=K)[0]

    def save(self, path):
        self.index.save_index(path)


class FaissHnsw:
    name = "faiss IndexHNSWFlat (M 32, efConstruction 200)"

    def build(self, x, sample):
        import faiss

        faiss.omp_set_num_threads(2)
        self.index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 200
        self.index.add(x.numpy())
        faiss.omp_set_num_threads(1)

    def search(self, q, ef):
        self.index.hnsw.efSearch = max(ef, K)
        return self.index.search(q, K)[1]

    def save(self, path):
        import faiss

        faiss.write_index(self.index, path)


class Usearch:
    name = "usearch (connectivity 16, expansion_add 200)"

    def build(self, x, sample):
        from usearch.index import Index

        self.index = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=200)
        self.index.add(np.arange(x.shape[0]), x.numpy(), threads=2)

    def search(self, q, ef):
        self.index.expansion_search = max(ef, K)
        return self.index.search(q, K, threads=1).keys

    def save(self, path):
        self.index.save(path)


def available():
    out = [Xmodal(), XmodalSample()]
    for cls, module in ((Hnswlib, "hnswlib"), (FaissHnsw, "faiss"), (Usearch, "usearch")):
        try:
            __import__(module)
            out.append(cls())
        except ImportError:
            print(f"{module} is not installed: left out (pip install -e '.[bench]')")
    return out


def measure(lib, x, q, sample, exact, one_query_calls: int):
    gc.collect()
    torch.set_num_threads(2)
    before = resident_bytes()
    start = time.perf_counter()
    lib.build(x, sample)
    build_s = time.perf_counter() - start
    added = resident_bytes() - before
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "index")
        lib.save(path)
        file_bytes = os.path.getsize(path)
    torch.set_num_threads(1)
    qn = q.numpy()
    sweep = []
    for ef in EFS:
        lib.search(qn[:50], ef)  # warm
        start = time.perf_counter()
        got = lib.search(qn, ef)
        batch_s = time.perf_counter() - start
        times = []
        for i in range(one_query_calls):
            one = qn[i: i + 1]
            start = time.perf_counter()
            lib.search(one, ef)
            times.append(time.perf_counter() - start)
        sweep.append({"ef": ef, "recall": recall(got, exact), "batch_qps": len(qn) / batch_s,
                      "one_query_us": statistics.median(times) * 1e6})
    torch.set_num_threads(2)
    return {"name": lib.name, "build_s": build_s, "file_bytes_per_vector": file_bytes / len(x),
            "resident_bytes_per_vector": added / len(x), "sweep": sweep}


def filters_and_removal(x, q, exact, ef: int = 64):
    """xmodal only: filtered searches (a random 1% / 10% of the rows allowed; recall against exact search over
    the allowed rows, the path the planner took and both paths' queries/s) and recall at ``ef`` before and after
    removing a random 30% of the rows (against exact search over the rows kept)."""
    torch.set_num_threads(2)
    index = xmodal.GraphIndex(x.shape[1], "cosine", degree=32, build_ef=200)
    index.add(x)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(7)
    out = {"filters": []}
    for share in (0.01, 0.1):
        mask = torch.rand(len(x), generator=g) < share
        allowed = torch.nonzero(mask).flatten()
        truth = allowed[xmodal.topk_search(q, x[allowed], K, metric="ip")[1]]
        row = {"share": share, "allowed": int(mask.sum()), "path": index.search_plan(K, mask, ef=ef)["path"],
               "path_batch": index.search_plan(K, mask, ef=ef, queries=len(q))["path"]}
        for path in ("graph", "exact"):
            plan = xmodal.index.graph.graph_plan
            forced = (lambda *a: path)  # time each path whatever the planner says
            xmodal.index.graph.graph_plan = forced
            try:
                start = time.perf_counter()
                got = index.search(q, K, mask, ef=ef)[1]
                row[f"{path}_qps"] = len(q) / (time.perf_counter() - start)
                row[f"{path}_recall"] = recall(got, truth)
            finally:
                xmodal.index.graph.graph_plan = plan
        out["filters"].append(row)
    out["recall_before_removal"] = recall(index.search(q, K, ef=ef)[1], exact)
    gone = torch.randperm(len(x), generator=g)[: int(0.3 * len(x))]
    torch.set_num_threads(2)
    start = time.perf_counter()
    index.remove(gone)
    out["removal_s"] = time.perf_counter() - start
    torch.set_num_threads(1)
    kept = torch.ones(len(x), dtype=torch.bool)
    kept[gone] = False
    rows = torch.nonzero(kept).flatten()
    truth = rows[xmodal.topk_search(q, x[rows], K, metric="ip")[1]]
    out["recall_after_removal"] = recall(index.search(q, K, ef=ef)[1], truth)
    out["ef"] = ef
    torch.set_num_threads(2)
    return out


def best_at(result, target, key):
    """The best value of key (larger queries/s, smaller latency) among settings reaching the target recall."""
    hits = [s for s in result["sweep"] if s["recall"] >= target]
    if not hits:
        return None
    return max(s[key] for s in hits) if key == "batch_qps" else min(s[key] for s in hits)


def report(results: dict, header: list, extras: dict) -> str:
    lines = ["# Graph indexes: xmodal GraphIndex against hnswlib, faiss HNSW and usearch", "", *header, ""]
    for set_name, rows in results.items():
        lines += [f"## {set_name}", "", "| index | build s (2 threads) | file B/vector | resident B/vector |",
                  "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['build_s']:.1f} | {r['file_bytes_per_vector']:.0f} | "
                  f"{r['resident_bytes_per_vector']:.0f} |" for r in rows]
        ours = [r for r in rows if r["name"].startswith("xmodal")]
        lines += ["", "Fastest setting reaching each recall@10 (one search thread); ratios = xmodal / anchor (speed, "
                      "higher is better), for each xmodal build in the order above:", "",
                  "| index | " + " | ".join(f"QPS batch @{t}" for t in TARGETS) + " | "
                  + " | ".join(f"one query us @{t}" for t in TARGETS) + " |", "|---" * (1 + 2 * len(TARGETS)) + "|"]
        for r in rows:
            cells = []
            for key in ("batch_qps", "one_query_us"):
                for t in TARGETS:
                    v = best_at(r, t, key)
                    if v is None:
                        cells.append("not reached")
                        continue
                    ratios = []
                    for mine in ours if r not in ours else ():
                        m = best_at(mine, t, key)
                        ratios.append("-" if m is None else f"{m / v if key == 'batch_qps' else v / m:.2f}x")
                    cells.append(f"{v:,.0f}" + (f" ({' / '.join(ratios)})" if ratios else ""))
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        extra = extras.get(set_name)
        if extra:
            lines += ["", f"xmodal GraphIndex (no sample), ef {extra['ef']}: filtered searches (a random share of the rows "
                          "allowed; recall against exact search over them; queries/s of each path, batch, one thread):", "",
                      "| allowed | planner's path: one query, the batch | walk: recall, QPS | exact scan: recall, QPS |",
                      "|---|---|---|---|"]
            lines += [f"| {f['share']:.0%} ({f['allowed']:,} rows) | {f['path']}, {f['path_batch']} | {f['graph_recall']:.3f}, "
                      f"{f['graph_qps']:,.0f} | {f['exact_recall']:.3f}, {f['exact_qps']:,.0f} |" for f in extra["filters"]]
            lines += ["", f"Removing a random 30% of the rows ({extra['removal_s']:.1f} s, 2 threads): recall@10 at ef "
                          f"{extra['ef']} {extra['recall_before_removal']:.3f} before, {extra['recall_after_removal']:.3f} "
                          "after (against exact search over the rows kept)."]
        lines += ["", "Sweep (ef: recall@10, batch queries/s, one-query median us):", ""]
        for r in rows:
            lines.append(f"- {r['name']}: " + "; ".join(
                f"{s['ef']}: {s['recall']:.3f}, {s['batch_qps']:,.0f}, {s['one_query_us']:.0f}" for s in r["sweep"]))
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--one-query-calls", type=int, default=300)
    p.add_argument("--sets", default="clustered,gap,shapes")
    p.add_argument("--sample", type=int, default=50_000, help="sample queries for the cross-modal construction")
    p.add_argument("--write", action="store_true")
    p.add_argument("--kind", default=None, help="CPU kind for the file name (e.g. amd_zen4)")
    args = p.parse_args()
    results, extras = {}, {}
    for set_name in args.sets.split(","):
        x, queries = make_set(set_name, args.n, args.queries + args.sample, args.d)
        q, sample = queries[: args.queries], queries[args.queries:]
        exact = xmodal.topk_search(q, x, K, metric="ip")[1]
        results[set_name] = []
        for lib in available():
            print(f"{set_name}: {lib.name} ...", flush=True)
            results[set_name].append(measure(lib, x, q, sample, exact, args.one_query_calls))
            print(f"  build {results[set_name][-1]['build_s']:.1f} s", flush=True)
            del lib
        extras[set_name] = filters_and_removal(x, q, exact)
        print(f"  filters and removal: {extras[set_name]}", flush=True)
    env = environment("cpu")
    header = [*[f"- {a}: {b}" for a, b in env.items()],
              f"- data: N = {args.n:,} rows, D = {args.d}, {args.queries} queries, k = {K}, query sample "
              f"{args.sample:,} (for the '+ query sample' build); sets: {args.sets} "
              "(see benchmarks/graph_anchors.py); metric: inner product of unit rows (cosine)",
              f"- xmodal {xmodal.__version__}, torch {torch.__version__}"]
    text = report(results, header, extras)
    print(text)
    if args.write:
        kind = f"_{args.kind}" if args.kind else ""
        stem = Path(__file__).parent / "results" / f"{datetime.date.today()}_graph_anchors_cpu{kind}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results, "extras": extras}, indent=2))


if __name__ == "__main__":
    main()
