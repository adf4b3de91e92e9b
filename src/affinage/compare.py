"""`affinage compare`: every strategy on the same data, split and seed, side by side (accuracy x time x
energy), and the cheapest one that meets the targets.

Each strategy runs as its own `affinage train` process, so its wall time, peak memory and energy are its
own (not inflated by what earlier strategies left in memory), and every run is a complete run directory.
Each also runs cold, with its own empty cache (AFFINAGE_CACHE_DIR, removed after the run): it decodes the images
and extracts the frozen features itself, as it would alone. Sharing one cache would time every strategy after the
first on the work the runs before it did, and "cheapest" would then favour whichever ran later.
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

from .config import COMPARE_STRATEGIES, check_strategy
from .errors import AffinageError
from .runfiles import read_metrics
from .storage import atomic_path, write_text

DEFAULT_STRATEGIES = COMPARE_STRATEGIES
COLUMNS = ("strategy", "test_accuracy", "macro_f1", "trainable_params", "wall_seconds", "samples_per_second",
           "peak_memory_mb", "energy_kwh", "co2_kg", "targets_met", "features_cached", "measured_as", "run_dir")
COLD = "cold run (own empty cache: decoding and feature extraction included)"


@dataclass
class Comparison:
    path: Path
    rows: list[dict[str, Any]]
    best: str
    cheapest: str | None  # the cheapest strategy meeting the targets (None: none does)
    cost_measure: str  # "energy_kwh" or "wall_seconds"
    summary: str


def _say(msg: str) -> None:
    print(msg, flush=True)


def compare(data: str, model: str = "efficientnet_lite0", strategies: Sequence[str] = DEFAULT_STRATEGIES,
            out: str | os.PathLike[str] | None = None, targets: Sequence[str] = (), seed: int = 0,
            train_args: Sequence[str] = (), progress: bool = True, log: Callable[[str], None] = _say) -> Comparison:
    """Run `strategies` on one split (the first run makes it, the others reuse its split lists) and write
    compare.csv, compare.md and compare.png in `out`. `train_args` are extra `affinage train` options."""
    from .run import prepare_run_dir

    names = [check_strategy(s) for s in strategies]
    if len(set(names)) != len(names):
        raise AffinageError(f"strategy listed twice in '{','.join(strategies)}'", "list each strategy once")
    if not names:
        raise AffinageError("no strategy to compare", f"pass e.g. --strategies {','.join(DEFAULT_STRATEGIES)}")
    root = prepare_run_dir(out, "compare")
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    for k, name in enumerate(names):
        run_dir = root / "runs" / name.replace(":", "")
        cmd = [sys.executable, "-m", "affinage.cli", "train", "--data", data, "--model", model, "--strategy", name,
               "--out", str(run_dir), "--seed", str(seed), *train_args]
        for t in targets:
            cmd += ["--target", t]
        if first is not None:
            cmd += ["--splits-from", str(first)]
        if not progress:
            cmd.append("--quiet")
        log(f"[{k + 1}/{len(names)}] {name}: {' '.join(cmd[3:])}")
        cache = root / "cache" / name.replace(":", "")
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
        write_text(root / "runs" / f"{name.replace(':', '')}.log", proc.stdout)
        if proc.returncode != 0 or not (run_dir / "metrics.json").exists():
            last = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["no output"]
            raise AffinageError(f"strategy {name} failed: {last[0]}",
                                f"see {root / 'runs' / (name.replace(':', '') + '.log')}")
        first = first or run_dir
        rows.append(row_from_run(name, run_dir, wall))
        r = rows[-1]
        log(f"    test accuracy {r['test_accuracy']:.4f}, {r['wall_seconds']:.0f}s, "
            f"{_fmt(r['energy_kwh'], '.2e')} kWh, peak {_fmt(r['peak_memory_mb'], '.0f')} MB")
    return finish(root, rows, targets, log)


def row_from_run(strategy: str, run_dir: Path, process_seconds: float) -> dict[str, Any]:
    """One table row from a finished run directory."""
    m = read_metrics(run_dir, required=True)
    timing, footprint = m.get("timing", {}), m.get("footprint") or {}
    checks = m.get("targets") or []
    return {
        "strategy": m.get("strategy", strategy),
        "test_accuracy": m["test"]["accuracy"],
        "macro_f1": m["test"]["macro_f1"],
        "trainable_params": m["model"]["trainable_params"],
        "wall_seconds": round(process_seconds, 2),  # the whole `affinage train` process, start-up included
        "samples_per_second": timing.get("train_samples_per_second"),
        "peak_memory_mb": timing.get("peak_memory_mb"),
        "energy_kwh": footprint.get("energy_kwh"),
        "co2_kg": footprint.get("co2_kg"),
        "targets_met": all(c.get("passed") for c in checks) if checks else None,
        "features_cached": timing.get("features_cached"),
        "measured_as": COLD,
        "run_dir": str(run_dir),
    }


def finish(root: Path, rows: list[dict[str, Any]], targets: Sequence[str],
           log: Callable[[str], None] = _say) -> Comparison:
    """Pick the best and the cheapest adequate strategy; write the CSV, Markdown and PNG."""
    best = max(rows, key=lambda r: (r["test_accuracy"], r["macro_f1"]))
    measure = "energy_kwh" if all(_number(r["energy_kwh"]) for r in rows) else "wall_seconds"
    if targets:
        adequate = [r for r in rows if r["targets_met"]]
        rule = f"meets {' and '.join(targets)}"
    else:  # no stated target: within one point of the best accuracy
        adequate = [r for r in rows if r["test_accuracy"] >= best["test_accuracy"] - 0.01]
        rule = f"is within 0.01 of the best test accuracy ({best['test_accuracy']:.4f})"
    cheapest = min(adequate, key=lambda r: r[measure]) if adequate else None
    unit = "kWh" if measure == "energy_kwh" else "s"
    if cheapest is not None:
        summary = (f"cheapest strategy that {rule}: {cheapest['strategy']} (test accuracy "
                   f"{cheapest['test_accuracy']:.4f}, {cheapest[measure]:.3g} {unit}); best: {best['strategy']} "
                   f"({best['test_accuracy']:.4f})")
    else:
        summary = f"no strategy {rule}; best: {best['strategy']} ({best['test_accuracy']:.4f})"
    _write_csv(root / "compare.csv", rows)
    write_text(root / "compare.md", markdown_table(rows) + f"\nEvery row is a {COLD}, so wall times and energies "
               f"compare.\n\n{summary}\n")
    plot(rows, root / "compare.png")
    log(markdown_table(rows))
    log(summary)
    log(f"written: {root / 'compare.csv'}, compare.md, compare.png")
    return Comparison(root, rows, best["strategy"], cheapest["strategy"] if cheapest else None, measure, summary)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if c not in ("run_dir", "measured_as")]  # measured_as: said once, under the table
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    formats = {"test_accuracy": ".4f", "macro_f1": ".4f", "wall_seconds": ".1f", "samples_per_second": ".1f",
               "peak_memory_mb": ".0f", "energy_kwh": ".3e", "co2_kg": ".3e", "trainable_params": ",d"}
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], formats.get(c, "")) for c in cols) + " |")
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
        ax.annotate(r["strategy"], (r["wall_seconds"], r["test_accuracy"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("strategies: accuracy vs time (point area ~ energy)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from .data import PATH_ERRORS

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)


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
