"""The report of benchmarks/recommend.py: RecBole's reference figures, the statistics over split seeds, the
markdown tables (against RecBole, ablations, multi-task, latency) and the chart. Runs nothing: it reads the runs
that benchmarks/recommend.py made (also from a finished run's JSON, with ``--from-json``)."""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional

from xmodal.bench.harness import markdown_table

METRICS = ("recall@10", "ndcg@10", "hit@10", "mrr@10", "precision@10")

#: RecBole 1.2.1 on this protocol, this project's 2-core machine (Adam lr 1e-3, batch 2048, one uniform negative
#: per positive, embedding 64, validation on MRR@10 every epoch with patience 10, best checkpoint tested; seed
#: 2020's split), as the tracker reports them
RECBOLE = {
    "Pop": dict(recall=0.0838, ndcg=0.1005, hit=0.4708, mrr=0.1896, precision=0.0824, seconds=0.4),
    "BPR (MF)": dict(recall=0.2466, ndcg=0.2928, hit=0.7815, mrr=0.4895, precision=0.1962, seconds=28),
    "ItemKNN": dict(recall=0.2470, ndcg=0.2834, hit=0.7847, mrr=0.4623, precision=0.1931, seconds=0.7),
    "NeuMF": dict(recall=0.2332, ndcg=0.2708, hit=0.7688, mrr=0.4525, precision=0.1862, seconds=113),
    "LightGCN (default, stopped epoch 26)": dict(recall=0.1853, ndcg=0.2116, hit=0.6819, mrr=0.3760, precision=0.1406,
                                                 seconds=62),
    "LightGCN (patience 50, 200 epochs)": dict(recall=0.2609, ndcg=0.3050, hit=0.8134, mrr=0.5025, precision=0.2064,
                                               seconds=458),
}



def summary(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def fmt(s: Dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["std"] else f"{s['mean']:.{digits}f}"



def aggregate(runs: List[dict]) -> Dict[str, dict]:
    rows: Dict[str, dict] = {}
    for run in runs:
        rows.setdefault(run["row"], []).append(run)
    out = {}
    for name, group in rows.items():
        entry = {m: summary([r["test"][m] for r in group]) for m in METRICS}
        entry["train_seconds"] = summary([r["train_seconds"] for r in group])
        entry["valid_mrr@10"] = summary([r["valid"]["mrr@10"] for r in group])
        entry["best_epoch"] = summary([float(r["best_epoch"]) for r in group])
        entry["seeds"] = [r["seed"] for r in group]
        for key in ("genre_probe", "genre_head"):
            if all(key in r for r in group):
                entry[key] = {m: summary([r[key][m] for r in group]) for m in group[0][key]}
        out[name] = entry
    return out


def paired(runs: List[dict], a: str, b: str, metric: str) -> Optional[Dict[str, float]]:
    """Per-seed differences a - b of a test metric (same split, same seed)."""
    by = {(r["row"], r["seed"]): r["test"][metric] for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["row"] == a} & {r["seed"] for r in runs if r["row"] == b})
    if not seeds:
        return None
    return summary([by[(a, s)] - by[(b, s)] for s in seeds])


def report(env: dict, args, all_runs: List[dict], lat: List[dict], shape_rows: List[dict]) -> str:
    # the tables use the main seeds; the ablation targets use the extra ablation seeds too
    runs = [r for r in all_runs if not r.get("ablation_only")]
    agg = aggregate(runs)
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Recommendation on MovieLens-100k (RecBole's protocol), cpu", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        f"- training threads: 1 (`torch.set_num_threads(1)`, as RecBole's times); latency threads: {args.latency_threads}",
        f"- split seeds: {', '.join(map(str, seeds))} (each model's initialisation and sampling use the same seed)",
        "",
        "Protocol (`xmodal.recommend.MovieLens100K`): all 100,000 ratings as implicit positives; per-user random split "
        "8:1:1 with RecBole's rounding (80,808 / 9,596 / 9,596 interactions, all 943 users in each part); full "
        "ranking over the 1,682 items with each user's training (and, at test time, validation) items excluded; "
        "metrics @10 as `recbole/evaluator/metrics.py` computes them, averaged over users. Model selection on "
        "validation MRR@10 (early stopping), the best validated weights tested. RecBole's split uses its own "
        "generator (seed 2020), so its rows are one split and ours the mean ± sample standard deviation over "
        f"{len(seeds)} splits.",
        "",
        "## Test split, @10",
        "",
    ]
    table = [["model", "Recall", "NDCG", "Hit", "MRR", "Precision", "train s (1 thread)", "best epoch"]]
    for name, entry in agg.items():
        table.append([name] + [fmt(entry[m]) for m in METRICS] + [fmt(entry["train_seconds"], 1),
                                                                    fmt(entry["best_epoch"], 0)])
    lines += markdown_table(table)
    lines += ["", "Train seconds include validation every few epochs and, for the multimodal rows, building the "
                  "side features and the item kNN graph. Settings: each class's `DEFAULTS` (MF: Adam lr 0.02, batch "
                  "8192, 32 negatives, L2 0.01, validation every 2 epochs, patience 5; LightGCN and multimodal: lr 0.02, "
                  "batch 8192, 16 negatives, L2 1e-3, 3 layers, validation every 5 epochs, patience 5; embedding 64).",
              "", "RecBole 1.2.1 (as measured for the tracker; one split, seed 2020):", ""]
    table = [["RecBole model", "Recall", "NDCG", "Hit", "MRR", "Precision", "train s (1 thread)"]]
    for name, r in RECBOLE.items():
        table.append([name] + [f"{r[m]:.4f}" for m in ("recall", "ndcg", "hit", "mrr", "precision")] + [f"{r['seconds']:g}"])
    lines += markdown_table(table)

    # targets
    lines += ["", "## Targets", ""]
    table = [["target", "measured", "met"]]

    def mean(row, m):
        return agg[row][m]["mean"] if row in agg else float("nan")

    if "MF-BPR" in agg:
        ok = mean("MF-BPR", "ndcg@10") >= 0.2928 and mean("MF-BPR", "recall@10") >= 0.2466 \
            and agg["MF-BPR"]["train_seconds"]["max"] < 28
        table.append(["MF-BPR: RecBole's BPR (NDCG 0.2928, Recall 0.2466) in < 28 s",
                      f"NDCG {fmt(agg['MF-BPR']['ndcg@10'])}, Recall {fmt(agg['MF-BPR']['recall@10'])}, "
                      f"{fmt(agg['MF-BPR']['train_seconds'], 1)} s", "yes" if ok else "no"])
    if "LightGCN" in agg:
        ok = mean("LightGCN", "ndcg@10") >= 0.30 and agg["LightGCN"]["train_seconds"]["max"] < 458
        table.append(["LightGCN: NDCG >= 0.30 in < 458 s",
                      f"NDCG {fmt(agg['LightGCN']['ndcg@10'])}, {fmt(agg['LightGCN']['train_seconds'], 1)} s",
                      "yes" if ok else "no"])
    if "multimodal" in agg:
        ok = mean("multimodal", "ndcg@10") > 0.305 and mean("multimodal", "recall@10") > 0.261
        table.append(["multimodal: NDCG > 0.305 and Recall > 0.261",
                      f"NDCG {fmt(agg['multimodal']['ndcg@10'])}, Recall {fmt(agg['multimodal']['recall@10'])}",
                      "yes" if ok else "no"])
        for ablation in ("multimodal without content", "multimodal without KG"):
            d = paired(all_runs, "multimodal", ablation, "ndcg@10")
            if d is not None:
                n = len(d["values"])
                shown = d["mean"] > 0 and d["mean"] > 2 * d["std"] / math.sqrt(n)
                table.append([f"{ablation.split('without ')[1]} matters (multimodal minus '{ablation}', NDCG, "
                              f"paired over {n} splits)",
                              f"mean {d['mean']:+.4f}, standard error {d['std'] / math.sqrt(n):.4f}, positive on "
                              f"{sum(v > 0 for v in d['values'])} of {n}",
                              "yes" if shown else "no (within the seeds' spread)"])
    if lat:
        worst = max(r["warm_seconds"] for r in lat)
        table.append([f"all {lat[0]['users']} users, k = 10, seen masked, < 100 ms ({lat[0]['threads']} threads)",
                      f"{worst * 1e3:.1f} ms (slowest model, warm); cold {max(r['cold_seconds'] for r in lat) * 1e3:.1f} ms",
                      "yes" if worst < 0.1 else "no"])
    lines += markdown_table(table)
    lines += ["", "'matters' is read as: the paired difference (same split and seed) is positive on average by more "
                  "than two standard errors."]

    # ablations, paired
    if "multimodal" in agg:
        lines += ["", "## Multimodal ablations (paired with the full model: same split, same seed)", ""]
        table = [["row", "NDCG", "Recall", "NDCG minus full model, per seed", "Recall minus full model, per seed"],
                 ["multimodal (full)", fmt(agg["multimodal"]["ndcg@10"]), fmt(agg["multimodal"]["recall@10"]), "", ""]]
        for name in agg:
            if name == "multimodal" or (not name.startswith("multimodal") and name != "LightGCN"):
                continue
            nd, rc = paired(runs, name, "multimodal", "ndcg@10"), paired(runs, name, "multimodal", "recall@10")
            table.append([name, fmt(agg[name]["ndcg@10"]), fmt(agg[name]["recall@10"]),
                          ", ".join(f"{v:+.4f}" for v in nd["values"]) if nd else "-",
                          ", ".join(f"{v:+.4f}" for v in rc["values"]) if rc else "-"])
        lines += markdown_table(table)
        base = "multimodal without content and KG"
        if base in agg:
            lines += ["", "The same runs read the other way: what each kind of side information adds to the model "
                          "without any (LightGCN with the auxiliary genre task, same training), per seed:", ""]
            table = [["side information added", "NDCG, per seed", "mean", "Recall, per seed", "mean"]]
            for name, what in (("multimodal without KG", "content only"), ("multimodal without content", "KG only"),
                               ("multimodal", "content and KG")):
                nd, rc = paired(runs, name, base, "ndcg@10"), paired(runs, name, base, "recall@10")
                if nd:
                    table.append([what, ", ".join(f"{v:+.4f}" for v in nd["values"]), f"{nd['mean']:+.4f}",
                                  ", ".join(f"{v:+.4f}" for v in rc["values"]), f"{rc['mean']:+.4f}"])
            lines += markdown_table(table)

    extra = sorted({r["seed"] for r in all_runs if r.get("ablation_only")})
    if extra:
        both = sorted(set(seeds) | set(extra))
        lines += ["", f"## Content and KG ablations over {len(both)} splits", "",
                  f"The full model and the two ablations, run on the main splits ({', '.join(map(str, seeds))}) and "
                  f"on {len(extra)} more ({', '.join(map(str, extra))}): full model minus ablation, per split.", ""]
        table = [["ablation", "metric", "per split", "mean", "standard error", "positive"]]
        for ablation in ("multimodal without content", "multimodal without KG"):
            for metric, label in (("ndcg@10", "NDCG@10"), ("recall@10", "Recall@10")):
                d = paired(all_runs, "multimodal", ablation, metric)
                if d is None:
                    continue
                n = len(d["values"])
                table.append([ablation.split("without ")[1], label, ", ".join(f"{v:+.4f}" for v in d["values"]),
                              f"{d['mean']:+.4f}", f"{d['std'] / math.sqrt(n):.4f}",
                              f"{sum(v > 0 for v in d['values'])} of {n}"])
        lines += markdown_table(table)

    # multi-task, ml-100k
    if "multimodal" in agg and "multimodal without the auxiliary task" in agg:
        lines += ["", "## Multi-task learning on ml-100k: BPR + genre prediction", "",
                  "The auxiliary task predicts an item's genres (multi-label) from its collaborative ID embedding; "
                  "`MultiTaskLoss` with learned uncertainty weights. 20% of the items (a fixed draw) are held out of "
                  "it; genre metrics are on those items: the trained head's, and a logistic-regression probe fitted "
                  "on the other 80% of the items' ID embeddings (the only way to read genres off the model trained "
                  "without the task).", ""]
        table = [["row", "NDCG@10", "Recall@10", "genre top-1 (head)", "genre micro-F1 (head)", "genre top-1 (probe)",
                  "genre micro-F1 (probe)"]]
        for name in ("multimodal", "multimodal without the auxiliary task"):
            e = agg[name]
            head = e.get("genre_head")
            table.append([name, fmt(e["ndcg@10"]), fmt(e["recall@10"]),
                          fmt(head["genre_top1"], 3) if head else "-", fmt(head["genre_micro_f1"], 3) if head else "-",
                          fmt(e["genre_probe"]["genre_top1"], 3), fmt(e["genre_probe"]["genre_micro_f1"], 3)])
        lines += markdown_table(table)
        weights = [r["task_weights"] for r in runs if r["row"] == "multimodal" and r.get("task_weights")]
        if weights:
            lines += ["", "Learned task weights at the end (per seed): " + "; ".join(
                ", ".join(f"{k} {v:.3g}" for k, v in w.items()) for w in weights)]
            if any(v > 1e3 for w in weights for v in w.values()):
                lines += ["", "A weight above 1,000 is the uncertainty weighting's known failure mode: the genre "
                              "task's training loss goes to ~0 (the ID embeddings learn the training items' genres "
                              "exactly), so its optimal weight 1 / (2 L) grows without bound "
                              "(`MultiTaskLoss(max_weight=...)` caps it; these runs did not)."]

    # multi-task, Shapes
    if shape_rows:
        lines += ["", "## Multi-task learning on the Shapes demo: contrastive + attribute classification", "",
                  f"The demo's model trained {shape_rows[0]['steps']} steps (same batches) with the contrastive "
                  "losses only, and with linear heads classifying each image's shape kind, colour and size from "
                  "its embedding (`train_multitask`, uncertainty weights). Retrieval R@1 on the demo's test "
                  "gallery (192 images); attribute accuracy of linear probes on the frozen image embeddings "
                  "(2,000 training / 1,000 test images), and of the trained heads.", ""]
        table = [["seed", "training", "text->image R@1", "image->text R@1", "composed R@1", "probe kind", "probe colour",
                  "probe size", "heads kind / colour / size", "train s (2 threads)"]]
        for r in shape_rows:
            h = r.get("heads")
            table.append([str(r["seed"]), r["mode"], f"{r['retrieval']['text_to_image_R@1']:.3f}",
                          f"{r['retrieval']['image_to_text_R@1']:.3f}", f"{r['retrieval']['composed_R@1']:.3f}",
                          f"{r['probe']['kind']:.3f}", f"{r['probe']['colour']:.3f}", f"{r['probe']['size']:.3f}",
                          " / ".join(f"{h[a]:.3f}" for a in ("kind", "colour", "size")) if h else "-",
                          f"{r['train_seconds']:.0f}"])
        lines += markdown_table(table)

    if lat:
        lines += ["", "## Recommending for every user", "",
                  "`model.recommend(all users, 10)`: user vectors searched against a `FlatIndex` (inner product) of "
                  "the item vectors, users batched by how many seen items they skip, each batch searching k + its "
                  "deepest skip and filtering. Median of 20 runs.", ""]
        table = [["model", "warm ms", "cold ms (vectors + index rebuilt)", "warm ms, validation items excluded too"]]
        for r in lat:
            table.append([r["model"], f"{r['warm_seconds'] * 1e3:.1f}", f"{r['cold_seconds'] * 1e3:.1f}",
                          f"{r['warm_with_validation_excluded_seconds'] * 1e3:.1f}"])
        lines += markdown_table(table)
    return "\n".join(lines) + "\n"


def chart(path: str, runs: List[dict]) -> None:
    """PNG: NDCG@10 and Recall@10 of each row (mean, with the seeds' range), RecBole's best row as a line."""
    from PIL import Image, ImageDraw

    agg = aggregate(runs)
    names = list(agg)
    label_w, bar_w, row_h, pad = 300, 420, 34, 12
    width, height = label_w + bar_w + 140, 60 + row_h * len(names) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), "MovieLens-100k test @10 (mean over seeds; whiskers: range). Line: RecBole's best row",
              fill="black")
    top = 0.4
    x0 = label_w

    def x(v):
        return x0 + int(bar_w * v / top)

    for j, tick in enumerate((0.0, 0.1, 0.2, 0.3, 0.4)):
        draw.line([x(tick), 40, x(tick), height - 30], fill=(225, 225, 225))
        draw.text((x(tick) - 8, height - 26), f"{tick:.1f}", fill=(80, 80, 80))
    for n, name in enumerate(names):
        y = 48 + n * row_h
        draw.text((pad, y + 8), name[:44], fill="black")
        for k, (metric, colour) in enumerate((("ndcg@10", (50, 110, 200)), ("recall@10", (230, 140, 40)))):
            s = agg[name][metric]
            yy = y + 4 + k * 13
            draw.rectangle([x0, yy, x(s["mean"]), yy + 10], fill=colour)
            draw.line([x(s["min"]), yy + 5, x(s["max"]), yy + 5], fill="black", width=1)
            draw.text((x(s["max"]) + 4, yy - 1), f"{s['mean']:.3f}", fill="black")
    for v, colour in ((RECBOLE["LightGCN (patience 50, 200 epochs)"]["ndcg"], (50, 110, 200)),
                      (RECBOLE["LightGCN (patience 50, 200 epochs)"]["recall"], (230, 140, 40))):
        draw.line([x(v), 40, x(v), height - 30], fill=colour, width=1)
    draw.text((x0, height - 14), "blue: NDCG@10   orange: Recall@10", fill=(60, 60, 60))
    from xmodal._atomic import write_atomic

    write_atomic(path, image.save, suffix=".png")
