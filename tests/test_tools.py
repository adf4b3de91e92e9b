"""Issue #16, the tools users already live in: config files (`--config`), experiment tracking (`--report-to`,
read back through TensorBoard's event reader and mlflow.MlflowClient, local store and a real `mlflow server`)."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from affinage.cli import main
from affinage.configfile import merge, read_config_file
from affinage.errors import AffinageError


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path, tiny_timm: Path, mlflow_server) -> Path:
    """A head run (several epochs of curves) logged to TensorBoard and to the local MLflow store beside it (the
    server of the server test boots meanwhile)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        code = main(["train", "--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "head",
                     "--epochs", "4", "--out", str(out), "--quiet", "--report-to", "tensorboard",
                     "--report-to", "mlflow"])
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
    assert code == 0
    return out


def _history_and_test(run: Path) -> tuple[list[dict], dict]:
    return (json.loads((run / "history.json").read_text()),
            json.loads((run / "metrics.json").read_text())["test"])


def _expected_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for step, row in enumerate(history, start=1):
        for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            if isinstance(row.get(name), (int, float)) and math.isfinite(row[name]):
                curves.setdefault(name, []).append((step, float(row[name])))
    return curves


def test_tensorboard_event_files_hold_the_history_and_test_figures(tracked_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from affinage.tracking import tensorboard_tag

    history, test = _history_and_test(tracked_run)
    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    curves = _expected_curves(history)
    assert len(curves["val_accuracy"]) == len(history) >= 4
    for name, points in curves.items():
        logged = [(e.step, e.value) for e in acc.Scalars(tensorboard_tag(name))]
        assert logged == [(s, float(np.float32(v))) for s, v in points], name  # TensorBoard stores float32
    assert acc.Scalars("test/accuracy")[-1].value == np.float32(test["accuracy"])
    assert acc.Scalars("test/loss")[-1].value == np.float32(test["loss"])
    assert "footprint/energy_kwh" in acc.Tags()["scalars"]


def _check_mlflow_run(client, run_id: str, run: Path) -> None:
    history, test = _history_and_test(run)
    logged = client.get_run(run_id)
    for name, points in _expected_curves(history).items():
        got = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
        assert got == points, name  # doubles: exactly metrics.json's / history.json's values
    assert logged.data.metrics["test_accuracy"] == test["accuracy"]
    assert logged.data.metrics["test_macro_f1"] == test["macro_f1"]
    assert "footprint_energy_kwh" in logged.data.metrics
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert logged.data.params["strategy"] == config["strategy"] == "head"
    assert logged.data.params["epochs"] == "4" and logged.data.params["seed"] == "0"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model", "report.html", "metrics.json", "config.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/model.json", "model/model.safetensors"}


def test_mlflow_local_store_beside_the_runs_holds_the_run(tracked_run: Path):
    from mlflow import MlflowClient

    where = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    assert where["tracking_uri"] == f"sqlite:///{tracked_run.parent.resolve() / 'mlruns.db'}"
    assert any((tracked_run.parent / "mlartifacts").rglob("model.safetensors"))  # artifacts beside the runs too
    _check_mlflow_run(MlflowClient(tracking_uri=where["tracking_uri"]), where["run_id"], tracked_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (a free port), started first so that it boots while the run trains."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=folder)
    yield server, f"http://127.0.0.1:{port}"
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


def _wait_for(server: subprocess.Popen, uri: str, seconds: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            why = server.stderr.read(400) if server.poll() is not None else b"still starting"
            pytest.skip(f"mlflow server did not start within {seconds:.0f} s at {uri} ({why!r})")
        time.sleep(0.3)


def test_mlflow_server_receives_the_run(mlflow_server, tracked_run: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    """The run logged (`affinage track`) through MLFLOW_TRACKING_URI to a real server and read back over HTTP."""
    from mlflow import MlflowClient

    server, uri = mlflow_server
    _wait_for(server, uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    copy = tmp_path / "copy"  # tracking.json is rewritten: log a copy of the shared run
    shutil.copytree(tracked_run, copy)
    assert main(["track", str(copy), "--report-to", "mlflow"]) == 0  # an earlier run, logged afterwards
    where = json.loads((copy / "tracking.json").read_text())["mlflow"]
    assert where["tracking_uri"] == uri
    _check_mlflow_run(MlflowClient(tracking_uri=uri), where["run_id"], copy)


def test_an_unreachable_tracking_server_is_one_line(tracked_run: Path, tmp_path: Path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tracked_run, copy)
    (copy / "tracking.json").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert main(["track", str(copy), "--report-to", "tensorboard", "--report-to", "mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is complete, but logging it to mlflow failed" in err
    assert f"affinage track {copy} --report-to mlflow" in err
    assert list(json.loads((copy / "tracking.json").read_text())) == ["tensorboard"]  # what did succeed is said


def test_a_runs_config_yaml_reruns_it_exactly(tracked_run: Path, tmp_path: Path):
    """`affinage train --config RUN/config.yaml --out NEW`: the same test block; a flag overrides the file."""
    out = tmp_path / "again"
    assert main(["train", "--config", str(tracked_run / "config.yaml"), "--out", str(out), "--quiet",
                 "--report-to", "none"]) == 0
    _, test = _history_and_test(tracked_run)
    assert _history_and_test(out)[1] == test
    assert not (out / "tracking.json").exists()  # --report-to none on the command line beat the file's trackers
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == []


def test_config_file_keys_flags_and_refusals(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("data: photos\nbatch-size: 16\nepochs: 3\nno_pretrained: true\nout: runs/x\nreport_to: mlflow\n"
                    "models: a, b\n")
    values = read_config_file(file)
    assert values == {"data": "photos", "batch_size": 16, "epochs": 3, "pretrained": False, "out": "runs/x",
                      "report_to": ["mlflow"], "models": ["a", "b"]}
    merged = merge(values, {"data": None, "epochs": 2, "batch_size": None, "lr": 1e-3}, explicit={"epochs"})
    assert merged["epochs"] == 2 and merged["batch_size"] == 16 and merged["lr"] == 1e-3
    (tmp_path / "c.json").write_text(json.dumps({"data": "photos", "strategy": "full"}))
    assert read_config_file(tmp_path / "c.json")["strategy"] == "full"
    (tmp_path / "bad.yaml").write_text("data: photos\nlearning_rate: 0.1\n")
    with pytest.raises(AffinageError, match="learning_rate") as err:
        read_config_file(tmp_path / "bad.yaml")
    assert "lr" in err.value.fix and "batch_size" in err.value.fix
    with pytest.raises(AffinageError, match="unknown strategy"):
        merge({"data": "photos", "strategy": "fulll"}, {}, set())
    with pytest.raises(AffinageError, match="--report-to"):
        merge({"data": "photos", "report_to": ["wandb"]}, {}, set())


def test_cli_reads_the_config_file_and_flags_win(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "c.yaml").write_text("data: /nowhere/photos\nstrategy: linear-probe\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "/nowhere/photos" in capsys.readouterr().err  # the file's data was used
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", "/elsewhere/x"]) == 2
    assert "/elsewhere/x" in capsys.readouterr().err  # ... and the command line's wins
    assert main(["train", "--strategy", "head"]) == 2
    assert "--data" in capsys.readouterr().err
