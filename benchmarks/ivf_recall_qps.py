"""Recall@10 / queries-per-second curve of xmodal.IVFIndex against faiss-cpu IndexIVFFlat (same data, same
nlist, same nprobe values, one process), plus FlatIndex as the exact baseline.

    python benchmarks/ivf_recall_qps.py [--n 1000000] [--nlist 1024] [--markdown out.md] [--json out.json]

Data: `centres` Gaussian centres in D dimensions, each point = centre + N(0, I), rows L2-normalised; queries
drawn the same way; metric: inner product on the normalised rows (= cosine).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import xmodal
from xmodal.bench import environment
from xmodal.metrics import knn_recall


def clustered(n, d, centres, seed, g_centres):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g_centres) * 3
    x = c[torch.randint(0, centres, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def timed(fn, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--centres", type=int, default=200)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="1,2,4,8,16,32")
    p.add_argument("--markdown")
    p.add_argument("--json")
    args = p.parse_args()
    gc = torch.Generator().manual_seed(123)
    x = clustered(args.n, args.d, args.centres, 0, gc)
    gc = torch.Generator().manual_seed(123)
    q = clustered(args.queries, args.d, args.centres, 1, gc)
    k = args.k
    rows = []

    flat = xmodal.FlatIndex(args.d, "ip")
    flat.add(x)
    t_flat, (_, exact) = timed(lambda: flat.search(q, k), repeats=1)
    rows.append(("xmodal FlatIndex", "-", 1.0, args.queries / t_flat))

    start = time.perf_counter()
    ivf = xmodal.IVFIndex(args.d, args.nlist, "ip")
    ivf.train(x)
    t_train = time.perf_counter() - start
    start = time.perf_counter()
    ivf.add(x)
    t_add = time.perf_counter() - start

    faiss_rows = []
    try:
        import faiss

        quantizer = faiss.IndexFlatIP(args.d)
        fidx = faiss.IndexIVFFlat(quantizer, args.d, args.nlist, faiss.METRIC_INNER_PRODUCT)
        xn = x.numpy()
        start = time.perf_counter()
        fidx.train(xn)
        f_train = time.perf_counter() - start
        start = time.perf_counter()
        fidx.add(xn)
        f_add = time.perf_counter() - start
    except ImportError:
        fidx = None
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        t, (_, ids) = timed(lambda: ivf.search(q, k, nprobe=nprobe))
        rows.append(("xmodal IVFIndex", nprobe, knn_recall(ids[:, :k], exact[:, :k]), args.queries / t))
        if fidx is not None:
            fidx.nprobe = nprobe
            t, (_, fids) = timed(lambda: fidx.search(q.numpy(), k))
            faiss_rows.append(("faiss IndexIVFFlat", nprobe, knn_recall(torch.from_numpy(fids)[:, :k], exact[:, :k]), args.queries / t))
    rows += faiss_rows
    env = environment("cpu")
    header = f"N={args.n} D={args.d} centres={args.centres} nlist={args.nlist} queries={args.queries} k={k}"
    lines = [f"# IVF recall@{k} / QPS: xmodal vs faiss-cpu", "", *[f"- {a}: {b}" for a, b in env.items()],
             f"- data: {header}", f"- xmodal train {t_train:.1f} s, add {t_add:.1f} s" +
             (f"; faiss train {f_train:.1f} s, add {f_add:.1f} s" if fidx is not None else ""), "",
             f"| index | nprobe | recall@{k} | queries/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {nprobe} | {r:.3f} | {qps:,.0f} |" for name, nprobe, r, qps in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text)
    if args.json:
        json.dump({"environment": env, "data": header, "rows": rows}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
