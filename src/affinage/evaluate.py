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
    if n_classes >= 5:
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
