"""The run directory: the one module that reads and writes its files.

    RUN/
      config.yaml            TrainConfig, whole (write_config / read_config)
      splits/{train,val,test}.csv   path,label,group,sha per split (data.write_split_lists / read_split_lists)
      skipped_files.csv      path,reason of every file in no split
      leaks.csv              duplicate pairs across splits
      model/model.json       ModelInfo: format_version, backbone spec, preprocessing, heads (label spaces), ...
      model/model.safetensors  the whole model's state dict (backbone.*, heads.<task>.*)
      model/adapter/         LoRA runs: peft's own adapter folder
      history.json / .csv    one row per epoch of every phase
      metrics.json           METRICS_SCHEMA below
      test_predictions.csv   path,sha,label,predicted,probability,p:<class>... (the full probability vector)
      test_predictions-<task>.csv   the same for every task but the first (several --task), over its known labels
      report.html            written by affinage.report
      checkpoint/            while training only (affinage.train); removed when the run is complete

A cross-validation (`--folds K`, affinage.crossval) writes a directory of runs instead:

    RUN/
      config.yaml            the TrainConfig, folds included
      skipped_files.csv      as above
      folds/folds.csv        path,label,group,sha,fold: the fold whose test split holds each image (0: trains in
                             every fold, never tested: its class has one image)  (write_fold_assignment)
      folds/lists/fold-K/splits/{train,val,test,excluded}.csv   fold K's split lists (test = fold K)
      folds/fold-K/          fold K's child run, a complete run directory made from those lists
      folds/fold-K-prototype/  few-shot: the prototype classifier's child run of fold K
      final/                 the final model (on a given test split, or --refit on): a complete run directory
      oof_predictions.csv    the out-of-fold prediction of every tested image: the test_predictions.csv columns
                             with `fold` after `label`
      metrics.json           CV_METRICS_SCHEMA

`format_version` 2 is written by this release; version 1 (no `format_version`: runs of affinage 0.1 before it)
is still read: its single `head.*` becomes the head of task `label`.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .data import PATH_ERRORS, Preprocessing
from .errors import AffinageError
from .labels import DEFAULT_TASK, LabelSpace
from .storage import atomic_path, read_json, write_json, write_text

FORMAT_VERSION = 2
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"  # affinage.train writes its checkpoints here
PROBABILITY_PREFIX = "p:"

# metrics.json, format_version 2. Keys marked * are always present; the others where they apply.
METRICS_SCHEMA: dict[str, str] = {
    "format_version*": "int, 2",
    "strategy*": "the strategy that trained the saved model (auto: the one it chose)",
    "strategy_reason*": "why (auto: the evidence in words)",
    "strategy_evidence": "auto: the numbers behind the choice",
    "task*": "the task name of the head evaluated below (single-label data: 'label')",
    "test*": "classification_metrics on the test split: n, accuracy, top5_accuracy (>5 classes), macro/weighted "
             "precision, recall, f1, per_class {class: precision, recall, f1, specificity, support}, "
             "confusion_matrix, classes; ci95 {accuracy, macro_f1, top5_accuracy (>5 classes), every figure a "
             "target names (e.g. recall[tulip]): [lo, hi], method} (affinage.intervals: seeded 95% bootstrap)",
    "val*": "{accuracy: best val accuracy over all epochs, kept_epoch, kept_phase}",
    "diverged*": "null, or why training stopped on a NaN/inf loss",
    "hyperparameters*": "the effective hyper-parameters (the strategy's defaults filled in)",
    "data*": "source, classes, split (how the splits were made), counts per split and class, skipped",
    "model*": "backbone, num_features, num_blocks, params, trainable_params, preprocessing, inference_precision, "
              "feature_runtime (runtime.py: torch or onnx, why, check and img/s figures)",
    "timing*": "wall_seconds and the seconds of each stage; throughputs; peak_memory_mb",
    "environment*": "device, threads, platform, library versions",
    "distributed*": "{world_size: processes that trained the run}",
    "calibration*": "expected calibration error and reliability bins on test",
    "groups": "per-group metrics when the data has a group column; each group's ci95 of its accuracy, and "
              "accuracy_gap_ci95",
    "old_task": "--init-from: source, n_classes, keep, measured; with --old-data accuracy_before, accuracy_after, "
                "forgetting (before - after on the old data's test split), per_class recall before/after; else reason",
    "new_task": "--init-from: n and accuracy on the new data's test images (all classes competing)",
    "tasks": "several --task: {task: its full test block (as test), unknown, classes, masked {reason: labels}, "
             "masked_classes {reason: {class: labels}}, groups}; test is the first task's",
    "leaks*": "pairs, exact, near, dropped, label_conflicts",
    "targets*": "each --target with its value and passed; ci95 and established (the interval's bound on the "
                "passing side passes too), images_needed where passed but not established",
    "diagnosis*": "learning-curve findings",
    "footprint*": "energy_kwh, co2_kg, water_l, country, method; bytes_downloaded (hub caches before/after), bytes_read "
                  "(image files), transfer_kwh / transfer_co2_kg (0.06 kWh/GB), total_energy_kwh, total_co2_kg",
    "audit": "--audit: label_issues, image_issues {check: n}, duplicate_clusters, outliers, imbalance_ratio, warnings, "
             "seconds, files (RUN/audit/: audit.html, label_issues.csv, image_issues.csv, duplicates.csv, audit.json)",
    "balance": "--balance weights|sampler: mode, class_weights {class: n / (k n_c)}, how",
}


# metrics.json of a cross-validation (affinage.crossval)
CV_METRICS_SCHEMA: dict[str, str] = {
    "format_version*": "int, 2",
    "cv*": "k, strategy, source (the figures come from cross-validation), folds (how they were made), per_fold "
           "(each fold's test figures, timing and run_dir), <metric>_mean and <metric>_std (sample std, ddof=1) of "
           "every headline metric, oof (classification figures of the pooled out-of-fold predictions, accuracy_ci95 "
           "and its width), not_evaluated, few_shot (the prototype vs the strategy on the folds, chosen and why), "
           "final (the final model's run and its test figures, where there is one)",
    "data*": "source, classes, counts, skipped",
    "timing*": "wall_seconds, decode_seconds and feature_seconds of the shared decoding and features",
    "footprint*": "the child runs' energy_kwh, co2_kg and water_l, summed",
}
OOF_PREDICTIONS = "oof_predictions.csv"
FOLD_ASSIGNMENT = Path("folds") / "folds.csv"


# ----------------------------------------------------------------------------------------------
# The directory itself
# ----------------------------------------------------------------------------------------------
def prepare_run_dir(out: str | os.PathLike[str] | None, strategy: str) -> Path:
    """A new, empty run directory; an existing run is never overwritten."""
    if out is None:
        out = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{strategy.replace(':', '')}"
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AffinageError(f"run directory '{path}' already exists and is not empty",
                            "choose a new --out, or move the old run away (affinage never overwrites a run)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_run_dir(out: str | os.PathLike[str] | None, config: dict[str, Any],
                   normalise: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> Path:
    """`--resume`: the run directory of an interrupted run made with the same config (`normalise` fills in the
    saved config's defaults), holding a checkpoint."""
    if out is None:
        raise AffinageError("--resume needs the run directory to continue", "pass --out RUN, the interrupted run's directory")
    path = Path(out)
    if not (path / "config.yaml").is_file():
        raise AffinageError(f"'{path}' is not an affinage run directory (no config.yaml), so it cannot be resumed",
                            "pass the --out of the interrupted run, or drop --resume to start a new run")
    saved = normalise(read_config(path))
    changed = [k for k in config if k != "resume" and saved.get(k) != config[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} in the run, {config[k]!r} now" for k in changed)
        raise AffinageError(f"--resume with options that differ from the interrupted run's config.yaml ({diffs})",
                            f"resume with the same options as {path / 'config.yaml'}, or drop --resume and use a new --out")
    if not any((path / CHECKPOINT_DIR).glob("*.pt")):
        if is_finished(path):
            raise AffinageError(f"run '{path}' has already finished; there is nothing to resume",
                                "use it as it is (affinage predict/eval), or train again with a new --out")
        raise AffinageError(f"run '{path}' has no checkpoint to resume from (it stopped before its first epoch ended)",
                            "start it again: remove that directory or choose a new --out, without --resume")
    return path


def is_finished(path: str | os.PathLike[str]) -> bool:
    root = Path(path)
    return (root / MODEL_DIR / "model.json").is_file() and (root / "metrics.json").is_file()


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A finished run directory (or its model/ folder) that can be the starting model of another run."""
    root = Path(path)
    return (root / MODEL_DIR / "model.json").is_file() or (
        (root / "model.json").is_file() and (root / "model.safetensors").is_file())


def remove_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete: model/ and history suffice


# ----------------------------------------------------------------------------------------------
# config.yaml
# ----------------------------------------------------------------------------------------------
def write_config(run_dir: Path, config_yaml: str) -> None:
    write_text(run_dir / "config.yaml", config_yaml)


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.yaml as a dict ({} when the run has none)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise AffinageError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]})",
                            "restore the run's config.yaml, or retrain") from None
    if not isinstance(values, dict):
        raise AffinageError(f"'{path}' does not hold a mapping of options", "restore the run's config.yaml, or retrain")
    return values


# ----------------------------------------------------------------------------------------------
# model/: model.json + model.safetensors
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadInfo:
    """One task's head: its label space and its shape (linear, or an MLP with `hidden` units)."""

    labels: LabelSpace
    hidden: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels.to_dict(), "hidden": self.hidden}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadInfo:
        return cls(LabelSpace.from_dict(d["labels"]), d.get("hidden"))


@dataclass(frozen=True)
class ModelInfo:
    """model.json: everything that rebuilds the saved model and says how it is evaluated."""

    backbone: dict[str, Any]  # BackboneSpec.to_dict()
    preprocessing: Preprocessing
    heads: dict[str, HeadInfo]
    strategy: str
    inference: str = "fp32"  # fp32 | bf16 | fp16: the autocast dtype used at test time
    evaluated_on: str = "pixels"  # "features": the head applied to the cached frozen features (frozen backbones)
    task: str = DEFAULT_TASK  # the task whose head `forward` returns
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> LabelSpace:
        return self.heads[self.task].labels

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "backbone": self.backbone,
                "preprocessing": self.preprocessing.to_dict(), "task": self.task,
                "heads": {name: h.to_dict() for name, h in self.heads.items()},
                "strategy": self.strategy, "inference": self.inference, "evaluated_on": self.evaluated_on,
                # for tools that read model.json directly (HF-style label map of the default task)
                "classes": self.classes, "id2label": {str(i): c for i, c in enumerate(self.classes)},
                **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model.json") -> ModelInfo:
        try:
            version = int(d.get("format_version", 1))
            if version > FORMAT_VERSION:
                raise AffinageError(f"'{where}' was written by a newer affinage (format {version}; this one reads "
                                    f"up to {FORMAT_VERSION})", "upgrade affinage: pip install -U affinage")
            pp = Preprocessing.from_dict(d["preprocessing"])
            if version == 1:  # one head, `classes` + `head_hidden`, the strategy says how it was evaluated
                strategy = d.get("strategy", "full")
                labels = LabelSpace(DEFAULT_TASK, tuple(d["classes"]), "train split (format 1 run)")
                return cls(d["backbone"], pp, {DEFAULT_TASK: HeadInfo(labels, d.get("head_hidden"))}, strategy,
                           d.get("inference", "fp32"), "features" if strategy in ("linear-probe", "head") else "pixels",
                           DEFAULT_TASK, 1)
            heads = {name: HeadInfo.from_dict(h) for name, h in d["heads"].items()}
            task = d["task"]
            if task not in heads:
                raise AffinageError(f"'{where}' names task '{task}' but has no head for it", "retrain the run")
            return cls(d["backbone"], pp, heads, d["strategy"], d["inference"], d["evaluated_on"], task, version,
                       d.get("extra") or {})
        except KeyError as exc:
            raise AffinageError(f"'{where}' is missing the field {exc}", "the run's model files are damaged: retrain") from None


def model_folder(path: str | os.PathLike[str]) -> Path:
    """RUN/model for a run directory, or the folder itself when it is a model/ folder."""
    root = Path(path)
    return root if (root / "model.json").is_file() and not (root / MODEL_DIR / "model.json").is_file() else root / MODEL_DIR


def write_model(run_dir: Path, state: dict[str, Any], info: ModelInfo) -> None:
    """model/: the whole model's state dict (safetensors, written first) and what rebuilds it (model.json, last)."""
    from safetensors.torch import save_file

    folder = run_dir / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "affinage",
                                             "format_version": str(FORMAT_VERSION)})
    write_json(folder / "model.json", info.to_dict())


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The ModelInfo of a run directory (or of its model/ folder), any format version."""
    folder = model_folder(path)
    info_path = folder / "model.json"
    if not info_path.is_file():
        raise AffinageError(f"'{path}' is not a finished affinage run (no {MODEL_DIR}/model.json)",
                            "pass the --out directory of a completed `affinage train`")
    try:
        raw = read_json(info_path)
    except ValueError as exc:
        raise AffinageError(f"'{info_path}' is not valid JSON ({exc})", "the run's model files are damaged: retrain") from None
    return ModelInfo.from_dict(raw, str(info_path))


def load_state(path: str | os.PathLike[str], info: ModelInfo) -> dict[str, Any]:
    """The saved state dict under this release's names (format 1's `head.*` -> `heads.<task>.*`)."""
    from safetensors.torch import load_file

    weights = model_folder(path) / "model.safetensors"
    if not weights.is_file():
        raise AffinageError(f"'{weights}' is missing", "the run's model files are incomplete: retrain")
    state = load_file(str(weights))
    if info.format_version == 1:
        state = {(f"heads.{info.task}." + k[5:] if k.startswith("head.") else k): v for k, v in state.items()}
    return state


def save_adapter(run_dir: Path, module: Any) -> None:
    """peft's own adapter folder (adapter_config.json + adapter_model.safetensors, head included), written to a
    temporary folder and renamed into place."""
    target = run_dir / MODEL_DIR / "adapter"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
    try:
        module.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# metrics.json, history
# ----------------------------------------------------------------------------------------------
def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / "metrics.json", {"format_version": FORMAT_VERSION, **metrics})


def read_metrics(run_dir: str | os.PathLike[str], required: bool = False) -> dict[str, Any]:
    """metrics.json ({} when absent, unless `required`). Format 1 files read as they are."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        if required:
            raise AffinageError(f"'{run_dir}' has no metrics.json: not a finished affinage run",
                                "pass the --out directory of a completed `affinage train`")
        return {}
    try:
        metrics = read_json(path)
    except ValueError as exc:
        raise AffinageError(f"'{path}' is not valid JSON ({exc})", "the run is damaged: retrain") from None
    if int(metrics.get("format_version", 1)) > FORMAT_VERSION:
        raise AffinageError(f"'{path}' was written by a newer affinage (format {metrics['format_version']})",
                            "upgrade affinage: pip install -U affinage")
    return metrics


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / "history.json", history)
    if not history:
        return
    with atomic_path(run_dir / "history.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / "history.json"
    return read_json(path) if path.is_file() else []


# ----------------------------------------------------------------------------------------------
# test_predictions.csv
# ----------------------------------------------------------------------------------------------
def write_predictions(path: Path, keys: Sequence[str], hashes: Sequence[str], labels: Sequence[str],
                      probabilities: np.ndarray, classes: Sequence[str], folds: Sequence[int] | None = None) -> None:
    """One row per test image: path, content hash, true label, (`folds`: the fold that tested it), top-1 and its
    probability, then the full probability vector (one `p:<class>` column per class, in the label space's order)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.writer(fh)
        w.writerow(["path", "sha", "label", *(["fold"] if folds is not None else []), "predicted", "probability",
                    *(PROBABILITY_PREFIX + c for c in classes)])
        fold_of = list(folds) if folds is not None else None
        for k, (key, sha, label, row) in enumerate(zip(keys, hashes, labels, probabilities)):
            j = int(row.argmax())
            w.writerow([key, sha, label, *([fold_of[k]] if fold_of is not None else []), classes[j], f"{row[j]:.6f}",
                        *(f"{p:.6g}" for p in row)])


@dataclass
class Predictions:
    """test_predictions.csv read back: rows in file order; `probabilities` is None for format-1 files."""

    paths: list[str]
    hashes: list[str | None]
    labels: list[str]
    predicted: list[str]
    confidence: np.ndarray
    classes: list[str] | None
    probabilities: np.ndarray | None
    folds: list[int] | None = None  # oof_predictions.csv: the fold that tested each image


def read_predictions(run_dir: str | os.PathLike[str], name: str = "test_predictions.csv") -> Predictions | None:
    """test_predictions.csv (or val_predictions.csv, same format) of a run; None where the file is missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = list(reader)
    col = {name: i for i, name in enumerate(header)}
    prob_cols = [i for i, name in enumerate(header) if name.startswith(PROBABILITY_PREFIX)]
    classes = [header[i][len(PROBABILITY_PREFIX):] for i in prob_cols] or None
    return Predictions([r[col["path"]] for r in rows],
                       [r[col["sha"]] for r in rows] if "sha" in col else [None] * len(rows),
                       [r[col["label"]] for r in rows], [r[col["predicted"]] for r in rows],
                       np.array([float(r[col["probability"]]) for r in rows]), classes,
                       np.array([[float(r[i]) for i in prob_cols] for r in rows]) if prob_cols else None,
                       [int(r[col["fold"]]) for r in rows] if "fold" in col else None)


# ----------------------------------------------------------------------------------------------
# Cross-validation: folds/folds.csv
# ----------------------------------------------------------------------------------------------
FOLD_COLUMNS = ["path", "label", "group", "sha", "fold"]


def write_fold_assignment(run_dir: Path, keys: Sequence[str], labels: Sequence[str], groups: Sequence[str | None],
                          hashes: Sequence[str], folds: Sequence[int]) -> None:
    """folds/folds.csv: every cross-validated image and the fold whose test split holds it (0: in none)."""
    path = run_dir / FOLD_ASSIGNMENT
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.writer(fh)
        w.writerow(FOLD_COLUMNS)
        w.writerows([key, label, group or "", sha, fold] for key, label, group, sha, fold
                    in zip(keys, labels, groups, hashes, folds))


def read_fold_assignment(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """folds/folds.csv as rows {path, label, group, sha, fold (int)}."""
    path = Path(run_dir) / FOLD_ASSIGNMENT
    if not path.is_file():
        raise AffinageError(f"'{run_dir}' has no {FOLD_ASSIGNMENT}: not a cross-validation run",
                            "pass the --out directory of `affinage train --folds K`")
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        return [{**row, "fold": int(row["fold"])} for row in csv.DictReader(fh)]
