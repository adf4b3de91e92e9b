"""The prototype classifier: nearest class mean on frozen features, for classes with a handful of images.

SimpleShot (Wang et al. 2019): centre the features on their mean, L2-normalise them, average each class's
normalised features into a prototype, and label an image by the prototype of highest cosine similarity. There is
nothing to tune but the softmax temperature, so it trains from one image per class, where the tuned probe's C has
almost nothing to be chosen on.

It is saved as an ordinary linear head: with prototypes p_c (unit rows) and centre m, the cosine ranking of
(x - m) against p_c is the ranking of p_c . (x - m), a linear function of x; the logits are that product scaled by
temperature / (mean norm of the centred training features), so the probabilities are the softmax of
temperature x cosine for an image of typical norm (exactly for one whose centred norm is the mean). Predict,
export and fine-tuning from it (LP-FT) see a plain `nn.Linear`; the predicted class is exactly the nearest
prototype's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_TEMPERATURE = 10.0  # where no val image can choose it: a cosine margin of 0.1 is a factor e in probability
TEMPERATURE_BOUNDS = (1.0, 30.0)  # a val split the prototypes separate perfectly drives T to the top: keep it moderate
ABSENT = -1e4  # logit of a class without a training image (as the probe's)


@dataclass(frozen=True)
class PrototypeFit:
    head: nn.Linear
    temperature: float
    val_logits: np.ndarray
    seconds: float


def prototype_head(x: Any, y: Any, n_classes: int, temperature: float = 1.0) -> nn.Linear:
    """The cosine nearest-class-mean classifier of features `x` (n, d) with labels `y`, as a linear layer."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    centre = x.mean(axis=0)
    z = x - centre
    norms = np.linalg.norm(z, axis=1)
    z = z / np.maximum(norms, 1e-12)[:, None]
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, ABSENT)
    for c in np.unique(y):
        mean = z[y == c].mean(axis=0)
        weight[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        bias[c] = 0.0
    scale = temperature / max(float(norms.mean()), 1e-12)
    present = bias == 0.0
    bias[present] = -(weight[present] @ centre) * scale
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight * scale, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


def logits(head: nn.Linear, x: Any) -> np.ndarray:
    with torch.no_grad():
        return head(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()


def choose_temperature(unit_logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the log loss of softmax(T x `unit_logits`) (logits at T = 1) on these images."""
    from scipy.optimize import minimize_scalar

    if not len(y):
        return DEFAULT_TEMPERATURE

    def loss(log_t: float) -> float:
        z = unit_logits * math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    return math.exp(float(minimize_scalar(loss, bounds=(low, high), method="bounded").x))


def fit_prototype(train_x: Any, train_y: Any, val_x: Any, val_y: Any, n_classes: int) -> PrototypeFit:
    """Prototypes from train, the temperature chosen on val (the default where val is empty)."""
    t0 = time.perf_counter()
    yv = np.asarray(val_y, dtype=np.int64)
    temperature = DEFAULT_TEMPERATURE
    if len(yv):
        temperature = choose_temperature(logits(prototype_head(train_x, train_y, n_classes), val_x), yv)
    head = prototype_head(train_x, train_y, n_classes, temperature)
    val_logits = logits(head, val_x) if len(yv) else np.zeros((0, n_classes))
    return PrototypeFit(head, temperature, val_logits, time.perf_counter() - t0)
