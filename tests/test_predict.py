"""`affinage predict`: files, folders and globs; batches that give the same answers as one image at a time;
JSON and CSV output; unreadable files skipped with their reason; the progress bar on stderr."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import CLASSES

from affinage.cli import main
from affinage.predict import CsvWriter, expand_inputs, iter_predictions, predict_files
from affinage.run import Run


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_images) -> Path:
    """A folder to predict on: nested subfolders, a JPEG with an upper-case suffix, and three unusable files."""
    root = tmp_path_factory.mktemp("photos")
    for k, name in enumerate(CLASSES):
        sub = root / ("nested/deeper" if k == 2 else "") / name
        sub.mkdir(parents=True)
        for f in sorted((tiny_images / name).iterdir())[:3]:
            shutil.copy(f, sub / f.name)
    shutil.copy(next((tiny_images / CLASSES[0]).glob("*.jpg")), root / "UPPER.JPG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not a photo")
    return root


def test_expand_files_folders_and_globs(photos, tmp_path):
    red = sorted((photos / CLASSES[0]).iterdir())
    files, problems = expand_inputs([str(red[0]), str(photos / "nested"), str(photos / "**" / "*.png"),
                                     str(red[0]), str(tmp_path / "absent.jpg"), str(tmp_path / "none" / "*.jpg"),
                                     str(tmp_path)])
    nested = sorted(str(p) for p in (photos / "nested").rglob("*") if p.is_file())
    pngs = sorted(str(p) for p in photos.rglob("*.png"))
    assert files[0] == str(red[0])  # given order kept, repeats dropped
    assert files[1:1 + len(nested)] == nested  # a folder: every file below it, recursively, sorted
    assert set(files) == {str(red[0]), *nested, *pngs, str(tmp_path / "absent.jpg")}
    assert len(files) == len(set(files))
    assert str(tmp_path / "absent.jpg") in files  # a missing plain path is reported when read, with the others
    assert problems == [(str(tmp_path / "none" / "*.jpg"), "no file matches this pattern"),
                        (str(tmp_path), "folder holds no files")]


def test_batches_give_the_same_answers_as_single_images(tiny_run, photos):
    run = Run.load(tiny_run)
    files, _ = expand_inputs([str(photos)])
    one = predict_files(run, files, top_k=3, batch_size=1)
    many = predict_files(run, files, top_k=3, batch_size=4)  # batches straddling unreadable files
    assert [r["file"] for r in one] == files == [r["file"] for r in many]
    for a, b in zip(one, many):
        assert ("error" in a) == ("error" in b)
        if "error" not in a:
            assert a["label"] == b["label"]
            assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
            assert a["probability"] == pytest.approx(b["probability"], abs=0.02)  # bf16 autocast on some CPUs
    # Run.predict (the Python API) is the same code, one default-sized batch here
    assert [r.get("label", r.get("error")) for r in run.predict(files, top_k=3)] == \
        [r.get("label", r.get("error")) for r in many]


def test_predictions_match_the_test_split_evaluation(tiny_run):
    """predict and the training-time test evaluation go through the same decoding and model."""
    with open(tiny_run / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    results = predict_files(Run.load(tiny_run), [r["path"] for r in rows], top_k=1)
    assert [r["label"] for r in results] == [row["predicted"] for row in rows]
    for result, row in zip(results, rows):
        assert result["probability"] == pytest.approx(float(row["probability"]), abs=0.02)


def test_unreadable_files_are_skipped_with_the_reason(tiny_run, photos, capsys):
    code = main(["predict", str(tiny_run), str(photos), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0  # some images were labelled
    lines = captured.out.splitlines()
    assert len(lines) == 3 * 3 + 1 + 3
    reasons = {Path(line.split(": skipped (")[0]).name: line.split(": skipped (", 1)[1][:-1]
               for line in lines if ": skipped (" in line}
    assert set(reasons) == {"broken.jpg", "empty.png", "notes.txt"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["notes.txt"].startswith("not an image")
    assert "truncated" in reasons["broken.jpg"] or "not an image" in reasons["broken.jpg"]
    assert "skipped 3 of 13 file(s)" in captured.err
    assert "Traceback" not in captured.err


def test_json_output_one_object_per_image(tiny_run, photos, capsys):
    assert main(["predict", str(tiny_run), str(photos / "**" / "*.png"), "--json", "--top-k", "2", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    pngs = sorted(photos.rglob("*.png"))
    assert [r["file"] for r in results] == [str(p) for p in pngs]
    for r in results:
        if r["file"].endswith("empty.png"):
            assert r == {"file": r["file"], "error": "empty file (0 bytes)"}
            continue
        assert set(r) == {"file", "label", "probability", "top_k"}
        assert len(r["top_k"]) == 2 and r["top_k"][0] == {"label": r["label"], "probability": r["probability"]}
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
        assert r["label"] in CLASSES
    # the tiny probe tells the three generated classes apart
    labelled = [r for r in results if "label" in r]
    right = sum(Path(r["file"]).parent.name == r["label"] for r in labelled)
    assert right >= len(labelled) - 1


def test_csv_output(tiny_run, photos, capsys):
    assert main(["predict", str(tiny_run), str(photos), "--csv", "--top-k", "9", "--quiet"]) == 0  # k capped at 3
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["file", "label", "probability", "label_2", "probability_2", "label_3", "probability_3",
                             "error"]
    assert len(rows) == 13
    for row in rows:
        if row["error"]:
            assert row["label"] == "" and row["probability"] == ""
        else:
            probs = [float(row[c]) for c in ("probability", "probability_2", "probability_3")]
            assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
            assert {row["label"], row["label_2"], row["label_3"]} == set(CLASSES)


def test_csv_writer_pads_short_top_k():
    out = io.StringIO()
    writer = CsvWriter(out, 2)
    writer.write({"file": "a.jpg", "label": "x", "probability": 1.0, "top_k": [{"label": "x", "probability": 1.0}]})
    writer.write({"file": "b.jpg", "error": "empty file (0 bytes)"})
    assert out.getvalue().splitlines() == ["file,label,probability,label_2,probability_2,error",
                                           "a.jpg,x,1.000000,,,", "b.jpg,,,,,empty file (0 bytes)"]


def test_progress_bar_goes_to_stderr(tiny_run, photos, capsys):
    files, _ = expand_inputs([str(photos / CLASSES[1])])
    results = list(iter_predictions(Run.load(tiny_run), files, progress=True))
    captured = capsys.readouterr()
    assert len(results) == 3
    assert captured.out == ""
    assert "predicting" in captured.err and "img" in captured.err


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--batch-size", "0"], "batch size must be >= 1"),
])
def test_bad_options_are_one_line_errors(tiny_run, photos, capsys, args, needle):
    assert main(["predict", str(tiny_run), str(photos / CLASSES[0]), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("affinage: error: ") and needle in err and " — fix: " in err


def test_nothing_to_predict_is_a_one_line_error(tiny_run, tmp_path, capsys):
    assert main(["predict", str(tiny_run), str(tmp_path / "*.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no files found" in err and "glob" in err
