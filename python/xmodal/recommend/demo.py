"""``xmodal demo recommend``: train a recommender on MovieLens-100k (RecBole's protocol) on the CPU, print the
test metrics beside exact train-set popularity, and draw a few users' histories and recommendations.

Wiring: ``add_arguments(parser)`` adds the options to an ``argparse`` parser, ``run(args)`` runs the demo and
returns the exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from .._atomic import write_atomic
from .._cli_args import existing_folder, output_file, positive_int  # (the same checks as every xmodal command)
from . import build
from .base import evaluate
from .data import MovieLens100K

#: the demo's models (popularity is always run, as the baseline)
DEMO_MODELS = ("mf", "lightgcn", "multimodal")
HIT, MISS = (30, 150, 60), (120, 120, 120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``xmodal demo recommend``."""
    parser.add_argument("--model", choices=DEMO_MODELS, default="multimodal",
                        help="mf (matrix factorisation, BPR), lightgcn, or multimodal (content + knowledge graph; "
                             "default)")
    parser.add_argument("--seed", type=int, default=2020, help="seed of the 8:1:1 split and of training (default: 2020)")
    parser.add_argument("--data", type=existing_folder, default=None, metavar="DIR",
                        help="folder with ml-100k.inter/.item/.kg/.link (default: the copy bundled with RecBole)")
    parser.add_argument("--out", default="xmodal-recommend", help="folder for the picture (default: xmodal-recommend)")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="write the metrics as JSON")
    parser.add_argument("--users", type=positive_int, default=4, help="users drawn in the picture (default: 4)")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="stop training after this many seconds (best validated weights kept; default: 150)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _table(rows: Dict[str, Dict[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    lines = [f"{'model':<14}" + "".join(f"{n:>14}" for n in names)]
    for model, values in rows.items():
        lines.append(f"{model:<14}" + "".join(f"{values[n]:>14.4f}" for n in names))
    return "\n".join(lines)


def example_users(data: MovieLens100K, count: int, seed: int = 0) -> List[int]:
    """A few users with test interactions, spread over light and heavy raters (deterministic)."""
    users = torch.unique(data.test.users)
    degree = torch.bincount(data.train.users, minlength=data.num_users)[users]
    order = users[torch.argsort(degree, stable=True)]
    picks = torch.linspace(0, order.shape[0] - 1, count + 2)[1:-1].round().long()
    return order[picks].tolist()


def write_picture(path: str, data: MovieLens100K, users: Sequence[int], items: torch.Tensor, title: str) -> None:
    """PNG: per user, the genres of their training history (bars, share of their items) and the recommended
    titles with their genres, green where the title is in the user's test interactions."""
    from PIL import Image, ImageDraw

    test_items = data.test.items_of(data.num_users)
    train_items = data.train.items_of(data.num_users)
    row_h, pad, left_w, right_w = 20 + 14 * items.shape[1], 10, 330, 640
    width, height = left_w + right_w + 3 * pad, 40 + len(users) * (row_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill=(0, 0, 0))
    draw.text((pad, 22), "left: genres of the user's training history; right: top recommendations "
                         "(green = in the user's test interactions)", fill=(60, 60, 60))
    for n, (user, recs) in enumerate(zip(users, items.tolist())):
        y = 40 + n * (row_h + pad)
        draw.rectangle([pad - 4, y - 2, width - pad + 4, y + row_h], outline=(200, 200, 200))
        history = train_items[user]
        counts = Counter(data.genre_names[g] for i in history for g in data.genres[i].nonzero().flatten().tolist())
        draw.text((pad, y + 2), f"user {data.user_tokens[user]}: {len(history)} training items", fill=(0, 0, 0))
        top = counts.most_common(min(8, items.shape[1]))
        most = max([c for _, c in top] + [1])
        for j, (genre, c) in enumerate(top):
            yy = y + 20 + 14 * j
            draw.text((pad, yy), genre[:12], fill=(40, 40, 40))
            bar = int((left_w - 130) * c / most)
            draw.rectangle([pad + 90, yy + 2, pad + 90 + bar, yy + 11], fill=(90, 120, 200))
            draw.text((pad + 95 + bar, yy), f"{c / max(len(history), 1):.0%}", fill=(40, 40, 40))
        x = left_w + 2 * pad
        draw.text((x, y + 2), "recommended (rank, title, genres)", fill=(0, 0, 0))
        relevant = set(test_items[user])
        for j, item in enumerate(recs):
            yy = y + 20 + 14 * j
            if item < 0:
                continue
            genres = ", ".join(data.genre_names[g] for g in data.genres[item].nonzero().flatten().tolist())
            colour = HIT if item in relevant else MISS
            draw.text((x, yy), f"{j + 1:>2}. {data.titles[item][:48]}  ({genres[:40]})", fill=colour)
    write_atomic(path, canvas.save, suffix=".png")


def run(args) -> int:
    started = time.perf_counter()
    if args.model not in DEMO_MODELS:
        raise ValueError(f"--model must be one of {list(DEMO_MODELS)}, got {args.model!r}")
    print(f"xmodal demo recommend: MovieLens-100k, RecBole's protocol (8:1:1 per-user random split, seed "
          f"{args.seed}; full ranking, seen items excluded)", flush=True)
    data = MovieLens100K(args.data, seed=args.seed)
    print(f"  {data}; {torch.get_num_threads()} CPU threads", flush=True)
    popularity = build("pop", data)
    popularity.fit(data)
    model = build(args.model, data)
    print(f"training {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters; validation MRR@10 "
          f"every {model.DEFAULTS['eval_every']} epochs, early stopping) ...", flush=True)
    fit = model.fit(data, seed=args.seed, progress=not args.no_progress, max_seconds=args.max_seconds)
    results = {"popularity": evaluate(popularity, data, "test"), args.model: evaluate(model, data, "test")}
    print()
    print("test split, @10 (users' training and validation items excluded):")
    print(_table(results))
    print(f"\ntrained {fit.epochs} epochs in {fit.seconds:.1f} s (best validation at epoch {fit.best_epoch}: MRR@10 "
          f"{fit.best_valid['mrr@10']:.4f})")
    if fit.cut_short:
        print(f"NOTE: training was cut short by the time limit (--max-seconds {args.max_seconds:g}) after {fit.epochs} "
              f"of at most {model.settings['epochs']} epochs, before early stopping ended it: the figures above are "
              f"those of a partly trained model (a full run scores higher; raise --max-seconds)")
    os.makedirs(args.out, exist_ok=True)
    users = example_users(data, args.users)
    _, items = model.recommend(users, 10, exclude=data.valid)
    picture = os.path.join(args.out, "recommendations.png")
    write_picture(picture, data, users, items, f"xmodal demo recommend: {args.model}, MovieLens-100k test split")
    total = time.perf_counter() - started
    print(f"a few users' histories and recommendations: {picture}\n{total:.0f} s in all")
    if args.json:
        report = {"model": args.model, "seed": args.seed, "metrics": results, "train_seconds": fit.seconds,
                  "epochs": fit.epochs, "best_epoch": fit.best_epoch, "valid": fit.best_valid,
                  "stopped_by": fit.stopped_by, "cut_short": fit.cut_short, "max_seconds": args.max_seconds,
                  "settings": {k: v for k, v in model.settings.items()}, "total_seconds": total,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}

        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(report, fh, indent=2)

        write_atomic(args.json, write)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xmodal.recommend.demo``: the demo without the ``xmodal`` command."""
    parser = argparse.ArgumentParser(prog="xmodal demo recommend", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
