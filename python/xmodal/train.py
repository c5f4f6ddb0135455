"""Contrastive training of a :class:`CrossModalModel` on the built-in Shapes data (``train``) or on your own
pairs (``train_pairs``). Its retrieval evaluation (``evaluate``, ``evaluate_pairs``) lives in
:mod:`xmodal.evaluation` and is re-exported here.

Loss: symmetric InfoNCE between image and caption embeddings (CLIP), plus (built-in data) the same loss between
composed queries (reference image + modification text) and their target images. Rows of a batch that show the
same attribute combination (built-in data) or have the same label (your pairs) are all positives for each
other (multi-positive targets), not false negatives. Training is deterministic for a given seed and thread
count; checkpoints hold the model, optimiser, schedule, step and random states, so ``resume`` continues
exactly where a run stopped.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._atomic import write_atomic
from .data import COLOURS, KINDS, POSITIONS, SIZES, ShapesDataset, composed_triples, row_attribute, vocabulary_words
from .encoders import CrossModalModel, Tokenizer
from .evaluation import evaluate, evaluate_pairs  # noqa: F401 (re-exported)

__all__ = ["TrainConfig", "contrastive_loss", "train", "train_pairs", "evaluate", "evaluate_pairs", "build_model",
           "MultiTaskLoss", "AttributeHeads", "train_multitask", "attribute_accuracy", "linear_probe"]


class MultiTaskLoss(torch.nn.Module):
    """A weighted sum of named losses, with weights that are learned or fixed.

    ``weighting="uncertainty"`` (Kendall, Gal & Cipolla, CVPR 2018): each task ``t`` has a learned log-variance
    ``s_t = log sigma_t^2`` (``log_vars[t]``, initially 0, i.e. weight 1) and contributes
    ``exp(-s_t) * L_t + s_t / 2`` for a classification-like loss (a likelihood with a temperature: the paper's
    ``1/sigma^2 L + log sigma``) or ``exp(-s_t) * L_t / 2 + s_t / 2`` for a regression loss (Gaussian likelihood:
    ``1/(2 sigma^2) L + log sigma``). Tasks whose loss is large or noisy learn a large ``sigma_t`` and so a small
    weight; the ``log sigma`` term keeps ``sigma`` from growing without bound. Put the module's parameters in the
    optimiser (without weight decay) beside the model's.

    A task whose loss can be driven to 0 (e.g. an auxiliary head that memorises its labels) makes the optimum
    ``exp(-s_t) = 1 / (2 L_t)`` grow without bound; ``max_weight`` caps ``exp(-s_t)`` there (``s_t`` is clamped at
    ``-log(max_weight)``; None: Kendall et al.'s unbounded form).

    ``weighting="fixed"``: ``sum_t weights[t] * L_t`` (every weight 1 unless given); no parameters.

    Args:
        tasks: the task names, in the order reported.
        weighting: ``"uncertainty"`` or ``"fixed"``.
        weights: fixed weights by name (``weighting="fixed"`` only).
        kinds: ``"classification"`` (default) or ``"regression"`` by name (``weighting="uncertainty"`` only).
        max_weight: cap on each learned ``exp(-s_t)`` (``weighting="uncertainty"`` only), or None.

    ``forward(losses)`` takes ``{name: scalar loss}`` with exactly the task names and returns the total;
    :meth:`weights` gives each task's current effective weight (for reports).
    """

    KINDS = ("classification", "regression")

    def __init__(self, tasks, weighting: str = "uncertainty", weights: Optional[Dict[str, float]] = None,
                 kinds: Optional[Dict[str, str]] = None, max_weight: Optional[float] = None) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the str {tasks!r}")
        self.tasks = list(tasks)
        if not self.tasks or any(not isinstance(t, str) or not t for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty sequence of non-empty names, got {tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks!r}")
        if weighting not in ("uncertainty", "fixed"):
            raise ValueError(f"weighting must be 'uncertainty' or 'fixed', got {weighting!r}")
        self.weighting = weighting
        for name, table in (("weights", weights), ("kinds", kinds)):
            unknown = sorted(set(table or {}) - set(self.tasks))
            if unknown:
                raise ValueError(f"{name} names tasks that are not in tasks {self.tasks}: {unknown}")
        if max_weight is not None:
            if weighting != "uncertainty":
                raise ValueError("max_weight caps learned weights: it needs weighting='uncertainty'")
            if isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not max_weight > 0 \
                    or not math.isfinite(max_weight):
                raise ValueError(f"max_weight must be a finite number > 0, got {max_weight!r}")
        self.max_weight = None if max_weight is None else float(max_weight)
        if weighting == "fixed":
            if kinds:
                raise ValueError("kinds only matter for weighting='uncertainty'")
            fixed = {t: 1.0 for t in self.tasks}
            for t, w in (weights or {}).items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ValueError(f"weights[{t!r}] must be a finite number >= 0, got {w!r}")
                fixed[t] = float(w)
            self.fixed = fixed
            self.log_vars = None
        else:
            if weights:
                raise ValueError("weights are for weighting='fixed'; with 'uncertainty' they are learned")
            self.kinds = {t: "classification" for t in self.tasks}
            for t, kind in (kinds or {}).items():
                if kind not in self.KINDS:
                    raise ValueError(f"kinds[{t!r}] must be one of {self.KINDS}, got {kind!r}")
                self.kinds[t] = kind
            self.log_vars = torch.nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Dict[str, Tensor]) -> Tensor:
        if not isinstance(losses, dict):
            raise TypeError(f"losses must be a dict of task name -> scalar loss, got {type(losses).__name__}")
        missing, extra = sorted(set(self.tasks) - set(losses)), sorted(set(losses) - set(self.tasks))
        if missing or extra:
            raise ValueError(f"losses must have exactly the tasks {self.tasks}; missing {missing}, unexpected {extra}")
        total = None
        for j, t in enumerate(self.tasks):
            loss = losses[t]
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"losses[{t!r}] must be a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            if self.log_vars is None:
                term = self.fixed[t] * loss
            else:
                s = self._log_var(j)
                scale = 1.0 if self.kinds[t] == "classification" else 0.5
                term = scale * torch.exp(-s) * loss + 0.5 * s
            total = term if total is None else total + term
        return total

    def _log_var(self, j: int) -> Tensor:
        s = self.log_vars[j]
        return s if self.max_weight is None else s.clamp(min=-math.log(self.max_weight))

    def weights(self) -> Dict[str, float]:
        """Each task's current weight on its loss: fixed, or ``exp(-s_t)`` (halved for regression tasks)."""
        if self.log_vars is None:
            return dict(self.fixed)
        with torch.no_grad():
            return {t: float(torch.exp(-self._log_var(j)).item() * (1.0 if self.kinds[t] == "classification" else 0.5))
                    for j, t in enumerate(self.tasks)}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, weighting={self.weighting!r}"


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
    torch.manual_seed(seed)
    return CrossModalModel.default(Tokenizer.fit(vocabulary_words(), max_length=24))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimise(
    model: CrossModalModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step_loss: Callable[[int], Tuple[Tensor, Dict[str, float]]],
    steps: int,
    *,
    checkpoint: Optional[str],
    resume: bool,
    checkpoint_every: int,
    config: Dict,
    progress: bool,
    on_step: Optional[Callable[[int, Dict[str, float]], None]],
    rng: Optional[random.Random] = None,
    run_state: Optional[Dict] = None,
    same_config: bool = False,
) -> Dict[str, float]:
    """The training loop of ``train`` and ``train_pairs``: for each step, ``step_loss(step)`` gives the loss
    and the values to report; then backward, gradient clipping, the optimiser and schedule steps, the
    progress bar, checkpoints and ``on_step``. Returns the last reported values.

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

    def save(step: int) -> None:
        if checkpoint:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step, "torch_rng": torch.get_rng_state(), "config": config, "run_state": run_state,
                     "tokenizer": model.tokenizer.state_dict() if model.tokenizer is not None else None}
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

    return _optimise(model, opt, sched, step_loss, config.steps, checkpoint=checkpoint, resume=resume,
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


#: the attributes of the built-in data that ``train_multitask`` can predict, and their values
ATTRIBUTE_VALUES = {"kind": KINDS, "colour": list(COLOURS), "size": SIZES, "position": POSITIONS}


class AttributeHeads(torch.nn.Module):
    """One linear classifier per attribute of the built-in data (``kind``, ``colour``, ``size``, ``position``)
    over image embeddings: ``forward(embeddings) -> {attribute: logits [B, values]}``."""

    def __init__(self, embed_dim: int, attributes: Sequence[str] = ("kind", "colour", "size")) -> None:
        super().__init__()
        attributes = list(attributes)
        unknown = [a for a in attributes if a not in ATTRIBUTE_VALUES]
        if not attributes or unknown:
            raise ValueError(f"attributes must be a non-empty list of {list(ATTRIBUTE_VALUES)}, got {attributes!r}")
        self.attributes = attributes
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(embed_dim, len(ATTRIBUTE_VALUES[a])) for a in attributes})

    def forward(self, embeddings: Tensor) -> Dict[str, Tensor]:
        return {a: head(embeddings) for a, head in self.heads.items()}

    @staticmethod
    def targets(pool: ShapesDataset, rows: Sequence[int], attributes: Sequence[str], device=None) -> Dict[str, Tensor]:
        """The class index of each attribute for the given rows of ``pool``."""
        return {a: torch.tensor([ATTRIBUTE_VALUES[a].index(getattr(pool.attributes[r], a)) for r in rows],
                                device=device) for a in attributes}


class _MultiTaskModel(torch.nn.Module):
    """What ``train_multitask`` optimises and checkpoints: the model, the heads and the task weights."""

    def __init__(self, model: CrossModalModel, heads: AttributeHeads, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model, self.heads, self.loss = model, heads, loss

    @property
    def tokenizer(self):
        return self.model.tokenizer


def train_multitask(
    model: CrossModalModel,
    config: TrainConfig = TrainConfig(),
    *,
    attributes: Sequence[str] = ("kind", "colour", "size"),
    weighting: str = "uncertainty",
    weights: Optional[Dict[str, float]] = None,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    pool: Optional[ShapesDataset] = None,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Tuple[Dict[str, float], AttributeHeads, MultiTaskLoss]:
    """``train`` plus auxiliary tasks: classify each image's ``attributes`` (shape kind, colour, size) from its
    embedding with a linear head, the retrieval loss (``train``'s: matching plus composed queries) and one
    cross-entropy per attribute combined by :class:`MultiTaskLoss` (``weighting``: learned uncertainty weights or
    fixed ``weights`` by task name: ``"retrieval"`` and the attribute names).

    The batches are those ``train`` draws for the same config (same seed, same random calls), so the two runs
    differ only by the auxiliary tasks. Returns the last reported values (each task's loss and weight), the
    trained heads and the loss module (its ``weights()``).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pool = pool if pool is not None else ShapesDataset(config.train_images, seed=config.seed + 1000)
    heads = AttributeHeads(model.embed_dim, attributes)
    losses = MultiTaskLoss(["retrieval", *heads.attributes], weighting, weights)
    wrapper = _MultiTaskModel(model, heads, losses)
    task_params = {id(p) for p in losses.parameters()}
    opt = torch.optim.AdamW([{"params": [p for p in wrapper.parameters() if id(p) not in task_params]},
                             {"params": list(losses.parameters()), "weight_decay": 0.0}],
                            lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    device = model.logit_scale.device
    heads.to(device)
    losses.to(device)

    def step_loss(step: int) -> Tuple[Tensor, Dict[str, float]]:
        retrieval, values, rows, image_emb = _shapes_step(model, pool, config, rng, device)
        logits = heads(image_emb)
        targets = AttributeHeads.targets(pool, rows, heads.attributes, device)
        task = {"retrieval": retrieval}
        for a in heads.attributes:
            task[a] = F.cross_entropy(logits[a], targets[a])
            values[f"{a}_loss"] = task[a].item()
        total = losses(task)
        values.update({f"{t}_weight": w for t, w in losses.weights().items()})
        return total, values

    cfg = {**asdict(config), "attributes": list(heads.attributes), "weighting": weighting, "weights": weights}
    last = _optimise(wrapper, opt, sched, step_loss, config.steps, checkpoint=checkpoint, resume=resume,
                     checkpoint_every=config.checkpoint_every, config=cfg, progress=progress, on_step=on_step, rng=rng)
    wrapper.eval()
    return last, heads, losses


@torch.no_grad()
def _image_embeddings(model: CrossModalModel, images: Tensor, batch: int = 512) -> Tensor:
    model.eval()
    device = model.logit_scale.device
    return torch.cat([model.encode_image(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def attribute_accuracy(model: CrossModalModel, heads: AttributeHeads, data: ShapesDataset) -> Dict[str, float]:
    """Accuracy of each head on the images of ``data`` (``{attribute: fraction right}``)."""
    heads.eval()
    emb = _image_embeddings(model, data.images)
    logits = heads.cpu()(emb)
    targets = AttributeHeads.targets(data, range(len(data)), heads.attributes)
    return {a: (logits[a].argmax(1) == targets[a]).double().mean().item() for a in heads.attributes}


def linear_probe(model: CrossModalModel, train_data: ShapesDataset, test_data: ShapesDataset,
                 attributes: Sequence[str] = ("kind", "colour", "size"), steps: int = 300, lr: float = 0.05,
                 seed: int = 0) -> Dict[str, float]:
    """How well each attribute can be read off the (frozen) image embeddings: a linear classifier per attribute
    trained on ``train_data``'s embeddings (full-batch Adam, ``steps``), its accuracy on ``test_data``'s. The
    fair way to compare models trained with and without attribute heads."""
    torch.manual_seed(seed)
    x_train, x_test = _image_embeddings(model, train_data.images), _image_embeddings(model, test_data.images)
    heads = AttributeHeads(x_train.shape[1], attributes)
    targets = AttributeHeads.targets(train_data, range(len(train_data)), heads.attributes)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = heads(x_train)
            loss = sum(F.cross_entropy(logits[a], targets[a]) for a in heads.attributes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    heads.eval()
    with torch.no_grad():
        logits = heads(x_test)
    expected = AttributeHeads.targets(test_data, range(len(test_data)), heads.attributes)
    return {a: (logits[a].argmax(1) == expected[a]).double().mean().item() for a in heads.attributes}


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
    _optimise(model, opt, sched, step_loss, steps, checkpoint=checkpoint, resume=resume,
              checkpoint_every=checkpoint_every or batches.per_epoch, config=config, progress=progress,
              on_step=on_step, run_state=run, same_config=True)
    return list(run["history"])


def _from_rng_state(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _to_rng_state(state):
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])
