"""The data audit (label issues, image quality, duplicates, balance and bias, outliers), --exclude, --balance and
the full footprint (bytes downloaded and read, transfer energy)."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_image

from affinage.audit import AuditData, audit, balance_report, label_issues
from affinage.data import Preprocessing, Sample

quiet = {"progress": False, "log": lambda _: None}


class _Decoded:
    """The part of DecodedImages the label and balance checks read."""

    def __init__(self, samples: list[Sample]):
        self.samples, self.hashes, self.skipped = samples, [str(i) for i in range(len(samples))], []


def _audit_data(samples: list[Sample], features: np.ndarray, split_of: list[str]) -> AuditData:
    return AuditData(_Decoded(samples), split_of, features, "synthetic", Preprocessing(32, (0.5,) * 3, (0.5,) * 3))


def test_flipped_labels_rank_at_the_top_and_test_candidates_are_review_only():
    rng = np.random.default_rng(0)
    n, k = 240, 4
    y = np.repeat(np.arange(k), n // k)
    centres = rng.normal(0, 1, size=(k, 16)) * 3
    features = centres[y] + rng.normal(0, 1, size=(n, 16))
    given = y.copy()
    flipped = rng.choice(n, 12, replace=False)
    given[flipped] = (y[flipped] + 1) % k
    split_of = ["test" if i % 5 == 0 else "train" for i in range(n)]
    samples = [Sample(f"img/{i}.png", f"class{given[i]}") for i in range(n)]
    found = label_issues(_audit_data(samples, features.astype(np.float32), split_of), [], seed=0, k=5)
    top = [c["index"] for c in found["candidates"][:15]]
    assert len(set(top) & set(flipped.tolist())) >= 11  # 12 flipped: nearly all of them first
    for c in found["candidates"]:
        assert c["action"].startswith("review (test split") == (c["split"] == "test")
        if c["index"] in flipped:
            assert c["suggested_label"] == f"class{y[c['index']]}"  # the true class is suggested


def test_class_by_group_table_small_cells_and_a_class_confined_to_one_group():
    samples = ([Sample(f"a{i}", "cat", group="indoor" if i % 2 else "outdoor") for i in range(40)]
               + [Sample(f"b{i}", "dog", group="outdoor" if i < 38 else "indoor") for i in range(40)]
               + [Sample(f"c{i}", "cow", group="field") for i in range(30)])
    split_of = ["test" if i % 4 == 0 else "train" for i in range(len(samples))]
    bal = balance_report(_audit_data(samples, np.zeros((len(samples), 2)), split_of))
    assert bal["class_by_group"]["dog"] == {"field": 0, "indoor": 2, "outdoor": 38}
    assert {"class": "dog", "group": "indoor", "n": 2} in bal["small_cells"]
    assert {"class": "cow", "group": "field", "share": 1.0} in bal["confined"]
    text = " ".join(bal["warnings"])
    assert "class 'cow' is confined to group 'field'" in text and "spurious" in text
    assert "dog x indoor (2)" in text
    assert bal["imbalance_ratio"] == pytest.approx(40 / 30, abs=1e-3) and bal["recommendation"] is None


def _dataset(root: Path) -> Path:
    """A CSV of 3 classes x 14 generated images with a `site` column, plus an exact copy, a dark image and a GIF
    placeholder (skipped by the loader)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = []
    for k, name in enumerate(("red", "green", "blue")):
        for i in range(14):
            path = root / f"{name}_{i:02d}.png"
            Image.fromarray(draw_image(k, rng, size=48)).save(path)
            rows.append((path.name, name, "lab" if name == "blue" else ("park" if i % 2 else "street")))
    shutil.copy(root / "red_03.png", root / "red_copy.png")
    rows.append(("red_copy.png", "red", "park"))
    dark = (draw_image(1, rng, size=48).astype(float) * 0.08).astype(np.uint8)
    Image.fromarray(dark).save(root / "green_dark.png")
    rows.append(("green_dark.png", "green", "street"))
    Image.new("P", (40, 40)).save(root / "imageNotFound.gif")
    rows.append(("imageNotFound.gif", "blue", "lab"))
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "site"])
        w.writerows(rows)
    return csv_path


def test_audit_finds_the_duplicate_the_dark_image_and_lists_the_gif_as_skipped(tmp_path: Path, tiny_timm: Path):
    data = _dataset(tmp_path)
    findings = audit(str(data), model=str(tiny_timm), out=tmp_path / "audit", group_column="site", folds=3, **quiet)
    out = tmp_path / "audit"
    exact = [c for c in findings["duplicates"]["clusters"] if c["kind"] != "near"]
    assert any({Path(p).name for p in c["paths"]} == {"red_03.png", "red_copy.png"} for c in exact)
    dark = [i for i in findings["image_issues"]["issues"] if i["issue"] == "dark"]
    assert [Path(i["path"]).name for i in dark] == ["green_dark.png"]
    assert all("imageNotFound" not in i["path"] for i in findings["image_issues"]["issues"])
    assert any(s["path"].endswith("imageNotFound.gif") for s in findings["skipped"])
    rows = list(csv.DictReader(open(out / "image_issues.csv", encoding="utf-8")))
    assert [r["issue"] for r in rows if r["path"].endswith(".gif")] == ["skipped"]
    assert "class 'blue' is confined to group 'lab'" in " ".join(findings["balance"]["warnings"])
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert not re.search(r"https?:", page) and page.count("data:image/jpeg;base64,") >= 3
    assert json.loads((out / "audit.json").read_text())["n_images"] == 44
    assert findings["footprint"]["bytes_read"] > 44 * 1000 and findings["footprint"]["bytes_downloaded"] == 0
    assert (out / "label_issues.csv").read_text().startswith("rank,path,given_label,suggested_label,score")


def test_train_exclude_drops_the_listed_images_and_lists_them(tmp_path: Path, tiny_images: Path, tiny_timm: Path):
    from affinage.run import finetune

    tiny_images = shutil.copytree(tiny_images, tmp_path / "data")  # files this session has not read yet
    files = sorted(str(p) for p in (tiny_images / "red_disc").iterdir())[:2]
    listing = tmp_path / "label_issues.csv"
    listing.write_text("rank,path,given_label\n" + "".join(f"{k},{p},red_disc\n" for k, p in enumerate(files, 1)))
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "r",
                   exclude=str(listing), audit="on", **quiet)
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(run.path / "skipped_files.csv", encoding="utf-8"))}
    assert {p: skipped.get(p) for p in files} == {p: f"excluded by {listing}" for p in files}
    used = [r["path"] for name in ("train", "val", "test")
            for r in csv.DictReader(open(run.path / "splits" / f"{name}.csv", encoding="utf-8"))]
    assert len(used) == 34 and not set(files) & set(used)
    assert (run.path / "audit" / "audit.html").is_file() and run.metrics["audit"]["files"].endswith("audit")
    fp = run.metrics["footprint"]
    assert fp["bytes_downloaded"] == 0 and fp["bytes_read"] > 0 and "0.06 kWh/GB" in fp["method"]


def test_balance_weights_are_the_inverse_frequencies_and_reach_the_loss(tmp_path: Path, tiny_images: Path,
                                                                         tiny_timm: Path, monkeypatch):
    import affinage.train as train
    from affinage.balance import class_weights
    from affinage.run import finetune

    assert class_weights([0, 0, 0, 1], 3).tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    seen = []
    real_fit = train.fit

    def spy(module, train_data, val_data, groups, settings, *args, **kwargs):
        seen.append(settings.class_weights)
        return real_fit(module, train_data, val_data, groups, settings, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    for p in sorted((data / "blue_bar").iterdir())[4:]:
        p.unlink()  # blue_bar: 4 images against 12
    run = finetune(data=str(data), model=str(tiny_timm), strategy="head", out=tmp_path / "r", balance="weights",
                   epochs=3, audit="off", **quiet)
    counts = run.metrics["data"]["counts"]["train"]
    n, k = sum(counts.values()), len(counts)
    expected = {c: n / (k * m) for c, m in counts.items()}
    assert run.metrics["balance"]["class_weights"] == pytest.approx(expected, abs=1e-4)
    assert seen and seen[-1].tolist() == pytest.approx([expected[c] for c in run.classes], abs=1e-4)


def test_balanced_probe_raises_the_rare_class_recall():
    from affinage.probe import fit_probe

    rng = np.random.default_rng(0)

    def draw(n_common: int, n_rare: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([rng.normal(0, 1, (n_common, 4)), rng.normal(1.2, 1, (n_rare, 4))])
        return x.astype(np.float32), np.array([0] * n_common + [1] * n_rare)

    xt, yt = draw(400, 20)
    xv, yv = draw(400, 400)
    recall = {}
    for weight in (None, "balanced"):
        fit = fit_probe(xt, yt, xv, yv, 2, class_weight=weight, grid=(1.0,))
        recall[weight] = float((fit.val_logits.argmax(1)[yv == 1] == 1).mean())
    assert recall["balanced"] > recall[None] + 0.2


def test_footprint_counts_hub_downloads_with_the_transfer_factor(tmp_path: Path, monkeypatch):
    from affinage.footprint import TRANSFER_KWH_PER_GB, FootprintTracker

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    tracker = FootprintTracker().start()
    (hub / "weights.bin").write_bytes(b"\0" * 2_000_000)
    fp = tracker.stop(bytes_read=123)
    assert fp["bytes_downloaded"] == 2_000_000 and fp["bytes_read"] == 123
    assert fp["transfer_kwh"] == pytest.approx(0.002 * TRANSFER_KWH_PER_GB)
    assert fp["total_energy_kwh"] == pytest.approx(fp["energy_kwh"] + fp["transfer_kwh"])
    assert "Aslan et al. 2018" in fp["method"] and "HF_HUB_CACHE" in fp["method"]


def test_balanced_sampler_draws_every_class_about_equally_and_is_seeded():
    import torch

    from affinage.balance import balanced_batches

    y = np.array([0] * 90 + [1] * 10)
    make = balanced_batches("sampler", y, 10)
    assert balanced_batches("none", y, 10) is None
    g = torch.Generator().manual_seed(0)
    drawn = [y[i] for _ in range(20) for batch in make(g) for i in batch]
    assert abs(np.mean(drawn) - 0.5) < 0.06
    first = [list(b) for b in make(torch.Generator().manual_seed(3))]
    assert first == [list(b) for b in make(torch.Generator().manual_seed(3))]


def test_a_rerun_on_the_same_data_copies_the_audit_from_the_cache(tmp_path: Path, tiny_images: Path, tiny_timm: Path):
    from affinage.run import finetune

    lines: dict[str, list[str]] = {"first": [], "second": []}
    for name in lines:
        finetune(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / name,
                 audit="auto", progress=False, log=lines[name].append)
    assert any("audited before" in line for line in lines["second"])  # the first may find an earlier test's audit
    first, second = (json.loads((tmp_path / n / "audit" / "audit.json").read_text()) for n in ("first", "second"))
    assert first == second and (tmp_path / "second" / "audit" / "audit.html").is_file()


def test_class_weighted_loss_never_makes_the_rare_class_everywhere_the_cheapest_answer():
    import torch

    from affinage.balance import ClassWeightedLoss, class_weights

    y = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)
    w = torch.as_tensor(class_weights(y.numpy(), 3), dtype=torch.float32)  # 0.37, 4.2 and 16.7
    loss = ClassWeightedLoss(w, label_smoothing=0.1)
    right = torch.nn.functional.one_hot(y, 3).float() * 8
    rare_everywhere = torch.tensor([[0.0, 0.0, 8.0]]).repeat(100, 1)
    assert loss(right, y) < loss(rare_everywhere, y)
    torch.manual_seed(0)  # a head trained with it: the majority stays right, the rare classes are found
    x = torch.randn(100, 8) + torch.nn.functional.one_hot(y, 3).float().repeat(1, 3)[:, :8] * 3
    head = torch.nn.Linear(8, 3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss(head(x), y).backward()
        opt.step()
    predicted = head(x).argmax(1)
    assert (predicted == y).float().mean() > 0.9 and (predicted[y == 2] == 2).all()
    per_image = torch.nn.functional.cross_entropy(right, y, reduction="none", label_smoothing=0.1)
    assert loss(right, y).item() == pytest.approx(((w[y] * per_image).sum() / w[y].sum()).item())


def test_audit_of_data_too_small_to_split_runs_without_splits(tmp_path: Path, tiny_images: Path, tiny_timm: Path):
    files = [p for c, n in (("red_disc", 6), ("green_square", 6), ("blue_bar", 1))
             for p in sorted((tiny_images / c).iterdir())[:n]]
    data = tmp_path / "labels.csv"
    data.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    findings = audit(str(data), model=str(tiny_timm), out=tmp_path / "audit", **quiet)
    assert "class 'blue_bar' has 1 image(s) and no split" in " ".join(findings["balance"]["warnings"])
    assert findings["label_issues"]["n_tested"] == 12  # the one-image class cannot be predicted out of fold


def test_the_audit_page_escapes_file_names_that_are_not_utf8() -> None:
    """audit.html is UTF-8: a file name's raw bytes (surrogate escapes) are shown as \\xNN, never written raw."""
    from affinage.audit_page import _e

    assert _e("photos/a\udcff<b>.jpg") == "photos/a\\xff&lt;b&gt;.jpg"
