"""Hostile input, everywhere images are read. A generated corpus of every kind of bad, odd or dangerous file goes
through `affinage train` and then `affinage predict` (and `Run.predict`); case by case, each file is used correctly,
or skipped with its reason listed (skipped_files.csv, predict's output), or the data are refused with one line:
never a traceback, never a silent drop, never a hang. Plus a diverging run, stopped with a diagnosis, that keeps
the last good weights."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_class_folders
from PIL import Image

from affinage.cli import main
from affinage.data import (
    PATH_ERRORS,
    Preprocessing,
    decode_all,
    load_pixels,
    load_source,
    printable,
    read_split_lists,
)
from affinage.run import Run, finetune

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _quiet(_: str) -> None:
    pass


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels but holds a few hundred bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def halves(size: tuple[int, int] = (48, 24)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge is the top of the photo
    return encode(halves(), "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (254 * 3))  # 0: black, transparent; 1: red
    img.paste(1, (0, 0, 16, 32))
    return encode(img, "PNG", transparency=0)


def gray16_ramp() -> bytes:
    return encode(Image.fromarray(np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)), "PNG")


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


NON_UTF8_GOOD = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 and invalid bytes: str with surrogate escapes
NON_UTF8_BAD = os.fsdecode(b"r\xe9sum\xe9.jpg")


def _row_mean(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, -1).mean(axis=1)


def _upright_reference(pp: Preprocessing) -> np.ndarray:
    return load_pixels(encode(halves().transpose(Image.Transpose.ROTATE_270), "PNG"), pp)


def check_exif(row: np.ndarray, pp: Preprocessing) -> None:
    upright, unrotated = _upright_reference(pp).astype(int), load_pixels(encode(halves(), "PNG"), pp).astype(int)
    assert np.abs(row.astype(int) - upright).mean() < 8  # the rotation is applied ...
    assert np.abs(row.astype(int) - unrotated).mean() > 40  # ... the stored orientation would look different
    side = row.shape[1]
    assert row[0, 2, side // 2] > 180 and row[2, -3, side // 2] > 180  # red on top, blue at the bottom


def check_cmyk(row: np.ndarray, pp: Preprocessing) -> None:
    r, g, b = _row_mean(row)
    assert r > 200 and g < 60 and b < 60  # magenta + yellow ink = red, not inverted, not black


def check_gray16(row: np.ndarray, pp: Preprocessing) -> None:
    assert (row[0] == row[1]).all() and (row[1] == row[2]).all()
    assert row.min() < 40 and row.max() > 215 and len(np.unique(row)) > 30  # a ramp, not clipped to white


def check_palette_alpha(row: np.ndarray, pp: Preprocessing) -> None:
    side = row.shape[1]
    assert tuple(row[:, side // 2, 2]) == pytest.approx(RED, abs=25)  # opaque red on the left
    assert tuple(row[:, side // 2, -3]) == (255, 255, 255)  # transparent -> white, not black


def check_one_pixel(row: np.ndarray, pp: Preprocessing) -> None:
    assert (row == np.array(BLUE, dtype=np.uint8)[:, None, None]).all()


def check_strip(row: np.ndarray, pp: Preprocessing) -> None:
    assert tuple(_row_mean(row)) == pytest.approx(RED, abs=2)


def check_plain(row: np.ndarray, pp: Preprocessing) -> None:
    assert row.std() > 10  # a real picture (one of the generated shapes)


# name -> (bytes, pixel check): odd but valid images that must be used, decoded correctly
USED: dict[str, tuple[bytes, Callable[[np.ndarray, Preprocessing], None]]] = {
    "exif_rotated.jpg": (exif_rotated_jpeg(), check_exif),
    "cmyk.jpg": (encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), check_cmyk),
    "gray16.png": (gray16_ramp(), check_gray16),
    "palette_alpha.png": (palette_with_transparency(), check_palette_alpha),
    "one_pixel.png": (encode(Image.new("RGB", (1, 1), BLUE), "PNG"), check_one_pixel),
    "strip_1x40000.png": (encode(Image.new("RGB", (1, 40000), RED), "PNG"), check_strip),  # bounded memory
    NON_UTF8_GOOD: (b"", check_plain),  # bytes filled in from a generated shape
}

# name -> the reason listed wherever the file is read (train and predict)
SKIPPED = {
    "zero.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated or corrupt image data",
    "text.jpg": "not an image",
    "imageNotFound.gif": "unsupported image format GIF",
    "bomb_10gpx.png": "image too large",
    "bomb_72mpx.png": "image too large",
    "self_loop.jpg": "symbolic link loop",
    "dangling.jpg": "broken symbolic link",
    "fifo.jpg": "not a regular file",
    NON_UTF8_BAD: "not an image",
}
# listed by training only (not files to predict on)
SKIPPED_FOLDERS = {
    "up": "symbolic link to a folder already listed",  # red_disc/sub/up -> red_disc: a directory loop
    "empty_class": "empty class folder",
}


def write_hostile_corpus(root: Path) -> Path:
    """Two generated classes (8 images each) with every hostile kind mixed into them."""
    write_class_folders(root, per_class=8, classes=("red_disc", "blue_bar"))
    red, blue = root / "red_disc", root / "blue_bar"
    for name, (data, _) in USED.items():
        target = red / name
        if name == NON_UTF8_GOOD:
            data = (blue / "blue_bar_00.png").read_bytes()
            target = blue / name
        target.write_bytes(data)
    contents = {"zero.jpg": b"", "truncated.jpg": truncated_jpeg(), "text.jpg": b"<html>404 Not Found</html>",
                "imageNotFound.gif": encode(Image.new("RGB", (24, 24), "white"), "GIF"),
                "bomb_10gpx.png": png_header_only(100_000, 100_000), "bomb_72mpx.png": png_header_only(9000, 8000),
                NON_UTF8_BAD: b"%PDF-1.4 not a photo"}
    for name, data in contents.items():
        (blue / name if name == NON_UTF8_BAD else red / name).write_bytes(data)
    os.symlink("self_loop.jpg", red / "self_loop.jpg")
    os.symlink("does-not-exist.jpg", red / "dangling.jpg")
    os.mkfifo(red / "fifo.jpg")  # reading it would block forever
    (red / "sub").mkdir()
    os.symlink("..", red / "sub" / "up")
    (root / "empty_class").mkdir()
    return root


def hostile_file(root: Path, name: str) -> Path:
    return root / ("blue_bar" if name in (NON_UTF8_GOOD, NON_UTF8_BAD) else "red_disc") / name


@contextlib.contextmanager
def utf8_terminal():
    """stdout/stderr as on a UTF-8 terminal with strict encoding: printing an undecodable file name would crash."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    texts: dict[str, str] = {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield texts
    texts["out"], texts["err"] = (s.buffer.getvalue().decode("utf-8") for s in (out, err))  # type: ignore[attr-defined]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        return list(csv.DictReader(fh))


@dataclass
class Outcome:
    root: Path
    run: Run
    train_out: str
    train_err: str
    skipped: dict[str, str]  # file name -> reason, from skipped_files.csv
    in_splits: set[str]
    rows: dict[str, np.ndarray]  # file name -> the decoded uint8 array training used
    predicted: dict[str, dict[str, Any]]  # file name -> Run.predict result
    predict_out: str
    predict_err: str
    predict_code: int


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_timm) -> Outcome:
    root = write_hostile_corpus(tmp_path_factory.mktemp("hostile") / "data")
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    with utf8_terminal() as train_io:
        code = main(["train", "--data", str(root), "--model", str(tiny_timm), "--strategy", "linear-probe",
                     "--epochs", "5", "--out", str(out), "--quiet"])
    assert code == 0, train_io
    run = Run.load(out)
    skipped = {Path(r["path"]).name: r["reason"] for r in read_csv_rows(out / "skipped_files.csv")}
    in_splits = {Path(r["path"]).name for s in ("train", "val", "test") for r in read_csv_rows(out / "splits" / f"{s}.csv")}
    decoded = decode_all(load_source(str(root)), run.preprocessing, progress=False)
    assert decoded.cache_hit  # exactly the arrays training used
    rows = {Path(s.key).name: np.asarray(decoded.pixels[i]) for i, s in enumerate(decoded.samples)}
    files = [str(hostile_file(root, name)) for name in [*USED, *SKIPPED]]
    predicted = {Path(r["file"]).name: r for r in run.predict(files)}
    with utf8_terminal() as predict_io:
        predict_code = main(["predict", str(out), *files, "--top-k", "1"])
    return Outcome(root, run, train_io["out"], train_io["err"], skipped, in_splits, rows, predicted,
                   predict_io["out"], predict_io["err"], predict_code)


# ----------------------------------------------------------------------------------------------
# Case by case
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(USED), ids=ascii)
def test_odd_but_valid_images_are_used_and_decoded_right(corpus, name):
    assert name not in corpus.skipped
    assert name in corpus.in_splits
    USED[name][1](corpus.rows[name], corpus.run.preprocessing)
    result = corpus.predicted[name]
    assert "error" not in result and result["label"] in ("red_disc", "blue_bar")
    assert np.isfinite(result["probability"])
    assert f"{printable(str(hostile_file(corpus.root, name)))}: {result['label']} — " in corpus.predict_out


@pytest.mark.parametrize("name", list(SKIPPED), ids=ascii)
def test_unusable_files_are_skipped_with_the_reason_in_train_and_predict(corpus, name):
    reason = SKIPPED[name]
    assert reason in corpus.skipped[name], corpus.skipped.get(name)
    assert name not in corpus.in_splits and name not in corpus.rows
    assert reason in corpus.predicted[name]["error"] and "label" not in corpus.predicted[name]
    assert f"{printable(str(hostile_file(corpus.root, name)))}: skipped (" in corpus.predict_out
    line = next(x for x in corpus.predict_out.splitlines() if x.startswith(printable(str(hostile_file(corpus.root, name)))))
    assert reason in line


@pytest.mark.parametrize("name", list(SKIPPED_FOLDERS))
def test_folder_problems_are_listed(corpus, name):
    assert SKIPPED_FOLDERS[name] in corpus.skipped[name]


def test_every_file_is_accounted_for(corpus):
    """No silent drop: every entry of the corpus is in a split or listed with a reason."""
    listed = set(corpus.in_splits) | set(corpus.skipped)
    for _, _, names in os.walk(corpus.root):
        for name in names:
            assert name in listed, name
    assert corpus.run.metrics["data"]["skipped"] == len(corpus.skipped) == len(SKIPPED) + len(SKIPPED_FOLDERS)


def test_no_traceback_and_the_skip_summary_is_printed_once(corpus):
    assert "Traceback" not in corpus.train_err and "Traceback" not in corpus.predict_err
    summary = [line for line in corpus.train_out.splitlines() if line.startswith("skipped ")]
    assert len(summary) == 1 and f"skipped {len(corpus.skipped)} file(s)" in summary[0], corpus.train_out
    assert "skipped_files.csv" in summary[0]
    assert corpus.predict_code == 0  # some files were usable
    assert f"skipped {len(SKIPPED)} of {len(USED) + len(SKIPPED)} file(s)" in corpus.predict_err


def test_non_utf8_names_survive_every_file_written(corpus):
    raw_good, raw_bad = os.fsencode(NON_UTF8_GOOD), os.fsencode(NON_UTF8_BAD)
    assert raw_bad in (corpus.run.path / "skipped_files.csv").read_bytes()  # the file's own bytes, not mojibake
    lists = b"".join((corpus.run.path / "splits" / f"{s}.csv").read_bytes() for s in ("train", "val", "test"))
    assert raw_good in lists
    # the split lists round-trip (--splits-from and resume read them back)
    decoded = decode_all(load_source(str(corpus.root)), corpus.run.preprocessing, progress=False)
    splits = read_split_lists(corpus.run.path / "splits", decoded.samples)
    assert NON_UTF8_GOOD in {Path(decoded.samples[i].key).name for _, idx in splits.items() for i in idx}
    predictions = read_csv_rows(corpus.run.path / "test_predictions.csv")
    assert predictions and all(r["predicted"] in ("red_disc", "blue_bar") for r in predictions)
    # printed as escapes, never a crash
    assert "caf\\xe9-\\xff.png" in corpus.predict_out
    json.dumps([corpus.predicted[NON_UTF8_GOOD]])  # --json output is plain ASCII JSON


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the fix
# ----------------------------------------------------------------------------------------------
def refused_line(args: list[str]) -> str:
    with utf8_terminal() as io_:
        code = main(args)
    assert code == 2
    assert "Traceback" not in io_["err"]
    lines = [line for line in io_["err"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("affinage: error: ") and " — fix: " in lines[0], io_["err"]
    return lines[0]


def test_single_class_dataset_is_refused(tmp_path, tiny_timm):
    root = write_class_folders(tmp_path / "one", per_class=4, classes=("only_cats",))
    line = refused_line(["train", "--data", str(root), "--model", str(tiny_timm), "--out", str(tmp_path / "run")])
    assert "single class (only_cats)" in line and "at least one more class" in line


def test_dataset_whose_second_class_is_all_unreadable_is_refused(tmp_path, tiny_timm):
    root = write_class_folders(tmp_path / "half", per_class=4, classes=("good",))
    (root / "broken").mkdir()
    for i in range(3):
        (root / "broken" / f"{i}.jpg").write_bytes(b"<html>403 Forbidden</html>")
    out = tmp_path / "run"
    line = refused_line(["train", "--data", str(root), "--model", str(tiny_timm), "--out", str(out), "--quiet"])
    assert "only one class (good)" in line and "skipped_files.csv" in line
    assert len(read_csv_rows(out / "skipped_files.csv")) == 3  # the reasons are there to read


def test_dataset_with_nothing_readable_is_refused(tmp_path, tiny_timm):
    root = tmp_path / "junk"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for k in range(3):  # enough files to split, had they been images
            (root / label / f"x{k}.jpg").write_bytes(b"")
    line = refused_line(["train", "--data", str(root), "--model", str(tiny_timm), "--out", str(tmp_path / "run"),
                         "--quiet"])
    assert "none of the images" in line


def test_unparseable_csv_is_refused(tmp_path, tiny_timm):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b'path,label\n"' + b"x" * 200_000 + b'",a\n')  # e.g. an unclosed quote swallowing the file
    line = refused_line(["train", "--data", str(bad), "--model", str(tiny_timm), "--out", str(tmp_path / "run")])
    assert "cannot be parsed" in line
    binary = tmp_path / "photo.csv"
    binary.write_bytes(bytes(range(256)) * 400)  # not text at all
    line = refused_line(["train", "--data", str(binary), "--model", str(tiny_timm), "--out", str(tmp_path / "run")])
    assert "it needs path and label" in line and len(line) < 600


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------
def test_diverging_run_stops_with_a_diagnosis_and_keeps_the_last_good_weights(tmp_path, tiny_images, tiny_timm):
    import torch
    from conftest import load_safetensors

    logs: list[str] = []
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="full", out=tmp_path / "run", epochs=3,
                   batch_size=8, lr=1e6, progress=False, log=logs.append)
    diagnosis = [line for line in logs if "diverged" in line]
    assert len(diagnosis) == 1, logs
    assert "lower --lr" in diagnosis[0] and "keeping the best weights" in diagnosis[0]
    assert run.metrics["diverged"] and "became" in run.metrics["diverged"]
    weights = load_safetensors(run.path / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    history = [r for r in json.loads((run.path / "history.json").read_text()) if r["phase"] == "fine-tune"]
    assert all(np.isfinite(r["val_loss"]) for r in history)  # the diverged epoch is not recorded as if it counted
    assert len(history) <= 3  # epoch 0 plus at most the epochs before the divergence
    # the saved model is the best one before the divergence: its val accuracy is the best recorded
    decoded = decode_all(load_source(str(tiny_images)), run.preprocessing, progress=False)
    splits = read_split_lists(run.path / "splits", decoded.samples)
    y = np.array([run.classes.index(decoded.samples[i].label) for i in splits.val])
    val_logits = run.split_logits(decoded.pixels, decoded.hashes, splits.val)
    assert np.isfinite(val_logits).all()
    assert (val_logits.argmax(1) == y).mean() == max(r["val_accuracy"] for r in history)
    image = str(next((tiny_images / "red_disc").glob("*.png")))
    result = run.predict([image])[0]
    assert np.isfinite(result["probability"]) and result["label"] in run.classes
