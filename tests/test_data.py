"""Data stage: sources (class folders, train/val trees, CSVs, hf: datasets, digits), seeded stratified splits,
safe decoding of bad files, and colour handling of unusual image encodings."""
from __future__ import annotations

import csv
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, IMAGES_PER_CLASS, SHARED, requires_shared, write_class_folders
from PIL import Image

from affinage.data import (
    Preprocessing,
    Sample,
    Splits,
    UnreadableImage,
    decode_all,
    load_source,
    make_splits,
    open_image,
    prepare_image,
    read_split_lists,
    write_split_lists,
)
from affinage.errors import AffinageError

PP = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, "center")


def _quiet(_: str) -> None:
    pass


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def solid(colour, size=(24, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def test_class_folders(tiny_images):
    images = load_source(str(tiny_images))
    assert images.classes == sorted(CLASSES)
    assert len(images.samples) == len(CLASSES) * IMAGES_PER_CLASS
    assert Counter(s.label for s in images.samples) == {c: IMAGES_PER_CLASS for c in CLASSES}
    for s in images.samples:
        assert Path(s.key).is_file() and Path(s.key).parent.name == s.label
        assert s.split is None and s.group is None
    assert images.skipped == []
    assert images.read_bytes(images.samples[0]) == Path(images.samples[0].key).read_bytes()
    assert "class folders" in images.description


def test_stray_files_and_empty_class_folders_are_listed(tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=3, classes=("a", "b"))
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "notes.txt").write_text("hello")
    (root / "empty_class").mkdir()
    images = load_source(str(root))
    assert images.classes == ["a", "b"]  # the empty folder is not a class
    reasons = {Path(k).name: r for k, r in images.skipped}
    assert "not inside a class folder" in reasons[".DS_Store"]
    assert "not inside a class folder" in reasons["notes.txt"]
    assert "empty class folder" in reasons["empty_class"]


def test_train_val_folders_val_becomes_test_and_val_is_carved(tmp_path):
    root = tmp_path / "tv"
    write_class_folders(root / "train", per_class=10, seed=1)
    write_class_folders(root / "val", per_class=4, seed=2)
    (root / "extras").mkdir()
    images = load_source(str(root))
    assert {s.split for s in images.samples} == {"train", "val"}
    assert any("not a split" in reason for _, reason in images.skipped)
    splits = make_splits(images.samples, seed=0)
    given_val = {i for i, s in enumerate(images.samples) if s.split == "val"}
    assert set(splits.test) == given_val  # the official val split is the test set
    assert splits.val and not set(splits.val) & given_val  # a val split is carved from train
    assert not set(splits.val) & set(splits.train)
    assert set(splits.train) | set(splits.val) == {i for i, s in enumerate(images.samples) if s.split == "train"}
    assert {images.samples[i].label for i in splits.val} == set(CLASSES)  # stratified
    assert "val split is used as test" in splits.how and "val carved from train" in splits.how


def test_train_val_test_folders_are_used_as_given(tmp_path):
    root = tmp_path / "tvt"
    for split, n in (("training", 5), ("validation", 3), ("test", 3)):  # aliases are understood
        write_class_folders(root / split, per_class=n, seed=n)
    images = load_source(str(root))
    splits = make_splits(images.samples, seed=0)
    assert splits.how == "given splits"
    for name, idx in splits.items():
        assert {images.samples[i].split for i in idx} == {name}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 9, 9)


def _write_csv(path: Path, rows: list[list[str]], header=("path", "label", "split", "group")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_with_relative_paths_splits_and_groups(tmp_path, tiny_images):
    root = tmp_path / "csvdata"
    shutil.copytree(tiny_images, root / "images")
    rows = []
    for k, p in enumerate(sorted((root / "images").rglob("*.*"))):
        split = ("train", "train", "val", "test")[k % 4]
        rows.append([str(p.relative_to(root)), p.parent.name, split, f"site{k % 2}"])
    csv_path = _write_csv(root / "labels.csv", rows)
    images = load_source(str(csv_path))
    assert len(images.samples) == len(rows)
    for s, row in zip(images.samples, rows):
        assert Path(s.key) == root / row[0] and Path(s.key).is_file()
        assert (s.label, s.split, s.group) == (row[1], row[2], row[3])
    splits = make_splits(images.samples, seed=0)
    assert splits.how == "given splits"
    assert [images.samples[i].split for i in splits.test] == ["test"] * len(splits.test)


def test_csv_absolute_paths_and_split_aliases(tmp_path, tiny_images):
    files = sorted(tiny_images.rglob("*.*"))
    rows = [[str(p), p.parent.name, "Validation" if k % 5 == 0 else "TRAIN"] for k, p in enumerate(files)]
    images = load_source(str(_write_csv(tmp_path / "abs.csv", rows, header=("Path", "Label", "Split"))))
    assert {s.split for s in images.samples} == {"train", "val"}


def test_csv_row_naming_a_missing_file(tmp_path, tiny_images):
    files = sorted(tiny_images.rglob("*.*"))
    rows = [[str(p), p.parent.name, "", ""] for p in files[:4]] + [["images/nope/missing_photo.jpg", "a", "", ""]]
    with pytest.raises(AffinageError) as info:
        load_source(str(_write_csv(tmp_path / "bad.csv", rows)))
    message = str(info.value)
    assert "missing_photo.jpg" in message and "line 6" in message
    assert info.value.fix


@pytest.mark.parametrize("header, rows, match", [
    (("file", "class"), [["x.png", "a"]], "needs path and label"),
    (("path", "label", "split"), [["{f}", "a", "holdout"]], "split 'holdout'"),
    (("path", "label"), [["{f}", ""]], "empty label"),
])
def test_csv_problems_are_named(tmp_path, tiny_images, header, rows, match):
    some_file = str(next(tiny_images.rglob("*.png")))
    rows = [[c.replace("{f}", some_file) for c in r] for r in rows]
    with pytest.raises(AffinageError, match=match):
        load_source(str(_write_csv(tmp_path / "x.csv", rows, header=header)))


def test_csv_mixing_split_and_no_split_is_refused(tmp_path, tiny_images):
    files = sorted(tiny_images.rglob("*.*"))
    rows = [[str(p), p.parent.name, "train" if k else "", ""] for k, p in enumerate(files)]
    images = load_source(str(_write_csv(tmp_path / "mixed.csv", rows)))
    with pytest.raises(AffinageError, match="some samples have a split and others not"):
        make_splits(images.samples, seed=0)


@pytest.mark.parametrize("spec, match", [
    ("does/not/exist", "does not exist"),
    ("README.txt", "is not a CSV"),
])
def test_bad_data_paths(tmp_path, spec, match):
    (tmp_path / "README.txt").write_text("hi")
    with pytest.raises(AffinageError, match=match) as info:
        load_source(str(tmp_path / spec))
    assert info.value.fix


def test_single_class_and_empty_data_are_refused(tmp_path):
    write_class_folders(tmp_path / "one", per_class=3, classes=("only",))
    with pytest.raises(AffinageError, match="single class"):
        load_source(str(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AffinageError, match="no images found"):
        load_source(str(tmp_path / "empty"))


def _png_bytes(colour) -> dict:
    return {"bytes": encode(solid(colour, (16, 16)), "PNG"), "path": None}


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "note": datasets.Value("string")})
    colours = ["red"] * 5 + ["blue"] * 5
    ds = datasets.Dataset.from_dict({"image": [_png_bytes(c) for c in colours], "label": [0] * 5 + [1] * 5,
                                     "note": ["x"] * 10}, features=features)
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0, 9]), "test": ds.select([1, 8]),
                               "unlabeled_extra": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "ds"))
    images = load_source(f"hf:{tmp_path / 'ds'}")
    assert images.classes == ["cat", "dog"]
    assert len(images.samples) == 14  # the split with an unknown name is left out, and says so:
    assert [(k, r.split(":")[0]) for k, r in images.skipped] == [("hf/unlabeled_extra", "split 'unlabeled_extra' (1 images) is not train, val or test")]
    assert Counter(s.split for s in images.samples) == {"train": 10, "val": 2, "test": 2}
    first_dog = next(s for s in images.samples if s.label == "dog" and s.split == "train")
    assert open_image(images.read_bytes(first_dog)).getpixel((3, 3)) == (0, 0, 255)
    assert make_splits(images.samples, seed=0).how == "given splits"


def test_hf_splits_without_a_known_name_or_labels_are_named(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"image": [_png_bytes(c) for c in ["red", "blue"] * 3], "label": [0, 1] * 3},
                                    features=features)
    unlabelled = datasets.Dataset.from_dict({"image": [_png_bytes("red")] * 2, "label": [-1, -1]}, features=features)
    datasets.DatasetDict({"train": ds, "test": unlabelled}).save_to_disk(str(tmp_path / "unlabelled"))
    images = load_source(f"hf:{tmp_path / 'unlabelled'}")
    assert {s.split for s in images.samples} == {"train"}  # -1 is no label, never names[-1] ("dog")
    assert images.skipped == [("hf/test", "2 image(s) of split 'test' have no label (-1): left out")]
    datasets.DatasetDict({"holdout": ds, "extra": ds}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(AffinageError, match=r"split\(s\) \['holdout', 'extra'\], none of them train") as info:
        load_source(f"hf:{tmp_path / 'odd'}")
    assert "train" in info.value.fix


def test_hf_single_dataset_gets_carved_splits(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"img": [_png_bytes(c) for c in ["red", "green", "blue"] * 6],
                                     "y": [0, 1, 2] * 6}, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    images = load_source(f"hf:{tmp_path / 'single'}")
    assert {s.split for s in images.samples} == {"train"}
    splits = make_splits(images.samples, seed=0)
    assert "test carved from train" in splits.how and "val carved from train" in splits.how
    for _, idx in splits.items():
        assert {images.samples[i].label for i in idx} == {"a", "b", "c"}


def test_hf_dataset_without_classlabel_is_refused(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [_png_bytes("red")] * 2, "label": ["a", "b"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(AffinageError, match="ClassLabel"):
        load_source(f"hf:{tmp_path / 'nolabel'}")


def test_hf_unknown_dataset_id_is_a_user_error():
    # offline in tests (HF_DATASETS_OFFLINE=1): the loader's failure becomes a one-line error with a fix
    with pytest.raises(AffinageError, match="cannot load Hugging Face dataset") as info:
        load_source("hf:affinage-tests/no-such-dataset-xyz")
    assert info.value.fix


def test_digits():
    images = load_source("digits")
    assert len(images.samples) == 1797
    assert images.classes == [str(d) for d in range(10)]
    img = open_image(images.read_bytes(images.samples[0]))
    assert img.size == (8, 8) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.max() > 128 and arr.min() == 0  # real strokes, full range


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(f"/x/{label}/{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


def test_seeded_splits_are_reproducible_and_stratified():
    samples = _samples({"a": 40, "b": 20, "c": 60})
    first = make_splits(samples, seed=3, val_fraction=0.2, test_fraction=0.25)
    again = make_splits(list(samples), seed=3, val_fraction=0.2, test_fraction=0.25)
    assert first.items() == again.items()
    other = make_splits(samples, seed=4, val_fraction=0.2, test_fraction=0.25)
    assert other.test != first.test
    # the order samples arrive in does not matter (splits are keyed by path, not position)
    shuffled = samples[::-1]
    flipped = make_splits(shuffled, seed=3, val_fraction=0.2, test_fraction=0.25)
    assert sorted(shuffled[i].key for i in flipped.test) == sorted(samples[i].key for i in first.test)

    all_idx = first.train + first.val + first.test
    assert sorted(all_idx) == list(range(len(samples)))  # disjoint and complete
    for name, idx, fraction in (("test", first.test, 0.25), ("val", first.val, 0.2)):
        counts = Counter(samples[i].label for i in idx)
        for label, total in (("a", 40), ("b", 20), ("c", 60)):
            assert counts[label] == pytest.approx(total * fraction, abs=1), (name, label)
    assert "seed 3" in first.how


def test_class_too_small_to_split_is_named():
    samples = _samples({"plenty": 10, "rare_orchid": 1})
    with pytest.raises(AffinageError, match="rare_orchid") as info:
        make_splits(samples, seed=0)
    assert "too few" in str(info.value) and info.value.fix


def test_tiny_classes_still_get_one_image_per_split():
    splits = make_splits(_samples({"a": 3, "b": 3}), seed=0)
    for _, idx in splits.items():
        assert len(idx) == 2  # one per class in each split


def test_split_lists_round_trip(tmp_path, tiny_images):
    images = load_source(str(tiny_images))
    decoded = decode_all(images, PP, progress=False)
    splits = make_splits(decoded.samples, seed=0)
    write_split_lists(tmp_path / "splits", decoded.samples, decoded.hashes, splits)
    for hashes in (decoded.hashes, None):  # by content, or by path
        again = read_split_lists(tmp_path / "splits", decoded.samples, hashes)
        assert again.items() == splits.items()
    with pytest.raises(AffinageError, match="not in the data"):
        read_split_lists(tmp_path / "splits", decoded.samples[:5], decoded.hashes[:5])


def _listed(tmp_path, root, **split_kw):
    """Decode `root`, make and write its split lists; returns (decoded, splits, lists folder)."""
    decoded = decode_all(load_source(str(root)), PP, progress=False)
    splits = make_splits(decoded.samples, seed=0, **split_kw)
    write_split_lists(tmp_path / "lists", decoded.samples, decoded.hashes, splits)
    return decoded, splits, tmp_path / "lists"


def _keys(samples, splits):
    return [sorted(Path(samples[i].key).name for i in idx) for _, idx in splits.items()]


def test_split_lists_follow_moved_and_renamed_files(tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=6, classes=("a", "b"))
    decoded, splits, lists = _listed(tmp_path, root)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    (moved / "a" / "a_00.png").rename(moved / "a" / "renamed.png")
    again = decode_all(load_source(str(moved)), PP, progress=False)
    reused = read_split_lists(lists, again.samples, again.hashes)
    expected = [[n.replace("a_00.png", "renamed.png") for n in names] for names in _keys(decoded.samples, splits)]
    assert [sorted(x) for x in _keys(again.samples, reused)] == [sorted(x) for x in expected]
    with pytest.raises(AffinageError, match="not in the data"):  # by path alone, the renamed file is gone
        read_split_lists(lists, again.samples)


def test_old_split_lists_without_sha_match_by_path(tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=6, classes=("a", "b"))
    decoded, splits, lists = _listed(tmp_path, root)
    for name in ("train", "val", "test"):
        path = lists / f"{name}.csv"
        rows = list(csv.reader(path.open()))
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([row[:3] for row in rows])  # path,label,group: the oldest format
    (lists / "excluded.csv").unlink()
    reused = read_split_lists(lists, decoded.samples, decoded.hashes)
    assert _keys(decoded.samples, reused) == _keys(decoded.samples, splits)


def test_split_lists_and_data_that_disagree_get_one_clear_line(tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=6, classes=("a", "b"))
    _, _, lists = _listed(tmp_path, root)
    # new images of known classes
    write_class_folders(tmp_path / "more", per_class=2, classes=("a",), seed=5)
    for i, p in enumerate(sorted((tmp_path / "more" / "a").iterdir())):
        shutil.copy(p, root / "a" / f"new_{i}{p.suffix}")
    grown = decode_all(load_source(str(root)), PP, progress=False)
    with pytest.raises(AffinageError, match=r"has 2 image\(s\) that are in none of the split lists.*new_") as info:
        read_split_lists(lists, grown.samples, grown.hashes)
    assert "drop --splits-from" in info.value.fix
    assert read_split_lists(lists, grown.samples, grown.hashes, complete=False).test  # evaluation may ignore them
    # a new class
    write_class_folders(root, per_class=3, classes=("c",), seed=6)
    wider = decode_all(load_source(str(root)), PP, progress=False)
    with pytest.raises(AffinageError, match=r"1 class\(es\) that the split lists .* do not have: c \(3 image"):
        read_split_lists(lists, wider.samples, wider.hashes)
    # images gone, and a file whose content changed
    shutil.rmtree(root / "c")
    for p in (root / "a").glob("new_*"):
        p.unlink()
    (root / "b" / "b_00.png").unlink()
    fewer = decode_all(load_source(str(root)), PP, progress=False)
    with pytest.raises(AffinageError, match=r"name 1 image\(s\) that are not in the data, e.g. '.*b_00.png'"):
        read_split_lists(lists, fewer.samples, fewer.hashes)
    shutil.copy(root / "b" / "b_02.png", root / "b" / "b_00.png")
    changed = decode_all(load_source(str(root)), PP, progress=False)
    with pytest.raises(AffinageError, match="b_00.png.*other content now"):
        read_split_lists(lists, changed.samples, changed.hashes)


def test_images_a_run_kept_out_of_every_split_are_known_to_reruns(tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=6, classes=("a", "b"))
    decoded = decode_all(load_source(str(root)), PP, progress=False)
    splits = make_splits(decoded.samples, seed=0)
    dropped = splits.test[0]
    kept = Splits(splits.train, splits.val, splits.test[1:], splits.how)  # as --drop-leaks leaves them
    write_split_lists(tmp_path / "lists", decoded.samples, decoded.hashes, kept, {dropped: "duplicate of a train image"})
    with open(tmp_path / "lists" / "excluded.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["reason"]) for r in rows] == [(decoded.samples[dropped].key, "duplicate of a train image")]
    reused = read_split_lists(tmp_path / "lists", decoded.samples, decoded.hashes)
    assert reused.items() == kept.items()


# ----------------------------------------------------------------------------------------------
# Safe decoding
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def messy_folder(tmp_path) -> Path:
    """Two good classes plus every kind of file that is not a usable photo."""
    root = write_class_folders(tmp_path / "messy", per_class=6, classes=("ants", "bees"))
    good_jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                       "JPEG", quality=90)
    (root / "ants" / "zero.jpg").write_bytes(b"")
    (root / "ants" / "text.jpg").write_text("<html>404 not found</html>")
    (root / "ants" / "imageNotFound.gif").write_bytes(encode(solid("white"), "GIF"))
    (root / "bees" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "bees" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    return root


EXPECTED_REASONS = {
    "zero.jpg": "empty file",
    "text.jpg": "not an image",
    "imageNotFound.gif": "unsupported image format GIF",
    "truncated.jpg": "truncated",
    ".DS_Store": "not an image",
}


def test_unreadable_files_are_skipped_with_a_reason(messy_folder):
    images = load_source(str(messy_folder))
    decoded = decode_all(images, PP, progress=False)
    reasons = {Path(k).name: r for k, r in decoded.skipped}
    assert set(reasons) == set(EXPECTED_REASONS)
    for name, reason in EXPECTED_REASONS.items():
        assert reason in reasons[name], (name, reasons[name])
    assert len(decoded.samples) == 12 and decoded.pixels.shape == (12, 3, 16, 16)
    assert all(Path(s.key).name not in EXPECTED_REASONS for s in decoded.samples)
    assert len(decoded.hashes) == len(decoded.samples)


def test_decoding_is_cached(tiny_images):
    images = load_source(str(tiny_images))
    pp = Preprocessing(20, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, "center")
    first = decode_all(images, pp, progress=False)
    second = decode_all(images, pp, progress=False)
    assert second.cache_hit
    assert np.array_equal(np.asarray(first.pixels), np.asarray(second.pixels))
    assert first.hashes == second.hashes


def test_finetune_lists_skipped_files(tmp_path, messy_folder, tiny_timm):
    from affinage.run import finetune

    run = finetune(data=str(messy_folder), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "run",
                   progress=False, log=_quiet, epochs=3)
    with open(run.path / "skipped_files.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {Path(r["path"]).name for r in rows} == set(EXPECTED_REASONS)
    assert all(r["reason"] for r in rows)
    assert run.metrics["data"]["skipped"] == len(EXPECTED_REASONS)
    # skipped files are in no split
    for split in ("train", "val", "test"):
        with open(run.path / "splits" / f"{split}.csv", newline="") as fh:
            assert not {Path(r["path"]).name for r in csv.DictReader(fh)} & set(EXPECTED_REASONS)
    # and predicting on one gives an error entry instead of a crash
    result = run.predict([str(messy_folder / "ants" / "text.jpg"), str(next((messy_folder / "bees").glob("*.png")))])
    assert "not an image" in result[0]["error"] and "label" not in result[0]
    assert result[1]["label"] in ("ants", "bees")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9])
def test_truncated_files_are_refused_with_a_reason(fmt, keep):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    with pytest.raises(UnreadableImage) as info:
        open_image(data[: int(len(data) * keep)])
    if fmt != "WEBP":  # libwebp only says it cannot create a decoder
        assert str(info.value) == "truncated or corrupt image data"


def test_decompression_bomb_is_refused():
    big = encode(Image.new("1", (9000, 8000)), "PNG")  # 72 Mpx, a few kB on disk
    with pytest.raises(UnreadableImage, match="too large"):
        open_image(big)


# ----------------------------------------------------------------------------------------------
# Colour and orientation
# ----------------------------------------------------------------------------------------------
def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge is the top of the photo
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = open_image(data)
    assert out.size == (20, 40)  # portrait, as it displays
    top, bottom = np.asarray(out)[3, 10].astype(int), np.asarray(out)[-4, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # the same in the decoded array that training uses (JPEG draft mode included)
    pixels = prepare_image(open_image(data, draft_size=16), Preprocessing(16, (0,) * 3, (1,) * 3, "bilinear", 1.0,
                                                                        "squash"))
    assert pixels[0, 1, 8] > 200 and pixels[2, -2, 8] > 200


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(open_image(data)).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert abs(out[32, 0, 0] - 128) <= 2  # mid-grey stays mid-grey
    assert len(np.unique(out[..., 0])) > 200  # a full ramp, not a clipped white image


def test_palette_png_with_transparency_goes_on_white():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * (254 * 3))  # 0 black (transparent), 1 red
    img.paste(1, (0, 0, 5, 10))
    data = encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = open_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((2, 5)) == (200, 30, 30)
    assert out.getpixel((8, 5)) == (255, 255, 255)  # transparent, not black


@pytest.mark.parametrize("mode, colour, expected", [
    ("RGBA", (0, 255, 0, 0), (255, 255, 255)),  # fully transparent -> white
    ("RGBA", (0, 255, 0, 255), (0, 255, 0)),
    ("LA", (0, 0), (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
])
def test_other_modes_decode_to_rgb(mode, colour, expected):
    out = open_image(encode(Image.new(mode, (8, 8), colour), "PNG"))
    assert out.mode == "RGB" and out.getpixel((4, 4)) == expected


def test_cmyk_jpeg_decodes_to_rgb():
    out = open_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60  # magenta + yellow = red


def test_preprocessing_has_one_crop_pct_default():
    minimal = {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}  # a hand-written model.json
    assert Preprocessing.from_dict(minimal) == Preprocessing(224, (0.5,) * 3, (0.5,) * 3)
    assert Preprocessing.from_dict(minimal).crop_pct == 0.875  # timm's default: 224 eval crops from 256
    pp = Preprocessing(96, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 0.9, "squash")
    assert Preprocessing.from_dict(pp.to_dict()) == pp


def test_prepare_image_center_crop_and_squash():
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 15, 30))  # a blue band on the left quarter
    center = prepare_image(img, Preprocessing(20, (0,) * 3, (1,) * 3, "bilinear", 1.0, "center"))
    squash = prepare_image(img, Preprocessing(20, (0,) * 3, (1,) * 3, "bilinear", 1.0, "squash"))
    assert center.shape == squash.shape == (3, 20, 20) and center.dtype == np.uint8
    assert center[2, 10, 1] < 50  # the centre crop cut the blue band away
    assert squash[2, 10, 1] > 200  # squashing keeps it


# ----------------------------------------------------------------------------------------------
# The real photo datasets (read in place)
# ----------------------------------------------------------------------------------------------
@requires_shared
def test_real_hymenoptera_layout():
    images = load_source(str(SHARED / "hymenoptera"))
    assert images.classes == ["ants", "bees"]
    assert Counter(s.split for s in images.samples) == {"train": 245, "val": 153}
    gif = next(s for s in images.samples if s.key.endswith("imageNotFound.gif"))
    with pytest.raises(UnreadableImage, match="GIF"):
        open_image(images.read_bytes(gif))
    formica = next(s for s in images.samples if s.key.endswith("formica.jpeg"))
    assert open_image(images.read_bytes(formica)).mode == "RGB"


@requires_shared
def test_real_oxford17_csv_splits():
    images = load_source(str(SHARED / "oxford17" / "splits.csv"))
    assert len(images.classes) == 17
    splits = make_splits(images.samples, seed=0)
    assert splits.how == "given splits"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (680, 340, 340)
    assert all(Path(s.key).is_file() for s in images.samples[:20])


@requires_shared
def test_real_flowers5_ds_store_is_not_a_class():
    images = load_source(str(SHARED / "flowers5"))
    assert images.classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert any(Path(k).name == ".DS_Store" for k, _ in images.skipped)
    assert all(Path(s.key).name != ".DS_Store" for s in images.samples)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("preset", ["none", "light", "strong"])
def test_every_augmentation_preset_runs_with_every_interpolation(preset, interpolation):
    import torch

    from affinage.data import Preprocessing, train_transform

    pp = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation, 0.875, "center")
    transform = train_transform(pp, preset, 48)
    torch.manual_seed(0)
    for _ in range(20):  # TrivialAugmentWide picks a random op each call: exercise several
        out = transform(torch.randint(0, 256, (3, 73, 73), dtype=torch.uint8))
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32 and torch.isfinite(out).all()
