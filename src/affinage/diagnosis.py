"""Diagnosis: what the learning curves and test metrics say went wrong, and the next thing to try.

Findings are ordered by the debugging checklist (implementation, data, more data, capacity, regularisation,
learning rate): fix the earliest step first, since a later symptom is often caused by an earlier one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

CHECKLIST = ("implementation", "data", "more data", "capacity", "regularisation", "learning rate")
OVERFIT_GAP = 0.10  # train accuracy above the best val accuracy by more than this: over-fitting
UNDERFIT_ACCURACY = 0.80  # final train accuracy below this (and no large gap): under-fitting
LOSS_RISE = 1.25  # an epoch whose train loss is 25% above the previous one: unstable
FLAT_LOSS = 0.97  # train loss still at >= 97% of its first-epoch value after several epochs: LR too low
CLASS_GAP = 0.20  # a class whose recall is this far below the overall accuracy fails on its own
FORGETTING = 0.05  # old-task accuracy lost (before - after, --init-from runs) above this: flagged


def _finding(issue: str, step: str, evidence: str, action: str) -> dict[str, str]:
    assert step in CHECKLIST, step
    return {"issue": issue, "step": step, "evidence": evidence, "action": action}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# long-function: a flat list of independent rules, one finding each, in the order they are reported
def diagnose(history: Sequence[dict[str, Any]], test: dict[str, Any] | None = None,
             classes: Sequence[str] | None = None, leaks: int = 0,
             old_task: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Findings from the per-epoch history (rows of {phase, epoch, train_loss, train_accuracy, val_loss,
    val_accuracy, lr, ...}) and the test metrics, sorted by checklist step; [] when nothing looks wrong."""
    findings: list[dict[str, str]] = []
    trained = [r for r in history if r.get("train_loss") is not None]
    phase = trained[-1]["phase"] if trained else (history[-1]["phase"] if history else None)
    rows = [r for r in history if r["phase"] == phase]
    epochs = [r for r in rows if r.get("train_loss") is not None]
    classes = list(classes or (test or {}).get("per_class", {}))
    n_classes = max(2, len(classes))
    chance = 1.0 / n_classes
    if test and test.get("per_class"):
        support = [v["support"] for v in test["per_class"].values()]
        chance = max(support) / max(1, sum(support))  # always predicting the largest class
    val_accs = [r["val_accuracy"] for r in history if _finite(r.get("val_accuracy"))]
    best_val = max(val_accs) if val_accs else None
    test_acc = test.get("accuracy") if test else None

    # 1. implementation: no better than chance
    margin = max(0.05, 0.1 * (1 - chance))
    if best_val is not None and best_val <= chance + margin and (test_acc is None or test_acc <= chance + margin):
        findings.append(_finding(
            "no better than chance", "implementation",
            f"best val accuracy {best_val:.3f}{f', test {test_acc:.3f}' if test_acc is not None else ''} vs "
            f"{chance:.3f} for always predicting the largest class",
            "check the pipeline before tuning: open a few images per class and their labels, check that the "
            "preprocessing matches the checkpoint, and that the model can overfit ~20 training images"))

    # 2. data: leaks, val/test disagreement, a class failing on its own
    if leaks:
        findings.append(_finding(
            "train/test leak", "data", f"{leaks} pair(s) of duplicate images across train/val/test (leaks.csv)",
            "the val/test figures are optimistic: retrain with --drop-leaks, or fix the split"))
    if test and best_val is not None and test.get("n", 0) >= 30 and abs(best_val - test_acc) > 0.10:
        findings.append(_finding(
            "val and test disagree", "data", f"best val accuracy {best_val:.3f}, test {test_acc:.3f}",
            "check that val and test come from the same distribution and are large enough to trust"))
    if test and test.get("per_class"):
        cm = test.get("confusion_matrix")
        for k, name in enumerate(classes):
            stats = test["per_class"].get(name)
            if not stats or stats["support"] < 2:
                continue
            if stats["recall"] < test_acc - CLASS_GAP and stats["recall"] < 0.8:
                confused = ""
                if cm is not None:
                    row = [(c, j) for j, c in enumerate(cm[k]) if j != k]
                    count, j = max(row) if row else (0, k)
                    if count:
                        confused = f"; most often predicted as '{classes[j]}' ({count} of {stats['support']})"
                findings.append(_finding(
                    "class-specific failure", "data",
                    f"recall of '{name}' is {stats['recall']:.2f} vs accuracy {test_acc:.2f}{confused}",
                    f"look at the '{name}' images and its confusions (mislabelled, ambiguous, or a different look?), "
                    f"then add training images of '{name}'"))

    # the old task (--init-from): forgetting beyond the threshold
    if old_task and old_task.get("measured") and old_task["forgetting"] > FORGETTING:
        keep = old_task.get("keep")
        more = {"none": "keep it: --old-data with --keep replay (half of each batch), or --keep distill",
                "distill": "replay old images (--old-data, --keep replay+distill)",
                "replay": "replay more (--replay-fraction 0.6) or add --keep replay+distill",
                "replay+distill": "replay more (--replay-fraction 0.6) or raise --distill-weight"}.get(keep, "")
        findings.append(_finding(
            "forgetting", "data",
            f"old-task accuracy {old_task['accuracy_before']:.3f} before, {old_task['accuracy_after']:.3f} after "
            f"(forgetting {old_task['forgetting']:.3f} > {FORGETTING})",
            f"{more}; then lower the learning rate (--lr), train fewer blocks (partial:N, linear-probe) or "
            "interpolate towards the start (--interpolate 0.5)"))

    train_losses = [r["train_loss"] for r in epochs]
    unstable = any(not _finite(x) for x in train_losses) or any(
        b > a * LOSS_RISE for a, b in zip(train_losses, train_losses[1:]))
    flat = (len(epochs) >= 3 and all(_finite(x) for x in train_losses)
            and train_losses[-1] >= FLAT_LOSS * train_losses[0] and epochs[-1]["train_accuracy"] < 0.9)
    last = epochs[-1] if epochs else None

    # 3./4./5. fit: over-fitting (more data, then regularisation), under-fitting (capacity)
    if last is not None and best_val is not None and _finite(last["train_accuracy"]):
        gap = last["train_accuracy"] - best_val
        val_losses = [r["val_loss"] for r in rows if _finite(r.get("val_loss"))]
        lowest = min(range(len(val_losses)), key=val_losses.__getitem__) if val_losses else 0
        rising = (len(val_losses) - 1 - lowest >= 2 and val_losses[-1] > 1.10 * val_losses[lowest]
                  and train_losses[-1] < train_losses[0])
        if gap > OVERFIT_GAP or rising:
            why = (f"train accuracy {last['train_accuracy']:.3f} vs best val {best_val:.3f}" if gap > OVERFIT_GAP else
                   f"val loss rose from {val_losses[lowest]:.3f} (epoch {rows[lowest]['epoch']}) to {val_losses[-1]:.3f} "
                   "while the train loss kept falling")
            findings.append(_finding(
                "over-fitting", "more data", why,
                "add training images or use stronger augmentation (--augment strong); then regularise: "
                "--weight-decay, fewer trained blocks (a smaller partial:N), label smoothing"))
        elif last["train_accuracy"] < UNDERFIT_ACCURACY and not unstable and not flat:
            findings.append(_finding(
                "under-fitting", "capacity",
                f"train accuracy only {last['train_accuracy']:.3f} (val {best_val:.3f}) after {len(epochs)} epoch(s)",
                "give the model more capacity: train more of the backbone (partial:N with a larger N, or full), "
                "a larger backbone, or more epochs"))

    # 6. learning rate: unstable, too low, not converged
    if unstable:
        bad = next((r for r in epochs if not _finite(r["train_loss"])), None)
        why = (f"the training loss became {bad['train_loss']} in epoch {bad['epoch']}" if bad else
               "the training loss jumped up between epochs: " + " -> ".join(f"{x:.3f}" for x in train_losses))
        findings.append(_finding("unstable training", "learning rate", why,
                                 "lower the learning rate 3-10x (--lr), or warm up longer (--warmup-epochs 1)"))
    elif flat:
        findings.append(_finding(
            "learning rate too low", "learning rate",
            f"train loss barely moved in {len(epochs)} epochs ({train_losses[0]:.3f} -> {train_losses[-1]:.3f})",
            "raise the learning rate 3-10x (--lr)"))
    val_rows = [r for r in rows if _finite(r.get("val_accuracy"))]
    if len(val_rows) >= 2 and not unstable:
        final, before = val_rows[-1], val_rows[-2]
        best_is_last = final["val_accuracy"] >= max(r["val_accuracy"] for r in val_rows)
        improving = final["val_accuracy"] - before["val_accuracy"] >= 0.01 or (
            _finite(final["val_loss"]) and final["val_loss"] < 0.97 * before["val_loss"])
        if best_is_last and improving:
            findings.append(_finding(
                "not converged", "learning rate",
                f"val accuracy still rising at the last epoch ({before['val_accuracy']:.3f} -> {final['val_accuracy']:.3f}, "
                f"val loss {before['val_loss']:.3f} -> {final['val_loss']:.3f})",
                f"train longer (e.g. --epochs {2 * max(1, len(epochs))}); the best epoch is kept, so more epochs cannot hurt val"))
    return sorted(findings, key=lambda f: CHECKLIST.index(f["step"]))


def format_findings(findings: Sequence[dict[str, str]]) -> list[str]:
    """Console lines: one per finding, the first one marked as the next thing to do."""
    if not findings:
        return ["diagnosis: no problem found in the learning curves and test metrics"]
    lines = []
    for k, f in enumerate(findings):
        lead = "next" if k == 0 else "then"
        lines.append(f"diagnosis: {f['issue']} ({f['evidence']}) -> {lead} [{f['step']}]: {f['action']}")
    return lines
