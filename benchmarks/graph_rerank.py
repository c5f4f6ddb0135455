"""kNN graph construction against faiss-cpu, and re-ranking (diffusion, GNN, alpha-QE) on data with manifold
structure: speed and mean average precision, one process, one machine.

    python benchmarks/graph_rerank.py [--n-graph 200000] [--n-rerank 100000] [--markdown out.md] [--json out.json]

Graph: N unit rows in D = 128 (Gaussian, normalised), k = 10, cosine; faiss: IndexFlatIP self-search for
k + 1, its own row dropped, turned into the same (source, target) edge list. Re-ranking data: noisy
concentric circles (radii 1, 2, 3) in a plane at height 4 (so that cosine sees the radius) with a little
thickness, lifted to D = 128 by a random orthogonal map plus noise: Euclidean neighbours of a point cross to the next circle where circles are
close, while diffusion follows each circle. A query's relevant rows are the rows of its own circle;
mAP@100 over 100 queries (rows of the data set, searched against all rows).
"""
from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import torch

import xmodal
from xmodal import metrics
from xmodal.bench import environment, publish
from xmodal.graph import knn_graph
from xmodal.rerank import Diffusion, GNNRerank, gnn_rerank, query_expansion


# (graph_k, layers) of the GNNRerank rows; feature_k = 64
GNN_SETTINGS = ((20, 2), (30, 3))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def resident_gib() -> float:
    """This process's resident memory now (not its high-water mark, which earlier steps may have set)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


class PeakResident:
    """The largest resident memory seen while the block runs (sampled every 20 ms by a thread)."""

    def __enter__(self):
        self.peak = resident_gib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak = max(self.peak, resident_gib())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_gib())


def faiss_graph(x: torch.Tensor, k: int):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x.numpy())
    scores, ids = index.search(x.numpy(), k + 1)
    ids, scores = torch.from_numpy(ids), torch.from_numpy(scores)
    own = ids == torch.arange(x.shape[0])[:, None]
    keep = torch.argsort(own.to(torch.int8), dim=1, stable=True)[:, :k]  # drop the row itself
    source = ids.gather(1, keep).reshape(-1)
    target = torch.arange(x.shape[0]).repeat_interleave(k)
    return torch.stack([source, target]), scores.gather(1, keep).reshape(-1)


def circles(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ring = torch.randint(0, 3, (n,), generator=g)
    angle = torch.rand(n, generator=g) * 6.2832
    radius = (ring + 1).float() + 0.2 * torch.randn(n, generator=g)
    # the plane sits at height 4 so that direction (cosine) depends on the radius, not only the angle
    plane = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle),
                         4 + 0.2 * torch.randn(n, generator=g)], dim=1)
    lift = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:3]
    return plane @ lift + 0.02 * torch.randn(n, d, generator=g), ring


def mean_ap(ids: torch.Tensor, ring: torch.Tensor, queries: torch.Tensor) -> float:
    relevant = [torch.nonzero(ring == ring[q]).flatten().tolist() for q in queries.tolist()]
    return metrics.mean_average_precision(ids, relevant, k=ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-graph", type=int, default=200_000)
    parser.add_argument("--n-rerank", type=int, default=100_000)
    parser.add_argument("--n-gnn", type=int, default=20_000, help="rows for gnn_rerank (it builds a GNNRerank per call)")
    parser.add_argument("--n-large", type=int, default=0,
                        help="also time knn_graph alone on this many rows (e.g. 1000000), with peak memory")
    parser.add_argument("--large-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    env = environment("cpu")
    rows = []

    x = torch.nn.functional.normalize(torch.randn(args.n_graph, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    (ours, _), t_ours = timed(lambda: knn_graph(x, 10))
    (theirs, _), t_faiss = timed(lambda: faiss_graph(x, 10))
    same = float((ours[0] == theirs[0]).float().mean())
    rows.append({"what": f"knn_graph {args.n_graph:,} x 128, k = 10", "xmodal_s": t_ours, "faiss_s": t_faiss,
                 "ratio": t_faiss / t_ours, "same_edges": same})
    del x, ours, theirs
    results = {}
    for name, n in (("rerank", args.n_rerank), ("gnn", args.n_gnn)):
        data, ring = circles(n, 128)
        picks = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:100]
        queries = data[picks]
        (_, raw), t_raw = timed(lambda: xmodal.topk_search(queries, data, 100, "cosine"))
        entry = {"n": n, "raw_map": mean_ap(raw, ring, picks), "raw_s": t_raw}
        (_, qe), t_qe = timed(lambda: query_expansion(queries, data, 100, n=10, alpha=3.0))
        entry.update(qe_map=mean_ap(qe, ring, picks), qe_s=t_qe)
        diffusion, t_build = timed(lambda: Diffusion(data, graph_k=50))
        (_, dif), t_dif = timed(lambda: diffusion.search(queries, 100))
        entry.update(diffusion_build_s=t_build, diffusion_map=mean_ap(dif, ring, picks), diffusion_s=t_dif)
        diffusion.max_iter = 10  # (the same graph, half the conjugate-gradient steps)
        (_, dif10), t_dif10 = timed(lambda: diffusion.search(queries, 100))
        entry.update(diffusion10_map=mean_ap(dif10, ring, picks), diffusion10_s=t_dif10)
        for graph_k, layers in GNN_SETTINGS:
            reranker, t_build = timed(lambda: GNNRerank(data, graph_k=graph_k, layers=layers, feature_k=64))
            (_, gnn), t_gnn = timed(lambda: reranker.search(queries, 100))
            entry[f"gnn_reranker_{graph_k}_{layers}"] = {"build_s": t_build, "map": mean_ap(gnn, ring, picks),
                                                         "s": t_gnn}
        if name == "gnn":
            (_, gnn), t_gnn = timed(lambda: gnn_rerank(queries, data, 100, graph_k=20, layers=2))
            entry.update(gnn_map=mean_ap(gnn, ring, picks), gnn_s=t_gnn)
        results[name] = entry

    # last, so that the (long) large graph cannot disturb the timings above
    if args.n_large:
        dtype = getattr(torch, args.large_dtype)
        x = torch.nn.functional.normalize(torch.randn(args.n_large, 128, generator=torch.Generator().manual_seed(2)),
                                          dim=1).to(dtype)
        gc.collect()
        before = resident_gib()
        with PeakResident() as peak_rss:
            (edges, _), t_large = timed(lambda: knn_graph(x, 10))
        peak = peak_rss.peak
        rows.append({"what": f"knn_graph {args.n_large:,} x 128 {args.large_dtype}, k = 10 (alone)", "xmodal_s": t_large,
                     "faiss_s": None, "ratio": None, "same_edges": None, "edges": int(edges.shape[1]),
                     "peak_rss_gib": peak, "rss_before_gib": before})
        del x, edges

    lines = [f"# kNN graph and re-ranking benchmark (cpu)", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", __doc__.split("\n\n", 2)[2].strip(), "",
              "| graph | xmodal s | faiss s | faiss / xmodal | same sources |", "|---|---|---|---|---|"]
    for r in rows:
        if r["faiss_s"] is None:
            lines.append(f"| {r['what']} | {r['xmodal_s']:.1f} | | | {r['edges']:,} edges; resident memory "
                         f"{r['rss_before_gib']:.2f} GiB before the call, at most {r['peak_rss_gib']:.2f} GiB "
                         f"during it |")
            continue
        lines.append(f"| {r['what']} | {r['xmodal_s']:.2f} | {r['faiss_s']:.2f} | {r['ratio']:.2f}x | {r['same_edges']:.4f} |")
    lines += ["", "| rows | method | mAP@100 | seconds (100 queries; build separately) |", "|---|---|---|---|"]
    for entry in results.values():
        n = f"{entry['n']:,}"
        lines.append(f"| {n} | raw cosine search | {entry['raw_map']:.4f} | {entry['raw_s']:.3f} |")
        lines.append(f"| {n} | alpha-QE (n = 10, alpha = 3) | {entry['qe_map']:.4f} | {entry['qe_s']:.3f} |")
        lines.append(f"| {n} | Diffusion (graph_k = 50, max_iter = 20, the default) | {entry['diffusion_map']:.4f} | {entry['diffusion_s']:.3f} "
                     f"(build {entry['diffusion_build_s']:.1f}) |")
        lines.append(f"| {n} | Diffusion (graph_k = 50, max_iter = 10) | {entry['diffusion10_map']:.4f} | "
                     f"{entry['diffusion10_s']:.3f} |")
        for graph_k, layers in GNN_SETTINGS:
            g = entry[f"gnn_reranker_{graph_k}_{layers}"]
            lines.append(f"| {n} | GNNRerank (graph_k = {graph_k}, {layers} layers, feature_k = 64) | {g['map']:.4f} | "
                         f"{g['s']:.3f} (build {g['build_s']:.1f}) |")
        if "gnn_map" in entry:
            lines.append(f"| {n} | gnn_rerank (GNNRerank built per call; graph_k = 20, 2 layers) | {entry['gnn_map']:.4f} | "
                         f"{entry['gnn_s']:.3f} |")
    publish("\n".join(lines) + "\n", {"environment": env, "graph": rows, "rerank": results}, args.markdown, args.json)

if __name__ == "__main__":
    main()
