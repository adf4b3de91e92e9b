"""k-fold cross-validation and few-shot: stratified, grouped folds (duplicates in one fold), per-fold lists, child runs
on the shared caches, out-of-fold predictions, mean and sample std, the prototype classifier."""
from __future__ import annotations

import io
import shutil
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, write_class_folders
from PIL import Image

from affinage import runfiles
from affinage.config import TrainConfig
from affinage.crossval import cross_validate, fold_statistics, make_folds
from affinage.data import decode_all, load_source, read_split_lists
from affinage.errors import AffinageError
from affinage.fewshot import fit_prototype, logits, prototype_head
from affinage.leaks import duplicate_pairs, perceptual_hashes
from affinage.run import finetune

quiet = {"progress": False, "log": lambda _: None}


# ----------------------------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------------------------
def test_folds_are_stratified_disjoint_and_cover_every_image_once():
    labels = ["a"] * 10 + ["b"] * 15 + ["c"] * 5
    folds = make_folds(labels, k=5, seed=0)
    assert sorted(Counter(folds.fold.tolist())) == [1, 2, 3, 4, 5]  # every image in exactly one test fold
    for f in range(1, 6):
        counts = Counter(label for label, g in zip(labels, folds.fold) if g == f)
        assert counts == {"a": 2, "b": 3, "c": 1}
    assert folds.fold.tolist() == make_folds(labels, k=5, seed=0).fold.tolist()  # seeded
    assert folds.fold.tolist() != make_folds(labels, k=5, seed=1).fold.tolist()


def test_duplicates_and_groups_share_a_fold():
    labels = ["a"] * 12 + ["b"] * 12
    groups = [None] * 20 + ["g1", "g1", "g2", "g2"]
    duplicates = [(0, 1), (1, 13), (5, 7)]  # 0-1-13: one cluster across two classes
    folds = make_folds(labels, k=3, seed=0, groups=groups, duplicates=duplicates)
    fold = folds.fold
    assert fold[0] == fold[1] == fold[13] and fold[5] == fold[7]
    assert fold[20] == fold[21] and fold[22] == fold[23]
    assert "StratifiedGroupKFold" in folds.how and set(fold.tolist()) == {1, 2, 3}


def test_more_folds_than_a_class_has_images_is_refused_by_name():
    with pytest.raises(AffinageError, match="'rare' has 6 images, fewer than --folds 7") as info:
        make_folds(["common"] * 30 + ["rare"] * 6, k=7, seed=0)
    assert "--folds 6" in info.value.fix
    few = make_folds(["common"] * 30 + ["rare"] * 3, k=7, seed=0)  # few-shot: its images go to different folds
    assert len({f for label, f in zip(["common"] * 30 + ["rare"] * 3, few.fold) if label == "rare"}) == 3


def test_one_image_class_trains_in_every_fold():
    folds = make_folds(["a"] * 6 + ["b"] * 6 + ["solo"], k=3, seed=0)
    assert folds.fold[-1] == 0 and (folds.fold[:-1] > 0).all()


def test_fold_statistics_are_the_mean_and_the_sample_std():
    rows = [{"accuracy": a, "macro_f1": f} for a, f in ((0.9, 0.8), (0.8, 0.7), (1.0, 0.75), (0.85, 0.9))]
    stats = fold_statistics(rows)
    assert stats["accuracy_mean"] == pytest.approx(0.8875)
    assert stats["accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.8, 1.0, 0.85]))  # ddof=1
    assert stats["macro_f1_std"] == pytest.approx(np.std([0.8, 0.7, 0.75, 0.9], ddof=1))
    assert "top5_accuracy_mean" not in stats  # a metric the folds lack is not invented


@pytest.mark.parametrize("options, match", [({"folds": 1}, "2 or more"), ({"folds": 3, "splits_from": "x"}, "splits-from"),
                                            ({"folds": 3, "resume": True}, "--resume")])
def test_bad_fold_options_are_refused(options, match):
    with pytest.raises(AffinageError, match=match):
        TrainConfig(data="digits", **options)


def test_finetune_sends_folds_to_cross_validate(tiny_images):
    with pytest.raises(AffinageError, match="cross_validate"):
        finetune(data=str(tiny_images), strategy="linear-probe", folds=3, **quiet)


def test_duplicate_pairs_finds_exact_and_near_copies_within_one_set(tiny_images):
    """Distinct drawings are not duplicates; a re-encoded copy and a file copy are (as in the leak check's tests)."""
    from affinage.data import Preprocessing

    decoded = decode_all(load_source(str(tiny_images)), Preprocessing(48, (0.5,) * 3, (0.5,) * 3), progress=False)
    pixels = np.array(decoded.pixels)
    n = len(pixels)
    assert duplicate_pairs(pixels, decoded.hashes, range(n), perceptual_hashes(pixels)) == []
    buf = io.BytesIO()
    Image.fromarray(pixels[2].transpose(1, 2, 0)).save(buf, format="JPEG", quality=95, subsampling=0)
    copy = np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1)
    pixels = np.concatenate([pixels, copy[None], pixels[4][None]])
    hashes = [*decoded.hashes, "copy-of-2", decoded.hashes[4]]
    pairs = duplicate_pairs(pixels, hashes, range(n + 2), perceptual_hashes(pixels))
    assert pairs == [(2, n, "near"), (4, n + 1, "exact")]
    assert duplicate_pairs(pixels, hashes, [2, 4, 5], perceptual_hashes(pixels)) == []  # only among `indices`


# ----------------------------------------------------------------------------------------------
# End to end, on the tiny images and the tiny timm backbone
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, tiny_images, tiny_timm):
    """A 3-fold linear-probe cross-validation through the CLI, on the tiny images plus an exact copy of one image
    per class."""
    from affinage.cli import main

    data = tmp_path_factory.mktemp("cv") / "shapes"
    shutil.copytree(tiny_images, data)
    for label in CLASSES:  # one exact copy per class: a fold assignment blind to copies splits some of them
        shutil.copy(data / label / f"{label}_00.png", data / label / "copy_of_00.png")
    out = data.parent / "cv"
    assert main(["train", "--data", str(data), "--model", str(tiny_timm), "--strategy", "linear-probe", "--folds", "3",
                 "--out", str(out), "--quiet"]) == 0
    return data, out


def test_cross_validation_folds_lists_and_duplicates(cv_run):
    data, out = cv_run
    rows = runfiles.read_fold_assignment(out)
    images = load_source(str(data))
    assert sorted(r["path"] for r in rows) == sorted(s.key for s in images.samples)  # every image once
    by_fold = Counter((r["fold"], r["label"]) for r in rows)
    for label in CLASSES:
        assert sorted(by_fold[(f, label)] for f in (1, 2, 3)) in ([4, 4, 4], [4, 4, 5])  # stratified
    fold_of = {(r["label"], Path(r["path"]).name): r["fold"] for r in rows}
    for label in CLASSES:  # a copy never straddles train and test
        assert fold_of[(label, "copy_of_00.png")] == fold_of[(label, f"{label}_00.png")]
    metrics = runfiles.read_metrics(out, required=True)
    pp = runfiles.read_model_info(metrics["cv"]["per_fold"][0]["run_dir"]).preprocessing
    decoded = decode_all(images, pp, progress=False)
    for f in (1, 2, 3):
        splits = read_split_lists(out / "folds" / "lists" / f"fold-{f}" / "splits", decoded.samples, decoded.hashes)
        tested = {decoded.samples[i].key for i in splits.test}
        assert tested == {r["path"] for r in rows if r["fold"] == f}
        others = {decoded.samples[i].key for i in splits.train + splits.val}
        assert not tested & others and len(tested | others) == len(rows)
        child = read_split_lists(out / "folds" / f"fold-{f}" / "splits", decoded.samples, decoded.hashes)
        assert (child.train, child.val, child.test) == (splits.train, splits.val, splits.test)  # the lists it used


def test_cross_validation_out_of_fold_predictions_and_figures(cv_run):
    data, out = cv_run
    metrics = runfiles.read_metrics(out, required=True)
    cv = metrics["cv"]
    oof = runfiles.read_predictions(out, runfiles.OOF_PREDICTIONS)
    rows = runfiles.read_fold_assignment(out)
    assert sorted(zip(oof.paths, oof.hashes)) == sorted((r["path"], r["sha"]) for r in rows)  # one row per image
    assert sorted(oof.classes) == sorted(CLASSES) and np.allclose(oof.probabilities.sum(1), 1, atol=1e-4)
    assert {p: f for p, f in zip(oof.paths, oof.folds)} == {r["path"]: r["fold"] for r in rows}
    per_fold = cv["per_fold"]
    assert [r["fold"] for r in per_fold] == [1, 2, 3] and cv["k"] == 3 and cv["strategy"] == "linear-probe"
    accs = [r["accuracy"] for r in per_fold]
    assert cv["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert cv["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    for r in per_fold:  # each fold's figure is its child run's, on the images its fold tests
        child = runfiles.read_metrics(r["run_dir"], required=True)
        assert r["accuracy"] == child["test"]["accuracy"] and r["n_test"] == sum(f == r["fold"] for f in oof.folds)
    correct = np.array([oof.classes[int(p.argmax())] == label for p, label in zip(oof.probabilities, oof.labels)])
    assert cv["oof"]["accuracy"] == pytest.approx(correct.mean())
    low, high = cv["oof"]["accuracy_ci95"]
    assert low <= cv["oof"]["accuracy"] <= high and "cross-validation" in cv["source"]
    assert cv["accuracy_mean"] > 1 / len(CLASSES) + 0.2  # learnt something on every fold


def test_cross_validation_decodes_and_extracts_features_once(cv_run):
    _, out = cv_run
    metrics = runfiles.read_metrics(out, required=True)
    assert metrics["timing"]["decoded_images"] > 0 or metrics["timing"]["decode_cache_hit"]  # the shared stage
    for r in metrics["cv"]["per_fold"]:  # no child run re-decodes an image or recomputes a feature
        t = r["timing"]
        assert t["decode_cache_hit"] is True and t["decoded_images"] == 0 and t["features_cached"] is True, r


def test_compare_rows_of_a_cross_validation_show_the_folds_mean_and_std(cv_run):
    from affinage.compare import choose_on_val, markdown_table, row_from_run

    _, out = cv_run
    cv = runfiles.read_metrics(out, required=True)["cv"]
    row = row_from_run("linear-probe", out, 12.0)
    assert (row["test_accuracy"], row["test_accuracy_std"]) == (cv["accuracy_mean"], cv["accuracy_std"])
    assert row["val_accuracy"] == cv["oof"]["accuracy"] and row["macro_f1"] == cv["macro_f1_mean"]
    assert "test_accuracy_std" in markdown_table([row])
    other = {**row, "strategy": "again", "trainable_params": row["trainable_params"] + 1}
    k, reason, seen = choose_on_val([row, other])  # chosen on the out-of-fold predictions, as on val
    assert k == 0 and seen == [round(cv["oof"]["accuracy"], 4)] * 2 and reason  # the cheaper of two equals


def test_a_class_of_two_images_trains_under_folds_and_is_refused_without(tmp_path, tiny_timm):
    data = write_class_folders(tmp_path / "few", per_class=6)
    for extra in sorted((data / CLASSES[2]).iterdir())[2:]:
        extra.unlink()  # blue_bar keeps 2 images
    with pytest.raises(AffinageError, match=f"too few to split.*'{CLASSES[2]}' \\(2\\)"):
        finetune(data=str(data), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "plain", **quiet)
    cv = cross_validate(data=str(data), model=str(tiny_timm), strategy="linear-probe", folds=2, out=tmp_path / "cv",
                        **quiet)
    oof = runfiles.read_predictions(cv.path, runfiles.OOF_PREDICTIONS)
    assert Counter(oof.labels)[CLASSES[2]] == 2  # both images tested, each by the fold that did not train on it
    few = cv.metrics["cv"]["few_shot"]
    assert few["candidates"] == ["linear-probe", "prototype"] and few["chosen"] in few["candidates"]
    assert few["reason"] and cv.metrics["cv"]["strategy"] == few["chosen"]
    assert (cv.path / "folds" / "fold-1-prototype" / "metrics.json").is_file()
    assert cv.final is None  # no given test split and no --refit on


# ----------------------------------------------------------------------------------------------
# The prototype classifier
# ----------------------------------------------------------------------------------------------
def _blobs(shots: int, classes: int = 5, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`shots` points per class around fixed class centres (the same for every seed), noise drawn with `seed`."""
    centres = np.random.default_rng(1234).normal(0, 1, (classes, dim)) + 3.0  # all-positive, like pooled ReLU features
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), shots)
    return np.abs(centres[y] + rng.normal(0, 0.6, (len(y), dim))), y


def test_prototype_classifier_is_well_above_chance_from_three_shots():
    x, y = _blobs(3)
    xv, yv = _blobs(2, seed=1)
    xt, yt = _blobs(40, seed=2)
    fit = fit_prototype(x, y, xv, yv, 5)
    accuracy = float((logits(fit.head, xt).argmax(1) == yt).mean())
    assert accuracy > 0.9  # chance: 0.2
    assert 1.0 <= fit.temperature <= 30.0


def test_prototype_head_ranks_classes_by_cosine_to_the_class_means():
    x, y = _blobs(4, seed=3)
    xt, _ = _blobs(10, seed=4)
    centre = x.mean(0)
    z = (x - centre) / np.linalg.norm(x - centre, axis=1, keepdims=True)
    means = np.stack([z[y == c].mean(0) for c in range(5)])
    zt = (xt - centre) / np.linalg.norm(xt - centre, axis=1, keepdims=True)
    cosine = zt @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    assert (logits(prototype_head(x, y, 5, 10.0), xt).argmax(1) == cosine.argmax(1)).all()
    absent = prototype_head(x[y != 4], y[y != 4], 5)
    assert (logits(absent, xt).argmax(1) != 4).all()  # a class without a training image is never predicted


def test_prototype_strategy_trains_a_run(tmp_path, tiny_images, tiny_timm):
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="prototype", out=tmp_path / "run", **quiet)
    assert run.metrics["strategy"] == "prototype" and run.metrics["last_points"]["refit"] is True
    assert run.metrics["test"]["accuracy"] > 1 / len(CLASSES) + 0.2
    assert 1.0 <= run.metrics["hyperparameters"]["temperature"] <= 30.0
    again = run.predict([str(next((tiny_images / CLASSES[0]).iterdir()))])  # an ordinary run: predict reads it
    assert again[0]["label"] in CLASSES
