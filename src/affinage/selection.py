"""Model selection on the val split: which candidate (strategy, backbone, WiSE-FT alpha, TTA) to keep.

One rule serves `train --strategy auto`, `--models`, `affinage compare` and the "last points" switches, so that what
`compare` marks as auto's pick is what auto picks. It is made for val splits of any size, small ones included:

1. Accuracy first, but only where val can tell: a candidate is *tied* with the most accurate one when its val
   accuracy is within two standard errors of the paired difference (per-image correct/incorrect, the same images
   for both). On a 36-image val split at 1.000, one more error is a tie; on 1,400 images it is not.
2. Among tied candidates on a small val split (under LARGE_VAL images: one image moves accuracy by more than half
   a point), the lowest val log loss after temperature scaling (one temperature per candidate, fitted on val:
   calibration differences, e.g. from label smoothing, must not decide). Log loss moves with every image's
   confidence, so it still separates candidates when accuracies are all equal. On a larger val split the highest
   val accuracy, log loss breaking exact ties. The evidence is thin either way: on oxford17 (340 val images,
   with partial:2 stopped early) the log-loss rule kept full (val 0.965, test 0.959) over progressive (val
   0.974, test 0.977); on digits (269) it kept full (val 0.952, test 0.967) over progressive (val 0.963), and
   this rule, in a later run, kept progressive (val 0.963, test 0.959) over full (val 0.959).
3. Where log losses are also within noise (`prefer_cheaper`: two paired standard errors of the per-image loss),
   the cheaper candidate when it is strictly cheaper: the smaller backbone, the strategy that costs less (the
   guides: with little data, retrain fewer layers; prefer smaller models where possible), no TTA rather than TTA.
   On a small val split this is what usually decides, and the run says so.

The test split never enters here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CRITERION = ("val accuracy where it separates candidates (difference > 2 paired standard errors), else val log "
             "loss after temperature scaling on a small val split, the higher val accuracy on a large one")
LARGE_VAL = 200  # val images from which accuracy (steps of < 0.5 point) decides among candidates it cannot separate


@dataclass
class Scored:
    """A candidate's predictions on the val split."""

    name: str
    log_probs: np.ndarray  # (n_val, classes): log-softmax of the logits
    cost: float = 0.0  # seconds (or parameters, for backbones): the tie-break of last resort
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_logits(cls, name: str, logits: Any, cost: float = 0.0, **extra: Any) -> "Scored":
        x = np.asarray(logits, dtype=np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return cls(name, x - np.log(np.exp(x).sum(axis=1, keepdims=True)), cost, dict(extra))

    @classmethod
    def from_probs(cls, name: str, probs: Any, cost: float = 0.0, **extra: Any) -> "Scored":
        return cls(name, np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)), cost, dict(extra))


@dataclass(frozen=True)
class Choice:
    index: int
    name: str
    reason: str
    table: list[dict[str, Any]]  # one row per candidate: val accuracy, calibrated loss, tied, chosen
    n_val: int
    accuracy_ci95: tuple[float, float]


def accuracy(s: Scored, y: np.ndarray) -> float:
    return float((s.log_probs.argmax(1) == y).mean()) if len(y) else 0.0


def calibrated_nll(log_probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-image negative log-likelihood at the temperature that minimises it on these images, and that temperature."""
    from scipy.optimize import minimize_scalar

    if not len(y):
        return np.zeros(0), 1.0

    def per_image(log_t: float) -> np.ndarray:
        z = log_probs / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]

    best = minimize_scalar(lambda t: float(per_image(t).mean()), bounds=(-1.0, 1.0), method="bounded")  # T in [0.37, 2.7]: a
    # perfectly separated val split must not drive T to 0 and every such candidate to a loss of 0
    return per_image(float(best.x)), math.exp(float(best.x))


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of an accuracy measured on n images."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over the same images."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def choose(candidates: Sequence[Scored], y: Any, prefer_cheaper: bool = False, what: str = "candidate") -> Choice:
    """The candidate to keep (see the module docstring), with a table and a one-line reason."""
    y = np.asarray(y, dtype=np.int64)
    if not candidates:
        raise ValueError("no candidate to choose from")
    correct = [(c.log_probs.argmax(1) == y).astype(np.float64) for c in candidates]
    accs = [float(c.mean()) if len(y) else 0.0 for c in correct]
    top = int(np.argmax(accs))
    tied = [i for i in range(len(candidates))
            if accs[top] - accs[i] <= 2 * paired_se(correct[top], correct[i]) + 1e-12]
    nll = [calibrated_nll(c.log_probs, y) for c in candidates]
    losses = [float(v.mean()) if len(v) else 0.0 for v, _ in nll]
    large = len(y) >= LARGE_VAL
    lowest = min(tied, key=lambda i: (losses[i], candidates[i].cost))
    best = min(tied, key=lambda i: (-accs[i], losses[i], candidates[i].cost)) if large else lowest
    how = "val accuracy"
    if len(tied) > 1:
        how = (f"val accuracy on {len(y)} images (log loss breaking exact ties; {len(tied)} candidates within 2 "
               "standard errors)" if large else f"val log loss among {len(tied)} candidates val accuracy cannot separate")
    if prefer_cheaper:
        close = [i for i in tied if losses[i] - losses[lowest] <= 2 * paired_se(nll[i][0], nll[lowest][0]) + 1e-12]
        cheapest = min(close, key=lambda i: (candidates[i].cost, losses[i]))
        if cheapest != best and candidates[cheapest].cost < candidates[best].cost:
            how = (f"the cheapest of {len(close)} candidates val cannot separate (accuracy and log loss within 2 "
                   f"standard errors of the best)")
            best = cheapest
    n = len(y)
    ci = wilson(int(correct[best].sum()), n)
    table = [{"name": c.name, "val_accuracy": round(accs[i], 4), "val_loss_calibrated": round(losses[i], 4),
              "temperature": round(nll[i][1], 3), "tied_on_accuracy": i in tied, "chosen": i == best,
              "cost": c.cost, **c.extra} for i, c in enumerate(candidates)]
    reason = (f"{candidates[best].name} kept by {how} (val accuracy {accs[best]:.4f}, 95% CI {ci[0]:.3f}–{ci[1]:.3f} "
              f"on {n} images; calibrated val log loss {losses[best]:.4f})")
    if len(candidates) == 1:
        reason = f"{candidates[0].name}: the only {what} (val accuracy {accs[0]:.4f} on {n} images)"
    return Choice(best, candidates[best].name, reason, table, n, ci)
