"""``xmodal demo``: end-to-end cross-modal retrieval on the built-in Shapes data -- an application of the core.

Trains the default two-tower model (with composed queries fused by factorized bilinear pooling) from scratch,
indexes the test images with a FlatIndex, runs text -> image, image -> text and composed (image + modification)
retrieval, prints R@1/5/10 with what each number means and what a random ranking would score, writes a PNG grid
of example queries and their top results, the trained model for ``xmodal serve --model``, the test images as a
collection for ``xmodal serve`` (:mod:`.collection`), and optionally the metrics as JSON.

Re-ranking (query expansion, diffusion, GNN) is not part of the demo's output: its premise -- a gallery whose
neighbourhoods follow the relevance, with parameters chosen on held-out queries -- does not hold for the Shapes
renderings, where an image's nearest neighbours often share colour and place but not the sought attribute.
``benchmarks/graph_rerank.py`` measures re-ranking where it applies; :func:`xmodal.demo.evaluation.rerank_report`
is still there for a look at it on Shapes.

The parts: :mod:`.shapes` (the data), :mod:`.training` and :mod:`.multitask` (the demo's training),
:mod:`.evaluation` (R@K on Shapes), :mod:`.grid` (the picture).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict

import torch

from .collection import write_gallery_collection
from .evaluation import evaluate, rerank_report
from .grid import CORRECT_FRAME, QUERY_FRAME, WRONG_FRAME, example_rows, write_grid
from .multitask import train_multitask
from .shapes import ComposedQueries, ShapesDataset
from .training import TrainConfig, build_model, train

__all__ = ["run", "results_table", "chance_recall", "evaluate", "rerank_report", "example_rows", "write_grid",
           "QUERY_FRAME", "CORRECT_FRAME", "WRONG_FRAME", "ShapesDataset", "ComposedQueries", "TrainConfig",
           "build_model", "train", "train_multitask", "write_gallery_collection"]

#: (printed name, metrics key, what the right answer is) of each direction the demo evaluates
DIRECTIONS = (("text -> image", "text_to_image", "the caption's image"),
              ("image -> text", "image_to_text", "any of the image's captions"),
              ("composed", "composed", "the image with the asked change"))


def chance_recall(k: int, relevant: int, total: int) -> float:
    """R@k of a random ranking: the chance that one of ``relevant`` right answers among ``total`` candidates is
    in the first ``k``."""
    k = min(k, total)
    return 1.0 - math.comb(total - relevant, k) / math.comb(total, k)


def results_table(results: dict, gallery: ShapesDataset, composed: ComposedQueries) -> str:
    """The demo's printed results: one row per direction, R@1/5/10, what the right answer is and what a random
    ranking would score, with a header that says what R@K means."""
    n, per = len(gallery), gallery.captions_per_image
    lines = [
        f"Retrieval on the test set ({n} images, one per combination of shape, colour, size and position;",
        f"{n * per} captions; {len(composed)} composed queries = an image plus a change such as \"make it blue\"),",
        "searched with a FlatIndex by cosine similarity of the trained model's embeddings.",
        "R@K: the fraction of queries whose right answer is among the first K results (1.000 = every query).",
        "",
        f"{'direction':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}   {'random R@10':>11}   right answer",
    ]
    for name, key, answer in DIRECTIONS:
        if f"{key}_R@1" not in results:
            continue
        pool, relevant, what = (n * per, per, f"{n * per} captions") if key == "image_to_text" else (n, 1, f"{n} images")
        lines.append(f"{name:<15}" + "".join(f"{results[f'{key}_R@{r}']:>7.3f}" for r in (1, 5, 10))
                     + f"   {chance_recall(10, relevant, pool):>11.3f}   {answer} (of {what})")
    return "\n".join(lines)


def run(args) -> int:
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    config = TrainConfig(steps=args.steps, seed=args.seed)
    print(f"xmodal demo: generating the Shapes data (seed {args.seed}) ...", flush=True)
    pool = ShapesDataset(config.train_images, seed=args.seed + 1000)
    gallery = ShapesDataset(None, seed=args.seed + 7)  # one test image per attribute combination
    composed = ComposedQueries(gallery, seed=args.seed + 11)
    print(f"  train: {len(pool)} images x {pool.captions_per_image} captions; test: {len(gallery)} images, "
          f"{len(gallery) * gallery.captions_per_image} captions, {len(composed)} composed queries", flush=True)
    model = build_model(args.seed)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters for {config.steps} steps "
          f"(checkpoint: {checkpoint}) ...", flush=True)
    t0 = time.perf_counter()
    multitask = getattr(args, "multitask", False)
    task_weights = None
    if multitask:  # contrastive loss + shape, colour and size classification, MultiTaskLoss-weighted
        _, _, losses = train_multitask(model, config, checkpoint=checkpoint, resume=args.resume,
                                       progress=not args.no_progress, pool=pool)
        task_weights = losses.weights()
        print("learned task weights (MultiTaskLoss, uncertainty weighting: the factor on each task's loss): "
              + ", ".join(f"{t} {w:.3g}" for t, w in task_weights.items()))
    else:
        train(model, config, checkpoint=checkpoint, resume=args.resume, progress=not args.no_progress, pool=pool)
    train_seconds = time.perf_counter() - t0
    results = evaluate(model, gallery, composed)
    print()
    print(results_table(results, gallery, composed))
    grid = os.path.join(args.out, "examples.png")
    write_grid(grid, example_rows(model, gallery, composed))
    model_folder = os.path.join(args.out, "model")
    model.save(model_folder)  # what `xmodal serve DIR --model <out>/model` searches with
    collections = os.path.join(args.out, "collections")
    write_gallery_collection(model, gallery, collections)
    total = time.perf_counter() - started
    print(f"\nexample queries and their top 5 (green: right, red: wrong): {grid}"
          f"\nthe trained model: {model_folder} (for xmodal serve --model)"
          f"\nthe test images as a collection, with a search page: "
          f"xmodal serve {collections} --model {model_folder} --ui"
          f"\ntraining took {train_seconds:.0f} s, the whole demo {total:.0f} s")
    if args.json:
        report = {"metrics": results, "multitask": multitask, "config": asdict(config), "train_seconds": train_seconds,
                  "total_seconds": total, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if task_weights is not None:
            report["task_weights"] = task_weights
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
