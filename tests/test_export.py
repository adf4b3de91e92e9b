"""`affinage export`: folders that load without affinage (onnxruntime, transformers, timm) and give the same
predictions as `affinage predict`; HF-style config and preprocessing files, a model card; clear refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers.utils.logging  # noqa: F401  # now, not inside a capsys test: it binds its log handler to stderr
from conftest import requires_oxford17

from affinage.cli import main
from affinage.predict import held_out_photos
from affinage.run import Run, finetune


def train(tmp_path_factory, data: Path, model: Path, strategy: str = "linear-probe") -> Path:
    out = tmp_path_factory.mktemp("export") / strategy
    finetune(data=str(data), model=str(model), strategy=strategy, out=out, progress=False, log=lambda _: None,
             epochs=2 if strategy == "head" else None)
    return out


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, tiny_images, tiny_timm) -> Path:
    return train(tmp_path_factory, tiny_images, tiny_timm)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, tiny_images, tiny_hf_vit) -> Path:
    return train(tmp_path_factory, tiny_images, tiny_hf_vit)


def export(run_dir: Path, fmt: str, out: Path, capsys) -> dict:
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"exported {run_dir} as {fmt} -> {out}") and "max abs logit diff" in line, line
    return json.loads((out / "config.json").read_text())


def predict_cli(run_dir: Path, photos: list[str], capsys) -> list[dict]:
    assert main(["predict", str(run_dir), *photos, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def check_common_files(out: Path, run: Run) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate(run.classes)}
    assert config["label2id"] == {c: i for i, c in enumerate(run.classes)}
    pp = json.loads((out / "preprocessor_config.json").read_text())
    for key in ("image_mean", "image_std", "size", "crop_size", "resample", "do_resize", "do_center_crop",
                "do_normalize", "do_rescale", "rescale_factor"):
        assert key in pp, key
    assert pp["crop_size"] == {"height": run.preprocessing.input_size, "width": run.preprocessing.input_size}
    assert pp["image_mean"] == list(run.preprocessing.mean) and pp["rescale_factor"] == pytest.approx(1 / 255)
    card = (out / "README.md").read_text()
    for section in ("## Data", "## Metrics", "## Footprint", "## Preprocessing", "## How to use", "## Export check",
                    "## Intended use and limits"):
        assert section in card, section
    assert run.strategy in card and f"{run.metrics['test']['accuracy']:.4f}" in card
    assert not list(out.parent.glob(f".{out.name}.*"))  # no half-written folder left behind


# ----------------------------------------------------------------------------------------------
# Must-show: ONNX with plain onnxruntime + numpy/PIL preprocessing, on 40 real Oxford-17 test photos
# ----------------------------------------------------------------------------------------------
def preprocess(path: str, pp: dict) -> np.ndarray:
    """Written from preprocessor_config.json alone: shortest edge (or both sides), centre crop, rescale, normalise."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if "shortest_edge" in pp["size"]:
        side = pp["size"]["shortest_edge"]
        w, h = img.size
        img = img.resize((max(side, round(w * side / min(w, h))), max(side, round(h * side / min(w, h)))),
                         pp["resample"])
    else:
        img = img.resize((pp["size"]["width"], pp["size"]["height"]), pp["resample"])
    if pp["do_center_crop"]:
        ch, cw = pp["crop_size"]["height"], pp["crop_size"]["width"]
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32) * pp["rescale_factor"]
    x = (x - np.array(pp["image_mean"], np.float32)) / np.array(pp["image_std"], np.float32)
    return x.transpose(2, 0, 1)


@requires_oxford17
@pytest.mark.slow
def test_onnx_export_agrees_with_predict_on_oxford17(oxford17_probe, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    run = Run.load(oxford17_probe)
    out = tmp_path / "onnx"
    config = export(oxford17_probe, "onnx", out, capsys)
    check_common_files(out, run)
    model = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (batch, *chw), = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert isinstance(batch, str) and chw == [3, 224, 224]  # dynamic batch, NCHW

    photos = held_out_photos(run, 40)
    expected = predict_cli(oxford17_probe, photos, capsys)
    pp = json.loads((out / "preprocessor_config.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run([config["output_name"]], {config["input_name"]: np.stack(
        [preprocess(p, pp) for p in photos[i:i + 16]])})[0] for i in range(0, len(photos), 16)])
    labels = [config["id2label"][str(j)] for j in logits.argmax(1)]
    same = sum(a == e["label"] for a, e in zip(labels, expected))
    truth = sum(a == Path(p).parent.name for a, p in zip(labels, photos))
    print(f"\nONNX (onnxruntime + numpy/PIL preprocessing) vs affinage predict: same top-1 on {same}/40; "
          f"correct {truth}/40")
    assert same >= 39


@requires_oxford17
@pytest.mark.slow
def test_timm_export_of_the_builtin_backbone_reloads_with_timm(oxford17_probe, tmp_path, capsys):
    import timm
    import torch
    from PIL import Image

    run = Run.load(oxford17_probe)
    out = tmp_path / "timm"
    config = export(oxford17_probe, "timm", out, capsys)
    check_common_files(out, run)
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 17
    assert config["label_names"] == run.classes
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    photos = held_out_photos(run, 17)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in photos]))
    expected = predict_cli(oxford17_probe, photos, capsys)
    same = sum(run.classes[j] == e["label"] for j, e in zip(logits.argmax(1).tolist(), expected))
    print(f"\ntimm export (timm's own transforms) vs affinage predict: same top-1 on {same}/17")
    assert same >= 16


# ----------------------------------------------------------------------------------------------
# transformers and timm folders from tiny backbones
# ----------------------------------------------------------------------------------------------
def test_hf_export_of_a_transformers_vit(vit_run, tiny_images, tmp_path, capsys):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    run = Run.load(vit_run)
    out = tmp_path / "hf"
    config = export(vit_run, "hf", out, capsys)
    check_common_files(out, run)
    assert config["architectures"] == ["ViTForImageClassification"]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(run.classes))
    photos = sorted(str(p) for p in tiny_images.rglob("*.*"))
    with torch.no_grad():
        logits = model(**processor([Image.open(p).convert("RGB") for p in photos], return_tensors="pt")).logits
    expected = predict_cli(vit_run, photos, capsys)
    labels = [model.config.id2label[j] for j in logits.argmax(1).tolist()]
    same = sum(a == e["label"] for a, e in zip(labels, expected))
    print(f"\nhf export (AutoImageProcessor + AutoModelForImageClassification) vs affinage predict: "
          f"same top-1 on {same}/{len(photos)}")
    assert same >= len(photos) - 1
    # the same pixels give the same logits as the run's own model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, run.model(x), atol=1e-5)


def test_timm_export_loads_with_timm_and_transformers(timm_run, tmp_path, capsys):
    import timm
    import torch
    from transformers import AutoModelForImageClassification

    run = Run.load(timm_run)
    for fmt in ("timm", "hf"):  # hf for a timm backbone: the same folder, through transformers' TimmWrapper
        out = tmp_path / fmt
        export(timm_run, fmt, out, capsys)
        check_common_files(out, run)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        reference = run.model(x)
        by_timm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(x)
        by_transformers = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()(pixel_values=x)
    assert torch.allclose(by_timm, reference, atol=1e-5)
    assert torch.allclose(by_transformers.logits, reference, atol=1e-5)


def test_onnx_export_of_a_transformers_vit_has_a_dynamic_batch(vit_run, tmp_path, capsys):
    import onnxruntime as ort
    import torch

    run = Run.load(vit_run)
    export(vit_run, "onnx", tmp_path / "onnx", capsys)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert np.abs(session.run(["logits"], {"pixel_values": x.numpy()})[0] - run.model(x).numpy()).max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the formats that work; nothing written
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_head_run(tmp_path_factory, tiny_images, tiny_timm) -> Path:
    return train(tmp_path_factory, tiny_images, tiny_timm, strategy="head")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("affinage: error: ") and " — fix: " in err, err
    return err


@pytest.mark.parametrize("which, fmt, needles", [
    ("vit", "timm", ["backbone is a transformers model (vit)", "use --format onnx or hf"]),
    ("mlp", "timm", ["head is an MLP (hidden size 512)", "use --format onnx"]),
    ("mlp", "hf", ["head is an MLP", "use --format onnx"]),
    ("vit", "tflite", ["unknown export format 'tflite'", "onnx, hf, timm"]),
])
def test_impossible_exports_are_refused(vit_run, mlp_head_run, tmp_path, capsys, which, fmt, needles):
    run_dir = {"vit": vit_run, "mlp": mlp_head_run}[which]
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert list(tmp_path.iterdir()) == []


def test_mlp_head_exports_to_onnx(mlp_head_run, tmp_path, capsys):
    import onnxruntime as ort
    import torch

    export(mlp_head_run, "onnx", tmp_path / "onnx", capsys)
    run = Run.load(mlp_head_run)
    x = torch.randn(2, 3, 48, 48)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(["logits"], {"pixel_values": x.numpy()})[0] - run.model(x).numpy()).max() < 1e-4


def test_existing_folder_is_never_overwritten(timm_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(timm_run), "--format", "timm", "--out", str(out)]) == 2
    assert "already exists and is not empty" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", str(timm_run), "--format", "onnx", "--out", str(out), "--opset", "13"]) == 2
    assert "opset 13 is too old" in one_line_error(capsys)


def test_export_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--format", "--out", "--opset", "onnx", "hf", "timm", "local-dir"):
        assert option in out, option
