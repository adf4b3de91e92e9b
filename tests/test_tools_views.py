"""Issue #16, the views practitioners look at first and the notebook: the top-losses gallery, most-confused pairs
and class thumbnails (report.html rendered in headless Chromium, the Gradio page), `Run._repr_html_`,
examples/quickstart.py, and `affinage env`."""
from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_oxford17

from affinage.cli import main
from affinage.gallery import describe, most_confused, top_losses
from affinage.runfiles import Predictions, read_predictions

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


def test_top_losses_and_most_confused_by_hand():
    pred = Predictions(paths=["a", "b", "c"], hashes=[None] * 3, labels=["x", "y", "y"], predicted=["x", "x", "y"],
                       confidence=np.array([0.9, 0.8, 0.6]), classes=["x", "y"],
                       probabilities=np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]))
    losses = top_losses(pred, k=2)
    assert [r.path for r in losses] == ["b", "c"]  # -log 0.2 > -log 0.6 > -log 0.9
    assert losses[0].predicted == "x" and losses[0].probability == 0.8 and losses[0].label_probability == 0.2
    assert losses[0].loss == pytest.approx(-np.log(0.2))
    cm = [[5, 2, 0], [0, 4, 3], [1, 0, 6]]
    assert most_confused(cm, ["a", "b", "c"]) == [("b", "c", 3), ("a", "b", 2), ("c", "a", 1)]


def test_thumbnails_of_relative_paths_are_found_from_elsewhere(tmp_path: Path, monkeypatch):
    """A run started in a project folder keeps relative paths; `affinage report`/`serve` started elsewhere find the
    files from the run directory's parents."""
    from PIL import Image

    from affinage.gallery import image_reader, thumbnail

    (tmp_path / "project" / "photos").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "project" / "photos" / "a.png")
    run = tmp_path / "project" / "runs" / "r"
    run.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    found = image_reader(run, ["photos/a.png"])("photos/a.png")
    assert found == str(tmp_path / "project" / "photos" / "a.png")
    assert thumbnail(found).startswith("data:image/jpeg;base64,")
    assert image_reader(run, ["photos/missing.png"])("photos/missing.png") is None


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_gallery_renders_in_chromium(tiny_run: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    from affinage.report import write_report

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    page_path = write_report(run)
    pred = read_predictions(run)
    expected = describe(run)["top_losses"]
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                         "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            shown = page.eval_on_selector_all("#top-losses img", "els => els.map(e => e.naturalWidth)")
            captions = page.eval_on_selector_all("#top-losses figcaption", "els => els.map(e => e.innerText)")
            pairs = page.locator("#most-confused tr").count() - 1 if page.locator("#most-confused").count() else 0
            page.locator("#gallery").screenshot(path=str(tmp_path / "gallery.png"))
        finally:
            browser.close()
    assert len(shown) == len(expected) == min(16, len(pred.paths)) and all(w > 0 for w in shown)  # decoded
    first = expected[0]
    assert captions[0].startswith(f"{first['predicted']} {first['probability']:.2f}")
    assert f"given {first['label']}" in captions[0]
    assert pairs == len(describe(run)["most_confused"])
    assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained: no network request
    assert (tmp_path / "gallery.png").stat().st_size > 5_000


@requires_oxford17
@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser at /usr/bin/chromium (apt-get install -y chromium)")
def test_oxford17_top_losses_gallery_screenshot(oxford17_probe: Path, tmp_path: Path):
    """The real-photo gallery: 16 decoded thumbnails, the mistakes among them; the screenshot is kept where
    AFFINAGE_GALLERY_SCREENSHOT says (to look at it)."""
    from playwright.sync_api import sync_playwright

    from affinage.report import write_report

    run = tmp_path / "run"
    shutil.copytree(oxford17_probe, run)
    page_path = write_report(run)
    shot = Path(os.environ.get("AFFINAGE_GALLERY_SCREENSHOT") or tmp_path / "oxford17-gallery.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                         "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(page_path.as_uri())
            widths = page.eval_on_selector_all("#top-losses img", "els => els.map(e => e.naturalWidth)")
            wrong = page.locator("#top-losses .bad").count()
            page.locator("#top-losses").screenshot(path=str(shot))
        finally:
            browser.close()
    errors = sum(r.label != r.predicted for r in top_losses(read_predictions(run), k=10_000))
    assert len(widths) == 16 and min(widths) > 0
    assert wrong == min(errors, 16) > 0  # the misclassified photos come first, marked
    assert shot.stat().st_size > 50_000


def test_gradio_page_has_the_gallery(tiny_run: Path):
    pytest.importorskip("gradio")
    from affinage.serve import build_app

    app = build_app(tiny_run)
    try:
        values = [c.get("props", {}).get("value") for c in app.config["components"]]
        html = next(v for v in values if isinstance(v, str) and 'id="top-losses"' in v)
        assert html.count("data:image/jpeg;base64,") >= 3
        assert any(c.get("props", {}).get("label", "").startswith("What the model gets wrong")
                   for c in app.config["components"])
    finally:
        app._affinage_model.close()


def test_run_renders_a_compact_summary_in_jupyter(tiny_run: Path):
    from affinage.run import Run

    html = Run.load(tiny_run)._repr_html_()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.4f}" in html and "learning curves" in html and "confusion matrix" in html
    assert html.count("<img") == 2 and len(html) < 150_000  # compact: two small PNGs


def test_progress_bars_are_tqdm_auto_everywhere():
    """Notebooks get widget progress bars: no module uses the terminal-only `tqdm.tqdm`."""
    for path in (ROOT / "src" / "affinage").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from tqdm import|import tqdm\s*$)", text, re.M), path.name


def test_quickstart_example_runs(tiny_images: Path, tiny_timm: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "quick"
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--data", str(tiny_images), "--model", str(tiny_timm),
                                      "--out", str(out)])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and printed.count(" -> ") >= 2
    assert (out / "summary.html").read_text().startswith("<div")


def test_env_prints_one_block(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for needle in ("versions:", "- torch: ", "- timm: ", "hardware:", "- cpu_count: ", "accelerate:", "caches:",
                   "- affinage: "):
        assert needle in text, needle
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["caches"]["affinage"] and info["versions"]["transformers"] and "gpus" in info["hardware"]
