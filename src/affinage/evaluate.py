"""Evaluation stage: deterministic test metrics from logits (scikit-learn does the counting)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy, top-5, macro P/R/F1, per-class sensitivity/specificity and the confusion matrix.

    Only deterministic figures: timings belong elsewhere so that reruns compare equal.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    n_classes = len(classes)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    preds = logits.argmax(axis=1)
    ids = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    cm = confusion_matrix(labels, preds, labels=ids)
    total = cm.sum()
    per_class = {}
    for k, name in enumerate(classes):
        tp = cm[k, k]
        fp = cm[:, k].sum() - tp
        fn = cm[k, :].sum() - tp
        tn = total - tp - fp - fn
        per_class[name] = {"recall": float(recall[k]), "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
                           "precision": float(precision[k]), "f1": float(f1[k]), "support": int(support[k])}
    present = support > 0
    metrics: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0,
    }
    if n_classes > 5:  # with 5 classes or fewer top-5 is always 1
        metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, logits, k=5, labels=ids))
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
