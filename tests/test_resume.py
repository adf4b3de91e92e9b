"""Resume: per-epoch checkpoints (atomic, loadable with weights_only=True), `--resume` refusals, and interrupted
runs that resume to exactly the result of an uninterrupted one -- in process on the tiny model, and as a real
`affinage train` killed with SIGKILL during its second epoch on real photos (hymenoptera)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARED, load_safetensors, requires_shared

from affinage import train
from affinage.cli import main
from affinage.config import TrainConfig
from affinage.run import finetune


def _quiet(_: str) -> None:
    pass


class Killed(Exception):
    """Stands in for SIGKILL in process: raised right after a checkpoint is written."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, phase: str, epoch: int) -> None:
    real = train.save_checkpoint

    def save_then_die(path: Path, state: dict) -> None:
        real(path, state)
        if state["phase"] == phase and state["epoch"] == epoch and not state["finished"]:
            raise Killed(f"killed after {phase} epoch {epoch}")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)


def _history_without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((run_dir / "history.json").read_text())]


def assert_same_run(a: Path, b: Path) -> None:
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert metrics_a["test"] == metrics_b["test"]
    weights_a, weights_b = (load_safetensors(d / "model" / "model.safetensors") for d in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert _history_without_timing(a) == _history_without_timing(b)
    for split in ("train", "val", "test"):
        assert (a / "splits" / f"{split}.csv").read_bytes() == (b / "splits" / f"{split}.csv").read_bytes()


def test_interrupted_run_resumes_bit_identically(tmp_path, tiny_images, tiny_timm, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    # progressive: a head-init probe phase, then a fine-tune whose trainable blocks change every epoch
    opts = dict(data=str(data), model=str(tiny_timm), strategy="progressive", epochs=3, batch_size=8, patience=10,
                progress=False)
    logs: list[str] = []
    whole = finetune(out=tmp_path / "whole", log=_quiet, **opts)
    assert not (whole.path / train.CHECKPOINT_DIR).exists()  # a finished run keeps no checkpoint

    _kill_after(monkeypatch, "fine-tune", 1)
    with pytest.raises(Killed):
        finetune(out=tmp_path / "cut", log=_quiet, **opts)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert not (cut / "metrics.json").exists() and not (cut / "model").exists()
    # the checkpoints hold only tensors and plain containers: loadable without unpickling arbitrary objects
    fine = torch.load(cut / train.CHECKPOINT_DIR / "fine-tune.pt", weights_only=True)
    assert (fine["phase"], fine["epoch"], fine["finished"]) == ("fine-tune", 1, False)
    assert {"model", "optimizer", "scheduler", "history", "best_key", "bad_epochs"} <= set(fine)
    assert [r["epoch"] for r in fine["history"]] == [0, 1]
    head = torch.load(cut / train.CHECKPOINT_DIR / "head-init.pt", weights_only=True)
    assert head["finished"] and "optimizer" not in head  # a finished phase keeps only its final weights
    assert not list((cut / train.CHECKPOINT_DIR).glob(".*.tmp"))  # atomic writes leave no temp files behind

    # the data changed since: refused, one line naming the fix
    moved = next(data.glob("red_disc/*.png"))
    hidden = tmp_path / moved.name
    moved.rename(hidden)
    shutil.copytree(cut, tmp_path / "cut-copy")
    with pytest.raises(Exception, match="made with other data or settings") as info:
        finetune(out=tmp_path / "cut-copy", log=_quiet, resume=True, **opts)
    assert info.value.fix
    hidden.rename(moved)

    resumed = finetune(out=cut, log=logs.append, resume=True, **opts)
    assert any("fine-tune: resumed after epoch 1" in line for line in logs), logs
    assert resumed.metrics["test"] == whole.metrics["test"]
    assert_same_run(whole.path, cut)
    assert not (cut / train.CHECKPOINT_DIR).exists()
    # the resumed run is a normal run directory
    assert TrainConfig.from_yaml((cut / "config.yaml").read_text()) == TrainConfig.from_yaml(
        (whole.path / "config.yaml").read_text())


def _run_dir_with_config(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(TrainConfig(**config).to_yaml())
    return path


def test_resume_refusals_are_one_line(tmp_path, tiny_images, tiny_timm, capsys):
    common = ["train", "--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "full", "--epochs", "2"]
    config = dict(data=str(tiny_images), model=str(tiny_timm), strategy="full", epochs=2)

    def refused(*extra: str) -> str:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("affinage: error: ") and " — fix: " in lines[0], err
        assert "Traceback" not in err
        return lines[0]

    assert "not an affinage run directory" in refused("--out", str(tmp_path / "nothing"), "--resume")
    assert "needs the run directory" in refused("--resume")

    no_ckpt = _run_dir_with_config(tmp_path / "no-ckpt", **config)
    assert "no checkpoint to resume from" in refused("--out", str(no_ckpt), "--resume")
    assert "already exists" in refused("--out", str(no_ckpt))  # without --resume a run is never overwritten

    other = _run_dir_with_config(tmp_path / "other", **{**config, "lr": 0.5})
    (other / train.CHECKPOINT_DIR).mkdir()
    (other / train.CHECKPOINT_DIR / "fine-tune.pt").write_bytes(b"")
    line = refused("--out", str(other), "--resume", "--lr", "0.01")
    assert "differ" in line and "lr: 0.5 in the run, 0.01 now" in line

    broken = _run_dir_with_config(tmp_path / "broken", **config)
    (broken / train.CHECKPOINT_DIR).mkdir()
    (broken / train.CHECKPOINT_DIR / "fine-tune.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read" in refused("--out", str(broken), "--resume", "--quiet")

    done = _run_dir_with_config(tmp_path / "done", **config)
    (done / "model").mkdir()
    (done / "model" / "model.json").write_text("{}")
    (done / "metrics.json").write_text("{}")
    assert "already finished" in refused("--out", str(done), "--resume")


# ----------------------------------------------------------------------------------------------
# A real process, really killed
# ----------------------------------------------------------------------------------------------
def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "affinage.cli", "train", "--data", str(SHARED / "hymenoptera"),
            "--model", "efficientnet_lite0", "--strategy", "full", "--epochs", "3", "--image-size", "64",
            "--out", str(out), "--quiet", *extra]


@requires_shared
@pytest.mark.slow
def test_sigkill_during_second_epoch_then_resume_gives_identical_test_metrics(tmp_path):
    # One thread per process: the same float reductions in every run, and no OpenMP spin-waiting on a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    checkpoint = cut / train.CHECKPOINT_DIR / "fine-tune.pt"
    reference_log = (tmp_path / "reference.log").open("w")
    reference = subprocess.Popen(_train_command(whole), stdout=reference_log, stderr=subprocess.STDOUT, env=env)
    victim = subprocess.Popen(_train_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.exists():  # written (atomically) when fine-tune epoch 1 ends
            assert victim.poll() is None, "the run ended before its first fine-tune checkpoint"
            assert time.monotonic() < deadline, "no fine-tune checkpoint appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 2 (an epoch takes seconds)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        for proc in (victim, reference):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reference_log.close()
    state = torch.load(checkpoint, weights_only=True)
    assert (state["epoch"], state["finished"]) == (1, False), "the kill did not land in epoch 2"
    assert not (cut / "metrics.json").exists() and not (cut / "model").exists()

    resumed = subprocess.run(_train_command(cut, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fine-tune: resumed after epoch 1" in resumed.stdout
    metrics = {d: json.loads((d / "metrics.json").read_text()) for d in (whole, cut)}
    assert metrics[cut]["test"] == metrics[whole]["test"]
    assert_same_run(whole, cut)
    assert not (cut / train.CHECKPOINT_DIR).exists()
