"""Losses for cross-modal training: :func:`contrastive_loss` (symmetric InfoNCE, multi-positive with labels) and
:class:`MultiTaskLoss` (a weighted sum of named losses, weights learned or fixed). ``xmodal.train`` re-exports
both."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["contrastive_loss", "MultiTaskLoss"]


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
