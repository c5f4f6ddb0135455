"""Recommendation on MovieLens-100k with RecBole's default protocol: xmodal's models against RecBole's figures,
the multimodal model's ablations, multi-task learning with and without the auxiliary task (ml-100k and the
Shapes demo), and the latency of recommending for every user. One process, one machine.

    python benchmarks/recommend.py --out benchmarks/results/2026-12-02_recommend_cpu_intel [--quick]

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (the tables and the chart: ``recommend_report.py``).
Protocol (see ``xmodal.recommend.data``): every rating an implicit positive, per-user random 8:1:1 split
(RecBole's rounding; 80,808 / 9,596 / 9,596), full ranking with the user's earlier interactions excluded,
Recall / MRR / NDCG / Hit / Precision @10 on the test part, each model selected on validation MRR@10 (early
stopping, best checkpoint tested). The split uses xmodal's own generator, so each figure is the mean over
three split seeds (each model's initialisation and sampling seeded alike), with the sample standard deviation
and the range; the full multimodal model and its content / KG ablations also run on seven more splits, for
the paired ablation differences.

Training is timed on one thread (``torch.set_num_threads(1)``), as RecBole's figures were; the all-users
latency on two (the machine's cores). The Shapes runs use two threads (their times are not compared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from xmodal.bench.harness import environment, publish, time_call
from xmodal.recommend import MovieLens100K, build, evaluate

from recommend_report import RECBOLE, aggregate, chart, report  # (this folder: the script's own)

#: the runs per seed: (row name, model, constructor options). The multimodal runs hold out 20% of the items'
#: genres from the auxiliary task, so that genre prediction can be measured on items it never saw.
RUNS = [
    ("popularity (train counts)", "pop", {}),
    ("MF-BPR", "mf", {}),
    ("LightGCN", "lightgcn", {}),
    ("multimodal", "multimodal", {"aux_holdout": 0.2}),
    ("multimodal without content", "multimodal", {"aux_holdout": 0.2, "use_content": False}),
    ("multimodal without KG", "multimodal", {"aux_holdout": 0.2, "use_kg": False}),
    ("multimodal without content and KG", "multimodal", {"aux_holdout": 0.2, "use_content": False, "use_kg": False}),
    ("multimodal without the auxiliary task", "multimodal", {"aux_holdout": 0.2, "aux_genres": False}),
]
QUICK_RUNS = ("popularity (train counts)", "MF-BPR", "multimodal")
#: the rows run again on the extra ablation seeds: whether the content and the KG matter is a paired difference
#: of a few thousandths of NDCG, so it is judged over more splits than the other rows need
ABLATION_RUNS = ("multimodal", "multimodal without content", "multimodal without KG")


# --- genre prediction (the auxiliary task's metric) ---------------------------------------------------------

def genre_scores(logits: torch.Tensor, genres: torch.Tensor) -> Dict[str, float]:
    """Top-1 accuracy (the highest-scored genre is one of the item's) and micro-F1 at probability 0.5."""
    truth = genres.bool()
    top1 = truth.gather(1, logits.argmax(1, keepdim=True)).double().mean().item()
    predicted = logits > 0
    tp = (predicted & truth).sum().item()
    f1 = 2 * tp / max(predicted.sum().item() + truth.sum().item(), 1)
    return {"genre_top1": top1, "genre_micro_f1": f1}


def genre_probe(embeddings: torch.Tensor, genres: torch.Tensor, train_items: torch.Tensor, test_items: torch.Tensor,
                steps: int = 500) -> Dict[str, float]:
    """A multi-label logistic regression from the items' ID embeddings to their genres, fitted on
    ``train_items``, scored on ``test_items``."""
    torch.manual_seed(0)
    x = F.normalize(embeddings.detach(), dim=1)
    head = torch.nn.Linear(x.shape[1], genres.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(x[train_items]), genres[train_items])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return genre_scores(head(x[test_items]), genres[test_items])


# --- the runs -----------------------------------------------------------------------------------------------

def run_one(name: str, kind: str, options: dict, data: MovieLens100K, seed: int) -> dict:
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = build(kind, data, **options)
    build_seconds = time.perf_counter() - started
    fit = model.fit(data) if kind == "pop" else model.fit(data, seed=seed)
    test = evaluate(model, data, "test")
    out = {"row": name, "model": kind, "options": options, "seed": seed, "test": test, "valid": fit.best_valid,
           "train_seconds": fit.seconds + build_seconds, "build_seconds": build_seconds,
           "eval_seconds": fit.eval_seconds, "epochs": fit.epochs, "best_epoch": fit.best_epoch}
    if kind == "multimodal":
        held = model.genre_holdout_items
        seen = model.genre_train_mask.nonzero().flatten()
        genres = data.genres.float()
        out["genre_probe"] = genre_probe(model.item_embedding.weight, genres, seen, held)
        if model.genre_head is not None:
            with torch.no_grad():
                out["genre_head"] = genre_scores(model.genre_head(model.item_embedding.weight[held]), genres[held])
            out["task_weights"] = model.multitask.weights()
        out["alpha"] = float(model.alpha.detach()) if hasattr(model, "alpha") else None
    return out, model


def latency(models: Dict[str, object], data: MovieLens100K, threads: int, repeats: int = 20) -> List[dict]:
    """Median seconds to recommend 10 items to every user, seen (training) items excluded: warm (user vectors
    and item index cached, as a service holds them), cold (vectors recomputed and the index rebuilt first) and
    warm with the validation items excluded too (what the test evaluation does)."""
    torch.set_num_threads(threads)
    users = torch.arange(data.num_users)
    rows = []
    for name, model in models.items():
        model.recommend(users, 10)

        def cold():
            model.refresh()
            model.recommend(users, 10)

        rows.append({"model": name, "threads": threads, "users": data.num_users, "k": 10,
                     "warm_seconds": time_call(lambda: model.recommend(users, 10), "cpu", repeats),
                     "cold_seconds": time_call(cold, "cpu", repeats),
                     "warm_with_validation_excluded_seconds":
                         time_call(lambda: model.recommend(users, 10, exclude=data.valid), "cpu", repeats)})
    return rows


def shapes(seeds: List[int], steps: int, threads: int) -> List[dict]:
    """The Shapes demo's model trained with and without the attribute tasks (same batches): retrieval R@K on the
    demo's test gallery, and attribute accuracy of linear probes on frozen image embeddings (both runs) and
    of the trained heads (multi-task run) on 1,000 fresh test images."""
    from xmodal.demo import shapes as D
    from xmodal.demo.evaluation import evaluate as shapes_evaluate
    from xmodal.demo.multitask import attribute_accuracy, linear_probe, train_multitask
    from xmodal.demo.training import TrainConfig, build_model, train

    torch.set_num_threads(threads)
    rows = []
    for seed in seeds:
        config = TrainConfig(steps=steps, seed=seed)
        pool = D.ShapesDataset(config.train_images, seed=seed + 1000)
        gallery = D.ShapesDataset(None, seed=seed + 7)
        composed = D.ComposedQueries(gallery, seed=seed + 11)
        probe_train, probe_test = D.ShapesDataset(2000, seed=seed + 2000), D.ShapesDataset(1000, seed=seed + 3000)
        for mode in ("contrastive only", "contrastive + attributes (uncertainty weights)"):
            model = build_model(seed)
            started = time.perf_counter()
            heads = weights = None
            if mode == "contrastive only":
                train(model, config, progress=False, pool=pool)
            else:
                _, heads, losses = train_multitask(model, config, progress=False, pool=pool)
                weights = losses.weights()
            seconds = time.perf_counter() - started
            row = {"seed": seed, "mode": mode, "steps": steps, "train_seconds": seconds,
                   "retrieval": shapes_evaluate(model, gallery, composed),
                   "probe": linear_probe(model, probe_train, probe_test, seed=seed)}
            if heads is not None:
                row["heads"] = attribute_accuracy(model, heads, probe_test)
                row["task_weights"] = weights
            rows.append(row)
            print(f"  shapes seed {seed} {mode}: {seconds:.0f} s, t2i R@1 {row['retrieval']['text_to_image_R@1']:.3f}, "
                  f"composed R@1 {row['retrieval']['composed_R@1']:.3f}, probe {row['probe']}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path prefix of the reports (<out>.md, .json, .png)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021, 2022], help="split seeds")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, popularity, MF and multimodal only, a short Shapes run (a smoke test)")
    parser.add_argument("--shapes-steps", type=int, default=300, help="training steps of each Shapes run")
    parser.add_argument("--shapes-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=list(range(2023, 2030)),
                        help="more split seeds for the full model and its content / KG ablations only")
    parser.add_argument("--latency-threads", type=int, default=2)
    parser.add_argument("--no-shapes", action="store_true", help="skip the Shapes multi-task runs")
    parser.add_argument("--from-json", metavar="PATH",
                        help="run nothing: rewrite the markdown and the chart from a finished run's JSON")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        parser.error(f"--out {args.out!r}: folder {folder!r} does not exist")
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        if saved.get("partial"):
            parser.error(f"--from-json {args.from_json!r}: that run did not finish")
        args.latency_threads = saved["latency"][0]["threads"] if saved["latency"] else args.latency_threads
        text = report(saved["environment"], args, saved["runs"], saved["latency"], saved["shapes"])
        publish(text, saved, args.out + ".md", None)
        chart(args.out + ".png", [r for r in saved["runs"] if not r.get("ablation_only")])
        return 0
    runs_spec = RUNS
    if args.quick:
        args.seeds, args.shapes_steps, args.shapes_seeds = args.seeds[:1], 30, args.shapes_seeds[:1]
        args.ablation_seeds = []
        runs_spec = [r for r in RUNS if r[0] in QUICK_RUNS]
    started = time.perf_counter()
    env = environment("cpu", faiss=False)
    env["command"] = "python benchmarks/recommend.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: List[dict] = []
    keep: Dict[str, object] = {}
    data = None
    for seed in args.seeds:
        torch.set_num_threads(1)
        data = MovieLens100K(seed=seed)
        for name, kind, options in runs_spec:
            torch.set_num_threads(1)
            run, model = run_one(name, kind, options, data, seed)
            runs.append(run)
            t = run["test"]
            print(f"seed {seed} {name}: NDCG {t['ndcg@10']:.4f} Recall {t['recall@10']:.4f} MRR {t['mrr@10']:.4f} "
                  f"({run['train_seconds']:.1f} s, best epoch {run['best_epoch']})", flush=True)
            if seed == args.seeds[-1] and name in ("MF-BPR", "LightGCN", "multimodal"):
                keep[name] = model
        publish_partial(args.out, env, runs)
    for seed in args.ablation_seeds:
        split = MovieLens100K(seed=seed)
        for name, kind, options in (r for r in RUNS if r[0] in ABLATION_RUNS):
            torch.set_num_threads(1)
            run, _ = run_one(name, kind, options, split, seed)
            run["ablation_only"] = True
            runs.append(run)
            t = run["test"]
            print(f"ablation seed {seed} {name}: NDCG {t['ndcg@10']:.4f} Recall {t['recall@10']:.4f}", flush=True)
        publish_partial(args.out, env, runs)
    lat = latency(keep, data, args.latency_threads)
    shape_rows = [] if args.no_shapes else shapes(args.shapes_seeds, args.shapes_steps, 2)
    env["total_seconds"] = round(time.perf_counter() - started, 1)
    text = report(env, args, runs, lat, shape_rows)
    main_runs = [r for r in runs if not r.get("ablation_only")]
    publish(text, {"environment": env, "runs": runs, "summary": aggregate(main_runs), "latency": lat,
                   "shapes": shape_rows, "recbole": RECBOLE}, args.out + ".md", args.out + ".json")
    chart(args.out + ".png", main_runs)
    return 0


def publish_partial(prefix: str, env: dict, runs: List[dict]) -> None:
    """The runs so far as JSON (a cut-off run keeps them)."""
    from xmodal._atomic import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump({"environment": env, "runs": runs, "partial": True}, fh, indent=2)

    write_atomic(prefix + ".json", write)


if __name__ == "__main__":
    raise SystemExit(main())
