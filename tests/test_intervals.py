"""Confidence intervals (issue #13, part 4): seeded bootstrap intervals of the test figures, targets that pass on
their value but not on their interval ("passed, not established"), paired gaps between compare's strategies that
the test split cannot resolve, and the intervals in metrics.json, the console and the report."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from affinage.compare import GAP_COLUMNS, finish, row_from_run
from affinage.evaluate import classification_metrics, group_metrics
from affinage.intervals import (
    accuracy_interval,
    figures_of_confusions,
    images_needed,
    interval_blocks,
    paired_difference,
    per_image,
    resolves,
)
from affinage.report import write_report
from affinage.runfiles import read_predictions, write_predictions
from affinage.targets import check_targets, format_result, parse_targets

CLASSES = [f"c{k}" for k in range(8)]


def _scores(n: int, accuracy: float, seed: int = 0, k: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """Logits of n images whose top class is right on about `accuracy` of them, and the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    right = rng.random(n) < accuracy
    top = np.where(right, y, (y + rng.integers(1, k, n)) % k)
    return rng.normal(0, 0.5, (n, k)) + 4 * np.eye(k)[top], y


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


# ----------------------------------------------------------------------------------------------
# The bootstrap itself
# ----------------------------------------------------------------------------------------------
def test_resampled_figures_are_classification_metrics_definitions():
    """On the identity resample the vectorised figures equal evaluate.classification_metrics, absent and
    never-predicted classes included."""
    logits, y = _scores(90, 0.6, seed=3)
    y[y == 7] = 0  # class c7 absent from the images
    logits[:, 6] -= 10  # c6 never predicted
    m = classification_metrics(logits, y, CLASSES)
    k = len(CLASSES)
    cm = np.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(1, k, k)
    got = figures_of_confusions(cm)
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "specificity"):
        assert got[name][0] == pytest.approx(m[name], abs=1e-12), name
    for j, c in enumerate(CLASSES):
        for name in ("precision", "recall", "f1", "specificity"):
            assert got[f"per_class/{name}"][0, j] == pytest.approx(m["per_class"][c][name], abs=1e-12), (c, name)
    images = per_image(logits, y)
    assert images["loss"].mean() == pytest.approx(m["loss"]) and images["top5_accuracy"].mean() == pytest.approx(
        m["top5_accuracy"])


def test_interval_contains_the_figure_and_narrows_with_more_images():
    widths = {}
    for n in (100, 10_000):
        logits, y = _scores(n, 0.85)
        m = classification_metrics(logits, y, CLASSES)
        ci = interval_blocks(logits, y, CLASSES, seed=0).ci95
        for name in ("accuracy", "macro_f1", "top5_accuracy"):
            assert ci[name][0] <= m[name] <= ci[name][1], (n, name, ci[name], m[name])
        widths[n] = _width(ci["accuracy"])
        assert "B=1000" in ci["method"] and "seed 0" in ci["method"]
    assert 0.10 < widths[100] < 0.20  # 1.96 * sqrt(0.85 * 0.15 / 100) * 2 ~ 0.14
    assert widths[10_000] < widths[100] / 5  # ~ 1/sqrt(100): a tenth


def test_intervals_are_reproducible_with_the_seed_and_move_with_it():
    logits, y = _scores(300, 0.8)
    a = interval_blocks(logits, y, CLASSES, seed=0).ci95
    assert interval_blocks(logits, y, CLASSES, seed=0).ci95 == a
    b = interval_blocks(logits, y, CLASSES, seed=1).ci95
    assert b["accuracy"] != a["accuracy"] or b["macro_f1"] != a["macro_f1"]
    assert abs(b["accuracy"][0] - a["accuracy"][0]) < 0.03  # another seed, the same interval within noise


def test_the_same_figures_whatever_the_targets_and_from_probabilities_too():
    """Naming a target adds its figure's interval without moving the others; probabilities (test_predictions.csv)
    give the intervals the logits gave."""
    logits, y = _scores(200, 0.8)
    plain = interval_blocks(logits, y, CLASSES, seed=0).ci95
    targets = parse_targets(["recall[c3]>=0.5", "loss<=2", "specificity>=0.9"], CLASSES)
    named = interval_blocks(logits, y, CLASSES, targets, seed=0).ci95
    assert named["accuracy"] == plain["accuracy"] and named["macro_f1"] == plain["macro_f1"]
    assert {"recall[c3]", "loss", "specificity"} <= set(named)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    from_probs = interval_blocks(probs, y, CLASSES, seed=0, probabilities=True).ci95
    assert from_probs["accuracy"] == plain["accuracy"] and from_probs["macro_f1"] == plain["macro_f1"]


def test_group_intervals_are_wider_for_the_smaller_group():
    logits, y = _scores(600, 0.8)
    groups = ["big"] * 540 + ["small"] * 60
    iv = interval_blocks(logits, y, CLASSES, groups=groups, seed=0)
    block = iv.on_groups(group_metrics(logits, y, groups, CLASSES))
    for g in ("big", "small"):
        lo, hi = block["by_group"][g]["ci95"]
        assert lo <= block["by_group"][g]["accuracy"] <= hi
    assert _width(block["by_group"]["small"]["ci95"]) > 2 * _width(block["by_group"]["big"]["ci95"])
    lo, hi = block["accuracy_gap_ci95"]
    assert lo <= block["accuracy_gap"] <= hi


# ----------------------------------------------------------------------------------------------
# Targets: passed, not established
# ----------------------------------------------------------------------------------------------
def _checked(n: int, accuracy: float, exprs: list[str]) -> tuple[dict, list[dict]]:
    logits, y = _scores(n, accuracy, seed=5)
    targets = parse_targets(exprs, CLASSES)
    test = interval_blocks(logits, y, CLASSES, targets, seed=0).on_test(classification_metrics(logits, y, CLASSES))
    return test, check_targets(targets, test)


def test_a_target_passing_on_its_value_but_not_its_lower_bound_is_not_established():
    test, [r] = _checked(100, 0.93, ["accuracy>=0.9"])
    assert test["accuracy"] == 0.92 and test["ci95"]["accuracy"][0] < 0.9
    assert r["passed"] is True and r["established"] is False and r["ci95"] == test["ci95"]["accuracy"]
    assert r["images_needed"] == 625  # half-width 0.05 towards the threshold for a margin of 0.02
    line = format_result(r)
    assert line.startswith("PASS") and "passed, not established (95% CI 0.870–0.970)" in line
    assert "about 625 test images would establish" in line
    test, [r] = _checked(80, 0.93, ["accuracy>=0.9"])  # exactly on the threshold
    assert test["accuracy"] == 0.9 and r["passed"] and not r["established"] and "no test split can establish it" in format_result(r)
    test, [r] = _checked(20_000, 0.93, ["accuracy>=0.9"])  # the same value on many more images: established
    assert r["passed"] and r["established"] and "not established" not in format_result(r)
    _, [r] = _checked(80, 0.80, ["accuracy>=0.9"])
    assert not r["passed"] and not r["established"] and format_result(r).startswith("FAIL")


def test_an_upper_bound_target_is_established_by_the_upper_end():
    test, [loss, recall] = _checked(100, 0.9, [f"loss<={0.0:.1f}", "recall[c1]>=0.0"])
    assert not loss["passed"]
    test, [loss] = _checked(100, 0.9, [f"loss<={test['loss'] + 1e-3}"])  # passes by a hair: the upper bound fails
    assert loss["passed"] and loss["established"] is False and loss["ci95"][1] > test["loss"]
    assert recall["passed"] and recall["established"]  # recall >= 0 holds for every resample


def test_images_needed_follows_one_over_root_n():
    assert images_needed(100, 0.93, 0.88, 0.9) == 278  # half-width 0.05 for a margin of 0.03: (5/3)^2 * 100
    assert images_needed(100, 0.9, 0.85, 0.9) is None  # on the threshold: no size shows it


# ----------------------------------------------------------------------------------------------
# Paired differences and compare
# ----------------------------------------------------------------------------------------------
def test_paired_difference_of_identical_predictions_is_zero():
    correct = (np.random.default_rng(0).random(250) < 0.8).astype(float)
    d, ci = paired_difference(correct, correct, seed=0)
    assert d == 0 and ci == [0.0, 0.0] and not resolves(d, ci)


def test_a_paired_gap_is_resolved_where_separate_intervals_overlap():
    """b is right wherever a is, and on 25 more of 1,000 images: the separate accuracy intervals overlap, the
    paired one (the same resample for both) does not include 0."""
    rng = np.random.default_rng(1)
    a = (rng.random(1000) < 0.85).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:25]] = 1
    ci_a, ci_b = accuracy_interval(a, 0), accuracy_interval(b, 0)
    assert ci_b[0] < ci_a[1]  # overlapping
    d, ci = paired_difference(b, a, seed=0)
    assert d == pytest.approx(0.025) and resolves(d, ci) and ci[0] > 0


def _run_dir(root: Path, name: str, y: np.ndarray, probs: np.ndarray, with_ci: bool) -> dict:
    """A finished run directory as compare reads it: metrics.json and test_predictions.csv (no val predictions:
    the val choice falls back to metrics.json, which is not what is tested here)."""
    run = root / "runs" / name.replace(":", "")
    run.mkdir(parents=True)
    accuracy = float((probs.argmax(1) == y).mean())
    test = {"accuracy": accuracy, "macro_f1": accuracy, "n": len(y)}
    if with_ci:
        test["ci95"] = {"accuracy": accuracy_interval((probs.argmax(1) == y).astype(float), 0)}
    metrics = {"format_version": 2, "strategy": name, "val": {"accuracy": accuracy, "loss": 0.3}, "test": test,
               "model": {"trainable_params": 10}, "timing": {}, "footprint": {"energy_kwh": 1e-3, "co2_kg": 1e-4},
               "targets": []}
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_predictions(run / "test_predictions.csv", [f"img/{i}.jpg" for i in range(len(y))],
                      [f"sha{i}" for i in range(len(y))], [CLASSES[k] for k in y], probs, CLASSES)
    return row_from_run(name, run, 10.0)


def test_compare_lists_the_gaps_the_test_split_cannot_resolve(tmp_path: Path):
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, len(CLASSES), n)
    right_a = rng.random(n) < 0.9
    right_b = right_a.copy()
    right_b[np.flatnonzero(right_a)[:3]] = False  # 3 images fewer: within noise
    right_c = right_a & (rng.random(n) < 0.75)  # far worse

    def probs(right: np.ndarray) -> np.ndarray:
        top = np.where(right, y, (y + 1) % len(CLASSES))
        return np.full((n, len(CLASSES)), 0.02) + 0.84 * np.eye(len(CLASSES))[top]

    rows = [_run_dir(tmp_path, "partial:2", y, probs(right_a), True), _run_dir(tmp_path, "full", y, probs(right_b), False),
            _run_dir(tmp_path, "head", y, probs(right_c), True)]
    said: list[str] = []
    result = finish(tmp_path, rows, [], log=said.append, seed=0)
    gaps = {(g["a"], g["b"]): g for g in result.gaps}
    assert set(gaps) == {("partial:2", "full"), ("partial:2", "head"), ("full", "head")}
    assert not gaps[("partial:2", "full")]["resolved"] and gaps[("partial:2", "full")]["test_images_needed"] > n
    assert gaps[("partial:2", "head")]["resolved"] and gaps[("full", "head")]["resolved"]
    assert gaps[("partial:2", "full")]["difference"] == pytest.approx(3 / n)
    for r in result.rows:  # the run without a ci95 in metrics.json got one from its test predictions
        lo, hi = r["test_accuracy_ci95"]
        assert lo <= r["test_accuracy"] <= hi
    text = "\n".join(said)
    assert f"warning: the test split ({n} images) is too small to resolve 1 gap(s)" in text
    assert "partial:2 vs full: +0.0100" in text and "resolved by the test split: partial:2 vs head" in text
    with open(tmp_path / "compare_gaps.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert tuple(written[0]) == GAP_COLUMNS and [w["resolved"] for w in written].count("False") == 1
    with open(tmp_path / "compare.csv", newline="") as fh:
        assert all(json.loads(r["test_accuracy_ci95"])[0] <= float(r["test_accuracy"]) for r in csv.DictReader(fh))
    md = (tmp_path / "compare.md").read_text()
    assert "| partial:2 | full | +0.0100 |" in md and "too small to resolve 1 gap(s)" in md


def test_compare_says_why_gaps_are_not_assessed_without_test_predictions(tmp_path: Path):
    y = np.arange(40) % len(CLASSES)
    rows = [_run_dir(tmp_path, s, y, np.eye(len(CLASSES))[y] * 0.9 + 0.01, True) for s in ("linear-probe", "head")]
    (Path(rows[1]["run_dir"]) / "test_predictions.csv").unlink()
    said: list[str] = []
    result = finish(tmp_path, rows, [], log=said.append)
    assert result.gaps == [] and not (tmp_path / "compare_gaps.csv").exists()
    assert any("not assessed: run head has no test_predictions.csv" in line for line in said)


# ----------------------------------------------------------------------------------------------
# A run: metrics.json, console, report
# ----------------------------------------------------------------------------------------------
def test_a_run_stores_its_intervals_and_they_follow_its_test_predictions(tiny_run: Path):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    ci = metrics["test"]["ci95"]
    assert ci["accuracy"][0] <= metrics["test"]["accuracy"] <= ci["accuracy"][1]
    assert ci["macro_f1"][0] <= metrics["test"]["macro_f1"] <= ci["macro_f1"][1]
    pred = read_predictions(tiny_run)
    classes = pred.classes
    y = np.array([classes.index(label) for label in pred.labels])
    again = interval_blocks(pred.probabilities, y, classes, seed=0, probabilities=True).ci95
    assert again["accuracy"] == ci["accuracy"]  # the same seed, the same resamples: from the CSV alone


def test_the_report_shows_intervals_and_not_established_targets(tmp_path: Path):
    from test_report import make_run_dir

    root = make_run_dir(tmp_path / "run")
    metrics = json.loads((root / "metrics.json").read_text())
    classes = metrics["data"]["classes"]
    cm = np.array(metrics["test"]["confusion_matrix"])
    y = np.repeat(np.arange(len(classes)), cm.sum(1))
    pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in cm])
    logits = np.eye(len(classes))[pred] * 3
    targets = parse_targets([f"accuracy>={metrics['test']['accuracy'] - 0.01}"], classes)
    groups = ["studio", "field"] * (len(y) // 2)
    iv = interval_blocks(logits, y, classes, targets, groups, seed=0)
    metrics["test"] = iv.on_test(metrics["test"])
    metrics["groups"] = iv.on_groups(group_metrics(logits, y, groups, classes))
    metrics["targets"] = check_targets(targets, metrics["test"])
    assert metrics["targets"][0]["established"] is False
    (root / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(root).read_text()
    lo, hi = metrics["test"]["ci95"]["accuracy"]
    assert f"95% CI {lo:.3f}–{hi:.3f}" in page and "passed, not established" in page
    assert "seeded percentile bootstrap, B=1000" in page and page.count("95% CI") >= 4
