"""Shared fixtures: a generated class-folder dataset, tiny local backbones (transformers and timm formats),
an isolated cache directory, and the location of the real photo datasets."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Nothing in the suite may reach the network or the user's caches: set before any library is imported.
_CACHE = tempfile.mkdtemp(prefix="affinage-test-cache-")
os.environ.update({
    "AFFINAGE_CACHE_DIR": _CACHE,
    "HF_HOME": os.path.join(_CACHE, "huggingface"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
})

# The tiny models run thousands of small ops: one thread avoids OpenMP spin-waiting, which on a busy 2-core
# machine made the suite ~6x slower. Subprocesses (the end-to-end CLI run) keep torch's default.
torch.set_num_threads(int(os.environ.get("AFFINAGE_TEST_THREADS", "1")))

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
requires_shared = pytest.mark.skipif(not (SHARED / "hymenoptera").is_dir(),
                                     reason=f"real photo datasets not found at {SHARED}")

CLASSES = ("red_disc", "green_square", "blue_bar")
IMAGES_PER_CLASS = 12
TINY_SIZE = 48  # input size of the tiny timm model: small images keep every run to a few seconds


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache():
    """Every cache write of the session goes to a temporary folder (never ~/.cache)."""
    from affinage.storage import cache_dir

    assert str(cache_dir()).startswith(_CACHE)
    yield Path(_CACHE)
    shutil.rmtree(_CACHE, ignore_errors=True)


def draw_image(cls: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """An RGB uint8 image of class `cls`: a dominant colour and a class-specific shape, with noise."""
    base = np.full((size, size, 3), 110, dtype=np.float64)
    base += rng.normal(0, 18, size=(size, size, 3))
    colour = np.zeros(3)
    colour[cls] = 255  # 0 red, 1 green, 2 blue
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    r = size * rng.uniform(0.28, 0.38)
    if cls == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    elif cls == 1:
        mask = (abs(yy - cy) <= r * 0.9) & (abs(xx - cx) <= r * 0.9)
    else:
        mask = abs(xx - cx) <= r * 0.4
    base[mask] = 0.2 * base[mask] + 0.8 * colour
    # a wash of the class colour over the whole image: separable by mean colour alone
    base = 0.75 * base + 0.25 * colour
    return np.clip(base, 0, 255).astype(np.uint8)


def write_class_folders(root: Path, per_class: int = IMAGES_PER_CLASS, seed: int = 0,
                        classes: tuple[str, ...] = CLASSES) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(draw_image(k % 3, rng, size=int(rng.integers(36, 56))))
            if i % 2:
                img.save(folder / f"{name}_{i:02d}.jpg", quality=92)
            else:
                img.save(folder / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/<class>/*.png|*.jpg: 3 classes x 12 generated images (colour + shape), read-only for tests."""
    return write_class_folders(tmp_path_factory.mktemp("tiny_images") / "shapes")


@pytest.fixture(scope="session")
def tiny_hf_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide transformers ViT saved with save_pretrained (+ its image processor); random weights."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    folder = tmp_path_factory.mktemp("hf_vit") / "tiny-vit"
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's `test_resnet` (BatchNorm, ~370k params, random init) in timm's Hub folder format (save_for_hf),
    at 48-pixel input."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    # Like a pretrained checkpoint: non-trivial BatchNorm running statistics, and residual branches that
    # contribute (timm zero-initialises the last BatchNorm of each block).
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, TINY_SIZE, TINY_SIZE))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    model.eval()
    folder = tmp_path_factory.mktemp("timm") / "tiny-resnet"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    config["pretrained_cfg"]["input_size"] = [3, TINY_SIZE, TINY_SIZE]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_backbones(tiny_hf_vit: Path, tiny_timm: Path) -> dict[str, Path]:
    return {"hf-vit": tiny_hf_vit, "timm-resnet": tiny_timm}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path, tiny_timm: Path) -> Path:
    """A finished linear-probe run on the tiny images and tiny timm backbone, shared by the predict and serve
    tests. Read-only for tests."""
    from affinage.run import finetune

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    finetune(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe", out=out, progress=False,
             log=lambda _: None)
    return out


requires_oxford17 = pytest.mark.skipif(not (SHARED / "oxford17" / "splits.csv").is_file(),
                                       reason=f"oxford17 photos not found at {SHARED / 'oxford17'}")


@pytest.fixture(scope="session")
def oxford17_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run shared by the serve and export tests: built-in EfficientNet-Lite0 (ImageNet weights), linear
    probe on Oxford 17 Flowers' fixed split (340 test photos); ~30 s on 2 idle CPU cores. Read-only for tests."""
    from affinage.run import finetune

    if not (SHARED / "oxford17" / "splits.csv").is_file():
        pytest.skip(f"oxford17 photos not found at {SHARED / 'oxford17'}")
    out = tmp_path_factory.mktemp("oxford17") / "lite0-probe"
    finetune(data=str(SHARED / "oxford17" / "splits.csv"), model="efficientnet_lite0", strategy="linear-probe",
             out=out, progress=False, log=lambda _: None)
    return out


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
