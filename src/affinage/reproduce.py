"""`affinage reproduce RUN`: re-run a run from its directory alone (config.yaml + split lists) into a sibling
directory and compare every deterministic figure. On CPU the test metrics are bit-identical."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import PATH_ERRORS
from .errors import AffinageError
from .runfiles import read_config, read_history, read_metrics

IGNORED_HISTORY_KEYS = {"seconds"}  # wall-clock time per epoch is the only non-deterministic history column
MAX_LISTED = 20


def reproduce(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train again with the run's saved config, seed and split lists; {"identical", "differences", "out"}."""

    from .run import Run, finetune

    root = Path(run_dir)
    original = Run.load(root)  # refuses a directory that is not a finished run
    if not (root / "config.yaml").exists() or not (root / "splits").is_dir():
        raise AffinageError(f"run '{root}' has no config.yaml or splits/ folder, so it cannot be reproduced",
                            "reproduce a run written by `affinage train`")
    cfg = TrainConfig.from_dict(read_config(root))
    if cfg.data != "digits" and not cfg.data.startswith("hf:") and not Path(cfg.data).expanduser().exists():
        raise AffinageError(f"the run's data '{cfg.data}' (config.yaml) is not found from {Path.cwd()}",
                            "run `affinage reproduce` from the folder the original run was started in (a relative "
                            "data path is relative to it), or put the data back")
    out_path = Path(out) if out is not None else root.with_name(f"{root.name}-reproduce-{datetime.now():%Y%m%d-%H%M%S}")
    options = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "model", "strategy")}
    options.update(splits_from=str(root), resume=False, models=[])  # config.yaml names the backbone --models chose
    strategy = cfg.strategy
    if strategy == "auto":  # the search depends on the wall clock; its result does not: replay the winner
        strategy, hp = original.metrics["strategy"], original.metrics.get("hyperparameters", {})
        options.update(candidates=[], budget=None, budget_factor=None)
        if hp.get("epochs_shortened_from"):  # the budget gave it fewer epochs than its defaults
            options["epochs"] = hp["epochs"]
    env = original.metrics.get("environment", {})
    threads = _same_threads(env.get("cpu_threads"))
    try:
        kwargs: dict[str, Any] = {} if log is None else {"log": log}
        rerun = finetune(data=cfg.data, model=cfg.model, strategy=strategy, out=out_path, progress=progress,
                         **kwargs, **options)
    finally:
        _restore_threads(threads)
    differences = compare_runs(root, rerun.path)
    return {"identical": not differences, "differences": differences, "out": str(rerun.path),
            "hardware": _hardware_note(env, rerun.metrics.get("environment", {}))}


def compare_runs(a: Path, b: Path) -> list[str]:
    """Every figure that differs between two run directories: data (split content hashes), test metrics,
    per-epoch history, groups and targets. Timings and the footprint are expected to differ and are skipped."""
    diffs: list[str] = []
    for split in ("train", "val", "test"):
        ha, hb = _split_hashes(a / "splits" / f"{split}.csv"), _split_hashes(b / "splits" / f"{split}.csv")
        if ha != hb:
            changed = sum(1 for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
            diffs.append(f"data: {changed} image(s) of the {split} split differ (path or content hash)")
    ma, mb = read_metrics(a, required=True), read_metrics(b, required=True)
    for key in ("test", "val", "groups", "targets", "calibration"):
        diffs += _diff(ma.get(key), mb.get(key), key)
    ha, hb = _history(a), _history(b)
    if len(ha) != len(hb):
        diffs.append(f"history: {len(ha)} epochs -> {len(hb)} epochs")
    for k, (ra, rb) in enumerate(zip(ha, hb)):
        diffs += _diff(ra, rb, f"history[{k}] ({ra.get('phase')} epoch {ra.get('epoch')})")
    return diffs[:MAX_LISTED] + ([f"... and {len(diffs) - MAX_LISTED} more"] if len(diffs) > MAX_LISTED else [])


def _diff(x: Any, y: Any, where: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in list(x) + [k for k in y if k not in x]:
            out += _diff(x.get(k), y.get(k), f"{where}.{k}")
        return out
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        out = []
        for k, (u, v) in enumerate(zip(x, y)):
            out += _diff(u, v, f"{where}[{k}]")
        return out
    same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
    return [] if same else [f"{where}: {x!r} -> {y!r}"]


def _history(run: Path) -> list[dict[str, Any]]:
    rows = read_history(run)
    return [{k: v for k, v in r.items() if k not in IGNORED_HISTORY_KEYS} for r in rows]


def _split_hashes(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:  # file names need not be UTF-8
        return {row["path"]: row.get("sha", "") for row in csv.DictReader(fh)}


def _same_threads(threads: Any) -> int | None:
    """CPU reductions depend on the thread count: use the original run's, when this machine has that many."""
    import torch

    before = torch.get_num_threads()
    if isinstance(threads, int) and 1 <= threads <= (os.cpu_count() or 1) and threads != before:
        torch.set_num_threads(threads)
        return before
    return None


def _restore_threads(before: int | None) -> None:
    if before is not None:
        import torch

        torch.set_num_threads(before)


def _hardware_note(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs between the original and the rerun environment (only keys both runs recorded)."""
    changed = [f"{k}: {a[k]} -> {b[k]}" for k in ("device", "cpu_threads", "cpu_model", "gpu") if k in a and k in b
               and a[k] != b[k]]
    va, vb = a.get("versions", {}), b.get("versions", {})
    changed += [f"{k} {va[k]} -> {vb[k]}" for k in va if k in vb and va[k] != vb[k]]
    return "same hardware and library versions" if not changed else "differs: " + "; ".join(changed)
