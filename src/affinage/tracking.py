"""`--report-to tensorboard|mlflow`: a finished run logged to the experiment trackers people already keep.

What is logged comes from the run directory alone (history.json, metrics.json, config.yaml), after it is
complete, so every tracker holds exactly the figures of metrics.json: per-epoch train/val loss and accuracy and
the LR (step = the row of history.json, 1-based, across phases), the resolved config as parameters, the final
test figures, the footprint, and (MLflow) the model folder, report.html, metrics.json and config.yaml as
artifacts. TensorBoard writes event files under RUN/tensorboard (float32 scalars, TensorBoard's format); MLflow
logs to $MLFLOW_TRACKING_URI when set, else to a local store beside the runs (`<parent>/mlruns.db`, artifacts in
`<parent>/mlartifacts`). Where each run went is written to RUN/tracking.json.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import AffinageError
from .runfiles import read_config, read_history, read_metrics
from .storage import write_json

TRACKERS = ("tensorboard", "mlflow")
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # history.json columns logged per epoch
TRACKING_FILE = "tracking.json"
EXPERIMENT = "affinage"  # the MLflow experiment, unless $MLFLOW_EXPERIMENT_NAME names another
LOCAL_STORE = "mlruns.db"
LOCAL_ARTIFACTS = "mlartifacts"


def check_trackers(report_to: Sequence[str]) -> None:
    """Refuse a tracker whose library is missing before anything slow runs (the extra to install named)."""
    for name in report_to:
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise AffinageError(f"--report-to {name} needs the optional package '{name}'",
                                "pip install 'affinage[tracking]' (tensorboard and mlflow)")


def log_run(run_dir: str | os.PathLike[str], report_to: Sequence[str],
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Log a finished run directory to every tracker of `report_to`; returns (and saves) where each run went."""
    root = Path(run_dir)
    check_trackers(report_to)
    facts = RunFacts.read(root)
    where: dict[str, Any] = {}
    try:
        if "tensorboard" in report_to:
            where["tensorboard"] = log_tensorboard(root, facts)
            log(f"tensorboard: {len(facts.history)} history rows -> {where['tensorboard']['logdir']} "
                f"(tensorboard --logdir {where['tensorboard']['logdir']})")
        if "mlflow" in report_to:
            where["mlflow"] = _failing_as_one_line(root, "mlflow", lambda: log_mlflow(root, facts))
            log(f"mlflow: run {where['mlflow']['run_id']} in experiment '{where['mlflow']['experiment']}' at "
                f"{where['mlflow']['tracking_uri']}")
    finally:
        if where:
            write_json(root / TRACKING_FILE, where)
    return where


def _failing_as_one_line(root: Path, tracker: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A tracker that cannot be reached (server down, bad URI) fails with one line; the run itself is complete."""
    try:
        return call()
    except AffinageError:
        raise
    except Exception as exc:  # MlflowException, connection errors after the client's retries
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise AffinageError(f"the run in '{root}' is complete, but logging it to {tracker} failed "
                            f"({type(exc).__name__}: {first})",
                            f"check {'MLFLOW_TRACKING_URI' if tracker == 'mlflow' else 'the tracker'}, then "
                            f"`affinage track {root} --report-to {tracker}`") from None


class RunFacts:
    """The numbers a tracker gets, read from the run directory."""

    def __init__(self, config: dict[str, Any], history: list[dict[str, Any]], metrics: dict[str, Any]):
        self.config, self.history, self.metrics = config, history, metrics

    @classmethod
    def read(cls, root: Path) -> RunFacts:
        return cls(read_config(root), read_history(root), read_metrics(root, required=True))

    def curves(self) -> list[tuple[int, str, float]]:
        """(step, name, value) of every per-epoch figure; step = the history row, 1-based."""
        return [(step, name, float(row[name])) for step, row in enumerate(self.history, start=1)
                for name in CURVES if _number(row.get(name))]

    def finals(self) -> dict[str, float]:
        """test_<figure> for the test block's numbers, footprint_<figure> for the footprint's, wall_seconds."""
        out = {f"test_{k}": float(v) for k, v in self.metrics.get("test", {}).items() if _number(v)}
        out.update({f"footprint_{k}": float(v) for k, v in (self.metrics.get("footprint") or {}).items() if _number(v)})
        wall = self.metrics.get("timing", {}).get("wall_seconds")
        if _number(wall):
            out["wall_seconds"] = float(wall)
        return out

    def params(self) -> dict[str, str]:
        """The resolved config as strings (lists and mappings as JSON), plus the strategy the run kept."""
        out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.config.items()}
        out["kept_strategy"] = str(self.metrics.get("strategy"))
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_tensorboard(root: Path, facts: RunFacts) -> dict[str, Any]:
    """Event files under RUN/tensorboard: scalars `train/loss`, `val/accuracy`, `lr`, `test/accuracy`, ...; the
    config and the footprint as text."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise AffinageError("--report-to tensorboard needs the optional package 'tensorboard'",
                            "pip install 'affinage[tracking]'") from exc
    logdir = root / "tensorboard"
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for step, name, value in facts.curves():
            writer.add_scalar(tensorboard_tag(name), value, step)
        last = max(len(facts.history), 1)
        for name, value in facts.finals().items():
            writer.add_scalar(tensorboard_tag(name), value, last)
        writer.add_text("config", "```\n" + json.dumps(facts.config, indent=1) + "\n```", last)
        writer.add_text("footprint", "```\n" + json.dumps(facts.metrics.get("footprint"), indent=1) + "\n```", last)
    finally:
        writer.close()
    return {"logdir": str(logdir)}


def tensorboard_tag(name: str) -> str:
    """`train_loss` -> `train/loss`, `test_macro_f1` -> `test/macro_f1`, `lr` -> `lr` (TensorBoard groups by prefix)."""
    head, _, rest = name.partition("_")
    return f"{head}/{rest}" if rest and head in ("train", "val", "test", "footprint") else name


def mlflow_location(root: Path) -> tuple[str, str | None]:
    """($MLFLOW_TRACKING_URI, None), or the local store beside the runs and its artifact folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    parent = root.resolve().parent
    return f"sqlite:///{parent / LOCAL_STORE}", (parent / LOCAL_ARTIFACTS).as_uri()


def log_mlflow(root: Path, facts: RunFacts) -> dict[str, Any]:
    """One MLflow run: params, per-epoch metrics (step = history row), final metrics, artifacts."""
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
    except ImportError as exc:
        raise AffinageError("--report-to mlflow needs the optional package 'mlflow'",
                            "pip install 'affinage[tracking]'") from exc
    uri, artifacts = mlflow_location(root)
    with _quiet("mlflow", "alembic"):  # its database migrations log INFO lines
        client = MlflowClient(tracking_uri=uri)
        return _mlflow_run(client, uri, artifacts, root, facts, Metric, Param)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _mlflow_run(client: Any, uri: str, artifacts: str | None, root: Path, facts: RunFacts, Metric: Any,
                Param: Any) -> dict[str, Any]:  # noqa: N803 - mlflow's entity classes, imported lazily
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(name, artifact_location=artifacts))
    run = client.create_run(experiment_id, run_name=root.name,
                            tags={"affinage.run_dir": str(root.resolve()), "affinage.strategy":
                                  str(facts.metrics.get("strategy"))})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, k, v in facts.curves()]
        last = max(len(facts.history), 1)
        metrics += [Metric(k, v, now, last) for k, v in facts.finals().items()]
        params = [Param(k, v[:6000]) for k, v in facts.params().items()]
        for i in range(0, max(len(metrics), len(params)), 100):  # MLflow's batch limits: 1000 metrics, 100 params
            client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
        for name_ in ("report.html", "metrics.json", "config.yaml", "history.csv"):
            if (root / name_).is_file():
                client.log_artifact(run_id, str(root / name_))
        if (root / "model").is_dir():
            client.log_artifacts(run_id, str(root / "model"), artifact_path="model")
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id, "run_id": run_id}
