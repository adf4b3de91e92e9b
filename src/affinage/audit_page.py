"""audit.html: one self-contained page (thumbnails as inline data URIs, no network request), a section per finding."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import DecodedImages, html_text, jpeg_data_uri
from .storage import write_text

THUMB = 112  # pixels per side of a thumbnail
MAX_SHOWN = 60  # thumbnails per section (the CSVs list everything)

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:""" + str(THUMB + 8) + """px;font-size:11px;word-wrap:break-word}
.card img{width:""" + str(THUMB) + "px;height:" + str(THUMB) + """px;display:block;border:1px solid #ccc}
.test{color:#b00;font-weight:bold}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;
padding:3px 6px}td.num{text-align:right}td.small{background:#fdd}.cluster{border:1px solid #eee;padding:6px;margin:6px 0}
.warn{color:#a40}"""


_e = html_text  # file names that are not UTF-8 (surrogate escapes) cannot go into the UTF-8 page raw


def thumbnail(pixels: np.ndarray) -> str:
    """A data URI of a small JPEG of one decoded (3, S, S) uint8 image."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(np.asarray(pixels).transpose(1, 2, 0)))
    image.thumbnail((THUMB, THUMB))
    return jpeg_data_uri(image, quality=80)


def _card(decoded: DecodedImages, index: int, lines: Sequence[str], split: str = "") -> str:
    text = "<br>".join(_e(t) for t in lines)
    mark = " class=\"test\"" if split == "test" else ""
    return (f"<div class=\"card\"><img src=\"{thumbnail(decoded.pixels[index])}\" alt=\"\"><span{mark}>"
            f"{_e(split)}</span><br>{text}</div>")


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id=\"{sid}\"><h2>{_e(title)}</h2>{body}</section>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], small: set[tuple[int, int]] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td class=\"{'num small' if (r, c) in small else 'num'}\">{_e(v)}</td>" if isinstance(v, (int, float))
        else f"<td>{_e(v)}</td>" for c, v in enumerate(row)) + "</tr>" for r, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _name(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def _labels(findings: dict[str, Any], decoded: DecodedImages) -> str:
    lab = findings["label_issues"]
    cards = [_card(decoded, c["index"], [f"#{c['rank']} {_name(c['path'])}", f"given: {c['given_label']}",
                                         f"suggested: {c['suggested_label']}", f"self-confidence {c['score']:.3g}"],
                   c["split"]) for c in lab["candidates"][:MAX_SHOWN]]
    text = (f"<p>{len(lab['candidates'])} candidate(s) among {lab['n_tested']} images ({_e(lab['method'])}; "
            f"out-of-fold accuracy {lab['oof_accuracy']:.3f}). Test-split candidates (red) are for review only; "
            "nothing is relabelled. All of them: label_issues.csv.</p>")
    return _section("label-issues", "Label issues", text + f"<div class=\"grid\">{''.join(cards)}</div>")


def _images(findings: dict[str, Any], decoded: DecodedImages) -> str:
    img = findings["image_issues"]
    parts = [f"<p>Counts: {_e(', '.join(f'{k}: {v}' for k, v in img['counts'].items()))}. Thresholds in "
             "audit.json (thresholds) and affinage.audit's docstring.</p>"]
    if img["size_statistics"]:
        parts.append(_table(["statistic", "value"], list(img["size_statistics"].items())))
    for check, share in img["set_properties"].items():
        parts.append(f"<p>{share:.0%} of the images are {_e(check.replace('_', ' '))} by the fixed threshold: a "
                     "property of the set; only this dataset's outliers are listed.</p>")
    for check in img["counts"]:
        shown = [i for i in img["issues"] if i["issue"] == check][:MAX_SHOWN]
        if shown:
            cards = [_card(decoded, i["index"], [_name(i["path"]), i["label"], f"score {i['score']}",
                                                 f"{i['width']}x{i['height']}"], i["split"]) for i in shown]
            parts.append(f"<h3>{_e(check.replace('_', ' '))}</h3><div class=\"grid\">{''.join(cards)}</div>")
    return _section("image-issues", "Image quality", "".join(parts))


def _duplicates(findings: dict[str, Any], decoded: DecodedImages) -> str:
    dup = findings["duplicates"]
    parts = [f"<p>{len(dup['clusters'])} cluster(s): {dup['exact_pairs']} exact and {dup['near_pairs']} near pair(s); "
             f"{dup['across_splits']} across splits, {dup['within_split']} within one; {dup['label_conflicts']} under "
             "two labels. All of them: duplicates.csv.</p>"]
    for c in dup["clusters"][:MAX_SHOWN]:
        cards = [_card(decoded, i, [_name(p), lab], sp) for i, p, sp, lab in
                 zip(c["members"], c["paths"], c["splits"], c["labels"])]
        parts.append(f"<div class=\"cluster\">{_e(c['kind'])}, {_e(c['where'])}"
                     f"{' — two labels' if c['label_conflict'] else ''}<div class=\"grid\">{''.join(cards)}</div></div>")
    return _section("duplicates", "Duplicates", "".join(parts))


def _balance(findings: dict[str, Any]) -> str:
    bal = findings["balance"]
    per = bal["per_split"]
    rows = [[c, n, per["train"].get(c, 0), per["val"].get(c, 0), per["test"].get(c, 0)]
            for c, n in bal["class_counts"].items()]
    parts = [f"<p>Imbalance ratio (largest / smallest class): <b>{bal['imbalance_ratio']:.2f}</b>.</p>",
             _table(["class", "images", "train", "val", "test"], rows)]
    if "class_by_group" in bal:
        groups = list(bal["group_counts"])
        table = bal["class_by_group"]
        small = {(r, c + 1) for r, cls in enumerate(table) for c, g in enumerate(groups) if 0 < table[cls][g] < 5}
        parts.append("<h3>Class x group</h3>" + _table(["class", *groups], [[cls, *(table[cls][g] for g in groups)]
                                                                          for cls in table], small))
    if bal["warnings"]:
        parts.append("<ul>" + "".join(f"<li class=\"warn\">{_e(w)}</li>" for w in bal["warnings"]) + "</ul>")
    return _section("balance", "Balance and bias", "".join(parts))


def _outliers(findings: dict[str, Any], decoded: DecodedImages) -> str:
    out = findings["outliers"]
    cards = [_card(decoded, o["index"], [_name(o["path"]), o["label"], f"nearest: {o['nearest_class']}",
                                         f"distance {o['distance']:.3f}"], o["split"]) for o in out["outliers"][:MAX_SHOWN]]
    text = (f"<p>{len(out['outliers'])} image(s) far from every class mean (cosine distance of the frozen feature; "
            f"median distance {out['median_distance']:.3f}).</p>")
    return _section("outliers", "Outliers", text + f"<div class=\"grid\">{''.join(cards)}</div>")


def _skipped(findings: dict[str, Any]) -> str:
    rows = [[s["path"], s["reason"]] for s in findings["skipped"]]
    body = _table(["path", "reason"], rows) if rows else "<p>No file was skipped.</p>"
    return _section("skipped", "Skipped files (not image issues: they were never used)", body)


def render(findings: dict[str, Any], decoded: DecodedImages) -> str:
    fp = findings.get("footprint") or {}
    head = (f"<h1>Data audit</h1><p>{_e(findings['source'])}: {findings['n_images']} images, "
            f"{len(findings['classes'])} classes. Nothing was deleted or relabelled; review the findings, then "
            "<code>affinage train --exclude FILE</code> drops what you list.</p>"
            + (f"<p>Footprint: {fp.get('energy_kwh', 0) * 1000:.3g} Wh, {fp.get('co2_kg', 0) * 1000:.3g} g CO2e.</p>"
               if fp else ""))
    body = "".join([head, _labels(findings, decoded), _images(findings, decoded), _duplicates(findings, decoded),
                    _balance(findings), _outliers(findings, decoded), _skipped(findings)])
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>affinage audit</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_page(path: Path, findings: dict[str, Any], decoded: DecodedImages) -> None:
    write_text(path, render(findings, decoded))
