"""The numpy metrics are scikit-learn's definitions: checked against sklearn.metrics on awkward cases."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from affinage.evaluate import classification_metrics, top_k_accuracy


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 12))
    n = int(rng.integers(1, 60))
    labels = rng.integers(0, n_classes, n)
    if seed % 2:  # some classes never predicted, some never present, exact score ties
        logits = np.round(rng.normal(size=(n, n_classes)), 0)
        logits[:, 0] -= 5
        labels = np.where(labels == n_classes - 1, 0, labels)
    else:
        logits = rng.normal(size=(n, n_classes)) + 2 * np.eye(n_classes)[labels]
    classes = [f"c{k}" for k in range(n_classes)]
    got = classification_metrics(logits, labels, classes)
    preds = logits.argmax(axis=1)
    ids = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    assert got["confusion_matrix"] == confusion_matrix(labels, preds, labels=ids).tolist()
    for k, c in enumerate(classes):
        assert got["per_class"][c]["precision"] == pytest.approx(precision[k], abs=1e-12)
        assert got["per_class"][c]["recall"] == pytest.approx(recall[k], abs=1e-12)
        assert got["per_class"][c]["f1"] == pytest.approx(f1[k], abs=1e-12)
        assert got["per_class"][c]["support"] == support[k]
    present = support > 0
    assert got["macro_f1"] == pytest.approx(f1[present].mean(), abs=1e-12)
    assert got["accuracy"] == pytest.approx((preds == labels).mean())
    for k in (1, 2, 5):
        if k < n_classes:
            assert top_k_accuracy(labels, logits, k) == pytest.approx(
                top_k_accuracy_score(labels, logits, k=k, labels=ids))
