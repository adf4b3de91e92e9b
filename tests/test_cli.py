"""The `affinage` command: help texts, one-line errors with a fix (never a traceback), and one end-to-end run
on real ImageNet weights and real photos (hymenoptera): train -> predict -> eval."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, requires_shared

from affinage.cli import build_parser, main

SUBCOMMANDS = {
    "train": ["--data", "--model", "--strategy", "--out", "--epochs", "--lr", "--layer-decay", "--lr-min",
              "--train-bn-stats", "--splits-from", "--precision", "--no-pretrained", "--lora-rank", "--target",
              "--fail-on-target", "--drop-leaks", "--country", "--water-factor", "--resume"],
    "demo": ["--data", "--model", "--strategy", "--out"],
    "predict": ["run", "--top-k", "--json", "--csv"],
    "eval": ["run", "--json"],
    "compare": ["--data", "--model", "--strategies", "--target", "--out", "--train-args"],
    "serve": ["run", "--host", "--port"],
    "export": ["run", "--format", "--out"],
    "report": ["run"],
    "reproduce": ["run", "--out"],
}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m affinage.cli ARGS` in a fresh interpreter (same environment: the test cache dir, offline)."""
    return subprocess.run([sys.executable, "-m", "affinage.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def assert_one_line_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("affinage: error: ") and " — fix: " in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ----------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------
def test_top_level_help_in_a_subprocess():
    result = cli("--help", timeout=120)
    assert result.returncode == 0
    for command in SUBCOMMANDS:
        assert command in result.stdout
    assert result.stderr == ""


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: affinage" in capsys.readouterr().out


def test_version(capsys):
    from affinage import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: affinage {command}")
    for option in SUBCOMMANDS[command]:
        assert option in out, option


def test_train_help_lists_every_strategy(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("linear-probe", "head", "partial:N", "full", "progressive"):
        assert name in out


def test_parser_defaults():
    demo = build_parser().parse_args(["demo"])
    assert (demo.data, demo.model) == ("digits", "efficientnet_lite0")  # offline: bundled data and weights
    train = build_parser().parse_args(["train", "--data", "x"])
    assert (train.model, train.strategy, train.seed) == ("efficientnet_lite0", "auto", 0)
    assert not train.no_pretrained and not train.train_bn_stats


# ----------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line naming the problem and the fix, no traceback
# ----------------------------------------------------------------------------------------------
def test_missing_data_path_in_a_subprocess(tmp_path):
    result = cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "nowhere", "does not exist")
    assert not (tmp_path / "run").exists()  # nothing written for bad input


def test_unknown_strategy_in_a_subprocess(tmp_path, tiny_images):
    result = cli("train", "--data", str(tiny_images), "--strategy", "lora2", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "unknown strategy 'lora2'", "linear-probe")
    assert not (tmp_path / "run").exists()


def test_unknown_model(tmp_path, tiny_images, capsys):
    code = main(["train", "--data", str(tiny_images), "--model", "resnet9000", "--out", str(tmp_path / "run"),
                 "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "unknown model 'resnet9000'", "timm:<name>")


def test_unknown_timm_model(tmp_path, tiny_images, capsys):
    code = main(["train", "--data", str(tiny_images), "--model", "timm:resnet9000", "--out", str(tmp_path / "run"),
                 "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "timm has no model 'resnet9000'")


def test_failed_train_leaves_out_reusable(tmp_path, tiny_images, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_images), "--model", "resnet9000", "--out", str(out), "--quiet"]) == 2
    capsys.readouterr()
    assert not out.exists() or not any(out.iterdir())


def test_csv_row_naming_a_missing_file(tmp_path, tiny_images, capsys):
    rows = [f"{p},{p.parent.name}" for p in sorted(tiny_images.rglob("*.png"))]
    rows.insert(3, "photos/missing_bee.jpg,bees")
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code = main(["train", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "missing_bee.jpg", "line 5")
    assert not (tmp_path / "run").exists()


def test_existing_non_empty_out_is_refused(tmp_path, tiny_images, capsys):
    out = tmp_path / "previous-run"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": "me"}')
    code = main(["train", "--data", str(tiny_images), "--out", str(out), "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "already exists and is not empty")
    assert (out / "metrics.json").read_text() == '{"keep": "me"}'  # never overwritten
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("option, value, needle", [
    ("--epochs", "0", "epochs must be >= 1"),
    ("--lr", "-1", "lr must be > 0"),
    ("--batch-size", "0", "batch_size must be >= 1"),
    ("--layer-decay", "1.5", "layer_decay must be in (0, 1]"),
    ("--val-fraction", "0.9", "do not leave a train split"),
])
def test_bad_hyperparameters(tmp_path, tiny_images, capsys, option, value, needle):
    code = main(["train", "--data", str(tiny_images), "--out", str(tmp_path / "run"), "--quiet", option, value])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


def test_predict_and_eval_need_a_run_directory(tmp_path, capsys, tiny_images):
    image = str(next(tiny_images.rglob("*.png")))
    assert main(["predict", str(tmp_path), image]) == 2
    assert_one_line_error(capsys.readouterr().err, "is not a finished affinage run")
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert_one_line_error(capsys.readouterr().err, "is not a finished affinage run")


def test_predict_on_tiny_run(tmp_path, tiny_images, tiny_timm, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_images), "--model", str(tiny_timm), "--out", str(out), "--quiet",
                 "--epochs", "20"]) == 0
    capsys.readouterr()
    image = str(next((tiny_images / "red_disc").glob("*.png")))
    assert main(["predict", str(out), image, "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{image}: ") and "red_disc" in text
    # only unreadable files: exit 1, each listed as skipped
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["predict", str(out), str(bad), str(tmp_path / "absent.png")]) == 1
    text = capsys.readouterr().out
    assert "broken.jpg: skipped (not an image" in text and "absent.png: skipped (cannot be read" in text


# ----------------------------------------------------------------------------------------------
# End to end on real weights and real photos
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hymenoptera_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "hymenoptera-lp"
    result = cli("train", "--data", str(SHARED / "hymenoptera"), "--model", "efficientnet_lite0",
                 "--strategy", "linear-probe", "--out", str(out), "--quiet", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return out


@requires_shared
@pytest.mark.slow
def test_e2e_train_on_hymenoptera(hymenoptera_run):
    metrics = json.loads((hymenoptera_run / "metrics.json").read_text())
    assert metrics["strategy"] == "linear-probe"
    assert metrics["test"]["n"] == 153  # the official val split is the test set
    assert metrics["test"]["accuracy"] >= 0.90
    assert metrics["data"]["classes"] == ["ants", "bees"]
    with open(hymenoptera_run / "skipped_files.csv", newline="") as fh:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert "imageNotFound.gif" in skipped and "GIF" in skipped["imageNotFound.gif"]
    assert metrics["data"]["skipped"] == len(skipped)
    for split in ("train", "val", "test"):
        assert (hymenoptera_run / "splits" / f"{split}.csv").exists()
    assert (hymenoptera_run / "model" / "model.safetensors").exists()


@requires_shared
@pytest.mark.slow
def test_e2e_predict_json(hymenoptera_run, capsys):
    images = [SHARED / "hymenoptera" / "val" / "bees" / name for name in
              sorted(os.listdir(SHARED / "hymenoptera" / "val" / "bees"))[:2]]
    assert main(["predict", str(hymenoptera_run), *map(str, images), "--json", "--top-k", "5"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    for result, image in zip(results, images):
        assert result["file"] == str(image)
        assert result["label"] in ("ants", "bees")
        top = result["top_k"]
        assert 1 <= len(top) <= 2  # top-k is capped at the number of classes
        assert top[0]["label"] == result["label"] and top[0]["probability"] == result["probability"]
        probs = [t["probability"] for t in top]
        assert all(0.0 <= p <= 1.0 for p in probs) and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-5 and sum(probs) == pytest.approx(1.0, abs=1e-3)
    # the linear probe on ImageNet features recognises these bees
    assert [r["label"] for r in results].count("bees") >= 1


@requires_shared
@pytest.mark.slow
def test_e2e_eval_reproduces_the_test_metrics(hymenoptera_run):
    # a fresh process, like the training run (same torch thread count: float reductions are bit-identical)
    result = cli("eval", str(hymenoptera_run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    saved = json.loads((hymenoptera_run / "metrics.json").read_text())["test"]
    assert report["matches_training_run"] is True
    assert report["test"]["accuracy"] == saved["accuracy"]
    assert report["test"]["loss"] == saved["loss"]
    assert report["test"]["confusion_matrix"] == saved["confusion_matrix"]


@requires_shared
@pytest.mark.slow
def test_e2e_eval_in_process_gives_the_same_accuracy(hymenoptera_run, capsys):
    assert main(["eval", str(hymenoptera_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((hymenoptera_run / "metrics.json").read_text())["test"]
    assert report["test"]["accuracy"] == saved["accuracy"]
    assert report["test"]["confusion_matrix"] == saved["confusion_matrix"]
    assert report["test"]["loss"] == pytest.approx(saved["loss"], rel=1e-5)
