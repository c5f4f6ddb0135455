"""Contrastive training of a :class:`CrossModalModel` on the built-in Shapes data, and its retrieval evaluation.

Loss: symmetric InfoNCE between image and caption embeddings (CLIP), plus the same loss between composed
queries (reference image + modification text) and their target images. Rows of a batch that show the same
attribute combination are all positives for each other (multi-positive targets), not false negatives.
Training is deterministic for a given seed and thread count; checkpoints hold the model, optimiser,
schedule, step and random states, so ``resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import metrics
from .data import ComposedQueries, ShapesDataset, composed_triples
from .encoders import CrossModalModel, Tokenizer
from .index import FlatIndex

__all__ = ["TrainConfig", "contrastive_loss", "train", "train_pairs", "evaluate", "build_model"]


def contrastive_loss(a: Tensor, b: Tensor, logit_scale: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """Symmetric InfoNCE between unit rows of ``a`` and ``b`` (row i of each is a positive pair).

    With ``labels``, every pair of rows with equal labels is a positive: the target distribution of a row
    spreads evenly over its positives.
    """
    logits = logit_scale.exp().clamp(max=100.0) * (a @ b.T)
    if labels is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    positives = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = positives / positives.sum(1, keepdim=True)
    loss_ab = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_ba = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_ab + loss_ba)


@dataclass
class TrainConfig:
    steps: int = 1200
    batch_size: int = 128
    composed_batch_size: int = 64
    composed_weight: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    train_images: int = 6000
    seed: int = 0
    checkpoint_every: int = 200


def build_model(seed: int = 0) -> CrossModalModel:
    """The default model, with a tokenizer fitted on every word the built-in data can produce."""
    from .data import _KIND_WORDS, _POSITION_WORDS, _SIZE_WORDS, _TEMPLATES, COLOURS

    words = list(COLOURS) + [w for d in (_KIND_WORDS, _SIZE_WORDS, _POSITION_WORDS) for v in d.values() for w in v]
    words += _TEMPLATES + ["make it change the colour to same but paint turn into a instead shape size move put in"]
    torch.manual_seed(seed)
    return CrossModalModel.default(Tokenizer.fit(words, max_length=24))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: CrossModalModel,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    pool: Optional[ShapesDataset] = None,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Dict[str, float]:
    """Trains ``model`` in place on renderings of the built-in data; returns the last losses.

    ``checkpoint``: a file written every ``config.checkpoint_every`` steps and at the end (atomically).
    ``resume``: continue from that file if it exists (same config expected).
    ``on_step(step, losses)``: called after every step (and after that step's checkpoint), e.g. for logging.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pool = pool if pool is not None else ShapesDataset(config.train_images, seed=config.seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    start = 0
    if resume and checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        rng.setstate(_to_rng_state(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])

    def save(step: int) -> None:
        if checkpoint:
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "step": step, "python_rng": _from_rng_state(rng.getstate()), "torch_rng": torch.get_rng_state(),
                          "config": asdict(config), "tokenizer": model.tokenizer.state_dict() if model.tokenizer else None}, checkpoint)

    steps = range(start, config.steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    device = model.logit_scale.device  # batches come from the (CPU) pool and go to the model's device
    model.train()
    last: Dict[str, float] = {}
    for step in steps:
        idx = [rng.randrange(len(pool)) for _ in range(config.batch_size)]
        texts = [pool.captions[i][rng.randrange(pool.captions_per_image)] for i in idx]
        labels = pool.labels[idx].to(device)
        images = pool.images[idx].to(device)
        loss_match = contrastive_loss(model.encode_image(images), model.encode_text(texts), model.logit_scale, labels)
        loss = loss_match
        if config.composed_weight > 0 and config.composed_batch_size > 0:
            refs, mods, targets, target_labels = composed_triples(pool, config.composed_batch_size, rng)
            loss_composed = contrastive_loss(
                model.encode_composed(refs.to(device), mods), model.encode_image(targets.to(device)), model.logit_scale,
                target_labels.to(device),
            )
            loss = loss + config.composed_weight * loss_composed
            last["composed_loss"] = loss_composed.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        last["match_loss"] = loss_match.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
        if checkpoint and (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
        if on_step is not None:
            on_step(step + 1, dict(last))
    if bar is not None:
        bar.close()
    save(config.steps)
    model.eval()
    return last


def train_pairs(
    model: CrossModalModel,
    pairs,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> List[float]:
    """Contrastive training on your own (image, caption) pairs, e.g. an ``ImageCaptionCSV``: symmetric
    InfoNCE over shuffled batches (every other pair of a batch is a negative), AdamW, cosine schedule.
    Returns the mean loss of each epoch. Deterministic for a seed and thread count."""
    from torch.utils.data import DataLoader

    from .data import collate_captions

    if len(pairs) < 2:
        raise ValueError(f"contrastive training needs at least 2 pairs, got {len(pairs)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(pairs, batch_size=min(batch_size, len(pairs)), shuffle=True, drop_last=True, generator=g,
                        collate_fn=collate_captions)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    device = model.logit_scale.device
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * len(loader), desc="train", unit="step", dynamic_ncols=True)
    model.train()
    history: List[float] = []
    for _ in range(epochs):
        total = 0.0
        for images, texts in loader:
            loss = contrastive_loss(model.encode_image(images.to(device)), model.encode_text(list(texts)),
                                    model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(total / len(loader))
    if bar is not None:
        bar.close()
    model.eval()
    return history


def _from_rng_state(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _to_rng_state(state):
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])


@torch.no_grad()
def evaluate(model: CrossModalModel, gallery: ShapesDataset, composed: Optional[ComposedQueries] = None) -> Dict[str, float]:
    """R@1/5/10 for text -> image, image -> text (any of the image's captions counts) and composed queries,
    with the gallery indexed in a ``FlatIndex`` (inner product of unit vectors = cosine)."""
    model.eval()
    device = model.logit_scale.device
    image_emb = model.encode_image(gallery.images.to(device)).cpu()
    captions = [c for cs in gallery.captions for c in cs]
    owner = torch.arange(len(gallery)).repeat_interleave(gallery.captions_per_image)
    text_emb = torch.cat([model.encode_text(captions[i : i + 512]).cpu() for i in range(0, len(captions), 512)])

    images = FlatIndex(image_emb.shape[1], "ip")
    images.add(image_emb)
    texts = FlatIndex(text_emb.shape[1], "ip")
    texts.add(text_emb)
    k = min(10, len(gallery))
    _, t2i = images.search(text_emb, k)
    _, i2t = texts.search(image_emb, min(10 * gallery.captions_per_image, len(captions)))
    i2t_images = torch.where(i2t >= 0, owner[i2t.clamp(min=0)], -1)
    out: Dict[str, float] = {}
    for r in (1, 5, 10):
        if r <= k:
            out[f"text_to_image_R@{r}"] = metrics.recall_at_k(t2i, owner, r)
            out[f"image_to_text_R@{r}"] = metrics.recall_at_k(i2t_images, torch.arange(len(gallery)), r)
    if composed is not None and len(composed):
        q = torch.cat([
            model.encode_composed(
                gallery.images[composed.references[i : i + 512]].to(device), composed.texts[i : i + 512]
            ).cpu()
            for i in range(0, len(composed), 512)
        ])
        _, c2i = images.search(q, k)
        for r in (1, 5, 10):
            if r <= k:
                out[f"composed_R@{r}"] = metrics.recall_at_k(c2i, torch.tensor(composed.targets), r)
    return out
