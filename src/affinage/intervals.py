"""Confidence intervals of the test figures: how far a figure measured on n test images can be trusted.

A seeded percentile bootstrap (Efron & Tibshirani 1993, ch. 13): the test images are resampled with replacement
B times (a numpy Generator seeded by `stage_seed(seed, "bootstrap")`), every figure is recomputed on each resample
with `evaluate.classification_metrics`' definitions (vectorised over per-resample confusion matrices), and the
2.5th and 97.5th percentiles are kept. One set of resamples serves every figure of a split, so the same seed gives
the same intervals whichever targets are named. A group's accuracy is resampled over that group's images alone
(its own stream, `stage_seed(seed, "bootstrap/group/<name>")`). Two prediction sets on the same images are compared
*paired*: the same resample for both, so the interval is that of the difference itself, much narrower than two
overlapping intervals suggest.

The bootstrap says how much the figure would move on another test split of the same size drawn from the same
images; it cannot see a test split that is unrepresentative of the images the model will meet. Macro figures over
many classes of a few test images each lean low under resampling (a resample often leaves a class's images out or
repeats its errors), so their interval can sit mostly below the figure itself: read it as the figure's spread.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .evaluate import TOP5_MIN_CLASSES
from .seeding import stage_seed

B = 1000  # resamples: the percentiles of 1,000 move by about 0.1 point of accuracy between seeds on 300 images
LEVEL = 0.95
STAGE = "bootstrap"
HEADLINE = ("accuracy", "macro_f1", "top5_accuracy")  # always given an interval (top-5 where it is measured)
_CELLS_PER_CHUNK = 2**22  # resampled images (or confusion-matrix cells) held at once: ~32 MB, whatever n and B


def method(seed: int, b: int = B) -> str:
    """How the intervals were made, in words (stored beside them)."""
    return (f"seeded percentile bootstrap, B={b}, seed {seed} (stage '{STAGE}'), test images resampled with "
            f"replacement; {LEVEL:.0%} interval")


def generator(seed: int, stage: str = STAGE) -> np.random.Generator:
    return np.random.default_rng(stage_seed(seed, stage))


def resamples(rng: np.random.Generator, n: int, b: int = B, width: int = 1) -> Iterator[np.ndarray]:
    """Bootstrap index rows (chunk, n), b rows in all, in chunks that hold a bounded number of cells (`width`: the
    cells each row needs, e.g. a confusion matrix's)."""
    chunk = max(1, min(b, _CELLS_PER_CHUNK // max(n, width, 1)))
    for start in range(0, b, chunk):
        yield rng.integers(0, n, size=(min(chunk, b - start), n))


def percentile_interval(values: np.ndarray) -> list[float]:
    """[lo, hi]: the central LEVEL share of the bootstrap values (along the first axis)."""
    tail = 50 * (1 - LEVEL)
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail], axis=0)
    return [float(lo), float(hi)]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def figures_of_confusions(cm: np.ndarray) -> dict[str, np.ndarray]:
    """classification_metrics' figures for a stack of confusion matrices (r, K, K): overall ones (r,), per-class
    ones (r, K). Macro means run over the classes present in each resample, as classification_metrics does."""
    cm = cm.astype(np.float64)
    k = np.arange(cm.shape[1])
    tp, support, predicted = cm[:, k, k], cm.sum(axis=2), cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))[:, None]
    fp = predicted - tp
    tn = total - support - fp
    per_class = {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
                 "f1": _ratio(2 * tp, support + predicted), "specificity": _ratio(tn, tn + fp)}
    present = support > 0
    count = present.sum(axis=1)

    def macro(x: np.ndarray) -> np.ndarray:
        return _ratio((x * present).sum(axis=1), count)

    overall = {"accuracy": _ratio(tp.sum(axis=1), total[:, 0]), "macro_precision": macro(per_class["precision"]),
               "macro_recall": macro(per_class["recall"]), "macro_f1": macro(per_class["f1"]),
               "specificity": macro(per_class["specificity"])}
    return {**overall, **{f"per_class/{name}": v for name, v in per_class.items()}}


def per_image(scores: np.ndarray, y: np.ndarray, probabilities: bool = False) -> dict[str, np.ndarray]:
    """What each test image contributes: its prediction, correct or not, its log loss and (above
    TOP5_MIN_CLASSES classes) whether its class is in the top 5; `scores` are logits, or probabilities."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if probabilities:
        log_p = np.log(np.clip(scores, 1e-12, None))
    else:
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    pred = scores.argmax(axis=1)
    out = {"pred": pred, "correct": (pred == y).astype(np.float64), "loss": -log_p[np.arange(len(y)), y]}
    if scores.shape[1] > TOP5_MIN_CLASSES:
        top = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :5]  # ties as evaluate.top_k_accuracy
        out["top5_accuracy"] = (top == y[:, None]).any(axis=1).astype(np.float64)
    return out


def bootstrap(scores: np.ndarray, y: np.ndarray, n_classes: int, seed: int, b: int = B,
              probabilities: bool = False) -> dict[str, np.ndarray]:
    """Every figure a target can name, on each of b resamples of the test images: {name: (b,) or (b, K)}."""
    y = np.asarray(y, dtype=np.int64)
    images = per_image(scores, y, probabilities)
    cells = y * n_classes + images["pred"]
    parts: dict[str, list[np.ndarray]] = {}
    for idx in resamples(generator(seed), len(y), b, n_classes * n_classes):
        r = len(idx)
        flat = (cells[idx] + (np.arange(r) * n_classes * n_classes)[:, None]).ravel()
        cm = np.bincount(flat, minlength=r * n_classes * n_classes).reshape(r, n_classes, n_classes)
        chunk = figures_of_confusions(cm)
        chunk["loss"] = images["loss"][idx].mean(axis=1)
        if "top5_accuracy" in images:
            chunk["top5_accuracy"] = images["top5_accuracy"][idx].mean(axis=1)
        for name, v in chunk.items():
            parts.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in parts.items()}


def figure_key(metric: str, cls: str | None = None) -> str:
    """The name of a figure in a ci95 block: `accuracy`, or `recall[tulip]` for a per-class one."""
    return metric if cls is None else f"{metric}[{cls}]"


def ci95_block(boot: dict[str, np.ndarray], classes: Sequence[str], named: Sequence[tuple[str, str | None]] = (),
              seed: int = 0, b: int = B) -> dict[str, Any]:
    """metrics["test"]["ci95"]: the headline figures' intervals, and those of every (metric, class) a target
    names, from `bootstrap`'s values."""
    block: dict[str, Any] = {}
    for metric, cls in [*((m, None) for m in HEADLINE), *named]:
        key = figure_key(metric, cls)
        if key in block:
            continue
        if cls is None and metric in boot:
            block[key] = percentile_interval(boot[metric])
        elif cls is not None and f"per_class/{metric}" in boot and cls in classes:
            block[key] = percentile_interval(boot[f"per_class/{metric}"][:, list(classes).index(cls)])
    block["method"] = method(seed, b)
    return block


def group_intervals(correct: np.ndarray, groups: Sequence[str], seed: int,
                    b: int = B) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Each group's accuracy interval, its images resampled on their own stream; and the bootstrap values."""
    correct = np.asarray(correct, dtype=np.float64)
    names = np.asarray([str(g) for g in groups], dtype=object)
    values: dict[str, np.ndarray] = {}
    for g in sorted(set(names.tolist())):
        mine = correct[names == g]
        values[g] = np.concatenate([mine[idx].mean(axis=1)
                                    for idx in resamples(generator(seed, f"{STAGE}/group/{g}"), len(mine), b)])
    return {g: percentile_interval(v) for g, v in values.items()}, values


def accuracy_interval(correct: np.ndarray, seed: int, b: int = B) -> list[float] | None:
    """The accuracy interval of per-image correct (1) / incorrect (0) values; None with no image."""
    correct = np.asarray(correct, dtype=np.float64)
    if not len(correct):
        return None
    return percentile_interval(np.concatenate([correct[idx].mean(axis=1)
                                               for idx in resamples(generator(seed), len(correct), b)]))


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, seed: int,
                      b: int = B) -> tuple[float, list[float]]:
    """accuracy(a) - accuracy(b) on the same images, and its paired interval (one resample serves both)."""
    d = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    if not len(d):
        return 0.0, [0.0, 0.0]
    boot = np.concatenate([d[idx].mean(axis=1) for idx in resamples(generator(seed), len(d), b)])
    return float(d.mean()), percentile_interval(boot)


def resolves(difference: float, ci: Sequence[float]) -> bool:
    """Whether the interval of a difference excludes 0: the test split tells the two apart."""
    return bool(ci[0] > 0 or ci[1] < 0) and difference != 0


def images_needed(n: int, estimate: float, bound: float, reference: float) -> int | None:
    """About how many test images would put `bound` on the same side of `reference` as `estimate` (the interval's
    half-width shrinks as 1/sqrt(n)); None where the estimate is the reference itself (no size can show it)."""
    gap, half = abs(estimate - reference), abs(estimate - bound)
    if gap == 0 or not math.isfinite(gap):
        return None
    return max(n + 1, math.ceil(n * (half / gap) ** 2))


@dataclass(frozen=True)
class Intervals:
    """The intervals of one task's test figures, and how to add them to metrics.json's blocks."""

    ci95: dict[str, Any]  # metrics["test"]["ci95"]
    groups: dict[str, list[float]]  # group -> accuracy interval
    group_values: dict[str, np.ndarray]  # group -> bootstrap accuracies (for the gap's interval)

    def on_test(self, test: dict[str, Any]) -> dict[str, Any]:
        """The test block with its ci95 (a new dict)."""
        return {**test, "ci95": self.ci95}

    def on_groups(self, groups: dict[str, Any]) -> dict[str, Any]:
        """evaluate.group_metrics' block with each group's ci95 and the interval of the best-to-worst gap."""
        by_group = {g: {**v, "ci95": self.groups[g]} for g, v in groups["by_group"].items()}
        best, worst = self.group_values[groups["best_group"]], self.group_values[groups["worst_group"]]
        return {**groups, "by_group": by_group, "accuracy_gap_ci95": percentile_interval(best - worst)}


def interval_blocks(scores: np.ndarray, y: np.ndarray, classes: Sequence[str], targets: Sequence[Any] = (),
                    groups: Sequence[str] | None = None, seed: int = 0, b: int = B,
                    probabilities: bool = False) -> Intervals:
    """The intervals of one task's test figures: headline figures, every target's (each Target's `metric` and
    `cls`), and per group (`groups`: each test image's group). `scores` are logits, or probabilities."""
    y = np.asarray(y, dtype=np.int64)
    if not len(y):
        return Intervals({"method": method(seed, b)}, {}, {})
    boot = bootstrap(scores, y, len(classes), seed, b, probabilities)
    ci95 = ci95_block(boot, classes, [(t.metric, t.cls) for t in targets], seed, b)
    if groups is None:
        return Intervals(ci95, {}, {})
    correct = per_image(scores, y, probabilities)["correct"]
    by_group, values = group_intervals(correct, groups, seed, b)
    return Intervals(ci95, by_group, values)


def fmt(ci: Sequence[float] | None, digits: int = 3, sign: bool = False) -> str:
    """`0.962–0.991` (with `sign`: `−0.012–+0.018`)."""
    if ci is None:
        return "—"
    spec = f"+.{digits}f" if sign else f".{digits}f"
    return "–".join(format(v, spec).replace("-", "−") for v in ci)


def warnings(metrics: dict[str, Any]) -> list[str]:
    """Console warnings of a run beyond the targets' own lines: a flagged group gap that the groups' test images
    cannot establish."""
    groups = metrics.get("groups") or {}
    gap_ci = groups.get("accuracy_gap_ci95")
    if groups.get("flagged") and gap_ci is not None and gap_ci[0] <= groups["threshold"]:
        return [f"warning: the group gap {groups['accuracy_gap']:.3f} is above {groups['threshold']:.2f}, but its 95% "
                f"CI {fmt(gap_ci)} reaches below: the groups' test images are too few to establish it"]
    return []


def headline(test: dict[str, Any]) -> str:
    """`test accuracy 0.9794 (95% CI 0.962–0.991, macro F1 0.9790 with 95% CI 0.960–0.990, n=340)`."""
    ci = test.get("ci95") or {}
    acc = f", 95% CI {fmt(ci['accuracy'])}" if "accuracy" in ci else ""
    f1 = f" with 95% CI {fmt(ci['macro_f1'])}" if "macro_f1" in ci else ""
    return (f"test accuracy {test['accuracy']:.4f} ({acc[2:] + ', ' if acc else ''}macro F1 {test['macro_f1']:.4f}"
            f"{f1}, n={test['n']})")
