"""Contrastive training of a :class:`CrossModalModel` on your own pairs (:func:`train_pairs`), and the training
loop it runs (:func:`optimise`: checkpoints, exact resume, progress). Its retrieval evaluation
(``evaluate_pairs``) lives in :mod:`xmodal.evaluation` and its losses (``contrastive_loss``, ``MultiTaskLoss``) in
:mod:`xmodal.losses`; both are re-exported here.

Loss: symmetric InfoNCE between image and caption embeddings (CLIP). Rows of a batch that have the same label
(or show the same image file) are all positives for each other (multi-positive targets), not false negatives.
Training is deterministic for a given seed and thread count; checkpoints hold the model, optimiser, schedule,
step and random states, so ``resume`` continues exactly where a run stopped.

The demo's training on the built-in Shapes data (``train``, ``TrainConfig``, ``build_model``, ``train_multitask``
and its attribute heads) moved to :mod:`xmodal.demo.training` and :mod:`xmodal.demo.multitask`; the old names
still resolve here, with a ``DeprecationWarning``, for one release.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _deprecated
from ._atomic import write_atomic
from .data import row_attribute
from .encoders import CrossModalModel
from .evaluation import evaluate_pairs  # noqa: F401 (re-exported)
from .losses import MultiTaskLoss, contrastive_loss

__all__ = ["contrastive_loss", "MultiTaskLoss", "train_pairs", "evaluate_pairs", "optimise"]

# the demo's training, moved to xmodal.demo: resolved lazily (and with a warning) by xmodal._deprecated
__getattr__ = _deprecated.module_getattr(__name__)


def optimise(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step_loss: Callable[[int], Tuple[Tensor, Dict[str, float]]],
    steps: int,
    *,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    config: Optional[Dict] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
    rng: Optional[random.Random] = None,
    run_state: Optional[Dict] = None,
    same_config: bool = False,
) -> Dict[str, float]:
    """The training loop of :func:`train_pairs` and of the demo's training (``xmodal.demo.training``): for each
    step, ``step_loss(step)`` gives the loss and the values to report; then backward, gradient clipping, the
    optimiser and schedule steps, the progress bar, checkpoints (every ``checkpoint_every`` steps and at the end)
    and ``on_step(step, values)``. Returns the last reported values.

    A checkpoint holds the model, optimiser, schedule, step, the random states (torch's and ``rng``'s),
    ``config`` and ``run_state`` (a dict the caller keeps up to date, e.g. a loss history); resuming restores
    all of them into the objects given, so the run goes on as if it had never stopped. ``same_config``: a
    checkpoint written with another ``config`` raises instead of resuming.
    """
    if checkpoint_every <= 0:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
    if checkpoint:
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint {checkpoint!r}: the folder {folder!r} does not exist")
    elif resume:
        raise ValueError("resume=True needs the checkpoint file to resume from: pass checkpoint=...")
    run_state = {} if run_state is None else run_state
    config = {} if config is None else config
    start = 0
    if resume and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        if same_config and state.get("config") != config:
            saved = state.get("config") or {}
            changed = ", ".join(f"{k}: {saved.get(k)!r} then, {config.get(k)!r} now"
                                for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k))
            raise ValueError(f"checkpoint {checkpoint!r} is from a run with other settings ({changed}); resume with "
                             f"the same data and settings, or start afresh with resume=False")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        if rng is not None:
            rng.setstate(_to_rng_state(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        run_state.update(state.get("run_state", {}))

    tokenizer = getattr(model, "tokenizer", None)

    def save(step: int) -> None:
        if checkpoint:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step, "torch_rng": torch.get_rng_state(), "config": config, "run_state": run_state,
                     "tokenizer": tokenizer.state_dict() if tokenizer is not None else None}
            if rng is not None:
                state["python_rng"] = _from_rng_state(rng.getstate())
            write_atomic(checkpoint, lambda tmp: torch.save(state, tmp))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    last: Dict[str, float] = {}
    try:
        for step in range(start, steps):
            loss, values = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            last.update(values)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
            if checkpoint and (step + 1) % checkpoint_every == 0:
                save(step + 1)
            if on_step is not None:
                on_step(step + 1, dict(last))
    finally:
        if bar is not None:
            bar.close()
    save(steps)
    model.eval()
    return last


def _row_classes(pairs) -> Optional[Tensor]:
    """For each row of ``pairs``, the id of its class: rows of one class match each other. The class is the
    label where the rows have labels, else the image file (the captions of one image); ids are numbered in
    order of first appearance. None when neither is known: every row is a class of its own."""
    labels = row_attribute(pairs, "labels")
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.long)
    paths = row_attribute(pairs, "image_paths")
    if paths is None:
        return None
    ids: Dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in paths], dtype=torch.long)


class _EpochBatches:
    """The batches of row indices of a run over ``rows`` rows: a fresh permutation each epoch, cut into
    ``size``-row batches (an incomplete last batch is dropped). Batch ``step`` of the run depends only on the
    seed, so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, rows: int, size: int, seed: int) -> None:
        self.rows, self.size = rows, size
        self.per_epoch = rows // size
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch, self._order = -1, torch.arange(rows)

    def batch(self, step: int) -> Tensor:
        epoch, b = divmod(step, self.per_epoch)
        while self._epoch < epoch:  # epochs are drawn in turn (a resumed run draws the ones it skips again)
            self._order = torch.randperm(self.rows, generator=self._generator)
            self._epoch += 1
        return self._order[b * self.size : (b + 1) * self.size]


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
    checkpoint: Optional[str] = None,
    resume: bool = False,
    checkpoint_every: Optional[int] = None,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> List[float]:
    """Contrastive training on your own (image, caption) pairs, e.g. an ``ImageCaptionCSV``: symmetric
    InfoNCE over shuffled batches, AdamW, cosine schedule. Returns the mean loss of each epoch.

    Positives: with labels (``pairs.labels``, e.g. a CSV's ``label`` column) every two pairs of a batch with
    equal labels are positives for each other, so pairs of one class are never pushed apart; without labels,
    pairs that show the same image file (several captions of one image). Every other pair of a batch is a
    negative. A ``torch.utils.data.Subset`` of such a data set (``random_split``) keeps its rows' labels.

    ``checkpoint``: a file written atomically every ``checkpoint_every`` steps (default: after every epoch)
    and at the end. ``resume``: continue from it if it exists; it must come from a run with the same data
    size and arguments, else ``ValueError``. A run that is stopped and resumed ends with the weights and the
    loss history of an uninterrupted one. ``on_step(step, {"loss": ...})``: called after every step (and
    after that step's checkpoint). Deterministic for a seed and thread count.
    """
    from .data import collate_captions

    if len(pairs) < 2:
        raise ValueError(f"contrastive training needs at least 2 pairs, got {len(pairs)}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a batch's other pairs are the negatives), got {batch_size}")
    torch.manual_seed(seed)
    batches = _EpochBatches(len(pairs), min(batch_size, len(pairs)), seed)
    classes = _row_classes(pairs)
    if classes is not None and len(classes.unique()) == len(classes):
        classes = None  # every pair is its own class: plain InfoNCE, the same loss without the bookkeeping
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * batches.per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    device = model.logit_scale.device
    # the loss history is part of the checkpoint, so that a resumed run returns the whole of it
    run = {"history": [], "epoch_total": 0.0}

    def step_loss(step: int) -> Tuple[Tensor, Dict[str, float]]:
        rows = batches.batch(step)
        images, texts = collate_captions([pairs[i] for i in rows.tolist()])[:2]
        labels = classes[rows].to(device) if classes is not None else None
        loss = contrastive_loss(model.encode_image(images.to(device)), model.encode_text(list(texts)),
                                model.logit_scale, labels)
        run["epoch_total"] += loss.item()
        if (step + 1) % batches.per_epoch == 0:
            run["history"].append(run["epoch_total"] / batches.per_epoch)
            run["epoch_total"] = 0.0
        return loss, {"loss": loss.item()}

    config = {"pairs": len(pairs), "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "seed": seed}
    optimise(model, opt, sched, step_loss, steps, checkpoint=checkpoint, resume=resume,
              checkpoint_every=checkpoint_every or batches.per_epoch, config=config, progress=progress,
              on_step=on_step, run_state=run, same_config=True)
    return list(run["history"])


def _from_rng_state(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _to_rng_state(state):
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])
