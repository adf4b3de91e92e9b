"""report.html: every section present, self-contained (plots as data: PNGs, nothing fetched), rebuilt by
`affinage report RUN`, and rendered by a real headless Chromium without a single network request."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from affinage.cli import main
from affinage.diagnosis import diagnose
from affinage.evaluate import calibration, classification_metrics, group_metrics
from affinage.report import SECTIONS, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_run_dir(root: Path, full: bool = True) -> Path:
    """A run directory as `finetune` writes it, from synthetic figures (no training): 4 classes, 2 groups."""
    classes = ["daisy", "rose", "tulip", "<script>alert(1)</script>"]  # a hostile class name must be escaped
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    logits = np.eye(4)[labels] * 3 + rng.normal(0, 1.2, size=(40, 4))
    groups = ["studio", "field"] * 20
    history = [{"phase": "head-init", "epoch": e, "train_loss": None if e == 0 else 1.3 - 0.1 * e,
                "train_accuracy": None if e == 0 else 0.5 + 0.05 * e, "val_loss": 1.3 - 0.08 * e,
                "val_accuracy": 0.4 + 0.05 * e, "lr": 1e-3, "trainable_params": 100, "seconds": 0.1} for e in range(6)]
    history += [{**history[-1], "phase": "fine-tune", "epoch": e, "train_loss": 0.7 - 0.1 * e,
                 "train_accuracy": 0.8 + 0.04 * e, "val_loss": 0.8 - 0.05 * e, "val_accuracy": 0.7 + 0.03 * e}
                for e in range(1, 4)]
    test = classification_metrics(logits, labels, classes)
    root.mkdir(parents=True)
    metrics = {
        "strategy": "partial:1", "test": test, "val": {"accuracy": 0.79},
        "hyperparameters": {"lr": 1e-3, "epochs": 3},
        "data": {"source": "CSV: /data/flowers.csv", "classes": classes, "split": "given splits",
                 "counts": {s: {c: n for c in classes} for s, n in (("train", 30), ("val", 10), ("test", 10))},
                 "skipped": 1},
        "model": {"backbone": "efficientnet_lite0", "trainable_params": 12345},
        "environment": {"device": "cpu", "cpu_threads": 2, "versions": {"torch": "2.x"}},
    }
    if full:
        metrics.update({
            "calibration": calibration(logits, labels),
            "groups": group_metrics(logits, labels, groups, classes),
            "leaks": {"pairs": 1, "exact": 0, "near": 1, "dropped": 0, "max_hash_distance": 48},
            "targets": [{"expr": "accuracy>=0.5", "value": test["accuracy"], "passed": True},
                        {"expr": "recall[tulip]>=0.99", "value": test["per_class"]["tulip"]["recall"], "passed": False}],
            "diagnosis": diagnose(history, test, classes, leaks=1),
            "footprint": {"energy_kwh": 2.5e-4, "co2_kg": 1.4e-5, "water_l": 4.5e-4, "method": "estimated: codecarbon",
                          "country": "FRA", "carbon_intensity_g_per_kwh": 56.0, "water_l_per_kwh": 1.8, "seconds": 12.0},
        })
        with open(root / "leaks.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "kind", "distance"),
                                      ("/data/a_copy.jpg", "train", "rose", "/data/a.jpg", "test", "rose", "near", 6)])
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "history.json").write_text(json.dumps(history))
    (root / "config.yaml").write_text("data: /data/flowers.csv\nstrategy: partial:1\nseed: 0\n")
    (root / "skipped_files.csv").write_text("path,reason\n/data/broken.jpg,truncated or corrupt image data\n")
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with open(root / "test_predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "probability"])
        for k, row in enumerate(probs):
            w.writerow([f"/data/{k}.jpg", classes[labels[k]], classes[int(row.argmax())], f"{row.max():.6f}"])
    return root


def sections(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z-]+)">', page)


def test_report_has_every_section_and_is_self_contained(tmp_path):
    page = write_report(make_run_dir(tmp_path / "run")).read_text()
    assert sections(page) == list(SECTIONS)
    for sid in ("calibration", "learning-curves", "confusion-matrix", "per-class", "groups"):
        body = page.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert 'src="data:image/png;base64,' in body, sid
    assert "ECE" in page and "recall[tulip]&gt;=0.99" in page and "FAIL" in page and "PASS" in page
    assert "train/test leak" in page and "a_copy.jpg" in page and "truncated or corrupt" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    # nothing to fetch: every src/href is a data: URI, no scripts, no web fonts, no CSS imports
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page


def test_report_of_a_run_without_the_optional_parts(tmp_path):
    """Older runs (no groups, footprint, leaks or calibration in metrics.json) still get every section, with the
    calibration recomputed from test_predictions.csv."""
    page = write_report(make_run_dir(tmp_path / "run", full=False)).read_text()
    assert sections(page) == list(SECTIONS)
    assert "No groups" in page and "no footprint" in page and "ECE" in page


def test_report_command_regenerates_the_page(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    assert not (run / "report.html").exists()
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out and (run / "report.html").exists()
    assert main(["report", str(tmp_path)]) == 2  # not a run directory: one-line error
    assert "no metrics.json" in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                                                   "(apt-get install -y chromium; .ci/run does it)")
def test_report_renders_in_chromium_without_network_requests(tmp_path):
    from playwright.sync_api import sync_playwright

    path = write_report(make_run_dir(tmp_path / "run"))
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            shown = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 100)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert shown == list(SECTIONS)
    assert len(images) >= 5 and all(images)
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), requests
    from PIL import Image

    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width == 1100 and shot.height > 3000  # the whole page, plots included
