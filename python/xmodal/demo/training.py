"""The demo's training: the default model (:func:`build_model`) trained contrastively on renderings of the built-in
Shapes data (:func:`train`, settings in :class:`TrainConfig`).

Loss: symmetric InfoNCE between image and caption embeddings (CLIP) plus the same loss between composed queries
(reference image + modification text) and their target images. Rows of a batch that show the same attribute
combination are all positives for each other. The loop is the core's :func:`xmodal.train.optimise`
(deterministic for a seed and thread count; checkpoints resume exactly).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..encoders import CrossModalModel, Tokenizer
from ..losses import contrastive_loss
from ..train import optimise
from .shapes import ShapesDataset, composed_triples, vocabulary_words

__all__ = ["TrainConfig", "build_model", "train"]


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
    torch.manual_seed(seed)
    return CrossModalModel.default(Tokenizer.fit(vocabulary_words(), max_length=24))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    ``resume``: continue from that file if it exists (same config expected; without ``checkpoint``, an error).
    ``on_step(step, losses)``: called after every step (and after that step's checkpoint), e.g. for logging.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pool = pool if pool is not None else ShapesDataset(config.train_images, seed=config.seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    device = model.logit_scale.device  # batches come from the (CPU) pool and go to the model's device

    def step_loss(step: int) -> Tuple[Tensor, Dict[str, float]]:
        loss, values, _, _ = _shapes_step(model, pool, config, rng, device)
        return loss, values

    return optimise(model, opt, sched, step_loss, config.steps, checkpoint=checkpoint, resume=resume,
                     checkpoint_every=config.checkpoint_every, config=asdict(config), progress=progress,
                     on_step=on_step, rng=rng)


def _shapes_step(model: CrossModalModel, pool: ShapesDataset, config: TrainConfig, rng: random.Random,
                 device) -> Tuple[Tensor, Dict[str, float], List[int], Tensor]:
    """One step's retrieval loss on the built-in data (``train``'s): InfoNCE between a batch of images and one
    caption of each, plus composed queries. Returns the loss, the values to report, the batch's rows of
    ``pool`` and their image embeddings (for the attribute heads of ``train_multitask``)."""
    idx = [rng.randrange(len(pool)) for _ in range(config.batch_size)]
    texts = [pool.captions[i][rng.randrange(pool.captions_per_image)] for i in idx]
    labels = pool.labels[idx].to(device)
    images = pool.images[idx].to(device)
    image_emb = model.encode_image(images)
    loss_match = contrastive_loss(image_emb, model.encode_text(texts), model.logit_scale, labels)
    values = {"match_loss": loss_match.item()}
    loss = loss_match
    if config.composed_weight > 0 and config.composed_batch_size > 0:
        refs, mods, targets, target_labels = composed_triples(pool, config.composed_batch_size, rng)
        loss_composed = contrastive_loss(
            model.encode_composed(refs.to(device), mods), model.encode_image(targets.to(device)), model.logit_scale,
            target_labels.to(device),
        )
        loss = loss + config.composed_weight * loss_composed
        values["composed_loss"] = loss_composed.item()
    return loss, values, idx, image_emb
