"""Data audit: label issues, image quality, duplicates, balance and bias, outliers — before a model is trusted.

    audit(data, model="efficientnet_lite0", out="audits/a")  # affinage audit --data D --out DIR
      load the data -> decode (image store) -> the frozen features (feature cache) -> find_issues:
        label issues:  out-of-fold probabilities of a k-fold linear probe on the features (folds.make_folds, duplicate
                       pictures kept in one fold) -> cleanlab's find_label_issues, ranked by self-confidence
        image quality: CleanVision's checks on the decoded pixels and the files' own sizes (thresholds below)
        duplicates:    the leak check's rules (exact: same content hash; near: perceptual hash + pixel
                       confirmation), within and across splits, clustered
        balance:       class counts, imbalance ratio, groups, class x group table, the warnings below
        outliers:      images far from every class mean in feature space
      -> label_issues.csv, image_issues.csv, duplicates.csv, audit.json, audit.html (self-contained), console lines

`train --audit auto|on|off` runs `find_issues` on the run's own splits and features (run.audit_data). Nothing is
ever deleted or relabelled: `train --exclude FILE` drops the reviewed items, listed in skipped_files.csv.
Test-split label candidates are flagged for review only.

Thresholds. CleanVision's fixed thresholds fire on a whole set where the set is unusual (catalogue shots on white
are all "light", a set of night photos all "dark"). So each fixed threshold below holds where it fires on at most
SET_SHARE (20%) of the images; where it fires on more, the set is said to be that way (`set_properties`) and an
image is listed only if it is also an outlier of this dataset: robust z-score z = (x - median) / (1.4826 MAD) beyond
ROBUST_Z = 3.5 (Iglewicz and Hoaglin's rule). Statistics on 64-px thumbnails of the decoded image (the backbone's
resize and crop):
  dark            95th percentile of luma < DARK_P95 (77 of 255: even the brightest pixels are under 30% grey)
                  [relative: mean luma z < -3.5]
  light           5th percentile of luma > LIGHT_P5 (230: even the darkest pixels are near white) [z > +3.5]
  low information entropy of the 256-bin grey histogram < LOW_ENTROPY_BITS (4 of 8 bits) [z < -3.5]
  grayscale       mean channel spread |R-G|, |G-B|, |R-B| < GRAYSCALE_SPREAD (2 of 255) [a grayscale set: none listed]
  blurry          relative only: z of log(std of the Laplacian / (std of the grey + 1)) at 128 px < -3.5 (edge
                  strength relative to contrast; no fixed value holds across cameras and resolutions)
  odd aspect      of the file: longer / shorter side >= ODD_ASPECT (2) and >= 1.5 x the dataset's median ratio
  odd size        of the file: sqrt(w x h) under a quarter or over 4 x the dataset's median, or a side < MIN_SIDE (32 px)
Outliers: cosine distance of the L2-normalised feature to the nearest class mean, z > 3.5 over the dataset.
Balance: imbalance ratio = largest / smallest class; >= IMBALANCE_RATIO (3) recommends `--balance weights`. A class
or group with fewer than MIN_TEST_IMAGES (10) test images is too small to measure (a recall from 9 images has a 95%
interval about +-0.3 wide); class x group cells under SMALL_CELL (5) images are named; a class with >= CONFINED (95%)
of its images in one group (a group holding less than that share of all images) is a spurious-correlation risk: the
model may learn the group (background, season, site) instead of the class; likewise a group confined to one class.
"""
from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import PATH_ERRORS, DecodedImages, Preprocessing, printable
from .errors import AffinageError
from .storage import atomic_path

# train --audit auto: on cached features up to this many images, where the k-fold probe takes seconds (2-core CPU
# shared with other jobs: oxford17's 1,360 images 7 s; fashion_small's 9,583 about two minutes)
AUTO_MAX_IMAGES = 5_000
FOLDS = 5
PROBE_C = 1.0  # the fold probes' L2 strength on standardised features (sklearn's default; oxford17, 20 flipped labels:
# all 20 in the top 40 at 0.1 and 1, 1 converging twice as fast)
ROBUST_Z = 3.5
SET_SHARE = 0.2  # a fixed threshold firing on more of the set describes the set: images then need to be outliers too
DARK_P95, LIGHT_P5 = 77.0, 230.0
LOW_ENTROPY_BITS = 4.0
GRAYSCALE_SPREAD = 2.0
ODD_ASPECT, MIN_SIDE = 2.0, 32
IMBALANCE_RATIO = 3.0
MIN_TEST_IMAGES = 10
SMALL_CELL = 5
CONFINED = 0.95
CHECKS = ("dark", "light", "low_information", "blurry", "grayscale", "odd_aspect_ratio", "odd_size")


def _say(msg: str) -> None:
    print(printable(msg), flush=True)


@dataclass(frozen=True)
class AuditData:
    """What the checks look at: decoded images, the split of each, their frozen features and the skipped files."""

    decoded: DecodedImages
    split_of: list[str]  # per sample: train, val or test
    features: np.ndarray  # (N, D) float32
    source: str
    pp: Preprocessing


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------
def audit(data: str, model: str = "efficientnet_lite0", out: str | Path | None = None, task: str | None = None,
          group_column: str | None = None, seed: int = 0, folds: int = FOLDS, image_size: int | None = None,
          progress: bool = True, log: Callable[[str], None] = _say) -> dict[str, Any]:
    """`affinage audit`: every finding on `data` (audit.json's content), written to `out`.

    >>> findings = audit("../shared/data/oxford17/splits.csv", out="audits/oxford17")
    >>> findings["label_issues"]["candidates"][0]["path"]
    """
    from .data import decode_all, load_source, make_splits
    from .footprint import FootprintTracker
    from .runfiles import prepare_run_dir

    started = time.perf_counter()
    footprint = FootprintTracker().start()
    decoded = None
    try:
        images = load_source(data, tasks=(task,) if task else ())
        if group_column:
            images.samples = with_group_column(images.samples, data, group_column)
        root = prepare_run_dir(out, "audit")
        net, card, pp = _backbone(model, image_size)
        decoded = decode_all(images, pp, progress=progress)
        samples = decoded.samples
        split_of = [""] * len(samples)
        try:
            splits = make_splits(samples, seed)  # given splits, or the ones `affinage train --seed S` would make
            how = splits.how
            for name, idx in splits.items():
                for i in idx:
                    split_of[i] = name
        except AffinageError as exc:  # classes too small to split: audited all the same, without splits
            how = f"no splits: {exc.problem}"
        t0 = time.perf_counter()
        feats = frozen_features(net, card, model, image_size, decoded, progress)
        log(f"audit: {len(samples)} images of {images.description}, features in {time.perf_counter() - t0:.1f}s "
            f"({how})")
        findings = find_issues(AuditData(decoded, split_of, feats, images.description, pp), seed, folds, log)
    finally:
        fp = footprint.stop(decoded.bytes_read if decoded is not None else None)
    findings["footprint"] = fp
    findings["seconds"]["total"] = time.perf_counter() - started
    write_audit(root, findings, decoded)
    for line in summary_lines(findings, root):
        log(line)
    return findings


def with_group_column(samples: list[Any], data: str, column: str) -> list[Any]:
    """Each sample's group read from the CSV column `column` (`--group-column`)."""
    from dataclasses import replace

    path = Path(data).expanduser()
    if not path.is_file():
        raise AffinageError(f"--group-column {column} needs a CSV; '{data}' is not one",
                            "pass a CSV with that column, or --group-by REGEX on the paths (train)")
    with open(path, newline="", encoding="utf-8-sig", errors=PATH_ERRORS) as fh:
        reader = csv.DictReader(fh)
        header = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if column.lower() not in header:
            raise AffinageError(f"CSV '{data}' has no column '{column}'",
                                f"name one of its columns: {', '.join(header.values())[:200]}")
        name, where = header[column.lower()], header["path"]
        groups = {}
        for row in reader:
            file = Path((row.get(where) or "").strip()).expanduser()
            groups[str(file if file.is_absolute() else path.parent / file)] = (row.get(name) or "").strip() or None
    return [replace(s, group=groups.get(s.key)) for s in samples]


def _backbone(model: str, image_size: int | None) -> tuple[Any, Any, Preprocessing]:
    """The frozen backbone's card where one is cached (no network built), else the network."""
    from .backbones import card_key, create_model, load_card

    card = load_card(card_key(model, image_size))
    if card is not None:
        return None, card, card.preprocessing
    net = create_model(model, num_classes=2, image_size=image_size)
    return net, None, net.preprocessing


def frozen_features(net: Any, card: Any, model: str, image_size: int | None, decoded: DecodedImages,
                    progress: bool) -> np.ndarray:
    """Pooled frozen features of every decoded image, from the feature cache (keyed as a training run keys them)."""
    from .backbones import card_key, create_model, fingerprint, save_card
    from .inference import cached_features, default_device, load_cached_features, resolve_precision

    device = default_device()
    dtype = resolve_precision("auto", device).inference_dtype
    if card is not None:
        feats = load_cached_features(card.fingerprint, dtype, decoded.hashes)
        if feats is not None:
            return feats.float().numpy()
        net = create_model(model, num_classes=2, image_size=image_size)
    net.to(device)
    key = card.fingerprint if card is not None else fingerprint(net)
    feats, _ = cached_features(net, key, decoded.pixels, decoded.hashes, net.preprocessing, device, dtype, progress)
    if card is None:
        save_card(card_key(model, image_size), net, key)
    return feats.float().numpy()


def find_issues(data: AuditData, seed: int = 0, folds: int = FOLDS,
                log: Callable[[str], None] = _say) -> dict[str, Any]:
    """Every finding (audit.json without the footprint), each check timed."""
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t0, 3)
        return result

    duplicates = timed("duplicates", lambda: find_duplicates(data))
    pairs = [(a, b) for c in duplicates["clusters"] for a, b in zip(c["members"], c["members"][1:])]
    labels = timed("label_issues", lambda: label_issues(data, pairs, seed, folds))
    quality = timed("image_quality", lambda: image_quality(data))
    balance = timed("balance", lambda: balance_report(data))
    outliers = timed("outliers", lambda: feature_outliers(data))
    log(f"audit: checks in {sum(seconds.values()):.1f}s ("
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in seconds.items()) + ")")
    samples = data.decoded.samples
    return {"source": data.source, "n_images": len(samples), "classes": sorted({s.label for s in samples}),
            "skipped": [{"path": k, "reason": r} for k, r in data.decoded.skipped],
            "label_issues": labels, "image_issues": quality, "duplicates": duplicates, "balance": balance,
            "outliers": outliers, "seconds": seconds,
            "thresholds": {"robust_z": ROBUST_Z, "dark_p95": DARK_P95, "light_p5": LIGHT_P5,
                           "low_entropy_bits": LOW_ENTROPY_BITS, "grayscale_spread": GRAYSCALE_SPREAD,
                           "odd_aspect": ODD_ASPECT, "min_side": MIN_SIDE, "imbalance_ratio": IMBALANCE_RATIO,
                           "min_test_images": MIN_TEST_IMAGES, "small_cell": SMALL_CELL, "confined": CONFINED}}


# ----------------------------------------------------------------------------------------------
# Label issues
# ----------------------------------------------------------------------------------------------
def out_of_fold_probabilities(features: np.ndarray, y: np.ndarray, n_classes: int, seed: int, k: int,
                              duplicates: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, classes), tested mask): each image predicted by a probe trained on the other folds."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from .folds import make_folds
    from .probe import single_threaded_blas

    smallest = min(Counter(y.tolist()).values())
    k = max(2, min(k, smallest)) if smallest > 1 else k
    assignment = make_folds([str(v) for v in y], k, seed, duplicates=duplicates).fold
    x = ((features - features.mean(0)) / (features.std(0) + 1e-6)).astype(np.float32)  # lbfgs converges faster
    probs = np.zeros((len(y), n_classes))
    for f in range(1, k + 1):
        test, train = assignment == f, assignment != f
        # tol 1e-3: a third of the iterations of the default 1e-4, the same held-out accuracy (fashion_small: 0.878
        # against 0.873); the ranking needs probabilities, not the last digit of the optimum
        model = LogisticRegression(C=PROBE_C, max_iter=300, tol=1e-3, random_state=seed)
        with warnings.catch_warnings(), single_threaded_blas():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[train], y[train])
        probs[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
    return probs, assignment > 0


def label_issues(data: AuditData, duplicates: Sequence[tuple[int, int]], seed: int, k: int) -> dict[str, Any]:
    """Candidates: the images cleanlab's find_label_issues flags on the out-of-fold probabilities, and those whose
    out-of-fold prediction is another class, ranked by self-confidence (the probability of the given label: lowest
    first, cleanlab's ranking); `flagged_by_cleanlab` says which the confident-learning filter flags."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as exc:
        raise AffinageError("the label-issue check needs cleanlab", "pip install 'affinage[audit]'") from exc
    samples = data.decoded.samples
    classes = sorted({s.label for s in samples})
    y = np.array([classes.index(s.label) for s in samples])
    probs, tested = out_of_fold_probabilities(data.features, y, len(classes), seed, k, duplicates)
    rows = np.flatnonzero(tested)
    if len(np.unique(y[rows])) < 2:
        return {"candidates": [], "n_tested": int(len(rows)), "flagged_by_cleanlab": 0, "folds": k,
                "oof_accuracy": float("nan"), "order": [],
                "method": "not run: fewer than two classes have images that can be predicted out of fold"}
    p = probs[rows] / probs[rows].sum(1, keepdims=True).clip(1e-12)
    flagged = set(rows[find_label_issues(y[rows], p, return_indices_ranked_by="self_confidence")].tolist())
    confidence = probs[np.arange(len(y)), y]
    wrong = {int(i) for i in rows if probs[i].argmax() != y[i]}
    ranked = sorted(flagged | wrong, key=lambda i: (confidence[i], i))
    candidates = []
    for rank, i in enumerate(ranked, start=1):
        s, split = samples[i], data.split_of[i]
        candidates.append({"rank": rank, "index": int(i), "path": s.key, "given_label": s.label,
                           "suggested_label": classes[int(probs[i].argmax())], "score": float(f"{confidence[i]:.4g}"),
                           "flagged_by_cleanlab": i in flagged, "split": split, "action": "review (test split: never changed)" if split == "test" else
                           "review; relabel, or list in --exclude FILE"})
    oof_accuracy = float((probs[rows].argmax(1) == y[rows]).mean()) if len(rows) else float("nan")
    return {"candidates": candidates, "n_tested": int(len(rows)), "flagged_by_cleanlab": len(flagged), "folds": k, "oof_accuracy": round(oof_accuracy, 4),
            "order": [int(i) for i in rows[np.argsort(confidence[rows], kind="stable")]],
            "method": f"{k}-fold logistic regression (C={PROBE_C}) on the frozen features, duplicate pictures in one "
                      "fold; candidates: cleanlab.filter.find_label_issues's issues and the images predicted as another class, "
                      "ranked by self-confidence"}


# ----------------------------------------------------------------------------------------------
# Image quality
# ----------------------------------------------------------------------------------------------
def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the MAD floored so that a set of near-equal values does not flag everything."""
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return (x - med) / max(mad, 1e-6 * max(1.0, abs(float(med))), 1e-9)


def pixel_statistics(pixels: Any, batch: int = 256) -> dict[str, np.ndarray]:
    """Per image: luma mean / p5 / p95, grey entropy (bits), colour spread, sharpness (see the module docstring)."""
    import torch

    out: dict[str, list[np.ndarray]] = defaultdict(list)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    for start in range(0, len(pixels), batch):
        x = torch.from_numpy(np.array(pixels[start:start + batch])).float()
        small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        grey = (small * luma).sum(1).flatten(1)
        q = torch.quantile(grey, torch.tensor([0.05, 0.95]), dim=1)
        bins = grey.round().clamp(0, 255).long()
        hist = torch.zeros(len(grey), 256).scatter_add_(1, bins, torch.ones_like(grey)) / grey.shape[1]
        entropy = -(hist * torch.log2(hist.clamp_min(1e-12))).sum(1)
        spread = ((small[:, 0] - small[:, 1]).abs() + (small[:, 1] - small[:, 2]).abs()
                  + (small[:, 0] - small[:, 2]).abs()).flatten(1).mean(1) / 3
        mid = torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
        g128 = (mid * luma).sum(1, keepdim=True)
        edges = torch.nn.functional.conv2d(g128, laplace).flatten(1).std(1)
        sharp = torch.log((edges / (g128.flatten(1).std(1) + 1.0)).clamp_min(1e-6))
        for name, value in (("mean", grey.mean(1)), ("p5", q[0]), ("p95", q[1]), ("entropy", entropy),
                            ("spread", spread), ("sharpness", sharp)):
            out[name].append(value.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def file_sizes(samples: Sequence[Any]) -> np.ndarray:
    """(N, 2) width, height of each file from its header (0 where the key is not a readable file: hub or in-memory
    images), and its bytes in a third column."""
    import os

    from PIL import Image

    sizes = np.zeros((len(samples), 3), dtype=np.int64)
    for i, s in enumerate(samples):
        try:
            with Image.open(s.key) as im:
                sizes[i, :2] = im.size
            sizes[i, 2] = os.path.getsize(s.key)
        except (OSError, ValueError):
            continue
    return sizes


def image_quality(data: AuditData) -> dict[str, Any]:
    """CleanVision's checks (the module docstring's thresholds) and the files' size statistics."""
    samples = data.decoded.samples
    st = pixel_statistics(data.decoded.pixels)
    sizes = file_sizes(samples)
    known = sizes[:, 0] > 0
    z_mean = robust_z(st["mean"])
    fixed = {"dark": (st["p95"] < DARK_P95, z_mean < -ROBUST_Z), "light": (st["p5"] > LIGHT_P5, z_mean > ROBUST_Z),
             "low_information": (st["entropy"] < LOW_ENTROPY_BITS, robust_z(st["entropy"]) < -ROBUST_Z),
             "grayscale": (st["spread"] < GRAYSCALE_SPREAD, np.zeros(len(samples), dtype=bool))}
    set_properties = {c: round(float(f.mean()), 3) for c, (f, _) in fixed.items() if f.mean() > SET_SHARE}
    flags = {c: f & rel if c in set_properties else f for c, (f, rel) in fixed.items()}
    flags["blurry"] = robust_z(st["sharpness"]) < -ROBUST_Z
    scores = {"dark": st["p95"], "light": st["p5"], "low_information": st["entropy"], "grayscale": st["spread"],
              "blurry": robust_z(st["sharpness"])}
    if known.any():
        w, h = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
        aspect = np.where(known, np.maximum(w, h) / np.maximum(np.minimum(w, h), 1), 1.0)
        side = np.sqrt(w * h)
        med_aspect, med_side = np.median(aspect[known]), np.median(side[known])
        flags["odd_aspect_ratio"] = known & (aspect >= ODD_ASPECT) & (aspect >= 1.5 * med_aspect)
        flags["odd_size"] = known & ((side < med_side / 4) | (side > med_side * 4) | (np.minimum(w, h) < MIN_SIDE))
        scores["odd_aspect_ratio"], scores["odd_size"] = aspect, side
    issues = []
    for check, flagged in flags.items():
        for i in np.flatnonzero(flagged):
            issues.append({"issue": check, "index": int(i), "path": samples[i].key, "label": samples[i].label,
                           "split": data.split_of[i], "score": round(float(scores[check][i]), 3),
                           "width": int(sizes[i, 0]), "height": int(sizes[i, 1])})
    stats = {}
    if known.any():
        stats = {f"{name}_{fn.__name__}": int(fn(col[known])) for name, col in
                 (("width", sizes[:, 0]), ("height", sizes[:, 1]), ("bytes", sizes[:, 2])) for fn in (np.min, np.median,
                                                                                                      np.max)}
    return {"issues": issues, "counts": {c: int(f.sum()) for c, f in flags.items()}, "size_statistics": stats,
            "set_properties": set_properties, "decoded_side": int(data.pp.stored_size),
            "files_with_size": int(known.sum())}


# ----------------------------------------------------------------------------------------------
# Duplicates, balance, outliers
# ----------------------------------------------------------------------------------------------
def find_duplicates(data: AuditData) -> dict[str, Any]:
    """Clusters of the same picture (exact: same content; near: the leak check's confirmed near copies), within and
    across splits."""
    from .folds import clusters_of
    from .leaks import cached_perceptual_hashes, duplicate_pairs

    d = data.decoded
    codes = cached_perceptual_hashes(d.pixels, d.hashes, json.dumps(data.pp.to_dict(), sort_keys=True))
    pairs = duplicate_pairs(d.pixels, d.hashes, range(len(d.samples)), codes)
    component = clusters_of(len(d.samples), None, [(i, j) for i, j, _ in pairs])
    kinds: dict[int, set[str]] = defaultdict(set)
    for i, _, kind in pairs:
        kinds[int(component[i])].add(kind)
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(component):
        if int(c) in kinds:
            members[int(c)].append(i)
    clusters = []
    for c, idx in sorted(members.items(), key=lambda kv: kv[1][0]):
        splits = sorted({data.split_of[i] for i in idx}, key=("train", "val", "test", "").index)
        labels = sorted({d.samples[i].label for i in idx})
        clusters.append({"members": idx, "paths": [d.samples[i].key for i in idx],
                         "splits": [data.split_of[i] for i in idx], "labels": [d.samples[i].label for i in idx],
                         "kind": "exact" if kinds[c] == {"exact"} else "near" if kinds[c] == {"near"} else "exact+near",
                         "where": "within " + splits[0] if len(splits) == 1 else "across " + "-".join(splits),
                         "label_conflict": len(labels) > 1})
    across = sum(c["where"].startswith("across") for c in clusters)
    return {"clusters": clusters, "pairs": len(pairs), "exact_pairs": sum(k == "exact" for *_, k in pairs),
            "near_pairs": sum(k == "near" for *_, k in pairs), "across_splits": across,
            "within_split": len(clusters) - across, "label_conflicts": sum(c["label_conflict"] for c in clusters)}


def balance_report(data: AuditData) -> dict[str, Any]:
    """Class counts (all and per split), imbalance ratio, groups and the class x group table, with warnings."""
    samples = data.decoded.samples
    counts = Counter(s.label for s in samples)
    per_split = {name: dict(sorted(Counter(s.label for s, sp in zip(samples, data.split_of) if sp == name).items()))
                 for name in ("train", "val", "test")}
    ratio = max(counts.values()) / min(counts.values())
    warnings = []
    test_counts = per_split["test"]
    for c in sorted(counts):
        if not test_counts and counts[c] < MIN_TEST_IMAGES:
            warnings.append(f"class '{c}' has {counts[c]} image(s) and no split: too small to measure")
        elif test_counts and test_counts.get(c, 0) < MIN_TEST_IMAGES:
            warnings.append(f"class '{c}' has {test_counts.get(c, 0)} test image(s) ({counts[c]} in all): too small to "
                            f"measure (its recall from under {MIN_TEST_IMAGES} images is noise)")
    recommendation = None
    if ratio >= IMBALANCE_RATIO:
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)  # type: ignore[arg-type]
        recommendation = (f"imbalance ratio {ratio:.1f} ('{big}' {counts[big]} vs '{small}' {counts[small]}): train with "
                          "--balance weights (class-weighted loss; sklearn class_weight='balanced' for the probe) or "
                          "--balance sampler, and read the macro metrics")
        warnings.append(recommendation)
    out: dict[str, Any] = {"class_counts": dict(sorted(counts.items())), "per_split": per_split,
                           "imbalance_ratio": round(ratio, 3), "recommendation": recommendation}
    if any(s.group is not None for s in samples):
        out.update(_group_table(samples, data.split_of, warnings))
    out["warnings"] = warnings
    return out


def _group_table(samples: Sequence[Any], split_of: Sequence[str], warnings: list[str]) -> dict[str, Any]:
    groups = Counter(s.group or "(none)" for s in samples)
    classes = Counter(s.label for s in samples)
    table: dict[str, dict[str, int]] = {c: {g: 0 for g in sorted(groups)} for c in sorted(classes)}
    for s in samples:
        table[s.label][s.group or "(none)"] += 1
    test_groups = Counter(s.group or "(none)" for s, sp in zip(samples, split_of) if sp == "test")
    for g in sorted(groups):
        if test_groups and test_groups.get(g, 0) < MIN_TEST_IMAGES:
            warnings.append(f"group '{g}' has {test_groups.get(g, 0)} test image(s) ({groups[g]} in all): too small "
                            "to measure")
    small = [{"class": c, "group": g, "n": n} for c, row in table.items() for g, n in row.items() if 0 < n < SMALL_CELL]
    empty = [{"class": c, "group": g} for c, row in table.items() for g, n in row.items() if n == 0]
    total = len(samples)
    confined = []
    for c, row in table.items():
        g, n = max(row.items(), key=lambda kv: kv[1])
        if len(groups) > 1 and n / classes[c] >= CONFINED and groups[g] / total < CONFINED:
            confined.append({"class": c, "group": g, "share": round(n / classes[c], 3)})
            warnings.append(f"class '{c}' is confined to group '{g}' ({n} of its {classes[c]} images): spurious-"
                            "correlation risk, the model may learn the group instead of the class")
    for g in sorted(groups):
        c, n = max(((c, table[c][g]) for c in table), key=lambda kv: kv[1])
        if len(classes) > 1 and n / groups[g] >= CONFINED and classes[c] / total < CONFINED and groups[g] >= SMALL_CELL:
            confined.append({"group": g, "class": c, "share": round(n / groups[g], 3)})
            warnings.append(f"group '{g}' is confined to class '{c}' ({n} of its {groups[g]} images): the group "
                            "alone predicts the class")
    if small:
        warnings.append(f"{len(small)} class x group cell(s) under {SMALL_CELL} images: "
                        + ", ".join(f"{x['class']} x {x['group']} ({x['n']})" for x in small[:12])
                        + (" ..." if len(small) > 12 else ""))
    return {"group_counts": dict(sorted(groups.items())), "class_by_group": table, "small_cells": small,
            "empty_cells": empty, "confined": confined}


def feature_outliers(data: AuditData) -> dict[str, Any]:
    """Images whose feature is far from every class mean (cosine distance to the nearest, robust z > ROBUST_Z)."""
    samples = data.decoded.samples
    classes = sorted({s.label for s in samples})
    y = np.array([classes.index(s.label) for s in samples])
    x = data.features / np.linalg.norm(data.features, axis=1, keepdims=True).clip(1e-12)
    means = np.stack([x[y == c].mean(0) for c in range(len(classes))])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    distance = 1 - x @ means.T
    nearest = distance.min(1)
    z = robust_z(nearest)
    found = [{"index": int(i), "path": samples[i].key, "label": samples[i].label, "split": data.split_of[i],
              "nearest_class": classes[int(distance[i].argmin())], "distance": round(float(nearest[i]), 4),
              "own_class_distance": round(float(distance[i, y[i]]), 4), "z": round(float(z[i]), 2)}
             for i in np.argsort(-nearest) if z[i] > ROBUST_Z]
    return {"outliers": found, "median_distance": round(float(np.median(nearest)), 4)}


def audit_into(data: AuditData, key: str, out: Path, seed: int = 0,
               log: Callable[[str], None] = _say) -> dict[str, Any]:
    """`find_issues` + `write_audit` into `out`, remembered in the cache under `key` (the images, labels, splits and
    backbone): a rerun on the same data copies the files (no probe, no cleanlab import: a cached rerun stays fast)."""
    import shutil

    from .storage import cache_dir, read_json

    cached = cache_dir() / "audits" / key
    if (cached / "audit.json").is_file():
        try:
            shutil.copytree(cached, out, dirs_exist_ok=True)  # --resume: the interrupted run may have written it
            findings = read_json(out / "audit.json")
            log(f"audit: these images, labels and splits were audited before: files copied from the cache ({cached})")
            return findings
        except (OSError, ValueError):
            shutil.rmtree(out, ignore_errors=True)  # a damaged cache entry: audited again below
    t0 = time.perf_counter()
    findings = find_issues(data, seed, log=log)
    findings["seconds"]["total"] = time.perf_counter() - t0
    write_audit(out, findings, data.decoded)
    try:
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        os.replace(tmp, cached)
    except OSError:
        pass  # best effort: the next run only audits again
    return findings


# ----------------------------------------------------------------------------------------------
# Files and console
# ----------------------------------------------------------------------------------------------
def write_audit(root: Path, findings: dict[str, Any], decoded: DecodedImages) -> None:
    """label_issues.csv, image_issues.csv, duplicates.csv, audit.json and audit.html in `root`."""
    from .audit_page import write_page
    from .storage import write_json

    root.mkdir(parents=True, exist_ok=True)
    _csv(root / "label_issues.csv", ["rank", "path", "given_label", "suggested_label", "score", "flagged_by_cleanlab",
                                      "split", "action"],
         findings["label_issues"]["candidates"])
    _csv(root / "image_issues.csv", ["issue", "path", "label", "split", "score", "width", "height"],
         findings["image_issues"]["issues"] + [{"issue": "skipped", "path": s["path"], "label": "", "split": "",
                                                "score": s["reason"]} for s in findings["skipped"]])
    rows = [{"cluster": k, "path": p, "split": sp, "label": lab, "kind": c["kind"], "where": c["where"]}
            for k, c in enumerate(findings["duplicates"]["clusters"], start=1)
            for p, sp, lab in zip(c["paths"], c["splits"], c["labels"])]
    _csv(root / "duplicates.csv", ["cluster", "path", "split", "label", "kind", "where"], rows)
    write_json(root / "audit.json", findings)
    write_page(root / "audit.html", findings, decoded)


def _csv(path: Path, columns: list[str], rows: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.DictWriter(fh, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def summary_lines(findings: dict[str, Any], root: Path | None = None) -> list[str]:
    """The console summary: one line per finding."""
    lab, img, dup, bal = (findings[k] for k in ("label_issues", "image_issues", "duplicates", "balance"))
    counts = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in img["counts"].items() if n) or "none"
    test = sum(c["split"] == "test" for c in lab["candidates"])
    lines = [f"audit: {findings['n_images']} images, {len(findings['classes'])} classes, "
             f"{len(findings['skipped'])} skipped file(s)",
             f"label issues: {len(lab['candidates'])} candidate(s), {lab['flagged_by_cleanlab']} flagged by cleanlab "
             f"(out-of-fold accuracy {lab['oof_accuracy']:.3f}; "
             f"{test} in the test split: review only)",
             f"image issues: {counts}",
             f"duplicates: {len(dup['clusters'])} cluster(s) of the same picture ({dup['exact_pairs']} exact, "
             f"{dup['near_pairs']} near pair(s); {dup['across_splits']} across splits, {dup['within_split']} within one"
             + (f"; {dup['label_conflicts']} under two labels" if dup["label_conflicts"] else "") + ")",
             f"balance: imbalance ratio {bal['imbalance_ratio']:.2f}"
             + (f"; {len(bal.get('group_counts', {}))} groups" if "group_counts" in bal else ""),
             f"outliers: {len(findings['outliers']['outliers'])} image(s) far from every class mean"]
    lines += [f"  warning: {w}" for w in bal["warnings"][:8]]
    if root is not None:
        lines.append(f"audit written to {root} (audit.html, label_issues.csv, image_issues.csv, duplicates.csv, "
                     f"audit.json) in {findings['seconds'].get('total', sum(findings['seconds'].values())):.1f}s")
    return lines
