"""The tuned linear probe: multinomial logistic regression on cached frozen features, its L2 strength chosen on val.

scikit-learn's `LogisticRegression` (lbfgs, raw features, as the reference probe users write themselves), over a
grid of C that includes scikit-learn's default C=1, so the probe is never worse on val than the plain one; C is
chosen by `selection.choose` (val accuracy where it separates, else calibrated val log loss), as
`LogisticRegressionCV` does with folds. The fitted coefficients become the run's linear head (`nn.Linear`), so
inference, export and fine-tuning from the probe (LP-FT) see an ordinary head.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .selection import Choice, Scored, choose

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # ascending: each fit starts from the previous one's solution
MAX_ITER = 3000  # the reference probe's


@dataclass(frozen=True)
class ProbeFit:
    head: nn.Linear
    C: float
    choice: Choice  # the C table (val accuracy and calibrated loss per C)
    val_logits: np.ndarray
    seconds: float
    task_C: dict[str, float] | None = None  # several tasks: each task's C (head: a tasks.MultiHead of their probes)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """scikit-learn's small fits on one BLAS thread: beside torch's OpenMP threads (still spinning after a forward
    pass) a multi-threaded OpenBLAS oversubscribes the cores; on 2 cores the oxford17 probe's six fits took 17 s that
    way against 0.9 s on one thread, with the same iterations and the same val scores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _model(C: float, seed: int, class_weight: str | None = None) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=MAX_ITER, warm_start=True, random_state=seed, class_weight=class_weight)


def _fit(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the C table says how each fit scored on val
        return model.fit(x, y)


def _logits(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Decision values over all `n_classes` (classes absent from train get -inf-like scores)."""
    scores = model.decision_function(x)
    if scores.ndim == 1:  # binary: sklearn returns the positive class's margin
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    full = np.full((len(x), n_classes), -1e4, dtype=np.float64)
    full[:, model.classes_] = scores
    return full


def to_head(model: Any, n_features: int, n_classes: int) -> nn.Linear:
    """The fitted logistic regression as a linear layer over all `n_classes`."""
    coef = np.asarray(model.coef_, dtype=np.float64)
    bias = np.asarray(model.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: logits (-m/2, m/2) give the same softmax as sklearn's sigmoid(m)
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    weight = np.zeros((n_classes, n_features))
    b = np.full(n_classes, -1e4)
    weight[model.classes_], b[model.classes_] = coef, bias
    head = nn.Linear(n_features, n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def fit_probe(train_x: Any, train_y: Any, val_x: Any, val_y: Any, n_classes: int, seed: int = 0,
              grid: tuple[float, ...] = C_GRID, class_weight: str | None = None) -> ProbeFit:
    """Fit the probe for every C in `grid` (stopping once val has got worse twice in a row), keep the C chosen on
    val (`refit_probe` fits it again on more data); `class_weight='balanced'`: --balance (balance.py)."""
    t0 = time.perf_counter()
    xt, yt = np.asarray(train_x, dtype=np.float32), np.asarray(train_y)
    xv, yv = np.asarray(val_x, dtype=np.float32), np.asarray(val_y)
    model = _model(grid[0], seed, class_weight)
    scored: list[Scored] = []
    worse = 0
    for C in grid:
        model.set_params(C=C)
        _fit(model, xt, yt)
        scored.append(Scored.from_logits(f"C={C:g}", _logits(model, xv, n_classes), C,
                                         coef=model.coef_.copy(), intercept=model.intercept_.copy()))
        if len(scored) > 1:
            now = choose(scored[-2:], yv)
            worse = worse + 1 if now.index == 0 else 0
            if worse >= 2:
                break
    choice = choose(scored, yv)
    kept = scored[choice.index]
    C = float(kept.cost)
    model.coef_, model.intercept_ = kept.extra["coef"], kept.extra["intercept"]
    val_logits = _logits(model, xv, n_classes)
    head = to_head(model, xt.shape[1], n_classes)
    for row in choice.table:
        row.pop("coef", None)
        row.pop("intercept", None)
    return ProbeFit(head, C, choice, val_logits, time.perf_counter() - t0)


def refit_probe(C: float, x: Any, y: Any, n_classes: int, seed: int = 0, class_weight: str | None = None) -> nn.Linear:
    """The probe at a C already chosen on val, fitted on more data (train + val)."""
    x = np.asarray(x, dtype=np.float32)
    return to_head(_fit(_model(C, seed, class_weight), x, np.asarray(y)), x.shape[1], n_classes)
