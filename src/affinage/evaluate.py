"""Evaluation stage: deterministic test metrics from logits.

The counting is done with numpy from the confusion matrix: importing scikit-learn's metrics costs about a second on
every run (a third of a cached linear-probe run), and these are its definitions exactly (precision, recall and F1
with zero_division=0, top-k ties as `top_k_accuracy_score`); tests check them against scikit-learn.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TOP5_MIN_CLASSES = 5  # top-5 accuracy is reported only above this many classes: with 5 or fewer it is always 1


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[i, j]: images of true class i predicted as j."""
    return np.bincount(np.asarray(labels) * n_classes + np.asarray(preds),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k highest scores (ties as scikit-learn breaks them)."""
    top = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean()) if len(labels) else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy, top-5, macro P/R/F1, per-class sensitivity/specificity and the confusion matrix.

    Only deterministic figures: timings belong elsewhere so that reruns compare equal.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    n_classes = len(classes)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # = 2PR/(P+R), and 0 where both are 0
    total = cm.sum()
    per_class = {}
    for k, name in enumerate(classes):
        fp = predicted[k] - cm[k, k]
        tn = total - support[k] - fp
        per_class[name] = {"recall": float(recall[k]), "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
                           "precision": float(precision[k]), "f1": float(f1[k]), "support": int(support[k])}
    present = support > 0
    metrics: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0,
    }
    if n_classes > TOP5_MIN_CLASSES:
        metrics["top5_accuracy"] = top_k_accuracy(labels, logits, 5)
    metrics.update({
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "specificity": float(np.mean([per_class[c]["specificity"] for c, p in zip(classes, present) if p])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    })
    return metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


GROUP_GAP_THRESHOLD = 0.10  # flag a best-to-worst group accuracy gap above 10 points


def group_metrics(logits: np.ndarray, labels: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                  threshold: float = GROUP_GAP_THRESHOLD) -> dict[str, Any]:
    """Accuracy and macro recall per group (e.g. site, device, skin tone), and the gap to the worst group.

    A model can be accurate on average and fail one group; the gap is flagged above `threshold`.
    """
    preds = np.asarray(logits).argmax(axis=1)
    labels = np.asarray(labels)
    names = np.asarray([str(g) for g in groups], dtype=object)
    by_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(names.tolist())):
        mask = names == g
        y, p = labels[mask], preds[mask]
        recall = {classes[k]: float((p[y == k] == k).mean()) for k in sorted(set(y.tolist()))}
        by_group[g] = {"n": int(mask.sum()), "accuracy": float((p == y).mean()),
                       "macro_recall": float(np.mean(list(recall.values()))), "recall": recall}
    worst = min(by_group, key=lambda g: (by_group[g]["accuracy"], g))
    best = max(by_group, key=lambda g: (by_group[g]["accuracy"], g))
    gap = by_group[best]["accuracy"] - by_group[worst]["accuracy"]
    recall_gap = max(v["macro_recall"] for v in by_group.values()) - min(v["macro_recall"] for v in by_group.values())
    return {"by_group": by_group, "worst_group": worst, "best_group": best, "accuracy_gap": float(gap),
            "recall_gap": float(recall_gap), "threshold": threshold, "flagged": bool(gap > threshold)}


def calibration(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Reliability of the top-label confidence: per-bin confidence vs accuracy and the expected calibration
    error (ECE, equal-width bins; Guo et al. 2017)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    return calibration_from_confidence(confidence, correct, bins)


def calibration_from_confidence(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, Any]:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(mask.sum()),
                     "confidence": conf, "accuracy": acc})
    return {"ece": float(ece), "bins": rows, "n": int(len(confidence))}
