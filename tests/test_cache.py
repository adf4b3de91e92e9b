"""Caches make reruns cheap without changing a single figure: a frozen backbone seen before is not rebuilt when
all its features are cached (its card holds what the run needs), and the leak check's hashes are reused."""
from __future__ import annotations

import shutil

import pytest
from conftest import load_safetensors

from affinage import backbones
from affinage.run import Run, finetune


def _train(data, model, out, **kw):
    return finetune(data=str(data), model=str(model), strategy="linear-probe", out=out, progress=False,
                    log=lambda _: None, **kw)


def _forbid_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built although its card and every feature were cached")
    monkeypatch.setattr(backbones, "create_model", refuse)


def test_rerun_on_cached_features_skips_the_backbone_and_changes_nothing(tmp_path, tiny_images, tiny_timm, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cache"))
    first = _train(tiny_images, tiny_timm, tmp_path / "first")
    assert first.metrics["timing"]["features_cached"] is False
    assert list((tmp_path / "cache" / "backbones").glob("*/card.json")), "the first run leaves a card"

    with monkeypatch.context() as patch:
        _forbid_building(patch)
        second = _train(tiny_images, tiny_timm, tmp_path / "second")
    assert second.metrics["timing"]["features_cached"] is True
    assert second.metrics["test"] == first.metrics["test"]
    assert second.metrics["model"] == first.metrics["model"]
    assert (tmp_path / "second" / "model" / "model.json").read_text() == (tmp_path / "first" / "model" / "model.json").read_text()
    a, b = load_safetensors(tmp_path / "first" / "model" / "model.safetensors"), load_safetensors(tmp_path / "second" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    # the run directory alone serves predictions, the same as the first run's
    files = sorted(str(p) for p in tiny_images.rglob("*.png"))[:4]
    assert Run.load(tmp_path / "second").predict(files) == Run.load(tmp_path / "first").predict(files)


def test_card_with_new_images_builds_the_backbone_and_matches_a_cold_run(tmp_path, tiny_images, tiny_timm, monkeypatch):
    """Features missing for new images: the backbone is built late, without moving the seeded head init."""
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "warm"))
    _train(tiny_images, tiny_timm, tmp_path / "seed-the-card")
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_images, fewer)
    next(fewer.rglob("*.png")).unlink()
    warm = _train(fewer, tiny_timm, tmp_path / "warm-run")
    assert warm.metrics["timing"]["features_cached"] is False
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cold"))
    cold = _train(fewer, tiny_timm, tmp_path / "cold-run")
    assert warm.metrics["test"] == cold.metrics["test"]


def test_a_damaged_card_is_ignored(tmp_path, tiny_images, tiny_timm, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cache"))
    first = _train(tiny_images, tiny_timm, tmp_path / "first")
    for weights in (tmp_path / "cache" / "backbones").glob("*/backbone.safetensors"):
        weights.unlink()  # a card whose weights are gone is not used
    again = _train(tiny_images, tiny_timm, tmp_path / "again")
    assert again.metrics["test"] == first.metrics["test"]


@pytest.mark.parametrize("strategy", ["full", "auto"])
def test_strategies_that_need_the_network_never_use_a_card(tmp_path, tiny_images, tiny_timm, monkeypatch, strategy):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cache"))
    _train(tiny_images, tiny_timm, tmp_path / "probe")
    calls = []
    real = backbones.create_model
    monkeypatch.setattr(backbones, "create_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    finetune(data=str(tiny_images), model=str(tiny_timm), strategy=strategy, out=tmp_path / strategy, progress=False,
             log=lambda _: None, epochs=1)
    assert calls, f"{strategy} must build the backbone"
