"""Backbone loading: local timm / transformers folders, `hf:` specs, preprocessing read from the checkpoint,
and rebuilding a saved run's architecture (what `Run.load` relies on)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, TINY_SIZE, load_safetensors

from affinage.backbones import _hf_preprocessing, create_model, rebuild_model
from affinage.data import eval_transform, prepare_image
from affinage.errors import AffinageError
from affinage.run import Run, finetune


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Local folders
# ----------------------------------------------------------------------------------------------
def test_local_timm_folder_loads_its_weights(tiny_timm):
    # the folder is save_for_hf's output, whose model_args name the 1000-class head
    config = json.loads((tiny_timm / "config.json").read_text())
    assert config["model_args"]["num_classes"] == 1000
    model = create_model(str(tiny_timm), num_classes=3, pretrained=True)
    raw = load_safetensors(tiny_timm / "model.safetensors")
    backbone = model.backbone.state_dict()
    assert set(backbone) <= set(raw)
    for name, value in backbone.items():
        assert torch.equal(value, raw[name]), name
    assert model.preprocessing.input_size == TINY_SIZE  # from the folder's pretrained_cfg
    assert model.spec.source == "timm" and model.spec.arch == "test_resnet"
    assert "num_classes" not in model.spec.timm_kwargs  # the backbone is always rebuilt headless
    assert model(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE)).shape == (2, 3)


def test_local_hf_folder_loads_its_weights(tiny_hf_vit):
    from transformers import ViTModel

    model = create_model(str(tiny_hf_vit), num_classes=4, pretrained=True)
    # transformers may rename checkpoint keys on load: compare with its own loader, then a few raw tensors
    expected = ViTModel.from_pretrained(tiny_hf_vit, add_pooling_layer=False).state_dict()
    backbone = {k.removeprefix("model."): v for k, v in model.backbone.state_dict().items()}
    assert set(backbone) == set(expected)
    for name, value in backbone.items():
        assert torch.equal(value, expected[name]), name
    raw = load_safetensors(tiny_hf_vit / "model.safetensors")
    assert raw["embeddings.cls_token"].equal(backbone["embeddings.cls_token"])
    assert raw["embeddings.position_embeddings"].equal(backbone["embeddings.position_embeddings"])
    pp = model.preprocessing
    assert (pp.input_size, pp.mean, pp.std, pp.crop_mode) == (32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash")
    assert model.num_features == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    # features are the CLS token of the last hidden state (no untrained pooler)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model.backbone.model(pixel_values=x).last_hidden_state
        assert torch.allclose(model.forward_features(x), hidden[:, 0])


def test_hf_prefix_accepts_a_local_folder(tiny_hf_vit):
    a = create_model(str(tiny_hf_vit), num_classes=2, pretrained=True)
    b = create_model(f"hf:{tiny_hf_vit}", num_classes=2, pretrained=True)
    assert b.spec.source == "hf" and b.spec.arch == "vit"
    for (na, ta), (nb, tb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


def test_pretrained_false_gives_random_weights(tiny_timm, tiny_hf_vit):
    raw = load_safetensors(tiny_timm / "model.safetensors")
    model = create_model(str(tiny_timm), num_classes=3, pretrained=False)
    assert not torch.equal(model.backbone.state_dict()["conv1.0.weight"], raw["conv1.0.weight"])
    raw = load_safetensors(tiny_hf_vit / "model.safetensors")
    model = create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    assert not torch.equal(model.backbone.state_dict()["model.embeddings.cls_token"], raw["embeddings.cls_token"])


def test_timm_spec_builds_without_download():
    model = create_model("timm:test_vit", num_classes=5, pretrained=False)
    assert model.spec.source == "timm" and model.spec.arch == "test_vit"
    size = model.preprocessing.input_size
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 5)
    assert len(model.block_names) == 6  # test_vit's 6 transformer blocks (final norm joins the last)


def test_builtin_efficientnet_lite0_has_imagenet_weights():
    model = create_model("efficientnet_lite0", num_classes=3, pretrained=True)
    random = create_model("efficientnet_lite0", num_classes=3, pretrained=False)
    pp = model.preprocessing
    assert pp.input_size == 224 and model.num_features == 1280
    # pretrained BatchNorm statistics are not the init values (0 mean / 1 variance)
    stats = [b for n, b in model.backbone.named_buffers() if n.endswith("running_var")]
    assert not all(torch.allclose(b, torch.ones_like(b)) for b in stats)
    assert not torch.equal(model.backbone.conv_stem.weight, random.backbone.conv_stem.weight)


@pytest.mark.parametrize("spec, match", [
    ("no_such_model_xyz", "unknown model"),
    ("timm:no_such_model_xyz", "timm has no model"),
])
def test_unknown_model_is_a_user_error(spec, match):
    with pytest.raises(AffinageError, match=match) as info:
        create_model(spec, num_classes=2)
    assert info.value.fix


def test_local_folder_needs_a_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(AffinageError, match="config.json"):
        create_model(str(tmp_path / "weights"), num_classes=2)
    (tmp_path / "weights" / "config.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(AffinageError, match="neither a timm nor a transformers config"):
        create_model(str(tmp_path / "weights"), num_classes=2)


def test_timm_folder_without_weights_is_a_user_error(tmp_path, tiny_timm):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_timm / "config.json").read_text())
    with pytest.raises(AffinageError, match="no model.safetensors"):
        create_model(str(folder), num_classes=2)


# ----------------------------------------------------------------------------------------------
# Preprocessing read from transformers image processors: same pixels as the processor itself
# ----------------------------------------------------------------------------------------------
def _gradient_image():
    from PIL import Image

    h, w = 300, 420  # not square: crops and squashes give different pixels
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("name, kwargs, mode", [
    ("ViTImageProcessor", {}, "squash"),
    ("DeiTImageProcessor", {}, "squash"),  # resize 256x256, crop 224
    ("BeitImageProcessor", {}, "squash"),
    ("CLIPImageProcessor", {}, "center"),  # short side 224, crop 224
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}}, "center"),  # short side 224/0.875, crop 224
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}, "squash"),  # >= 384: warped, no crop
])
def test_hf_preprocessing_matches_the_image_processor(name, kwargs, mode):
    import transformers

    processor = getattr(transformers, name)(**kwargs)
    pp = _hf_preprocessing(processor)
    assert pp.crop_mode == mode
    img = _gradient_image()
    ours = eval_transform(pp)(torch.from_numpy(prepare_image(img, pp)))
    theirs = processor(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    # the same geometry and normalisation (resampling filters differ slightly between implementations)
    assert (ours - theirs).abs().mean() < 0.02


# ----------------------------------------------------------------------------------------------
# Rebuilding saved runs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["hf-vit", "timm-resnet"])
def test_rebuild_model_reproduces_the_outputs(tiny_backbones, which):
    torch.manual_seed(0)
    model = create_model(str(tiny_backbones[which]), num_classes=3, pretrained=True, head_hidden=16).eval()
    spec = type(model.spec).from_dict(json.loads(json.dumps(model.spec.to_dict())))  # as saved in model.json
    rebuilt = rebuild_model(spec, model.preprocessing, 3, 16)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    size = model.preprocessing.input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def _tiny_hf_models():
    import transformers as T

    small = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
    squash = T.ViTImageProcessor(size={"height": 32, "width": 32})
    return {
        "beit": (T.BeitConfig(**small), T.BeitModel, squash),  # its classifier keeps a mean-pooling pooler
        "dinov2": (T.Dinov2Config(**small), T.Dinov2Model,
                   T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "vit_msn": (T.ViTMSNConfig(**small), T.ViTMSNModel, squash),
        "swin": (T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
                 T.SwinModel, squash),
        "convnext": (T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                     T.ConvNextModel, T.ConvNextImageProcessor(size={"shortest_edge": 32})),
    }


@pytest.mark.parametrize("arch", ["beit", "dinov2", "vit_msn", "swin", "convnext"])
def test_tiny_transformers_architectures_train_and_reload(tmp_path, tiny_images, arch):
    """Each kind of transformers backbone trains, saves, and reloads into the same predictions."""
    config, model_class, processor = _tiny_hf_models()[arch]
    torch.manual_seed(0)
    folder = tmp_path / arch
    model_class(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    run = finetune(data=str(tiny_images), model=str(folder), strategy="partial:1", out=tmp_path / "run",
                   progress=False, log=_quiet, epochs=1, batch_size=12, head_init="random")
    assert run.metrics["model"]["num_blocks"] >= 2
    with open(run.path / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    reloaded = Run.load(run.path)
    results = reloaded.predict([r["path"] for r in rows], top_k=3)
    assert [r["label"] for r in results] == [r["predicted"] for r in rows]
    assert set(r["label"] for r in results) <= set(CLASSES)
    saved = load_safetensors(run.path / "model" / "model.safetensors")
    assert set(reloaded.model.state_dict()) == set(saved)


@pytest.mark.parametrize("arch", ["beit", "swin"])
def test_relative_position_tables_get_no_weight_decay(tmp_path, arch):
    """Like absolute position embeddings, relative position bias tables (Swin, BEiT) are not decayed."""
    import transformers as T

    config, model_class, processor = _tiny_hf_models()[arch]
    if arch == "beit":
        config = T.BeitConfig(**{**config.to_dict(), "use_relative_position_bias": True})
    folder = tmp_path / arch
    model_class(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    model = create_model(str(folder), num_classes=2, pretrained=True)
    tables = [n for n, _ in model.backbone.named_parameters() if "relative_position_bias_table" in n]
    assert len(tables) == 2
    assert set(tables) <= model.no_weight_decay()
    decayed = [n for n, p in model.backbone.named_parameters() if n not in model.no_weight_decay()]
    assert decayed and all(n.endswith(".weight") for n in decayed)
    assert not any(w in n for n in decayed for w in ("norm", "position", "cls_token"))


def test_a_run_directory_or_its_model_folder_is_a_starting_model(tmp_path, tiny_images, tiny_timm):
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "run",
                   progress=False, log=_quiet, epochs=5)
    for where in (run.path, Path(run.path) / "model", f"run:{run.path}"):
        model = create_model(str(where), num_classes=2)
        assert model.pretrained_head.labels.classes == tuple(run.classes) and model.num_classes == 2
    with pytest.raises(AffinageError, match="not a finished affinage run"):
        create_model(f"run:{tmp_path / 'nothing'}", num_classes=2)
