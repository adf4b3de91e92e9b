"""Imbalance handling, `--balance none|weights|sampler`: what a rare class weighs in training.

- weights: each training image's cross-entropy weighted by its class's w_c = n / (k n_c) over the training labels
  (scikit-learn's class_weight='balanced', which the linear probe uses itself); a class absent from train weighs 0.
  The weight multiplies the whole (label-smoothed) loss of the image, not each target class: torch's
  `CrossEntropyLoss(weight=..., label_smoothing=...)` weighs the smoothed mass of every class by that class's weight,
  which on fashion_small's gender (weights 0.3 to 45) made predicting the rarest class everywhere the cheapest
  answer (train accuracy 0.04).
- sampler: every class drawn equally often (torch's WeightedRandomSampler, each image drawn with probability
  1 / (k n_c), with replacement), an epoch the size of the train split; the loss is the plain one.
With either mode the epoch kept (early stopping, best epoch) is the one with the best *balanced* val accuracy (the
mean of the per-class recalls: each val image weighs 1 / (k n_c)); with none, the plain val accuracy as before.
The macro metrics (macro recall and F1) stay in every report: they are what balancing is for.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import AffinageError

BALANCE_MODES = ("none", "weights", "sampler")


def check_balance(mode: str) -> str:
    if mode not in BALANCE_MODES:
        raise AffinageError(f"unknown --balance '{mode}'", f"choose one of {', '.join(BALANCE_MODES)}")
    return mode


def class_weights(y: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """n / (k n_c) for each class c of the training labels `y` (k: the classes present), 0 for absent classes."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def loss_weights(mode: str, y: Sequence[int] | np.ndarray, n_classes: int) -> Any:
    """The class weights of the loss (a float tensor) for `weights`, else None."""
    if mode != "weights":
        return None
    import torch

    return torch.as_tensor(class_weights(y, n_classes), dtype=torch.float32)


class ClassWeightedLoss:
    """Cross-entropy with label smoothing, each image's loss weighted by its class's weight (a weighted mean)."""

    def __init__(self, weights: Any, label_smoothing: float = 0.0):
        self.weights, self.label_smoothing = weights, label_smoothing

    def __call__(self, logits: Any, y: Any) -> Any:
        import torch

        per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)
        w = self.weights.to(logits.device)[y]
        return (w * per_image).sum() / w.sum().clamp_min(1e-12)


def balanced_batches(mode: str, y: Sequence[int] | np.ndarray, batch_size: int) -> Callable[[Any], Any] | None:
    """For `sampler`: a factory of the epoch's batches (positions into the train split) drawn class-balanced from the
    loop's generator (seeded per epoch: resumable), else None."""
    if mode != "sampler":
        return None
    import torch

    labels = np.asarray(y, dtype=np.int64)
    per_image = 1.0 / np.bincount(labels)[labels]

    def batches(generator: torch.Generator) -> Any:
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(per_image, dtype=torch.double),
                                                         num_samples=len(labels), replacement=True, generator=generator)
        return torch.utils.data.BatchSampler(sampler, batch_size, drop_last=len(labels) > batch_size)

    return batches


def balanced_val_weights(mode: str, y_val: Sequence[int] | np.ndarray) -> Any:
    """Per val image weights summing to 1 whose weighted accuracy is the balanced accuracy (train.LoopSettings
    .val_weights), for `weights` and `sampler`; else None."""
    if mode == "none" or len(y_val) == 0:
        return None
    import torch

    labels = np.asarray(y_val, dtype=np.int64)
    counts = np.bincount(labels)
    w = 1.0 / (counts[labels] * (counts > 0).sum())
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


def probe_class_weight(mode: str) -> str | None:
    """scikit-learn's class_weight for the linear probe: 'balanced' for both modes (a sampler has no meaning for
    lbfgs on the whole train split; reweighting is its equivalent)."""
    return "balanced" if mode in ("weights", "sampler") else None


def describe(mode: str, y: Sequence[int] | np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """metrics.json["balance"]: the mode and the weights it gave each class."""
    w = class_weights(y, len(classes))
    return {"mode": mode, "class_weights": {c: round(float(v), 4) for c, v in zip(classes, w)} if mode != "none" else None,
            "how": {"none": "plain cross-entropy", "weights": "class-weighted cross-entropy, n / (k n_c); probe "
                    "class_weight='balanced'", "sampler": "class-balanced WeightedRandomSampler; probe "
                    "class_weight='balanced'"}[mode]}
