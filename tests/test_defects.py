"""Issue #10's defect list: each test failed on the code before its fix."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, SHARED, requires_oxford17, requires_shared, write_class_folders

from affinage.cli import main
from affinage.errors import AffinageError

# ----------------------------------------------------------------------------------------------
# 1. top5_accuracy needs more than 5 classes: refused before any training
# ----------------------------------------------------------------------------------------------
FIVE = ("c1", "c2", "c3", "c4", "c5")


def test_top5_target_on_five_classes_is_refused():
    from affinage.targets import parse_targets

    with pytest.raises(AffinageError) as info:
        parse_targets(["top5_accuracy>=0.9"], FIVE)
    assert "more than 5 classes" in info.value.problem and "has 5" in info.value.problem
    assert info.value.fix == "use accuracy instead"
    assert [t.metric for t in parse_targets(["top5>=0.9"], (*FIVE, "c6"))] == ["top5_accuracy"]


def test_top5_target_on_five_classes_fails_before_training(tmp_path, capsys):
    data = write_class_folders(tmp_path / "five", per_class=3, classes=FIVE)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "top5>=0.9", "--out", str(out), "--quiet"]) == 2
    assert "needs top-5 accuracy" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory, the model or any decoding


# ----------------------------------------------------------------------------------------------
# 2. File names that are not UTF-8: leaks.csv, report.html and reproduce's split reader
# ----------------------------------------------------------------------------------------------
def test_non_utf8_file_names_through_leaks_report_and_reproduce(tmp_path, tiny_images, tiny_timm):
    from PIL import Image

    from affinage.leaks import read_leaks
    from affinage.report import write_report
    from affinage.reproduce import compare_runs
    from affinage.run import finetune

    folder = tmp_path / "data"
    shutil.copytree(tiny_images, folder)
    odd = os.fsdecode(b"\xff\xfe-photo.png")  # Linux allows any bytes: a surrogate escape in str
    original = sorted((folder / CLASSES[0]).glob("*.png"))[0]
    Image.open(original).convert("RGB").save(folder / CLASSES[0] / odd)  # same pixels, other bytes
    rows = [("path", "label", "split")]
    for label in CLASSES:
        for k, f in enumerate(sorted((folder / label).iterdir())):
            rows.append((str(f), label, "test" if f.name == odd else ("train", "val", "test")[k % 3]))
    rows = [r if r[0] != str(original) else (r[0], r[1], "train") for r in rows]
    source = tmp_path / "data.csv"
    with open(source, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        csv.writer(fh).writerows(rows)
    run = finetune(data=str(source), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "run",
                   progress=False, log=lambda _: None)
    leaks = read_leaks(run.path / "leaks.csv")
    assert [(Path(r["path_a"]).name, Path(r["path_b"]).name) for r in leaks] == [(original.name, odd)]
    page = write_report(run.path).read_text(encoding="utf-8")
    assert "\\xff\\xfe-photo.png" in page  # shown escaped, never a crash
    assert compare_runs(run.path, run.path) == []  # reproduce reads the split lists back


def test_report_of_a_damaged_run_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{ not json")
    with pytest.raises(AffinageError) as info:
        from affinage.report import write_report

        write_report(run)
    assert "metrics.json" in info.value.problem and info.value.fix


# ----------------------------------------------------------------------------------------------
# 3. `affinage eval` that DIFFERS exits non-zero
# ----------------------------------------------------------------------------------------------
def test_eval_that_differs_exits_1(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    assert main(["eval", str(copy)]) == 0
    assert "identical to the training-time figures" in capsys.readouterr().out
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["test"]["accuracy"] -= 0.25
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert main(["eval", str(copy)]) == 1
    assert "DIFFERS from the training-time figures (accuracy)" in capsys.readouterr().out
    assert main(["eval", str(copy), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["matches_training_run"] is False and printed["differs"] == ["accuracy"]


# ----------------------------------------------------------------------------------------------
# 4. The export check: no blanket suppress; the model card says what was checked
# ----------------------------------------------------------------------------------------------
def test_export_card_names_the_held_out_photos_it_checked(tiny_run, tmp_path, capsys):
    from affinage.predict import held_out_photos
    from affinage.run import Run

    out = tmp_path / "export"
    assert main(["export", str(tiny_run), "--format", "timm", "--out", str(out)]) == 0
    assert "2 held-out test photo(s)" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    photos = held_out_photos(Run.load(tiny_run))[:2]
    assert "on 3 inputs: 2 held-out test photo(s)" in card and "and 1 random-noise image(s)" in card
    assert all(p in card for p in photos)


def test_export_check_lists_an_unreadable_photo_instead_of_hiding_it(tiny_run, tmp_path, monkeypatch):
    import affinage.export as export
    from affinage.run import Run

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    real = export.held_out_photos(Run.load(tiny_run))
    monkeypatch.setattr(export, "held_out_photos", lambda run: [str(broken), *real])
    checked = export._check_inputs(Run.load(tiny_run))
    assert checked.photos == real[:2] and checked.noise == 1 and len(checked.pixels) == 3
    assert [path for path, _ in checked.skipped] == [str(broken)]
    assert f"not usable: {broken} (" in checked.describe()


def test_export_card_of_an_in_memory_dataset_claims_no_photo(tmp_path, tiny_timm, capsys):
    from affinage.run import finetune

    run = finetune(data="digits", model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "digits",
                   progress=False, log=lambda _: None)
    out = tmp_path / "export"
    assert main(["export", str(run.path), "--format", "timm", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    check = card.split("## Export check", 1)[1].split("##", 1)[0]
    assert "held-out test image(s) decoded from the in-memory data source (digits/" in check
    assert "photo" not in check and "and 1 random-noise image(s)" in check


# ----------------------------------------------------------------------------------------------
# 5. Footprint: scaled figures say so, the estimate is not clamped
# ----------------------------------------------------------------------------------------------
class _FakeData:
    energy_consumed, emissions, cpu_energy, gpu_energy, ram_energy = 2e-4, 1e-5, 1.5e-4, 0.0, 5e-5
    tracking_mode, codecarbon_version = "process", "9.9"


class CPU:  # codecarbon's class names say which device each is
    _mode = "intel_rapl"


class RAM:
    pass


class _FakeTracker:
    final_emissions_data = _FakeData()
    _hardware = [CPU(), RAM()]


@pytest.mark.parametrize("started_after, basis, words, scale", [
    (2.0, "scaled", "measured by codecarbon over 8.0 s of the 10.0 s run, scaled to the whole run", 1.25),
    (0.05, "measured", "measured by codecarbon over the whole run", 1.0),
])
def test_footprint_says_when_codecarbon_figures_were_scaled(started_after, basis, words, scale):
    from affinage.footprint import FootprintTracker

    tracker = FootprintTracker("FRA")
    tracker._t0, tracker._tracked_from = 100.0, 100.0 + started_after
    r = tracker._from_codecarbon(_FakeTracker(), 10.0)
    assert r["basis"] == basis and r["measured"] == (basis == "measured") and r["method"].startswith(words)
    assert "CPU via RAPL measured; RAM from its size estimated" in r["method"]
    assert r["energy_kwh"] == pytest.approx(2e-4 * scale) and r["tracked_seconds"] == pytest.approx(10 - started_after)


def test_footprint_refuses_to_scale_a_short_tracking_window():
    from affinage.footprint import FootprintTracker

    tracker = FootprintTracker("FRA")
    tracker._t0, tracker._tracked_from = 0.0, 6.0
    assert tracker._from_codecarbon(_FakeTracker(), 10.0) is None
    assert tracker._error == "codecarbon tracked only 4.0 s of the 10.0 s run"


def test_footprint_estimate_is_cpu_time_times_tdp_without_a_floor(monkeypatch):
    import affinage.footprint as footprint

    monkeypatch.setattr(footprint.os, "cpu_count", lambda: 4)
    tracker = footprint.FootprintTracker("FRA")
    tracker._cpu0 = 10.0
    monkeypatch.setattr(footprint, "_cpu_seconds", lambda: 17.2)
    r = tracker._estimate(seconds=60.0)
    assert r["energy_kwh"] == pytest.approx(footprint.FALLBACK_TDP_W * 7.2 / 4 / 3.6e6) and r["basis"] == "estimated"
    assert "7.2 CPU-seconds / 4 cores" in r["method"]
    monkeypatch.setattr(footprint, "_cpu_seconds", lambda: 10.0)  # no CPU time at all: 0, not a made-up minimum
    idle = tracker._estimate(seconds=60.0)
    assert idle["energy_kwh"] == 0.0 and idle["co2_kg"] == 0.0
    assert idle["carbon_intensity_g_per_kwh"] == pytest.approx(footprint.carbon_intensity("FRA"))


# ----------------------------------------------------------------------------------------------
# 6. HF checkpoints whose processor config states no mean/std/size: refused, never invented
# ----------------------------------------------------------------------------------------------
def _edited_vit(tiny_hf_vit: Path, folder: Path, *drop: str) -> Path:
    shutil.copytree(tiny_hf_vit, folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("drop, needles", [
    (("image_mean",), ["states no image_mean", "--mean"]),
    (("image_std",), ["states no image_std", "--std"]),
    (("size", "crop_size"), ["states no input size", "--image-size"]),
])
def test_hf_processor_config_without_a_field_is_refused(tiny_hf_vit, tmp_path, drop, needles):
    from affinage.backbones import create_model

    folder = _edited_vit(tiny_hf_vit, tmp_path / "vit", *drop)
    with pytest.raises(AffinageError) as info:
        create_model(str(folder), num_classes=2)
    text = str(info.value)
    assert all(n in text for n in needles), text
    assert str(folder) in info.value.problem


def test_hf_preprocessing_takes_the_overrides(tiny_hf_vit, tmp_path):
    from transformers import AutoImageProcessor
    from transformers.image_processing_utils import ImageProcessingMixin

    from affinage.backbones import _hf_preprocessing, create_model

    folder = _edited_vit(tiny_hf_vit, tmp_path / "vit", "image_mean", "image_std", "size", "crop_size")
    processor = AutoImageProcessor.from_pretrained(folder)
    stated, _ = ImageProcessingMixin.get_image_processor_dict(str(folder))
    pp = _hf_preprocessing(processor, stated, "x", image_size=40, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    assert (pp.input_size, pp.mean, pp.std, pp.crop_mode) == (40, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "squash")
    assert create_model(str(tiny_hf_vit), num_classes=2).preprocessing.input_size == 32  # stated: read as before


def test_mean_and_std_options_are_validated(capsys):
    from affinage.config import TrainConfig

    assert TrainConfig(data="x", mean=(0.5, 0.4, 0.3), std=[0.2, 0.2, 0.2]).mean == [0.5, 0.4, 0.3]
    with pytest.raises(AffinageError, match="std must be 3 finite numbers"):
        TrainConfig(data="x", std=[0.2, 0.0, 0.2])
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--mean", "0.5,0.5"])
    assert "expected three numbers R,G,B" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 8. --patience 0 is refused (it used to become the strategy's default silently)
# ----------------------------------------------------------------------------------------------
def test_patience_zero_is_refused_and_explicit_patience_is_kept(tmp_path, tiny_images, capsys):
    from affinage.config import TrainConfig
    from affinage.strategies import get_strategy

    with pytest.raises(AffinageError) as info:
        TrainConfig(data="x", patience=0)
    assert "patience must be >= 1, got 0" in info.value.problem and "--patience equal to --epochs" in info.value.fix
    assert main(["train", "--data", str(tiny_images), "--patience", "0", "--out", str(tmp_path / "r")]) == 2
    assert "patience must be >= 1" in capsys.readouterr().err and not (tmp_path / "r").exists()
    probe = get_strategy("linear-probe")
    assert probe.resolve(TrainConfig(data="x", patience=1))["patience"] == 1
    assert probe.resolve(TrainConfig(data="x"))["patience"] == probe.defaults.patience
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "1 stops at the first epoch that does not improve" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------------------------
# 9. Leak check: near-duplicate candidates confirmed on the pixels
# ----------------------------------------------------------------------------------------------
@requires_shared
def test_a_recoloured_product_shot_is_not_a_copy_but_a_resized_one_is():
    from PIL import Image

    from affinage.data import Preprocessing, load_pixels
    from affinage.leaks import compare_pictures

    pp = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, "center")
    photo = sorted((SHARED / "hymenoptera" / "train" / "bees").glob("*.jpg"))[0]
    with Image.open(photo) as im:
        im = im.convert("RGB")
    w, h = im.size
    product = np.asarray(im).astype(int)  # a colour variant: the centre (the "product") 20 levels bluer, less red
    product[int(h * 0.35):int(h * 0.65), int(w * 0.35):int(w * 0.65)] += np.array([-20, 0, 20])
    variants = {"resized": im.resize((w * 3 // 4, h * 3 // 4)),
                "recoloured": Image.fromarray(np.clip(product, 0, 255).astype(np.uint8)),
                "darker": im.point(lambda v: int(v * 0.8))}
    pixels = [load_pixels(photo.read_bytes(), pp)]
    for img in variants.values():
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        pixels.append(load_pixels(buf.getvalue(), pp))
    same, edges, colours = compare_pictures(np.stack(pixels), [0, 0, 0], [1, 2, 3])
    assert same.tolist() == [True, False, False], (edges, colours)
    assert edges[1] > 0.99 and colours[1] > 15  # the very same edges: only its colours tell it apart


def _fashion_subset(tmp_path: Path, classes: set[str]) -> Path:
    rows = [r for r in csv.DictReader(open(SHARED / "fashion_small" / "articleType.csv", newline=""))
            if r["label"] in classes]
    source = tmp_path / "fashion.csv"
    with open(source, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *((str(SHARED / "fashion_small" / r["path"]), r["label"])
                                                        for r in rows)])
    return source


requires_fashion = pytest.mark.skipif(not (SHARED / "fashion_small" / "articleType.csv").is_file(),
                                      reason=f"fashion_small photos not found at {SHARED / 'fashion_small'}")


@requires_fashion
@pytest.mark.slow
def test_leak_check_does_not_flood_on_catalogue_photos(tmp_path):
    """1,269 product shots on white (sunglasses, formal shoes, ties, wallets, sandals, flip flops, gift sets; the
    classes where the old check listed the most pairs): 3,000+ candidates within the hash threshold, all different
    products (looked at: black vs brown wallets, ties of one cut in other colours...): none is reported."""
    from affinage.data import Preprocessing, decode_all, load_source, make_splits
    from affinage.leaks import NEAR_DUPLICATE_BITS, _hash_candidates, find_leaks, perceptual_hashes

    classes = {"Sunglasses", "Formal Shoes", "Ties", "Wallets", "Sandals", "Flip Flops", "Accessory Gift Set"}
    decoded = decode_all(load_source(str(_fashion_subset(tmp_path, classes))),
                         Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, "center"), progress=False)
    splits = make_splits(decoded.samples, 0)
    codes = perceptual_hashes(decoded.pixels)
    assert len(_hash_candidates(codes, splits, NEAR_DUPLICATE_BITS)) > 3000  # what the hash alone listed
    assert find_leaks(decoded.pixels, decoded.hashes, splits, codes=codes) == []


@requires_oxford17
@pytest.mark.slow
def test_leak_check_keeps_oxford17s_genuine_pairs_and_planted_copies():
    """Oxford-17's given split holds 40 pairs of the same photo (one a shifted crop, 44 hash bits apart), each
    checked by eye; 10 test photos resized to 80% and saved at JPEG 70 into train are all found too."""
    from PIL import Image

    from affinage.data import Preprocessing, Splits, decode_all, load_pixels, load_source, make_splits
    from affinage.leaks import find_leaks

    pp = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, "center")  # EfficientNet-Lite0's
    decoded = decode_all(load_source(str(SHARED / "oxford17" / "splits.csv")), pp, progress=False)
    splits = make_splits(decoded.samples, 0)
    leaks = find_leaks(decoded.pixels, decoded.hashes, splits)
    assert len(leaks) == 40 and max(leak.distance for leak in leaks) == 44
    assert all(decoded.samples[leak.a].label == decoded.samples[leak.b].label for leak in leaks)

    picked = random.Random(17).sample(list(splits.test), 10)
    copies = []
    for i in picked:
        with Image.open(decoded.samples[i].key) as im:
            im = im.convert("RGB")
            small = im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.BICUBIC)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=70)
        copies.append(load_pixels(buf.getvalue(), pp))
    n = len(decoded.pixels)
    pixels = np.concatenate([np.asarray(decoded.pixels), np.stack(copies)])
    leaky = Splits(list(splits.train) + list(range(n, n + 10)), list(splits.val), list(splits.test), "planted")
    found = {(leak.a, leak.b) for leak in find_leaks(pixels, [*decoded.hashes, *(f"copy{k}" for k in range(10))],
                                                     leaky)}
    assert all((n + k, i) in found for k, i in enumerate(picked))
