"""What the model gets wrong, the views practitioners look at first (fastai's `plot_top_losses` and
`most_confused`): the test images with the highest loss (given label, predicted label, its probability), the
most-confused class pairs, and a few example thumbnails per class. Built from test_predictions.csv and
metrics.json alone; thumbnails are embedded as base64 JPEG, so the HTML stays self-contained (report.html, the
Gradio page)."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import html_text, jpeg_data_uri
from .runfiles import Predictions, read_metrics, read_predictions

_h = html_text  # a non-UTF-8 file or class name (surrogate escapes) cannot go into UTF-8 HTML raw

TOP_LOSSES = 16
CONFUSED_PAIRS = 10
EXAMPLES_PER_CLASS = 4
MAX_CLASSES_SHOWN = 40  # example rows; a long tail of classes would make the page heavy
THUMBNAIL = 112  # pixels, longest side

GALLERY_CSS = """
.gal{display:flex;flex-wrap:wrap;gap:.5rem}.gal figure{margin:0;width:124px;font-size:.74rem;line-height:1.25}
.gal img{width:112px;height:112px;object-fit:cover;border-radius:4px;border:1px solid #d6dbe0;display:block}
.gal .miss{width:112px;height:112px;background:#f3f5f7;display:flex;align-items:center;justify-content:center;
color:#5b6670;border-radius:4px}.gal .bad{color:#b42318}.gal .ok{color:#176f2c}.exrow{margin:.3rem 0}
"""


@dataclass(frozen=True)
class Loss:
    """One test image: its given label, the prediction and its probability, the loss -log p(given label)."""

    path: str
    label: str
    predicted: str
    probability: float
    label_probability: float
    loss: float


def top_losses(pred: Predictions, k: int = TOP_LOSSES) -> list[Loss]:
    """The k test images with the highest loss (the surest mistakes first), as fastai's `top_losses`."""
    if pred.probabilities is None or pred.classes is None:
        return []
    column = {c: j for j, c in enumerate(pred.classes)}
    rows = []
    for i, (path, label, predicted) in enumerate(zip(pred.paths, pred.labels, pred.predicted)):
        p_label = float(pred.probabilities[i, column[label]]) if label in column else 0.0
        rows.append(Loss(path, label, predicted, float(pred.confidence[i]), p_label, -math.log(max(p_label, 1e-12))))
    return sorted(rows, key=lambda r: (-r.loss, r.path))[:k]


def most_confused(confusion: list[list[int]], classes: list[str], k: int = CONFUSED_PAIRS) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) of the largest off-diagonal cells of the confusion matrix, largest first."""
    cm = np.asarray(confusion, dtype=np.int64)
    pairs = [(classes[a], classes[p], int(cm[a, p])) for a in range(len(cm)) for p in range(len(cm))
             if a != p and cm[a, p] > 0]
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))[:k]


def class_examples(pred: Predictions, per_class: int = EXAMPLES_PER_CLASS) -> dict[str, list[int]]:
    """Per class (in the run's order), the rows of a few of its test images, in file order."""
    order = pred.classes or sorted(set(pred.labels))
    out: dict[str, list[int]] = {c: [] for c in order}
    for i, label in enumerate(pred.labels):
        if label in out and len(out[label]) < per_class:
            out[label].append(i)
    return out


def thumbnail(source: str | bytes, size: int = THUMBNAIL) -> str | None:
    """A data: URI of a small JPEG of an image file or its encoded bytes (None where it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            small = ImageOps.exif_transpose(img).convert("RGB")
            small.thumbnail((size, size))
            return jpeg_data_uri(small, quality=82)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def image_reader(root: Path, paths: list[str]) -> Callable[[str], str | bytes | None]:
    """path -> the image file, or its bytes from the run's data source where the keys are not files (hf:
    datasets, digits: read again through the source named in config.yaml); None where neither works. A relative
    path is relative to where the run was started: tried from here, then from the run directory and its parents
    (`affinage report` / `serve` started elsewhere)."""
    def locate(p: str) -> str | None:
        path = Path(p)
        if path.is_file():
            return p
        if path.is_absolute():
            return None
        return next((str(base / path) for base in (root.resolve(), *root.resolve().parents)
                     if (base / path).is_file()), None)

    if any(locate(p) for p in paths[:TOP_LOSSES]):
        return locate
    from .data import load_source
    from .errors import AffinageError
    from .runfiles import read_config

    config = read_config(root)
    data = str(config.get("data") or "")
    if not (data == "digits" or data.startswith("hf:")):
        return locate
    try:
        images = load_source(data, image_column=config.get("image_column"), label_column=config.get("label_column"))
    except AffinageError:
        return lambda p: None
    by_key = {s.key: s for s in images.samples}

    def read(p: str) -> bytes | None:
        sample = by_key.get(p)
        return images.read_bytes(sample) if sample is not None else None

    return read


def _figure(path: str, caption: str, read: Callable[[str], str | bytes | None]) -> str:
    found = read(path)
    uri = thumbnail(found) if found is not None else None
    name = _h(os.path.basename(path))  # a non-UTF-8 file name cannot go into UTF-8 HTML raw
    img = (f'<img src="{uri}" alt="{name}" title="{_h(path)}">' if uri
           else f'<div class="miss" title="{_h(path)}">no file</div>')
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def gallery_html(run_dir: str | os.PathLike[str]) -> str:
    """The three views as one HTML fragment (headings h3), or a line saying why there is nothing to show."""
    root = Path(run_dir)
    pred = read_predictions(root)
    if pred is None or not pred.paths:
        return "<p>No test predictions (test_predictions.csv) in this run.</p>"
    metrics = read_metrics(root)
    base = image_reader(root, pred.paths)
    losses = top_losses(pred)
    if not losses:
        return ("<p>test_predictions.csv has no probability columns (a run written before format 2): retrain to "
                "see the top losses.</p>")
    figures = "".join(_figure(r.path, f'<span class="{"ok" if r.predicted == r.label else "bad"}">'
                                      f'{_h(r.predicted)}</span> '
                                      f'{r.probability:.2f}<br>given {_h(r.label)} ({r.label_probability:.2f})'
                                      f"<br>loss {r.loss:.2f}", base) for r in losses)
    wrong = sum(r.label != r.predicted for r in losses)
    parts = [f"<h3>Top losses</h3><p>The {len(losses)} test images with the highest loss ({wrong} misclassified): "
             "predicted label and its probability, the given label and its probability. A sure mistake is often a "
             "wrong label or an ambiguous photo.</p>", f'<div class="gal" id="top-losses">{figures}</div>']
    test = metrics.get("test", {})
    classes = metrics.get("data", {}).get("classes") or pred.classes or []
    if test.get("confusion_matrix") and classes:
        pairs = most_confused(test["confusion_matrix"], list(classes))
        rows = "".join(f"<tr><td>{_h(a)}</td><td>{_h(p)}</td><td class=num>{n}</td></tr>"
                       for a, p, n in pairs)
        parts.append("<h3>Most confused</h3>" + (f"<table id=\"most-confused\"><tr><th>actual</th><th>predicted as"
                                                 f"</th><th>test images</th></tr>{rows}</table>" if pairs
                                                 else "<p>No test image was misclassified.</p>"))
    examples = class_examples(pred)
    shown = list(examples.items())[:MAX_CLASSES_SHOWN]
    rows_html = []
    for cls, idx in shown:
        figs = "".join(_figure(pred.paths[i], f'<span class="{"ok" if pred.predicted[i] == cls else "bad"}">'
                                              f"{_h(pred.predicted[i])}</span> {pred.confidence[i]:.2f}", base)
                       for i in idx)
        rows_html.append(f'<div class="exrow"><b>{_h(cls)}</b><div class="gal">{figs}</div></div>')
    more = f" (the first {MAX_CLASSES_SHOWN} of {len(examples)} classes)" if len(examples) > MAX_CLASSES_SHOWN else ""
    parts.append(f"<h3>Examples per class</h3><p>A few test images of each class{more}, with the prediction.</p>"
                 + "".join(rows_html))
    return "".join(parts)


def gallery_page(run_dir: str | os.PathLike[str]) -> str:
    """The fragment with its style, for pages other than report.html (the Gradio page)."""
    return f"<style>{GALLERY_CSS}</style>{gallery_html(run_dir)}"


def describe(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The gallery's content as data (top losses, most-confused pairs) for scripts and tests."""
    root = Path(run_dir)
    pred = read_predictions(root)
    metrics = read_metrics(root)
    test = metrics.get("test", {})
    classes = metrics.get("data", {}).get("classes") or (pred.classes if pred else []) or []
    return {"top_losses": [r.__dict__ for r in top_losses(pred)] if pred else [],
            "most_confused": most_confused(test["confusion_matrix"], list(classes))
            if test.get("confusion_matrix") else []}
