"""``xmodal demo``: end-to-end cross-modal retrieval on the built-in Shapes data.

Trains the default two-tower model (with composed queries fused by factorized bilinear pooling) from
scratch, indexes the test images with a FlatIndex, runs text -> image, image -> text and composed
(image + modification) retrieval, prints R@1/5/10, writes a PNG grid of example queries and their top
results, and optionally the metrics as JSON.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import List, Sequence

import torch

from . import data as D
from ._atomic import write_atomic
from .index import FlatIndex
from .evaluation import evaluate, rerank_report
from .train import TrainConfig, build_model, train, train_multitask


def _upscale(image: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="nearest")[0]


QUERY_FRAME, CORRECT_FRAME, WRONG_FRAME = (60, 60, 200), (30, 170, 60), (210, 40, 40)


def write_grid(path: str, rows: Sequence[dict], cell: int = 96) -> None:
    """PNG with a legend, column headers (query, rank 1..k) and one row per query: the query (text and/or
    image) then its top results, each result an image or a caption, framed green (correct) or red (wrong)."""
    from PIL import Image, ImageDraw

    text_w, pad, header = 260, 6, 40
    results = max(len(r["results"]) for r in rows)
    width = text_w + (cell + pad) * (results + 1) + pad
    height = header + (cell + 2 * pad) * len(rows) + pad
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    # legend: what each frame colour means
    x = pad
    for colour, label in ((QUERY_FRAME, "query image"), (CORRECT_FRAME, "correct result"), (WRONG_FRAME, "wrong result")):
        draw.rectangle([x, 6, x + 14, 20], outline=colour, width=3)
        draw.text((x + 20, 7), label, fill=(40, 40, 40))
        x += 30 + 7 * len(label)
    # column headers
    draw.text((pad, header - 14), "query", fill=(40, 40, 40))
    draw.text((text_w, header - 14), "query image", fill=(40, 40, 40))
    for r in range(results):
        draw.text((text_w + (cell + pad) * (r + 1), header - 14), f"rank {r + 1}", fill=(40, 40, 40))
    for r, row in enumerate(rows):
        y = header + pad + r * (cell + 2 * pad)
        draw.text((pad, y + 4), row["title"], fill=(40, 40, 40))
        lines = _wrap(row["text"], 38) if row.get("text") else []
        for j, line in enumerate(lines[:5]):
            draw.text((pad, y + 22 + 14 * j), line, fill=(0, 0, 0))
        x = text_w
        if row.get("image") is not None:
            canvas.paste(_to_pil(_upscale(row["image"], cell)), (x, y + pad))
            draw.rectangle([x - 2, y + pad - 2, x + cell + 1, y + pad + cell + 1], outline=QUERY_FRAME, width=2)
        x += cell + pad
        for result, correct in row["results"]:
            if isinstance(result, str):  # a caption (image -> text)
                draw.rectangle([x, y + pad, x + cell - 1, y + pad + cell - 1], fill=(255, 255, 255))
                for j, line in enumerate(_wrap(result, cell // 7)[:6]):
                    draw.text((x + 3, y + pad + 3 + 14 * j), line, fill=(0, 0, 0))
            else:
                canvas.paste(_to_pil(_upscale(result, cell)), (x, y + pad))
            colour = CORRECT_FRAME if correct else WRONG_FRAME
            draw.rectangle([x - 2, y + pad - 2, x + cell + 1, y + pad + cell + 1], outline=colour, width=3)
            x += cell + pad
    write_atomic(path, canvas.save, suffix=".png")


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def example_rows(model, gallery: D.ShapesDataset, composed: D.ComposedQueries, top: int = 5) -> List[dict]:
    with torch.no_grad():
        index = FlatIndex(model.image_head.net[-1].out_features, "ip")
        index.add(model.encode_image(gallery.images))
        rows = []
        for i in (0, 37, 101):
            text = gallery.captions[i][0]
            _, ids = index.search(model.encode_text([text]), top)
            rows.append({"title": "text -> image", "text": text,
                         "results": [(gallery.images[j], j == i) for j in ids[0].tolist()]})
        captions = [c for per_image in gallery.captions for c in per_image]
        owner = [i for i, per_image in enumerate(gallery.captions) for _ in per_image]
        caption_index = FlatIndex(model.image_head.net[-1].out_features, "ip")
        caption_index.add(model.encode_text(captions))
        for i in (5, 120):
            _, ids = caption_index.search(model.encode_image(gallery.images[[i]]), top)
            rows.append({"title": "image -> text", "image": gallery.images[i],
                         "results": [(captions[j], owner[j] == i) for j in ids[0].tolist()]})
        for j in (0, 57, 130):
            ref, text, target = composed.references[j], composed.texts[j], composed.targets[j]
            _, ids = index.search(model.encode_composed(gallery.images[[ref]], [text]), top)
            rows.append({"title": "composed (image + text)", "text": text, "image": gallery.images[ref],
                         "results": [(gallery.images[t], t == target) for t in ids[0].tolist()]})
    return rows


def run(args) -> int:
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    config = TrainConfig(steps=args.steps, seed=args.seed)
    print(f"xmodal demo: generating the Shapes data (seed {args.seed}) ...", flush=True)
    pool = D.ShapesDataset(config.train_images, seed=args.seed + 1000)
    gallery = D.ShapesDataset(None, seed=args.seed + 7)  # one test image per attribute combination
    composed = D.ComposedQueries(gallery, seed=args.seed + 11)
    print(f"  train: {len(pool)} images x {pool.captions_per_image} captions; test: {len(gallery)} images, "
          f"{len(gallery) * gallery.captions_per_image} captions, {len(composed)} composed queries", flush=True)
    model = build_model(args.seed)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters for {config.steps} steps "
          f"(checkpoint: {checkpoint}) ...", flush=True)
    t0 = time.perf_counter()
    if getattr(args, "multitask", False):  # contrastive loss + shape, colour and size classification, MultiTaskLoss-weighted
        _, _, losses = train_multitask(model, config, checkpoint=checkpoint, resume=args.resume,
                                       progress=not args.no_progress, pool=pool)
        print("learned task weights: " + ", ".join(f"{t} {w:.3g}" for t, w in losses.weights().items()))
    else:
        train(model, config, checkpoint=checkpoint, resume=args.resume, progress=not args.no_progress, pool=pool)
    train_seconds = time.perf_counter() - t0
    results = evaluate(model, gallery, composed)
    print()
    print(f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for name, key in (("text -> image", "text_to_image"), ("image -> text", "image_to_text"), ("composed", "composed")):
        print(f"{name:<16}" + "".join(f"{results[f'{key}_R@{r}']:>8.3f}" for r in (1, 5, 10)))
    rerank_images = D.ShapesDataset(1000, seed=args.seed + 13)
    reranked = rerank_report(model, rerank_images, seed=args.seed)
    print(f"\nimage -> image of the same shape ({len(rerank_images)} images, 200 queries), mAP@100:")
    print("".join(f"{name:>16}" for name in reranked))
    print("".join(f"{value:>16.3f}" for value in reranked.values()))
    grid = os.path.join(args.out, "examples.png")
    write_grid(grid, example_rows(model, gallery, composed))
    model_folder = os.path.join(args.out, "model")
    model.save(model_folder)  # what `xmodal serve DIR --model <out>/model` searches with
    total = time.perf_counter() - started
    print(f"\nexample queries and their top 5: {grid}\nthe trained model: {model_folder} (for xmodal serve --model)"
          f"\ntrained in {train_seconds:.0f} s, {total:.0f} s in all")
    if args.json:
        report = {"metrics": results, "rerank_same_shape_mAP@100": reranked, "multitask": getattr(args, "multitask", False),
                  "config": asdict(config), "train_seconds": train_seconds, "total_seconds": total,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
