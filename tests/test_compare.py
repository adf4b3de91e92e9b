"""`affinage compare`: every strategy on one split, a complete table, a plot, and the cheapest adequate strategy."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from affinage.cli import main
from affinage.compare import COLD, COLUMNS, finish


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_timm, tiny_images):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    code = main(["compare", "--data", str(tiny_images), "--model", str(tiny_timm), "--strategies", "linear-probe,partial:1",
                 "--target", "accuracy>=0.6", "--out", str(out), "--quiet", "--train-args", "--epochs 1 --batch-size 8 --lr 0.03"])  # one epoch: a high lr
    return code, out


def test_compare_writes_a_complete_table(comparison):
    code, out = comparison
    assert code == 0
    with open(out / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["strategy"] for r in rows] == ["linear-probe", "partial:1"]
    assert tuple(rows[0]) == COLUMNS
    for r in rows:
        for column in COLUMNS:
            assert r[column] not in ("", "None"), f"{r['strategy']}: {column} is empty"
        assert float(r["test_accuracy"]) >= 0.6
        assert float(r["wall_seconds"]) > 0 and float(r["samples_per_second"]) > 0 and float(r["peak_memory_mb"]) > 50
        assert float(r["energy_kwh"]) > 0 and float(r["co2_kg"]) > 0
    assert int(rows[0]["trainable_params"]) < int(rows[1]["trainable_params"])  # the probe trains only the head
    md = (out / "compare.md").read_text()
    assert md.count("\n|") >= 3 and "cheapest strategy that meets accuracy>=0.6" in md
    with Image.open(out / "compare.png") as img:
        assert img.size[0] > 300


def test_compare_runs_share_one_split(comparison):
    _, out = comparison
    runs = sorted((out / "runs").glob("*/splits"))
    assert len(runs) == 2
    for split in ("train", "val", "test"):
        assert (runs[0] / f"{split}.csv").read_bytes() == (runs[1] / f"{split}.csv").read_bytes()
    for run in runs:
        assert json.loads((run.parent / "metrics.json").read_text())["test"]["n"] > 0


def test_every_strategy_is_timed_as_a_cold_run(comparison):
    """Each row pays for decoding and feature extraction itself: the second strategy does not ride on the cache the
    first one filled (and neither rides on the session's cache, where the tiny backbone's features already are)."""
    _, out = comparison
    for run in sorted((out / "runs").glob("*/metrics.json")):
        timing = json.loads(run.read_text())["timing"]
        assert timing["decode_cache_hit"] is False and timing["features_cached"] is False, (run, timing)
    with open(out / "compare.csv", newline="") as fh:
        assert {r["measured_as"] for r in csv.DictReader(fh)} == {COLD}
    assert f"Every row is a {COLD}" in (out / "compare.md").read_text()
    assert not (out / "cache").exists() or not any((out / "cache").iterdir())  # the per-run caches are removed


def _row(strategy: str, accuracy: float, energy: float | None, seconds: float, met: bool | None) -> dict:
    """`accuracy` is the val accuracy (what compare chooses on); test is shown only (see test_compare_selection.py)."""
    return {"strategy": strategy, "auto_pick": False, "val_accuracy": accuracy, "val_loss": None,
            "test_accuracy": accuracy, "macro_f1": accuracy, "trainable_params": 1,
            "wall_seconds": seconds, "samples_per_second": 1.0, "peak_memory_mb": 1.0, "energy_kwh": energy,
            "co2_kg": energy, "targets_met": met, "features_cached": False, "run_dir": "x"}


def test_cheapest_meeting_the_target_is_named(tmp_path: Path):
    rows = [_row("full", 0.98, 3e-3, 300, True), _row("linear-probe", 0.90, 1e-4, 20, False),
            _row("partial:2", 0.96, 1e-3, 120, True)]
    result = finish(tmp_path, rows, ["accuracy>=0.95"], log=lambda _: None)
    assert result.best == "full" and result.cheapest == "partial:2" and result.cost_measure == "energy_kwh"
    # without targets: the cheapest within a point of the best val accuracy
    result = finish(tmp_path, rows, [], log=lambda _: None)
    assert result.cheapest == "full"
    rows[2]["val_accuracy"] = 0.975
    assert finish(tmp_path, rows, [], log=lambda _: None).cheapest == "partial:2"
    # nobody meets it
    result = finish(tmp_path, [_row("head", 0.5, 1e-4, 10, False)], ["accuracy>=0.95"], log=lambda _: None)
    assert result.cheapest is None and "no strategy meets" in result.summary


def test_compare_rejects_bad_strategy_lists(tmp_path, tiny_images, capsys):
    assert main(["compare", "--data", str(tiny_images), "--strategies", "full,nope", "--out", str(tmp_path / "c")]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["compare", "--data", str(tiny_images), "--strategies", "full,full", "--out", str(tmp_path / "d")]) == 2
