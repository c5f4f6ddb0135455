"""GraphFusion fusing modalities on the Shapes data: R@1/5/10 with and without it, one seed, one machine.

    python benchmarks/graph_fusion.py [--steps 800] [--fusion-steps 300] [--seed 0] [--markdown out.md] [--json out.json]

The demo's two-tower model is trained first (``--steps``, as ``xmodal demo``) and then frozen. Its image and
caption embeddings become the nodes of one graph: each image joined to its ``--k`` nearest images, each
caption to its ``--k`` nearest captions, and each caption to its ``--cross`` nearest images (both ways) by
the frozen model's cosine similarity -- no labels go into the graph, so the test graph is built exactly as
the training graph is. A ``GraphFusion`` (2 GATv2 layers, 2 heads) is trained on a graph of training images
(``--train-images``) and their captions with the contrastive loss between each caption and its image, then
refines the test gallery's graph. Text -> image and image -> text R@K are measured with ``xmodal.metrics``
on the raw and on the refined embeddings.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import xmodal
from xmodal import metrics
from xmodal.bench import environment, publish
from xmodal.demo.shapes import ShapesDataset
from xmodal.demo.training import TrainConfig, build_model, train
from xmodal.graph import knn_graph
from xmodal.losses import contrastive_loss
from xmodal.nn import GraphFusion


@torch.no_grad()
def embed(model, data: ShapesDataset):
    images = torch.cat([model.encode_image(data.images[i: i + 512]) for i in range(0, len(data), 512)])
    captions = [c for cs in data.captions for c in cs]
    texts = torch.cat([model.encode_text(captions[i: i + 512]) for i in range(0, len(captions), 512)])
    owner = torch.arange(len(data)).repeat_interleave(data.captions_per_image)
    return F.normalize(images, dim=1), F.normalize(texts, dim=1), owner


def build_graph(images, texts, k: int, cross: int):
    """Nodes: images, then captions. Edges: kNN within each modality, and each caption's nearest images."""
    n_img = images.shape[0]
    e_img, w_img = knn_graph(images, k)
    e_txt, w_txt = knn_graph(texts, k)
    scores, nearest = xmodal.topk_search(texts, images, cross, "cosine")
    caption = torch.arange(texts.shape[0]).repeat_interleave(cross) + n_img
    image = nearest.reshape(-1)
    edges = torch.cat([e_img, e_txt + n_img, torch.stack([image, caption]), torch.stack([caption, image])], dim=1)
    weights = torch.cat([w_img, w_txt, scores.reshape(-1), scores.reshape(-1)])
    return torch.cat([images, texts]), edges, weights


def recalls(images, texts, owner, prefix: str):
    k = 10
    _, t2i = xmodal.topk_search(texts, images, k, "cosine")
    _, i2t = xmodal.topk_search(images, texts, k * 5, "cosine")
    i2t_images = owner[i2t]
    out = {}
    for r in (1, 5, 10):
        out[f"{prefix}text_to_image_R@{r}"] = metrics.recall_at_k(t2i, owner, r)
        out[f"{prefix}image_to_text_R@{r}"] = metrics.recall_at_k(i2t_images, torch.arange(images.shape[0]), r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps of the two-tower model")
    parser.add_argument("--fusion-steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=1500, help="images in the GraphFusion training graph")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--cross", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = environment("cpu", faiss=False)
    started = time.perf_counter()

    config = TrainConfig(steps=args.steps, seed=args.seed)
    pool = ShapesDataset(config.train_images, seed=args.seed + 1000)
    gallery = ShapesDataset(None, seed=args.seed + 7)
    model = build_model(args.seed)
    train(model, config, progress=False, pool=pool)
    model.eval()
    model_seconds = time.perf_counter() - started

    sub = ShapesDataset(args.train_images, seed=args.seed + 2000)  # fresh training images for the fusion
    tr_img, tr_txt, tr_owner = embed(model, sub)
    te_img, te_txt, te_owner = embed(model, gallery)
    x_tr, e_tr, w_tr = build_graph(tr_img, tr_txt, args.k, args.cross)
    x_te, e_te, w_te = build_graph(te_img, te_txt, args.k, args.cross)

    torch.manual_seed(args.seed)
    fusion = GraphFusion(x_tr.shape[1], layers=2, heads=2)
    logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as the two-tower model starts
    opt = torch.optim.AdamW([*fusion.parameters(), logit_scale], lr=1e-3, weight_decay=1e-4)
    n_img = tr_img.shape[0]
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.fusion_steps):
        refined = F.normalize(fusion(x_tr, e_tr, w_tr), dim=1)
        pick = torch.randperm(tr_txt.shape[0], generator=g)[:512]
        owners = tr_owner[pick]
        loss = contrastive_loss(refined[n_img + pick], refined[owners], logit_scale, labels=owners)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fusion_seconds = time.perf_counter() - t0

    fusion.eval()
    with torch.no_grad():
        refined = F.normalize(fusion(x_te, e_te, w_te), dim=1)
    n_te = te_img.shape[0]
    results = {**recalls(te_img, te_txt, te_owner, "raw/"),
               **recalls(refined[:n_te], refined[n_te:], te_owner, "fused/")}
    report = {"environment": env, "args": vars(args), "results": results, "model_train_seconds": model_seconds,
              "fusion_train_seconds": fusion_seconds, "final_loss": float(loss),
              "test_graph": {"nodes": int(x_te.shape[0]), "edges": int(e_te.shape[1])}}

    lines = ["# GraphFusion on the Shapes data: retrieval with and without it", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", __doc__.split("\n\n", 2)[2].strip(), "",
              f"Seed {args.seed}; two-tower model {args.steps} steps ({model_seconds:.0f} s); GraphFusion "
              f"{args.fusion_steps} steps on {args.train_images} images + their captions ({fusion_seconds:.0f} s, "
              f"final loss {float(loss):.3f}); test graph {x_te.shape[0]} nodes, {e_te.shape[1]} edges.", "",
              "| direction | embeddings | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
    for direction in ("text_to_image", "image_to_text"):
        for which in ("raw", "fused"):
            vals = [results[f"{which}/{direction}_R@{r}"] for r in (1, 5, 10)]
            name = "frozen two-tower" if which == "raw" else "+ GraphFusion"
            lines.append(f"| {direction.replace('_', ' ')} | {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    publish("\n".join(lines) + "\n", report, args.markdown, args.json)

if __name__ == "__main__":
    main()
