"""How well an index's recall estimate (``index.estimated_recall``, computed when a codec or PCA is trained)
predicts the recall@10 its searches then reach, on data where lossy encodings collapse and on data where they
hold.

    python benchmarks/lossy_recall.py [--n 100000] [--d 512] [--markdown out.md] [--json out.json]

Data: ``clusters`` isotropic Gaussian clusters (centres N(0, I), rows = centre + 0.5 N(0, I)), queries drawn
the same way; metric cosine. Within a cluster the nearest neighbours are decided by noise spread evenly over
every dimension, which sign bits and a PCA to few dimensions lose; int8 keeps them.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import xmodal
from xmodal.bench import environment
from xmodal.metrics import knn_recall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--markdown")
    p.add_argument("--json")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.clusters, args.d, generator=g)
    x = centres[torch.randint(0, args.clusters, (args.n,), generator=g)] + 0.5 * torch.randn(args.n, args.d, generator=g)
    q = centres[torch.randint(0, args.clusters, (200,), generator=g)] + 0.5 * torch.randn(200, args.d, generator=g)
    exact = xmodal.topk_search(q, x, 10, "cosine").indices
    nlist = max(1, args.n // 400)
    methods = {
        "FlatIndex codec='binary', rescore=10": lambda: xmodal.FlatIndex(args.d, "cosine", codec="binary", rescore=10),
        "FlatIndex codec='int8'": lambda: xmodal.FlatIndex(args.d, "cosine", codec="int8"),
        f"IVFIndex reduce_to={args.d // 4}, nprobe=nlist": lambda: xmodal.IVFIndex(args.d, nlist, "cosine", nprobe=nlist,
                                                                                  reduce_to=args.d // 4),
    }
    rows = []
    for name, make in methods.items():
        index = make()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            index.train(x)
        train_s = time.perf_counter() - start
        index.add(x)
        _, found = index.search(q, 10)
        rows.append({"index": name, "estimated_recall": index.estimated_recall, "recall": knn_recall(found, exact),
                     "warned": any(issubclass(w.category, xmodal.index.LossyEncodingWarning) for w in caught),
                     "train_s": train_s})
    env = environment("cpu")
    lines = ["# Recall estimate of lossy encodings vs the recall reached", "", *[f"- {k}: {v}" for k, v in env.items()],
             f"- data: N={args.n} D={args.d}, {args.clusters} isotropic Gaussian clusters, 200 queries, k = 10, cosine",
             "", "| index | estimated recall@10 (at train) | recall@10 reached | warned | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['index']} | {r['estimated_recall']:.3f} | {r['recall']:.3f} | {'yes' if r['warned'] else 'no'} | "
              f"{r['train_s']:.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text)
    if args.json:
        json.dump({"environment": env, "rows": rows}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
