"""Trustworthy results: targets, diagnosis, leak check, per-group metrics, footprint, and exact reproduction —
unit tests on synthetic inputs, plus one small end-to-end run (with a planted leak, groups and two targets)
that is then reproduced bit for bit."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, SHARED, requires_shared
from test_cli import assert_one_line_error

from affinage.cli import main
from affinage.data import Preprocessing, Splits, decode_all, load_source
from affinage.diagnosis import CHECKLIST, diagnose, format_findings
from affinage.errors import AffinageError
from affinage.evaluate import calibration, classification_metrics, group_metrics
from affinage.footprint import FootprintTracker, track_footprint
from affinage.leaks import drop_leaked, find_leaks, perceptual_hashes
from affinage.run import finetune
from affinage.targets import check_targets, parse_target, parse_targets


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, metric, cls, op, threshold", [
    ("accuracy>=0.95", "accuracy", None, ">=", 0.95),
    ("recall[tulip]>=0.9", "recall", "tulip", ">=", 0.9),
    ("specificity>=0.9", "specificity", None, ">=", 0.9),
    (" macro_f1 >= 90% ", "macro_f1", None, ">=", 0.9),
    ("loss<0.5", "loss", None, "<", 0.5),
    ("f1[sun flower] > .25", "f1", "sun flower", ">", 0.25),
    ("sensitivity[tulip]>=0.8", "recall", "tulip", ">=", 0.8),
    ("f1>=0.7", "macro_f1", None, ">=", 0.7),
])
def test_target_grammar(expr, metric, cls, op, threshold):
    t = parse_target(expr)
    assert (t.metric, t.cls, t.op) == (metric, cls, op)
    assert t.threshold == pytest.approx(threshold)


@pytest.mark.parametrize("expr, needle", [
    ("acc>=high", "cannot read target"),
    ("__import__('os').system('x')>=1", "cannot read target"),
    ("accuracy>=0.9; import os", "cannot read target"),
    ("accuracy=0.9", "cannot read target"),
    ("precison>=0.9", "unknown metric 'precison'"),
    ("accuracy[tulip]>=0.9", "not a per-class metric"),
])
def test_bad_targets_name_the_valid_metrics(expr, needle):
    with pytest.raises(AffinageError) as info:
        parse_target(expr)
    assert needle in str(info.value)
    assert "accuracy" in info.value.fix and "recall[CLASS]" in info.value.fix


def test_target_class_names_are_checked():
    with pytest.raises(AffinageError) as info:
        parse_targets(["recall[tulp]>=0.9"], ["rose", "tulip"])
    assert "'tulp'" in info.value.problem and "rose, tulip" in info.value.fix
    with pytest.raises(AffinageError, match="top-5"):
        parse_targets(["top5_accuracy>=0.9"], ["a", "b", "c"])


def test_targets_pass_and_fail_on_test_metrics():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 0])  # 8/10; recall a=0.75, b=1, c=0.5
    test = classification_metrics(np.eye(3)[preds] * 5, labels, ["a", "b", "c"])
    results = check_targets(parse_targets(["accuracy>=0.8", "accuracy>0.8", "recall[a]>=0.75", "recall[c]>=0.6",
                                           "loss<=10", "specificity[b]<0.9"], ["a", "b", "c"]), test)
    assert [r["passed"] for r in results] == [True, False, True, False, True, True]
    assert results[0]["value"] == pytest.approx(0.8) and results[3]["value"] == pytest.approx(0.5)
    assert results[5]["value"] == pytest.approx(5 / 6)  # b: one false positive among the 6 non-b images


def test_a_bad_target_fails_before_anything_is_written(tiny_images, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(tiny_images), "--model", "efficientnet_lite0", "--out", str(out),
                 "--target", "accuracy>=0.9", "--target", "recal[red_disc]>=0.9", "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "recal", "valid metrics")
    assert not out.exists()
    code = main(["train", "--data", str(tiny_images), "--model", "efficientnet_lite0", "--out", str(out),
                 "--target", "recall[tulip]>=0.9", "--quiet"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "tulip", ", ".join(sorted(CLASSES)))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Diagnosis on synthetic histories
# ----------------------------------------------------------------------------------------------
def history(rows, phase="fine-tune"):
    """[(train_loss, train_acc, val_loss, val_acc), ...] -> history rows, epoch 0 first (no train figures)."""
    out = []
    for epoch, (tl, ta, vl, va) in enumerate(rows):
        out.append({"phase": phase, "epoch": epoch, "train_loss": tl, "train_accuracy": ta, "val_loss": vl,
                    "val_accuracy": va, "lr": 1e-3, "trainable_params": 1000, "seconds": 1.0})
    return out


def healthy_test(n_classes=4, per_class=20, accuracy=0.9):
    classes = [f"c{k}" for k in range(n_classes)]
    labels = np.repeat(np.arange(n_classes), per_class)
    preds = labels.copy()
    wrong = np.arange(0, len(labels), int(round(1 / (1 - accuracy))))
    preds[wrong] = (preds[wrong] + 1) % n_classes
    return classification_metrics(np.eye(n_classes)[preds] * 4, labels, classes), classes


def issues(findings):
    return [f["issue"] for f in findings]


def test_diagnosis_healthy_run_finds_nothing():
    test, classes = healthy_test()
    h = history([(None, None, 1.2, 0.5), (0.9, 0.80, 0.6, 0.86), (0.5, 0.90, 0.45, 0.89), (0.42, 0.93, 0.44, 0.89)])
    assert diagnose(h, test, classes) == []
    assert "no problem" in format_findings([])[0]


def test_diagnosis_over_fitting():
    test, classes = healthy_test(accuracy=0.8)
    h = history([(None, None, 1.0, 0.6), (0.7, 0.85, 0.6, 0.80), (0.2, 0.97, 0.7, 0.80), (0.05, 1.0, 0.9, 0.79),
                 (0.02, 1.0, 1.1, 0.78)])
    found = diagnose(h, test, classes)
    assert issues(found) == ["over-fitting"]
    assert found[0]["step"] == "more data" and "augment" in found[0]["action"]


def test_diagnosis_over_fitting_from_rising_val_loss():
    test, classes = healthy_test(accuracy=0.9)
    h = history([(None, None, 1.0, 0.6), (0.8, 0.85, 0.40, 0.88), (0.6, 0.90, 0.42, 0.89), (0.4, 0.93, 0.47, 0.89),
                 (0.3, 0.95, 0.52, 0.89)])
    assert issues(diagnose(h, test, classes)) == ["over-fitting"]


def test_diagnosis_under_fitting_points_to_capacity():
    test, classes = healthy_test(accuracy=0.6)
    h = history([(None, None, 1.4, 0.3), (1.3, 0.40, 1.25, 0.45), (1.1, 0.55, 1.1, 0.55), (1.0, 0.6, 1.05, 0.58),
                 (0.98, 0.61, 1.05, 0.58)])
    found = diagnose(h, test, classes)
    assert issues(found) == ["under-fitting"]
    assert found[0]["step"] == "capacity" and "partial:N" in found[0]["action"]


def test_diagnosis_unstable_and_nan_blame_the_learning_rate():
    test, classes = healthy_test(accuracy=0.7)
    jumpy = history([(None, None, 1.4, 0.3), (1.0, 0.6, 0.9, 0.7), (2.5, 0.4, 2.0, 0.5), (1.2, 0.6, 1.0, 0.7)])
    found = diagnose(jumpy, test, classes)
    assert "unstable training" in issues(found) and "under-fitting" not in issues(found)
    assert next(f for f in found if f["issue"] == "unstable training")["step"] == "learning rate"
    nan = history([(None, None, 1.4, 0.3), (1.0, 0.6, 0.9, 0.7), (float("nan"), 0.2, 0.9, 0.7)])
    unstable = next(f for f in diagnose(nan, test, classes) if f["issue"] == "unstable training")
    assert "nan" in unstable["evidence"] and "lower" in unstable["action"]


def test_diagnosis_learning_rate_too_low():
    test, classes = healthy_test(accuracy=0.4)
    h = history([(None, None, 1.39, 0.3), (1.38, 0.35, 1.38, 0.36), (1.375, 0.35, 1.375, 0.36),
                 (1.372, 0.36, 1.372, 0.36), (1.37, 0.36, 1.372, 0.36)])
    found = diagnose(h, test, classes)
    assert "learning rate too low" in issues(found) and "under-fitting" not in issues(found)
    assert "raise" in next(f for f in found if f["issue"] == "learning rate too low")["action"]


def test_diagnosis_not_converged():
    test, classes = healthy_test(accuracy=0.85)
    h = history([(None, None, 1.2, 0.5), (0.9, 0.75, 0.8, 0.70), (0.7, 0.82, 0.6, 0.80), (0.55, 0.86, 0.45, 0.85)])
    found = diagnose(h, test, classes)
    assert issues(found) == ["not converged"] and "--epochs 6" in found[0]["action"]


def test_diagnosis_chance_level_points_to_the_implementation_first():
    test, classes = healthy_test(accuracy=0.25)
    h = history([(None, None, 1.39, 0.25), (1.38, 0.26, 1.39, 0.25), (1.38, 0.27, 1.39, 0.26), (1.38, 0.26, 1.39, 0.25)])
    found = diagnose(h, test, classes)
    assert found[0]["issue"] == "no better than chance" and found[0]["step"] == "implementation"
    steps = [CHECKLIST.index(f["step"]) for f in found]
    assert steps == sorted(steps)  # ordered by the checklist
    assert format_findings(found)[0].startswith("diagnosis: no better than chance")


def test_diagnosis_class_specific_failure_names_the_confusion():
    classes = ["daisy", "rose", "tulip"]
    labels = np.repeat([0, 1, 2], 10)
    preds = labels.copy()
    preds[20:27] = 1  # 7 of 10 tulips predicted as roses
    test = classification_metrics(np.eye(3)[preds] * 4, labels, classes)
    h = history([(None, None, 1.0, 0.6), (0.6, 0.8, 0.6, 0.8), (0.5, 0.82, 0.55, 0.8), (0.48, 0.82, 0.55, 0.8)])
    found = diagnose(h, test, classes, leaks=2)
    assert issues(found)[:2] == ["train/test leak", "class-specific failure"]
    failure = found[1]
    assert failure["step"] == "data" and "'tulip'" in failure["evidence"] and "'rose' (7 of 10)" in failure["evidence"]


# ----------------------------------------------------------------------------------------------
# Leak check
# ----------------------------------------------------------------------------------------------
def _resave(src: Path, dst: Path, scale: float = 0.8, crop: float = 0.0, quality: int = 70) -> Path:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    w, h = img.size
    dx, dy = int(w * crop / 2), int(h * crop / 2)
    img = img.crop((dx, dy, w - dx, h - dy))
    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.LANCZOS)
    img.save(dst, format="JPEG", quality=quality)
    return dst


@requires_shared
def test_leak_check_finds_planted_copies_of_real_photos_and_nothing_else(tmp_path):
    photos = sorted((SHARED / "hymenoptera" / "train" / "bees").glob("*.jpg"))[:16] + \
        sorted((SHARED / "hymenoptera" / "train" / "ants").glob("*.jpg"))[:16]
    rows = [(str(p), p.parent.name, "test" if k % 4 == 0 else "val" if k % 4 == 1 else "train")
            for k, p in enumerate(photos)]
    tests = [Path(p) for p, _, split in rows if split == "test"]
    planted = {
        "resized": _resave(tests[0], tmp_path / "resized.jpg"),
        "cropped": _resave(tests[1], tmp_path / "cropped.jpg", crop=0.03),
        "exact": Path(shutil.copyfile(tests[2], tmp_path / "exact.jpg")),
        "small": _resave(tests[3], tmp_path / "small.jpg", scale=0.5, quality=50),
    }
    originals = {"resized": tests[0], "cropped": tests[1], "exact": tests[2], "small": tests[3]}
    rows += [(str(p), originals[name].parent.name, "train") for name, p in planted.items()]
    source = tmp_path / "data.csv"
    with open(source, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    decoded = decode_all(load_source(str(source)), Preprocessing(224, (0.5,) * 3, (0.5,) * 3), progress=False)
    keys = [s.key for s in decoded.samples]
    splits = Splits(*[[i for i, s in enumerate(decoded.samples) if s.split == name] for name in ("train", "val", "test")],
                    "given")
    leaks = find_leaks(decoded.pixels, decoded.hashes, splits)
    found = {(Path(keys[leak.a]).name, Path(keys[leak.b]).name): leak for leak in leaks}
    expected = {(planted[name].name, originals[name].name) for name in planted}
    assert set(found) == expected, found  # every planted copy, and no pair of distinct photos
    assert found[("exact.jpg", tests[2].name)].kind == "exact"
    assert all(leak.kind == "near" and leak.split_a == "train" and leak.split_b == "test"
               for pair, leak in found.items() if pair[0] != "exact.jpg")

    kept, dropped = drop_leaked(splits, leaks)
    assert sorted(keys[i] for i in dropped) == sorted(str(originals[n]) for n in planted)
    assert kept.train == splits.train and not set(dropped) & set(kept.test)


def test_leak_check_on_similar_synthetic_images(tiny_images):
    """Distinct drawings of one class (same shape and colour, different noise) are not duplicates; a re-encoded
    copy is, and so is an exact copy between val and test. (These 54-px drawings are mostly pixel noise: a resized
    or chroma-subsampled copy changes that noise as much as another drawing does; real photos are tested above.)"""
    decoded = decode_all(load_source(str(tiny_images)), Preprocessing(48, (0.5,) * 3, (0.5,) * 3), progress=False)
    n = len(decoded.samples)
    splits = Splits(list(range(0, n, 3)), list(range(1, n, 3)), list(range(2, n, 3)), "interleaved")
    assert find_leaks(decoded.pixels, decoded.hashes, splits) == []

    from PIL import Image

    pixels = np.array(decoded.pixels)
    buf = io.BytesIO()
    Image.fromarray(pixels[2].transpose(1, 2, 0)).save(buf, format="JPEG", quality=95, subsampling=0)
    copy = np.asarray(Image.open(buf).convert("RGB"))
    assert np.abs(copy.transpose(2, 0, 1).astype(int) - pixels[2]).max() > 10  # not the same pixels
    pixels = np.concatenate([pixels, copy.transpose(2, 0, 1)[None], pixels[4][None]])
    hashes = [*decoded.hashes, "copy-of-2", decoded.hashes[4]]
    splits = Splits(splits.train + [n], splits.val, splits.test + [n + 1], "with copies")
    leaks = find_leaks(pixels, hashes, splits)
    assert [(leak.a, leak.b, leak.kind) for leak in leaks] == [(4, n + 1, "exact"), (n, 2, "near")]
    assert leaks[0].split_a == "val" and leaks[0].split_b == "test"
    kept, dropped = drop_leaked(splits, leaks)
    assert dropped == [2, n + 1] and 2 not in kept.test and 4 in kept.val


def test_perceptual_hash_ignores_brightness_noise_but_not_content():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(1, 3, 64, 64), dtype=np.uint8)
    b = np.clip(a.astype(int) + 6, 0, 255).astype(np.uint8)  # slightly brighter
    c = rng.integers(0, 255, size=(1, 3, 64, 64), dtype=np.uint8)
    ha, hb, hc = perceptual_hashes(a), perceptual_hashes(b), perceptual_hashes(c)
    assert ha.shape == (1, 256)
    assert (ha != hb).sum() <= 12 and (ha != hc).sum() > 80


# ----------------------------------------------------------------------------------------------
# Groups and calibration
# ----------------------------------------------------------------------------------------------
def test_group_metrics_gap_and_flag():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    preds = np.array([0, 1, 0, 1, 0, 1, 1, 0, 1, 1])  # site_a all right, site_b 1 of 4 right
    groups = ["site_a"] * 6 + ["site_b"] * 4
    g = group_metrics(np.eye(2)[preds], labels, groups, ["cat", "dog"])
    assert g["by_group"]["site_a"] == {"n": 6, "accuracy": 1.0, "macro_recall": 1.0, "recall": {"cat": 1.0, "dog": 1.0}}
    assert g["by_group"]["site_b"]["accuracy"] == pytest.approx(0.25)
    assert g["by_group"]["site_b"]["recall"] == {"cat": 0.0, "dog": 0.5}
    assert (g["worst_group"], g["best_group"]) == ("site_b", "site_a")
    assert g["accuracy_gap"] == pytest.approx(0.75) and g["recall_gap"] == pytest.approx(0.75) and g["flagged"]
    even = group_metrics(np.eye(2)[labels], labels, ["x", "y"] * 5, ["cat", "dog"])
    assert even["accuracy_gap"] == 0 and not even["flagged"]


def test_calibration_of_a_perfectly_calibrated_and_an_overconfident_model():
    labels = np.array([0] * 8 + [1] * 2)
    honest = np.log(np.tile([0.8, 0.2], (10, 1)))  # 80% confident, 80% right
    assert calibration(honest, labels)["ece"] == pytest.approx(0.0, abs=1e-9)
    sure = np.log(np.tile([0.99, 0.01], (10, 1)))
    cal = calibration(sure, labels)
    assert cal["ece"] == pytest.approx(0.19) and cal["bins"][-1]["count"] == 10


# ----------------------------------------------------------------------------------------------
# Footprint
# ----------------------------------------------------------------------------------------------
def test_footprint_is_positive_and_water_follows_energy():
    with track_footprint("fra", water_l_per_kwh=2.5) as fp:
        sum(i * i for i in range(300_000))
    r = fp.result
    assert r["energy_kwh"] > 0 and r["co2_kg"] > 0
    assert r["water_l"] == pytest.approx(r["energy_kwh"] * 2.5)
    assert r["country"] == "FRA" and r["basis"] in ("measured", "scaled", "estimated")
    assert r["method"].startswith(("measured by codecarbon", "estimated by codecarbon", "estimated from CPU time"))
    assert ("scaled to the whole run" in r["method"]) == ("tracked_seconds" in r and r["tracked_seconds"] < r["seconds"] * 0.99)
    assert r["carbon_intensity_g_per_kwh"] == pytest.approx(r["co2_kg"] * 1000 / r["energy_kwh"])


def test_footprint_falls_back_to_a_tdp_estimate(monkeypatch):
    import affinage.footprint as footprint

    def broken(country):
        raise RuntimeError("no RAPL, no luck")

    monkeypatch.setattr(footprint, "_codecarbon_tracker", broken)
    tracker = FootprintTracker("DEU").start()
    start = sum(os.times()[:2])
    while sum(os.times()[:2]) - start < 0.05:  # os.times() counts clock ticks (10 ms): burn a few of them for sure
        sum(i * i for i in range(100_000))
    r = tracker.stop()
    assert r["energy_kwh"] > 0 and r["co2_kg"] > 0 and r["water_l"] > 0 and not r["measured"]
    assert r["basis"] == "estimated" and r["method"].startswith("estimated from CPU time x TDP")
    assert "no RAPL, no luck" in r["method"]
    assert tracker.stop() is r  # idempotent


def test_footprint_rejects_an_unknown_country():
    with pytest.raises(AffinageError) as info:
        FootprintTracker("Frankreich")
    assert "country" in info.value.problem and "FRA" in info.value.fix


# ----------------------------------------------------------------------------------------------
# End to end: groups, two targets, a planted leak, report, reproduce
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trust_run(tmp_path_factory, tiny_images, tiny_timm):
    """partial:1 on a CSV with given splits and a group column, plus a re-encoded copy of a test image in train
    (lossless: these tiny drawings are mostly pixel noise, which a lossy copy changes like another drawing would;
    lossy copies of real photos are tested above)."""
    root = tmp_path_factory.mktemp("trust")
    rows = []
    for label in CLASSES:
        files = sorted((tiny_images / label).iterdir())
        for k, f in enumerate(files):
            split = "train" if k < 8 else "val" if k < 10 else "test"
            rows.append((str(f), label, split, "studio" if k % 2 else "field"))
    leaked = next(r for r in rows if r[2] == "test")
    from PIL import Image

    copy = root / "copy_of_test.png"
    Image.open(leaked[0]).convert("RGB").save(copy, format="PNG", compress_level=1)
    assert copy.read_bytes() != Path(leaked[0]).read_bytes()
    rows.append((str(copy), leaked[1], "train", "field"))
    source = root / "data.csv"
    with open(source, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split", "group"), *rows])
    targets = ["accuracy>=0.5", "recall[blue_bar]>1"]  # the second one can never be met
    run = finetune(data=str(source), model=str(tiny_timm), strategy="partial:1", out=root / "run", progress=False,
                   log=_quiet, epochs=2, batch_size=8, seed=0, targets=targets)
    return run, leaked[0], copy


def test_run_saves_targets_groups_leaks_diagnosis_and_footprint(trust_run):
    run, leaked, copy = trust_run
    m = json.loads((run.path / "metrics.json").read_text())
    acc = m["test"]["accuracy"]
    ci = m["test"]["ci95"]
    assert m["targets"] == [{"expr": "accuracy>=0.5", "value": acc, "passed": acc >= 0.5, "ci95": ci["accuracy"],
                             "established": ci["accuracy"][0] >= 0.5},
                            {"expr": "recall[blue_bar]>1", "value": m["test"]["per_class"]["blue_bar"]["recall"],
                             "passed": False, "ci95": ci["recall[blue_bar]"], "established": False}]
    assert set(m["groups"]["by_group"]) == {"studio", "field"}
    assert all(g["ci95"][0] <= g["accuracy"] <= g["ci95"][1] for g in m["groups"]["by_group"].values())
    assert sum(g["n"] for g in m["groups"]["by_group"].values()) == m["test"]["n"]
    assert m["leaks"]["pairs"] == 1 and m["leaks"]["dropped"] == 0
    with open(run.path / "leaks.csv", newline="") as fh:
        pairs = list(csv.DictReader(fh))
    assert [(p["path_a"], p["split_a"], p["path_b"], p["split_b"]) for p in pairs] == [(str(copy), "train", leaked, "test")]
    assert any(f["issue"] == "train/test leak" for f in m["diagnosis"])
    fp = m["footprint"]
    assert fp["energy_kwh"] > 0 and fp["co2_kg"] > 0 and fp["water_l"] > 0 and fp["method"]
    assert 0 <= m["calibration"]["ece"] <= 1
    page = (run.path / "report.html").read_text()
    for section in ("targets", "diagnosis", "leaks", "groups", "calibration", "footprint", "learning-curves",
                    "confusion-matrix", "per-class", "data", "config"):
        assert f'<section id="{section}">' in page, section
    assert "copy_of_test.png" in page and "recall[blue_bar]&gt;1" in page and "FAIL" in page


def test_drop_leaks_removes_the_copy_from_test(trust_run, tmp_path, tiny_timm):
    run, leaked, _ = trust_run
    again = finetune(data=run.config["data"], model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "dropped",
                     progress=False, log=_quiet, seed=0, drop_leaks=True)
    with open(again.path / "splits" / "test.csv", newline="") as fh:
        test_files = [r["path"] for r in csv.DictReader(fh)]
    assert leaked not in test_files and len(test_files) == run.metrics["test"]["n"] - 1
    assert (again.metrics["leaks"]["pairs"], again.metrics["leaks"]["dropped"]) == (1, 1)
    assert not any(f["issue"] == "train/test leak" for f in again.metrics["diagnosis"])


def test_reproduce_is_identical(trust_run, capsys):
    run, _, _ = trust_run
    out = run.path.parent / "rerun"
    assert main(["reproduce", str(run.path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith("identical"), printed
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (run.path, out))
    assert a["test"] == b["test"] and a["targets"] == b["targets"] and a["groups"] == b["groups"]


def test_reproduce_reports_a_changed_figure(trust_run, tmp_path, capsys):
    from affinage.reproduce import compare_runs

    run, _, _ = trust_run
    fake = tmp_path / "fake"
    shutil.copytree(run.path, fake)
    m = json.loads((fake / "metrics.json").read_text())
    m["test"]["loss"] += 1e-12
    (fake / "metrics.json").write_text(json.dumps(m))
    diffs = compare_runs(run.path, fake)
    assert len(diffs) == 1 and diffs[0].startswith("test.loss: ")


def test_fail_on_target_exit_status(tiny_images, tiny_timm, tmp_path, capsys):
    args = ["train", "--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "linear-probe", "--quiet",
            "--target", "accuracy>=0", "--target", "accuracy>1", "--country", "DEU", "--water-factor", "3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--fail-on-target"]) == 1
    out = capsys.readouterr().out
    assert "PASS  accuracy>=0" in out and "FAIL  accuracy>1" in out and "footprint:" in out
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["footprint"]["country"] == "DEU" and m["footprint"]["water_l_per_kwh"] == 3.0
    assert [t["passed"] for t in m["targets"]] == [True, False]
    assert main(["report", str(tmp_path / "a")]) == 0  # regenerates report.html
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("command, options", [
    ("train", ["--target", "--fail-on-target", "--drop-leaks", "--country", "--water-factor", "--group-by"]),
    ("report", ["run"]),
    ("reproduce", ["run", "--out", "identical"]),
])
def test_help_of_the_trust_options(command, options, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option
