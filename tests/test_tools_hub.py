"""Issue #16, Hub and datasets conventions: `--image-column` / `--label-column` for hf: datasets, `export
--push-to-hub` failing with one clear line offline or where the Hub cannot be reached, and
`transformers.pipeline("image-classification")` on the hf export of every backbone kind (timm through
transformers' TimmWrapper, transformers models, and the built-in EfficientNet-Lite0 on real photos)."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from conftest import requires_oxford17

from affinage.cli import main
from affinage.data import load_source
from affinage.errors import AffinageError

quiet = {"progress": False, "log": lambda _: None}


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path) -> Path:
    """The tiny images as a datasets folder (save_to_disk) whose columns are `img` and `species`, not image/label."""
    import datasets

    files = sorted(p for p in tiny_images.rglob("*") if p.is_file())
    ds = datasets.Dataset.from_dict({"img": [str(p) for p in files], "species": [p.parent.name for p in files],
                                     "note": ["x"] * len(files)}).cast_column("img", datasets.Image())
    folder = tmp_path_factory.mktemp("hfds") / "flowers"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
    return folder


def test_hf_dataset_columns_are_named_or_the_error_says_how(hf_dataset: Path, tiny_images: Path):
    with pytest.raises(AffinageError, match="no ClassLabel column") as err:
        load_source(f"hf:{hf_dataset}")
    assert err.value.fix == "name it: --label-column COLUMN" and "species (Value)" in err.value.problem
    images = load_source(f"hf:{hf_dataset}", image_column="img", label_column="species")
    assert sorted(images.classes) == sorted(p.name for p in tiny_images.iterdir())
    assert len(images.samples) == sum(1 for p in tiny_images.rglob("*") if p.is_file())
    assert images.read_bytes(images.samples[0])[:2] in (b"\x89P", b"\xff\xd8")  # the file's own bytes
    with pytest.raises(AffinageError, match="no column 'image'.*img, species, note"):
        load_source(f"hf:{hf_dataset}", image_column="image", label_column="species")
    with pytest.raises(AffinageError, match="applies to hf: datasets"):
        load_source(str(tiny_images), label_column="species")


def test_train_on_an_hf_dataset_with_other_column_names(hf_dataset: Path, tiny_timm: Path, tmp_path: Path):
    out = tmp_path / "run"
    assert main(["train", "--data", f"hf:{hf_dataset}", "--image-column", "img", "--label-column", "species",
                 "--model", str(tiny_timm), "--strategy", "linear-probe", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # 3 classes: chance is 1/3
    assert main(["eval", str(out), "--json"]) == 0  # eval re-reads the dataset with the saved column names
    page = (out / "report.html").read_text()  # the gallery reads the thumbnails back through the dataset
    gallery = page[page.index('id="top-losses"'):page.index("<h3>Most confused")]
    assert gallery.count("data:image/jpeg;base64,") == gallery.count("<figure>") > 0 and "no file" not in gallery


def test_push_to_hub_offline_is_one_line_and_writes_nothing(tiny_run: Path, tmp_path: Path, capsys):
    assert main(["export", str(tiny_run), "--format", "hf", "--out", str(tmp_path / "x"), "--push-to-hub",
                 "me/tiny"]) == 2  # the suite runs with HF_HUB_OFFLINE=1 (conftest)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline mode is on (HF_HUB_OFFLINE=1)" in err
    assert not (tmp_path / "x").exists()  # refused before the export started
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "y"), "--push-to-hub",
                 "me/tiny"]) == 2
    assert "pass --format hf" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_is_one_line(tiny_run: Path, tmp_path: Path, monkeypatch, capsys):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "export"
    assert main(["export", str(tiny_run), "--format", "hf", "--out", str(out), "--push-to-hub", "me/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "cannot push to the Hub (me/tiny" in err
    assert (out / "config.json").is_file() and f"the export is in {out}" in err  # the folder is kept


@pytest.fixture(scope="module")
def vit_probe(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path, tiny_hf_vit: Path) -> Path:
    from affinage.run import finetune

    out = tmp_path_factory.mktemp("vit_probe") / "run"
    finetune(data=str(tiny_images), model=str(tiny_hf_vit), strategy="linear-probe", out=out, **quiet)
    return out


def _test_photos(run: Path, limit: int) -> list[str]:
    with open(run / "splits" / "test.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row["path"])
    return [paths[k] for k in range(limit) for paths in by_class.values() if k < len(paths)][:limit]


def _pipeline_vs_predict(run: Path, export: Path, photos: list[str]) -> tuple[int, float]:
    """(top-1 agreements, max abs probability difference) between the transformers pipeline on the export and
    the run's own predictions on the same files."""
    from PIL import Image
    from transformers import pipeline

    from affinage.run import Run

    clf = pipeline("image-classification", model=str(export), device="cpu")
    ours = Run.load(run).predict(photos, top_k=len(Run.load(run).classes))
    agree, diff = 0, 0.0
    for path, mine in zip(photos, ours):
        with Image.open(path) as img:
            theirs = clf(img.convert("RGB"), top_k=len(mine["top_k"]))
        agree += theirs[0]["label"] == mine["label"]
        p_theirs = {t["label"]: t["score"] for t in theirs}
        diff = max(diff, max(abs(p_theirs[t["label"]] - t["probability"]) for t in mine["top_k"]))
    return agree, diff


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_transformers_pipeline_runs_the_hf_export_of_every_backbone_kind(kind, tiny_run, vit_probe, tmp_path):
    from affinage.export import export_run

    run = tiny_run if kind == "timm" else vit_probe
    export = tmp_path / "export"
    export_run(run, "hf", export, log=lambda _: None)
    photos = _test_photos(run, 6)
    agree, diff = _pipeline_vs_predict(run, export, photos)
    assert agree == len(photos) and diff < 0.02, (agree, diff)


@requires_oxford17
@pytest.mark.slow
def test_pipeline_on_the_builtin_lite0_export_agrees_with_predict_on_40_oxford17_photos(oxford17_probe, tmp_path):
    from affinage.export import export_run

    export = tmp_path / "lite0-hf"
    export_run(oxford17_probe, "hf", export, log=lambda _: None)
    photos = _test_photos(oxford17_probe, 40)  # round robin over the 17 classes
    assert len(photos) == 40 and len({Path(p).parent.name for p in photos}) == 17
    agree, _ = _pipeline_vs_predict(oxford17_probe, export, photos)
    assert agree >= 39, f"pipeline and predict agree on {agree}/40"
