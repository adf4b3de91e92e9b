"""`affinage compare`: every strategy on the same data, split and seed, side by side (accuracy x time x
energy), and the cheapest one that meets the targets.

Each strategy runs as its own `affinage train` process, so its wall time, peak memory and energy are its
own (not inflated by what earlier strategies left in memory), and every run is a complete run directory.
Each also runs cold, with its own empty cache (AFFINAGE_CACHE_DIR, removed after the run): it decodes the images
and extracts the frozen features itself, as it would alone. Sharing one cache would time every strategy after the
first on the work the runs before it did, and "cheapest" would then favour whichever ran later.

The choice is made on val, never on test (issue #11): "best" is the row `affinage.selection.choose` keeps from the
runs' val_predictions.csv (the rule `train --strategy auto` applies), marked `auto_pick`; "cheapest adequate" is
the cheapest row within 0.01 of that row's val accuracy. Test accuracy is shown beside them and never used to
choose. `--target` expressions are checked on test by each run (metrics.json "targets"), and the summary says so.

Test accuracies come with their 95% interval (each run's metrics.json, else a bootstrap of its test_predictions.csv),
and every pair of rows with the paired bootstrap interval of its difference on the same test images
(affinage.intervals; compare_gaps.csv): a gap whose interval includes 0 is one the test split cannot resolve, and
the console says so, with about how many test images would.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import COMPARE_STRATEGIES, KEEP_MODES, check_strategy
from .errors import AffinageError
from .runfiles import read_metrics
from .storage import atomic_path, write_text

DEFAULT_STRATEGIES = COMPARE_STRATEGIES
COLUMNS = ("strategy", "auto_pick", "val_accuracy", "val_loss", "test_accuracy", "test_accuracy_ci95", "macro_f1",
           "trainable_params",
           "wall_seconds", "samples_per_second", "peak_memory_mb", "energy_kwh", "co2_kg", "bytes_downloaded",
           "bytes_read", "transfer_kwh", "targets_met", "features_cached", "measured_as", "run_dir")
COLD = "cold run (own empty cache: decoding and feature extraction included)"
ON_VAL = "best and auto_pick chosen on val; test shown, never used to choose"
VAL_PREDICTIONS = "val_predictions.csv"
TEST_PREDICTIONS = "test_predictions.csv"
GAP_COLUMNS = ("a", "b", "a_test_accuracy", "b_test_accuracy", "difference", "ci95_low", "ci95_high", "resolved",
               "test_images_needed")


@dataclass
class Comparison:
    path: Path
    rows: list[dict[str, Any]]
    best: str  # chosen on val (the row marked auto_pick)
    cheapest: str | None  # the cheapest strategy meeting the targets (None: none does)
    cost_measure: str  # "energy_kwh" or "wall_seconds"
    summary: str
    auto_pick: str = ""  # the strategy `train --strategy auto`'s rule keeps among these rows (= best)
    auto_reason: str = ""  # why, in words
    multitask: list[dict[str, Any]] | None = None  # --multitask-baseline: multitask_table's rows
    gaps: list[dict[str, Any]] | None = None  # every pair of rows: test accuracy difference, paired 95% CI, resolved


def _say(msg: str) -> None:
    print(msg, flush=True)


def _train_job(cmd: list[str], root: Path, name: str, run_dir: Path) -> float:
    """Run one `affinage train` child on a cold cache of its own; its log under runs/; its wall seconds."""
    cache = root / "cache" / _slug(name)
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "AFFINAGE_CACHE_DIR": str(cache)}  # cold: nothing decoded or extracted before
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              env=env)
    finally:
        wall = time.perf_counter() - t0
        shutil.rmtree(cache, ignore_errors=True)  # a decoded dataset per strategy would fill the disk
    (root / "runs").mkdir(exist_ok=True)
    write_text(root / "runs" / f"{_slug(name)}.log", proc.stdout)
    if proc.returncode != 0 or not (run_dir / "metrics.json").exists():
        last = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["no output"]
        raise AffinageError(f"strategy {name} failed: {last[0]}",
                            f"see {root / 'runs' / (_slug(name) + '.log')}")
    return wall


def compare(data: str, model: str = "efficientnet_lite0", strategies: Sequence[str] = DEFAULT_STRATEGIES,
            out: str | os.PathLike[str] | None = None, targets: Sequence[str] = (), seed: int = 0,
            train_args: Sequence[str] = (), progress: bool = True, log: Callable[[str], None] = _say,
            keeps: Sequence[str] = (), tasks: Sequence[str] = (), multitask_baseline: bool = False,
            folds: int | None = None) -> Comparison:
    """Run `strategies` on one split (the first run makes it, the others reuse its split lists) and write
    compare.csv, compare.md and compare.png in `out`. `train_args` are extra `affinage train` options; `keeps`
    (with --init-from in them): one run per strategy and way of keeping the old task, its forgetting in the row.
    `tasks`: the CSV's label columns (several: multi-task runs); with `multitask_baseline`, each strategy also trains
    every task alone (`--train-task T`, same images and splits) and multitask.csv gives the per-task difference;
    `folds`: each strategy cross-validated on the same K folds (a pure function of the data, seed and K), its row
    the mean ± std over them, chosen on the out-of-fold predictions."""
    from .run import prepare_run_dir

    names = [check_strategy(s) for s in strategies]
    if len(set(names)) != len(names):
        raise AffinageError(f"strategy listed twice in '{','.join(strategies)}'", "list each strategy once")
    if not names:
        raise AffinageError("no strategy to compare", f"pass e.g. --strategies {','.join(DEFAULT_STRATEGIES)}")
    modes = list(keeps) or [None]
    bad = [m for m in modes if m is not None and m not in KEEP_MODES]
    if bad:
        raise AffinageError(f"unknown --keep '{bad[0]}'", f"choose among {', '.join(KEEP_MODES)}")
    if multitask_baseline and len(tasks) < 2:
        raise AffinageError("--multitask-baseline needs several --task columns (it trains each one alone)",
                            "pass e.g. --task masterCategory --task gender --task baseColour")
    root = prepare_run_dir(out, "compare")
    rows: list[dict[str, Any]] = []
    alone: dict[tuple[str, str], dict[str, Any]] = {}  # (strategy, task) -> row of the task trained alone
    first: Path | None = None
    jobs = [(s, m, None) for s in names for m in modes]
    jobs += [(s, None, t) for s in names for t in tasks] if multitask_baseline else []
    task_args = [a for t in tasks for a in ("--task", t)]
    for k, (strategy, mode, solo) in enumerate(jobs):
        name = strategy if mode is None else f"{strategy} keep={mode}"
        name = name if solo is None else f"{strategy} alone={solo}"
        run_dir = root / "runs" / _slug(name)
        cmd = [sys.executable, "-m", "affinage.cli", "train", "--data", data, "--model", model, "--strategy", strategy,
               "--out", str(run_dir), "--seed", str(seed), *train_args,
               *([] if "--audit" in train_args else ["--audit", "off"]),  # audited once by the user, not per row
               *(["--keep", mode] if mode else []),
               *task_args, *(["--train-task", solo] if solo else []),
               *(["--folds", str(folds)] if folds is not None else [])]
        for t in targets:
            cmd += ["--target", t]
        if first is not None and folds is None:
            cmd += ["--splits-from", str(first)]
        if not progress:
            cmd.append("--quiet")
        log(f"[{k + 1}/{len(jobs)}] {name}: {' '.join(cmd[3:])}")
        wall = _train_job(cmd, root, name, run_dir)
        first = first or run_dir
        r = row_from_run(name, run_dir, wall)
        if solo is not None:  # a baseline: not a candidate of the comparison
            alone[(strategy, solo)] = r
            task = (read_metrics(run_dir).get("tasks") or {}).get(solo, {})
            log(f"    {solo} alone: test accuracy {task.get('accuracy', float('nan')):.4f}, {r['wall_seconds']:.0f}s")
            continue
        rows.append(r)
        if mode is not None:
            rows[-1]["strategy"] = name
        spread = f" ± {r['test_accuracy_std']:.4f} over {folds} folds" if r.get("test_accuracy_std") is not None else ""
        log(f"    val accuracy {_fmt(r['val_accuracy'], '.4f')}, test accuracy {r['test_accuracy']:.4f}{spread} "
            f"(95% CI {_ci(r['test_accuracy_ci95'])}), "
            f"{r['wall_seconds']:.0f}s, "
            f"{_fmt(r['energy_kwh'], '.2e')} kWh, peak {_fmt(r['peak_memory_mb'], '.0f')} MB")
    result = finish(root, rows, targets, log, seed)
    if multitask_baseline:
        result.multitask = multitask_table(root, rows, alone, list(tasks), log)
    return result


MULTITASK_COLUMNS = ("strategy", "task", "multi_task_accuracy", "alone_accuracy", "difference", "relative_difference")


def multitask_table(root: Path, rows: Sequence[dict[str, Any]], alone: dict[tuple[str, str], dict[str, Any]],
                    tasks: list[str], log: Callable[[str], None] = _say) -> list[dict[str, Any]]:
    """Per strategy and task: test accuracy of the multi-task run and of the task trained alone, their difference,
    and LibMTL's Delta (the mean relative difference over tasks); the cost of one multi-task run against the task
    runs together. Written to multitask.csv and appended to compare.md."""
    table: list[dict[str, Any]] = []
    lines = ["", "## Multi-task vs each task alone (same images, splits and strategy)", "",
             "| strategy | task | multi-task | alone | difference |", "|---|---|---|---|---|"]
    summaries: list[str] = []
    for r in rows:
        multi = read_metrics(r["run_dir"]).get("tasks") or {}
        solos = [alone.get((r["strategy"], t)) for t in tasks]
        if not multi or any(s is None for s in solos):
            continue
        relative = []
        for task, solo in zip(tasks, solos):
            m_acc = multi[task]["accuracy"]
            a_acc = (read_metrics(solo["run_dir"]).get("tasks") or {})[task]["accuracy"]
            relative.append((m_acc - a_acc) / a_acc if a_acc else 0.0)
            table.append({"strategy": r["strategy"], "task": task, "multi_task_accuracy": m_acc,
                          "alone_accuracy": a_acc, "difference": m_acc - a_acc, "relative_difference": relative[-1]})
            lines.append(f"| {r['strategy']} | {task} | {m_acc:.4f} | {a_acc:.4f} | {m_acc - a_acc:+.4f} |")
        wall = sum(s["wall_seconds"] for s in solos)
        energy = [s["energy_kwh"] for s in solos]
        cost = (f"one multi-task run {r['wall_seconds']:.0f}s"
                + (f", {r['energy_kwh'] * 1000:.3g} Wh" if _number(r["energy_kwh"]) else "")
                + f" vs {len(tasks)} single-task runs {wall:.0f}s"
                + (f", {sum(energy) * 1000:.3g} Wh" if all(_number(e) for e in energy) else ""))
        delta = 100 * sum(relative) / len(relative)
        summaries.append(f"{r['strategy']}: Delta_m (LibMTL, mean relative accuracy difference) {delta:+.2f}%; {cost}.")
        table.append({"strategy": r["strategy"], "task": "(all tasks: Delta_m)", "relative_difference": delta / 100,
                      "multi_task_wall_seconds": r["wall_seconds"], "alone_wall_seconds": wall,
                      "multi_task_energy_kwh": r["energy_kwh"], "alone_energy_kwh": sum(energy)
                      if all(_number(e) for e in energy) else None})
    lines += [""] + summaries
    with atomic_path(root / "multitask.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        columns = list(MULTITASK_COLUMNS) + ["multi_task_wall_seconds", "alone_wall_seconds", "multi_task_energy_kwh",
                                             "alone_energy_kwh"]
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(table)
    with open(root / "compare.md", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    for line in lines[2:]:
        log(line)
    return table


def row_from_run(strategy: str, run_dir: Path, process_seconds: float) -> dict[str, Any]:
    """One table row from a finished run directory (or cross-validation: the mean over its folds)."""
    m = read_metrics(run_dir, required=True)
    if "cv" in m:
        return _row_from_cv(strategy, run_dir, process_seconds, m)
    timing, footprint = m.get("timing", {}), m.get("footprint") or {}
    old, new = m.get("old_task") or {}, m.get("new_task") or {}
    checks = m.get("targets") or []
    # several tasks: metrics' val is every task's known labels together; compare chooses on the first task's val
    # predictions, so its row shows that task's val accuracy (finish fills it in from val_predictions.csv)
    val = {} if m.get("tasks") else (m.get("val") or {})
    return {
        "strategy": m.get("strategy", strategy),
        "auto_pick": False,  # set by finish()
        "val_accuracy": val.get("accuracy"),
        "val_loss": val.get("loss", val.get("loss_calibrated")),  # train writes the temperature-scaled one
        "test_accuracy": m["test"]["accuracy"],
        "test_accuracy_ci95": (m["test"].get("ci95") or {}).get("accuracy"),  # None: finish() bootstraps the CSV
        "macro_f1": m["test"]["macro_f1"],
        "trainable_params": m["model"]["trainable_params"],
        "wall_seconds": round(process_seconds, 2),  # the whole `affinage train` process, start-up included
        "samples_per_second": timing.get("train_samples_per_second"),
        "peak_memory_mb": timing.get("peak_memory_mb"),
        "energy_kwh": footprint.get("energy_kwh"),
        "co2_kg": footprint.get("co2_kg"),
        **_data_footprint(footprint),
        "targets_met": all(c.get("passed") for c in checks) if checks else None,
        "features_cached": timing.get("features_cached"),
        "keep": old.get("keep"),
        "new_accuracy": new.get("accuracy"),
        "old_accuracy": old.get("accuracy_after"),
        "forgetting": old.get("forgetting"),
        "measured_as": COLD,
        "run_dir": str(run_dir),
    }


def _row_from_cv(strategy: str, run_dir: Path, process_seconds: float, m: dict[str, Any]) -> dict[str, Any]:
    """A cross-validation's row: test figures = the mean over the folds (with the std), val = out-of-fold."""
    cv, footprint = m["cv"], m.get("footprint") or {}
    folds = cv["per_fold"]
    checks = [c for r in folds for c in (read_metrics(r["run_dir"]).get("targets") or [])]
    return {"strategy": cv.get("strategy", strategy), "auto_pick": False, "val_accuracy": cv["oof"]["accuracy"],
            "val_loss": cv["oof"].get("loss"), "test_accuracy": cv["accuracy_mean"],
            "test_accuracy_std": cv["accuracy_std"], "macro_f1": cv["macro_f1_mean"],
            "trainable_params": max(r["trainable_params"] for r in folds), "wall_seconds": round(process_seconds, 2),
            "samples_per_second": None, "peak_memory_mb": max((r["timing"].get("peak_memory_mb") or 0) for r in folds),
            "energy_kwh": footprint.get("energy_kwh"), "co2_kg": footprint.get("co2_kg"), **_data_footprint(footprint),
            "targets_met": all(c.get("passed") for c in checks) if checks else None,
            "features_cached": m["timing"].get("features_cached"), "measured_as": COLD, "run_dir": str(run_dir)}


def _data_footprint(footprint: dict[str, Any]) -> dict[str, Any]:
    """What the run downloaded (hub caches before/after) and read (image files), and the transfer's energy."""
    return {k: footprint.get(k) for k in ("bytes_downloaded", "bytes_read", "transfer_kwh")}


def finish(root: Path, rows: list[dict[str, Any]], targets: Sequence[str],
           log: Callable[[str], None] = _say, seed: int = 0) -> Comparison:
    """Pick the best (on val: auto's pick) and the cheapest adequate strategy; say which test gaps the test split
    cannot resolve; write the CSV, Markdown and PNG."""
    k, reason, seen = choose_on_val(rows)
    gaps, n_test, why = pairwise_gaps(rows, seed)
    for i, r in enumerate(rows):
        r["auto_pick"] = i == k
        if seen is not None and not _finite(r.get("val_accuracy")):
            r["val_accuracy"] = seen[i]  # metrics.json without it: the accuracy of its val predictions
    best = rows[k]
    measure = "energy_kwh" if all(_number(r["energy_kwh"]) for r in rows) else "wall_seconds"
    best_val = _val_accuracy(best)
    if targets:
        adequate = [r for r in rows if r["targets_met"]]
        rule = (f"meets {' and '.join(targets)} (targets are checked on test by each run, as its metrics.json "
                f"reports; not a val choice)")
    elif best_val is None:
        adequate, rule = [], "is within 0.01 of the best val accuracy (no val accuracy to compare)"
    else:  # no stated target: within one point of the best row's val accuracy
        adequate = [r for r in rows if (_val_accuracy(r) if _val_accuracy(r) is not None else -1.0) >= best_val - 0.01]
        rule = f"is within 0.01 of the best val accuracy ({best_val:.4f}) on val"
    cheapest = min(adequate, key=lambda r: r[measure]) if adequate else None
    unit = "kWh" if measure == "energy_kwh" else "s"
    pick = f"auto would pick {best['strategy']} ({reason})"
    if cheapest is not None:
        summary = (f"{pick}; cheapest strategy that {rule}: {cheapest['strategy']} (val accuracy "
                   f"{_fmt(_val_accuracy(cheapest), '.4f')}, test accuracy {cheapest['test_accuracy']:.4f}, "
                   f"{cheapest[measure]:.3g} {unit}); best on val: {best['strategy']} (val accuracy "
                   f"{_fmt(best_val, '.4f')}, test accuracy {best['test_accuracy']:.4f})")
    else:
        summary = (f"{pick}; no strategy {rule}; best on val: {best['strategy']} (val accuracy "
                   f"{_fmt(best_val, '.4f')}, test accuracy {best['test_accuracy']:.4f})")
    resolution = gap_lines(gaps, n_test, why)
    _write_csv(root / "compare.csv", rows)
    if gaps:
        _write_csv(root / "compare_gaps.csv", gaps, GAP_COLUMNS)
    write_text(root / "compare.md", markdown_table(rows) + f"\nEvery row is a {COLD}, so wall times and energies "
               f"compare. {ON_VAL[0].upper() + ON_VAL[1:]}.\n\n{summary}\n\n"
               + _markdown_lines(resolution) + (f"\n{gap_table(gaps)}" if gaps else ""))
    plot(rows, root / "compare.png")
    log(markdown_table(rows))
    log(f"{ON_VAL}.")
    log(summary)
    for line in resolution:
        log(line)
    log(f"written: {root / 'compare.csv'}, compare.md, {'compare_gaps.csv, ' if gaps else ''}compare.png")
    return Comparison(root, rows, best["strategy"], cheapest["strategy"] if cheapest else None, measure, summary,
                      auto_pick=best["strategy"], auto_reason=reason, gaps=gaps)


def pairwise_gaps(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], int, str]:
    """Every pair of rows (the more accurate on test first): the test accuracy difference and its paired 95%
    bootstrap interval over the same test images, whether it resolves the gap and, where not, about how many test
    images would; the number of test images; and why not, where the runs' test predictions cannot be paired. Rows
    without an interval get one from their test predictions (same seed, same resamples)."""
    from itertools import combinations

    from .intervals import accuracy_interval, images_needed, paired_difference, resolves

    test, why = _aligned(rows, TEST_PREDICTIONS)
    if test is None:
        return [], 0, why
    y, probs = test
    correct = [(p.argmax(1) == y).astype(float) for p in probs]
    for r, c in zip(rows, correct):
        if r.get("test_accuracy_ci95") is None:
            r["test_accuracy_ci95"] = accuracy_interval(c, seed)
    gaps = []
    for i, j in combinations(range(len(rows)), 2):
        a, b = (i, j) if correct[i].mean() >= correct[j].mean() else (j, i)
        d, ci = paired_difference(correct[a], correct[b], seed)
        resolved = resolves(d, ci)
        gaps.append({"a": rows[a]["strategy"], "b": rows[b]["strategy"], "a_test_accuracy": float(correct[a].mean()),
                     "b_test_accuracy": float(correct[b].mean()), "difference": d, "ci95_low": ci[0],
                     "ci95_high": ci[1], "resolved": resolved,
                     "test_images_needed": None if resolved else images_needed(len(y), d, ci[0], 0.0)})
    return gaps, len(y), ""


def gap_lines(gaps: Sequence[dict[str, Any]], n: int, why: str) -> list[str]:
    """What the test split can and cannot tell apart, in words: a warning line per gap it cannot resolve."""
    from .intervals import fmt

    if not gaps:
        return [f"test accuracy gaps between strategies not assessed: {why}"] if why else []

    def gap(g: dict[str, Any]) -> str:
        return f"{g['a']} vs {g['b']}: {g['difference']:+.4f} (95% CI {fmt([g['ci95_low'], g['ci95_high']], sign=True)})"

    open_ = [g for g in gaps if not g["resolved"]]
    lines = [f"test accuracy gaps: seeded paired bootstrap over the same {n} test images (B=1000); a gap whose 95% "
             f"interval includes 0 is one the test split cannot resolve: {len(open_)} of {len(gaps)} pairs"]
    if open_:
        lines.append(f"warning: the test split ({n} images) is too small to resolve {len(open_)} gap(s):")
        for g in open_:
            need = g["test_images_needed"]
            lines.append(f"  {gap(g)}; " + (f"about {need:,} test images would resolve a gap this size" if need else
                                             "the same share of the test images right: no gap to resolve"))
    done = [g for g in gaps if g["resolved"]]
    if done:
        lines.append("resolved by the test split: " + "; ".join(gap(g) for g in done))
    return lines


def _markdown_lines(lines: Sequence[str]) -> str:
    """Console lines as Markdown: indented ones as list items, the others as paragraphs."""
    blocks: list[str] = []
    for line in lines:
        if line.startswith(" ") and blocks and blocks[-1].startswith("- "):
            blocks[-1] += f"\n- {line.strip()}"
        else:
            blocks.append(f"- {line.strip()}" if line.startswith(" ") else line)
    return "".join(f"{b}\n\n" for b in blocks)


def gap_table(gaps: Sequence[dict[str, Any]]) -> str:
    """compare_gaps.csv as a Markdown table."""
    from .intervals import fmt

    lines = ["| a | b | test accuracy a − b | 95% CI (paired) | resolved | test images needed |", "|---|---|---|---|---|---|"]
    for g in gaps:
        lines.append(f"| {g['a']} | {g['b']} | {g['difference']:+.4f} | "
                     f"{fmt([g['ci95_low'], g['ci95_high']], sign=True)} | {'yes' if g['resolved'] else 'no'} | "
                     f"{_fmt(g['test_images_needed'], ',d')} |")
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return name.replace(":", "").replace(" keep=", "-keep-").replace("+", "-")


def choose_on_val(rows: Sequence[dict[str, Any]]) -> tuple[int, str, list[float] | None]:
    """The index of the row `affinage.selection.choose` keeps from the runs' val predictions (cost: wall seconds),
    the reason in words and each row's accuracy on those predictions (None in the fallback). Where a run has no
    usable val_predictions.csv: the highest val accuracy of metrics.json (ties: the lower val loss, then the faster
    run). Test figures never enter."""
    from .selection import Scored, choose

    val, why = _aligned(rows, VAL_PREDICTIONS)
    if val is not None:
        y, probs = val
        c = choose([Scored.from_probs(r["strategy"], p, float(r["trainable_params"] or 0)) for r, p in zip(rows, probs)],
                   y, prefer_cheaper=True, what="strategy")  # the rule auto applies to its candidates
        return c.index, c.reason, [t["val_accuracy"] for t in c.table]

    def key(i: int) -> tuple[float, float, float]:
        r = rows[i]
        acc, loss = r.get("val_accuracy"), r.get("val_loss")
        return (-(acc if _finite(acc) else -1.0), loss if _finite(loss) else math.inf,
                r["wall_seconds"] if _finite(r["wall_seconds"]) else math.inf)

    k = min(range(len(rows)), key=key)
    return k, (f"{rows[k]['strategy']} has the highest val accuracy in metrics.json "
               f"({_fmt(rows[k].get('val_accuracy'), '.4f')}); {why}, so auto's full rule (val log loss where val "
               f"accuracy cannot separate) could not be applied"), None


def read_val_predictions(run_dir: str | os.PathLike[str],
                         name: str = VAL_PREDICTIONS) -> tuple[list[str], list[str], list[str], Any] | None:
    """val_predictions.csv (or test_predictions.csv: `name`) of a run (runfiles owns the format): paths, labels,
    classes (the p:<class> columns' order) and the (n, classes) probabilities; None where the file or its
    probability columns are missing. A cross-validated run's val predictions are its out-of-fold ones."""
    from .runfiles import OOF_PREDICTIONS, read_predictions

    val = read_predictions(run_dir, name) or (read_predictions(run_dir, OOF_PREDICTIONS) if name == VAL_PREDICTIONS
                                              else None)
    if val is None or val.probabilities is None or val.classes is None:
        return None
    return val.paths, val.labels, val.classes, val.probabilities.reshape(len(val.paths), len(val.classes))


def _aligned(rows: Sequence[dict[str, Any]], name: str) -> tuple[tuple[Any, list[Any]] | None, str]:
    """(labels as indices, one probability matrix per row) of each run's `name` (val_predictions.csv or
    test_predictions.csv), all on the same images in the same order and the same class order; or None and why not."""
    import numpy as np

    split = name.split("_")[0]
    read = []
    for r in rows:
        v = read_val_predictions(r.get("run_dir") or "", name)
        if v is None:
            return None, f"run {r['strategy']} has no {name} with probabilities"
        read.append(v)
    paths, labels, classes, _ = read[0]
    index = {p: j for j, p in enumerate(paths)}
    if len(index) != len(paths) or not paths:
        return None, f"{name} of {rows[0]['strategy']} is empty or lists an image twice"
    lookup = {c: j for j, c in enumerate(classes)}
    if any(label not in lookup for label in labels):
        return None, f"{name} of {rows[0]['strategy']} has a label without a probability column"
    y = np.array([lookup[label] for label in labels], dtype=np.int64)
    aligned = []
    for r, (p_paths, p_labels, p_classes, probs) in zip(rows, read):
        if sorted(p_paths) != sorted(paths) or sorted(p_classes) != sorted(classes):
            return None, f"runs {rows[0]['strategy']} and {r['strategy']} were not scored on the same {split} images/classes"
        where = {p: j for j, p in enumerate(p_paths)}
        order = np.array([where[p] for p in paths], dtype=np.int64)
        cols = np.array([p_classes.index(c) for c in classes], dtype=np.int64)
        if [p_labels[j] for j in order] != labels:
            return None, f"runs {rows[0]['strategy']} and {r['strategy']} disagree on {split} labels"
        aligned.append(probs[order][:, cols])
    return (y, aligned), ""


def _val_accuracy(row: dict[str, Any]) -> float | None:
    v = row.get("val_accuracy")
    return float(v) if _finite(v) else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


OLD_TASK_COLUMNS = ("keep", "new_accuracy", "old_accuracy", "forgetting")


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: the old-task ones only in an --init-from comparison (--keep), the folds' std only in a
    cross-validated one (--folds)."""
    cols = list(COLUMNS)
    if any(r.get("test_accuracy_std") is not None for r in rows):
        cols.insert(cols.index("test_accuracy") + 1, "test_accuracy_std")
    if any(r.get("keep") for r in rows):
        return [*cols[:-2], *OLD_TASK_COLUMNS, *cols[-2:]]
    return cols


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in columns(rows) if c not in ("run_dir", "measured_as")]  # measured_as: said under the table
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    formats = {"new_accuracy": ".4f", "old_accuracy": ".4f", "forgetting": "+.4f", "val_accuracy": ".4f", "val_loss": ".4f", "test_accuracy": ".4f", "test_accuracy_std": ".4f", "macro_f1": ".4f", "wall_seconds": ".1f", "samples_per_second": ".1f",
               "peak_memory_mb": ".0f", "energy_kwh": ".3e", "co2_kg": ".3e", "trainable_params": ",d",
               "bytes_downloaded": ",d", "bytes_read": ",d", "transfer_kwh": ".3e"}
    for r in rows:
        lines.append("| " + " | ".join(_ci(r.get(c)) if c == "test_accuracy_ci95" else _fmt(r.get(c), formats.get(c, ""))
                                       for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against wall time; point area proportional to energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energies = [r["energy_kwh"] if _number(r["energy_kwh"]) else 0.0 for r in rows]
    top = max(energies) or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r, e in zip(rows, energies):
        ax.scatter(r["wall_seconds"], r["test_accuracy"], s=40 + 900 * e / top, alpha=0.6)
        ci = r.get("test_accuracy_ci95")
        if ci:
            ax.errorbar(r["wall_seconds"], r["test_accuracy"], yerr=[[r["test_accuracy"] - ci[0]],
                                                                     [ci[1] - r["test_accuracy"]]],
                        fmt="none", ecolor="#555", capsize=3, lw=0.8)
        label = r["strategy"] + (" (auto's pick, on val)" if r.get("auto_pick") else "")
        ax.annotate(label, (r["wall_seconds"], r["test_accuracy"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (bars: 95% CI)")
    ax.set_title("strategies: accuracy vs time (point area ~ energy)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> None:
    """The rows as CSV (intervals as JSON lists: `[0.962, 0.991]`)."""
    from .data import PATH_ERRORS

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields or columns(rows)), extrasaction="ignore")
        w.writeheader()
        w.writerows([{k: [round(x, 6) for x in v] if isinstance(v, list) else v for k, v in r.items()} for r in rows])


def _ci(ci: Sequence[float] | None) -> str:
    from .intervals import fmt

    return fmt(ci) if ci else "—"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not spec:
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
