"""The demo's multi-task training: :func:`train_multitask` trains the retrieval loss of
:func:`xmodal.demo.training.train` together with classifiers of each image's attributes (shape kind, colour,
size), combined by :class:`xmodal.losses.MultiTaskLoss`; :func:`attribute_accuracy` and :func:`linear_probe`
measure what the embeddings say about the attributes."""
from __future__ import annotations

import random
from dataclasses import asdict
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders import CrossModalModel
from ..losses import MultiTaskLoss
from ..train import optimise
from .shapes import COLOURS, KINDS, POSITIONS, SIZES, ShapesDataset
from .training import TrainConfig, _lr_factor, _shapes_step

__all__ = ["ATTRIBUTE_VALUES", "AttributeHeads", "train_multitask", "attribute_accuracy", "linear_probe"]


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
    last = optimise(wrapper, opt, sched, step_loss, config.steps, checkpoint=checkpoint, resume=resume,
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
