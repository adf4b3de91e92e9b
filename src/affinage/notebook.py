"""A run shown in Jupyter: `Run._repr_html_` renders this compact summary (headline metrics, learning curves,
confusion matrix) from the run directory, as pandas renders a DataFrame. Progress bars are tqdm.auto's, so a
notebook gets widgets and a terminal text bars."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from .runfiles import read_history

_STYLE = ("font-family:system-ui,sans-serif;font-size:13px;line-height:1.35;max-width:860px", "display:flex;gap:10px;"
          "flex-wrap:wrap;align-items:flex-start")


def run_html(path: Path, metrics: dict[str, Any]) -> str:
    """The compact HTML summary of a finished run directory."""
    test = metrics.get("test", {})
    classes = metrics.get("data", {}).get("classes") or list(test.get("per_class", {}))
    ci = (test.get("ci95") or {}).get("accuracy")
    ci_text = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    model = metrics.get("model", {})
    facts = [("test accuracy", f"<b>{test.get('accuracy', float('nan')):.4f}</b>{ci_text}"),
             ("macro F1", f"{test.get('macro_f1', float('nan')):.4f}"), ("test images", str(test.get("n", "?"))),
             ("strategy", html.escape(str(metrics.get("strategy")))),
             ("backbone", html.escape(_backbone(model.get("backbone")))),
             ("classes", str(len(classes))),
             ("wall time", f"{metrics.get('timing', {}).get('wall_seconds', float('nan')):.1f} s")]
    rows = "".join(f"<tr><td style='padding:1px 8px 1px 0;color:#5b6670'>{k}</td><td>{v}</td></tr>" for k, v in facts)
    figures = [_curves(read_history(path)), _confusion(test.get("confusion_matrix"), classes)]
    return (f"<div style='{_STYLE[0]}'><div><b>affinage run</b> <code>{html.escape(str(path))}</code></div>"
            f"<div style='{_STYLE[1]}'><table style='border-collapse:collapse'>{rows}</table>"
            + "".join(f for f in figures if f) + "</div></div>")


def _backbone(spec: Any) -> str:
    if isinstance(spec, dict):
        return f"{spec.get('arch', '')} ({spec.get('source', '')})"
    return str(spec or "")


def _curves(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    fig = _figure(3.6, 2.4)
    ax = fig.subplots()
    x = list(range(len(history)))
    for key, colour in (("train_accuracy", "#1f77b4"), ("val_accuracy", "#d62728")):
        points = [(i, r[key]) for i, r in zip(x, history) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), ".-", ms=3, color=colour, label=key.replace("_", " "))
    ax.set_xlabel("epoch (all phases)", fontsize=8)
    ax.set_title("learning curves", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _img(fig, "learning curves")


def _confusion(cm: list[list[int]] | None, classes: list[str]) -> str:
    if not cm:
        return ""
    import numpy as np

    m = np.asarray(cm)
    fig = _figure(2.9, 2.6)
    ax = fig.subplots()
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    n = len(m)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=70, ha="right", fontsize=6)
        ax.set_yticks(range(n), classes, fontsize=6)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title("confusion matrix (test)", fontsize=9)
    return _img(fig, "confusion matrix")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80)


def _img(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.05, metadata={"Software": None})
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}'>"
