"""k-fold cross-validation: K child runs on stratified folds, their out-of-fold predictions, mean and spread; few-shot.

    cross_validate(data, model, strategy, out, folds=K, ...):
      load the data -> decode once (image store) and extract the frozen features once (feature cache)
      -> near-duplicate clusters (leaks.duplicate_pairs) -> make_folds -> per fold: split lists (test = the fold,
      train/val carved from the others), a child run by `run.finetune` from those lists, on the caches
      -> out-of-fold predictions -> few-shot: the prototype classifier against the strategy, on them
      -> the final model (on a given test split, or --refit on) -> metrics.json["cv"], oof_predictions.csv

Which images are cross-validated: all of them, except a given test split (a `test` split column or folder), which
is held out and evaluated once, by the final model trained on all the others. Folds are stratified by class
(scikit-learn's StratifiedKFold), and grouped (StratifiedGroupKFold) where the data has groups or duplicate
pictures: the images of one group, and every cluster of exact or near copies found by the leak check's rules, share
a fold, so a copy is never in train while its original is tested. A class of one image cannot be tested (it would
be missing from its fold's train split): it trains in every fold, and the run lists it as not evaluated.

Few-shot: where the smallest class has at most FEW_SHOT_MAX images, the classes are not refused ("too few to
split"): every fold also trains the prototype classifier (fewshot.py), and the one of the two with the better
out-of-fold predictions (`selection.choose`: accuracy where it separates them, else calibrated log loss, else the
prototype, which fits nothing but a temperature) is kept, with the reason. Its figures are out-of-fold figures,
and the run says so, with their 95% interval (Wilson, on the pooled out-of-fold predictions).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import DecodedImages, Splits, printable
from .errors import AffinageError
from .folds import FEW_SHOT_MAX, Folds, carve_val, fold_splits, make_folds
from .seeding import stage_seed

HEADLINE = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss", "top5_accuracy", "specificity")
PROTOTYPE = "prototype"
TIMING = ("wall_seconds", "decode_seconds", "decode_cache_hit", "decoded_images", "feature_seconds", "features_cached",
          "train_seconds", "eval_seconds", "peak_memory_mb")
GIVEN_TEST = "the given test split: evaluated once, by the final model"


def _say(msg: str) -> None:
    print(printable(msg), flush=True)


@dataclass
class CrossValidation:
    path: Path
    metrics: dict[str, Any]
    runs: list[Path]  # the child runs of the kept classifier, fold by fold
    final: Path | None  # the final model's run directory (None: none was trained)


# ----------------------------------------------------------------------------------------------
# cross_validate
# ----------------------------------------------------------------------------------------------
def cross_validate(data: str, model: str = "efficientnet_lite0", strategy: str = "auto",
                   out: str | os.PathLike[str] | None = None, progress: bool = True,
                   log: Callable[[str], None] = _say, **options: Any) -> CrossValidation:
    """`affinage train --folds K`: K child runs, their out-of-fold predictions and mean ± std, in one directory.

    >>> cv = cross_validate(data="../shared/data/hymenoptera", strategy="linear-probe", folds=5, out="runs/cv")
    >>> cv.metrics["cv"]["accuracy_mean"], cv.metrics["cv"]["accuracy_std"]
    """
    from .runfiles import prepare_run_dir, write_config

    cfg = TrainConfig(data=str(data), model=model, strategy=strategy, **options)
    if cfg.folds is None:
        raise AffinageError("cross_validate needs folds=K", "pass folds=5 (or use run.finetune for one split)")
    started = time.perf_counter()
    shared = _shared_stage(cfg, progress, log)
    root = prepare_run_dir(out, f"cv{cfg.folds}-{cfg.strategy}")
    write_config(root, cfg.to_yaml())
    pool, given_test = shared.pool, shared.given_test
    labels = [s.label for s in shared.decoded.samples]
    pool_labels = [labels[i] for i in pool]
    folds = make_folds(pool_labels, cfg.folds, cfg.seed, [shared.decoded.samples[i].group for i in pool],
                       shared.duplicates)
    smallest = min((n, c) for c, n in Counter(pool_labels).items())
    few_shot = smallest[0] <= FEW_SHOT_MAX
    strategies = _strategies(cfg, few_shot, f"class '{smallest[1]}' has {smallest[0]} image(s)", log)
    log(f"cross-validation: {len(pool)} images in {cfg.folds} folds ({folds.how})"
        + (f"; {len(given_test)} test images held out for the final model" if given_test else ""))
    _write_folds(root, shared.decoded, pool, folds, given_test, cfg)
    children = {s: _run_folds(root, cfg, s, folds, strategies[0], progress, log) for s in strategies}
    oof = {s: _out_of_fold(children[s], shared.decoded, pool, folds) for s in strategies}
    kept, few = _few_shot_choice(strategies, oof, few_shot, log)
    final = _final_model(root, cfg, kept, shared, folds, progress, log)
    metrics = _summary(cfg, shared, pool, folds, children, oof, kept, few, final, started)
    _write_outputs(root, shared.decoded, oof[kept], metrics)
    for line in _summary_lines(metrics):
        log(line)
    return CrossValidation(root, metrics, [Path(r["run_dir"]) for r in children[kept]],
                           Path(final["run_dir"]) if final else None)


@dataclass
class _Shared:
    """What every child run reuses: the decoded images (image store), the features (feature cache), duplicates."""

    images: Any  # LabelledImages
    decoded: DecodedImages
    pool: np.ndarray  # indices of the cross-validated images
    given_test: list[int]
    duplicates: list[tuple[int, int]]  # positions in `pool` of duplicate pairs
    timing: dict[str, Any]
    footprint: dict[str, Any]


def _shared_stage(cfg: TrainConfig, progress: bool, log: Callable[[str], None]) -> _Shared:
    """Decode every image and extract its frozen features once, into the caches the child runs read; find the
    duplicate pictures among the cross-validated images."""
    from .data import check_usable, decode_all, drop_small_classes, load_source
    from .footprint import FootprintTracker
    from .leaks import cached_perceptual_hashes, duplicate_pairs
    from .run import build_backbone, extract_features, plan_device
    from .targets import parse_targets

    footprint = FootprintTracker(cfg.country, cfg.water_l_per_kwh).start()
    t0 = time.perf_counter()
    images = load_source(cfg.data, cfg.group_by, cfg.tasks, cfg.image_column, cfg.label_column)  # several --task: the folds are the first task's
    if len(cfg.tasks) < 2:  # (a `task:` target is checked by the child runs, which know every task's classes)
        parse_targets(cfg.targets, images.classes)
    frozen = _main_strategy(cfg, True) if cfg.strategy == "auto" else cfg.strategy  # a card where one is cached
    backbone = build_backbone(cfg.replace(strategy=frozen))
    t1 = time.perf_counter()
    decoded = decode_all(images, backbone.preprocessing, progress=progress)
    decoded, _ = drop_small_classes(decoded, cfg.min_per_class, True)
    check_usable(decoded.samples, cfg.data, "the skipped files")
    t2 = time.perf_counter()
    log(f"images: {len(decoded.samples)} usable, {decoded.decoded_count} decoded now (the others from the image "
        f"store), in {t2 - t1:.1f}s; the child runs read them from the store")
    given_test = [i for i, s in enumerate(decoded.samples) if s.split == "test"]
    pool = np.array([i for i, s in enumerate(decoded.samples) if s.split != "test"], dtype=np.int64)
    features = extract_features(cfg.replace(strategy=frozen), backbone, _as_prepared(decoded), plan_device(cfg),
                                progress, log)[1]
    t3 = time.perf_counter()
    pp = backbone.preprocessing
    codes = cached_perceptual_hashes(decoded.pixels, decoded.hashes, json.dumps(pp.to_dict(), sort_keys=True))
    position = {int(i): k for k, i in enumerate(pool)}
    pairs = [(position[i], position[j]) for i, j, _ in duplicate_pairs(decoded.pixels, decoded.hashes, pool, codes)]
    if pairs:
        log(f"duplicates: {len(pairs)} pair(s) of the same picture among the cross-validated images, each kept in one "
            "fold")
    timing = {"model_load_seconds": backbone.seconds, "decode_seconds": t2 - t1, "decoded_images": decoded.decoded_count,
              "decode_cache_hit": decoded.cache_hit, "feature_seconds": t3 - t2, "features_cached": features.cached,
              "duplicate_seconds": time.perf_counter() - t3, "load_seconds": t1 - t0}
    return _Shared(images, decoded, pool, given_test, pairs, timing, footprint.stop(decoded.bytes_read))


def _as_prepared(decoded: DecodedImages) -> Any:
    """The decoded images as `run.extract_features` takes them (it reads their pixels and hashes only)."""
    from .labels import LabelSpace
    from .run import PreparedData

    labels = LabelSpace.from_labels((s.label for s in decoded.samples), "all images")
    y = np.array(labels.indices(s.label for s in decoded.samples), dtype=np.int64)
    return PreparedData(decoded, Splits([], [], [], "all images"), labels, y, {}, [], 0.0, "", [])


def _main_strategy(cfg: TrainConfig, few_shot: bool) -> str:
    """The strategy cross-validated: the configured one, but the tuned probe where auto meets few-shot classes."""
    return "linear-probe" if few_shot and cfg.strategy == "auto" else cfg.strategy


def _strategies(cfg: TrainConfig, few_shot: bool, smallest: str, log: Callable[[str], None]) -> list[str]:
    """The classifiers each fold trains: the strategy, and with few-shot classes the prototype classifier too."""
    main = _main_strategy(cfg, few_shot)
    if not few_shot:
        return [main]
    if main != cfg.strategy:
        log(f"few-shot: {smallest} (at most {FEW_SHOT_MAX}), too few for auto's fine-tuning candidates: the tuned "
            "linear probe is cross-validated instead")
    if main == PROTOTYPE:
        return [main]
    log(f"few-shot: {smallest} (at most {FEW_SHOT_MAX}): every fold also trains the prototype classifier (nearest "
        f"class mean on the frozen features); the better of {main} and prototype on the out-of-fold predictions is "
        "kept")
    return [main, PROTOTYPE]


def _write_folds(root: Path, decoded: DecodedImages, pool: np.ndarray, folds: Folds, given_test: list[int],
                 cfg: TrainConfig) -> None:
    """folds/folds.csv and each fold's split lists (folds/lists/fold-K/splits/), which its child run reuses."""
    from .data import write_split_lists
    from .runfiles import write_fold_assignment

    samples, hashes = decoded.samples, decoded.hashes
    write_fold_assignment(root, [samples[i].key for i in pool], [samples[i].label for i in pool],
                          [samples[i].group for i in pool], [hashes[i] for i in pool], folds.fold.tolist())
    labels = [s.label for s in samples]
    fraction = cfg.val_fraction / (1 - cfg.test_fraction)  # the share of train + val that a plain run validates on
    for f in range(1, folds.k + 1):
        splits = fold_splits(pool, folds, f, labels, fraction, cfg.seed)
        write_split_lists(_lists(root, f) / "splits", samples, hashes, splits,
                          reasons={i: GIVEN_TEST for i in given_test})


def _lists(root: Path, f: int | str) -> Path:
    return root / "folds" / "lists" / (f"fold-{f}" if isinstance(f, int) else f)


def _child_options(cfg: TrainConfig, splits_from: Path, refit: str) -> dict[str, Any]:
    options = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "model", "strategy")}
    options.update(folds=None, splits_from=str(splits_from), refit=refit, audit="off")  # audited once, not per fold
    return options


def _run_folds(root: Path, cfg: TrainConfig, strategy: str, folds: Folds, main: str, progress: bool,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One child run per fold (`run.finetune` on the fold's lists); each fold's figures, timing and run_dir."""
    from .run import finetune
    from .runfiles import read_metrics

    refit = "auto" if cfg.refit == "on" else cfg.refit  # --refit on: the final model, not K second trainings
    rows = []
    for f in range(1, folds.k + 1):
        name = f"fold-{f}" if strategy == main else f"fold-{f}-{strategy.replace(':', '')}"
        tag = f"[{strategy} fold {f}/{folds.k}]"

        def child_log(msg: str, tag: str = tag) -> None:
            log(f"  {tag} {msg}")

        run = finetune(data=cfg.data, model=cfg.model, strategy=strategy, out=root / "folds" / name,
                       progress=progress, log=child_log, **_child_options(cfg, _lists(root, f), refit))
        m = read_metrics(run.path, required=True)
        timing = {k: m["timing"].get(k) for k in TIMING}
        rows.append({"fold": f, "strategy": m["strategy"], "run_dir": str(run.path), "n_test": m["test"]["n"],
                     **{k: m["test"][k] for k in HEADLINE if k in m["test"]},
                     "trainable_params": m["model"]["trainable_params"], "timing": timing,
                     "targets": m.get("targets") or [],
                     "energy_kwh": (m.get("footprint") or {}).get("energy_kwh"),
                     "co2_kg": (m.get("footprint") or {}).get("co2_kg"),
                     "water_l": (m.get("footprint") or {}).get("water_l")})
        log(f"{tag} test accuracy {m['test']['accuracy']:.4f} (n={m['test']['n']}); decode {timing['decode_seconds']:.2f}s "
            f"({'store hit' if timing['decode_cache_hit'] else 'decoded'}, {timing['decoded_images']} decoded), features "
            f"{timing['feature_seconds']:.2f}s ({'cached' if timing['features_cached'] else 'computed'}), train "
            f"{timing['train_seconds']:.2f}s, whole run {timing['wall_seconds']:.1f}s")
    return rows


@dataclass
class _OutOfFold:
    """The pooled test predictions of one classifier's child runs, aligned with the pool."""

    classes: list[str]
    probabilities: np.ndarray  # (tested images, classes)
    rows: np.ndarray  # positions in the pool of the tested images, in the order of `probabilities`
    y: np.ndarray  # their labels as indices into `classes`
    keys: list[str]
    hashes: list[str]
    labels: list[str]
    folds: list[int]


def _out_of_fold(children: list[dict[str, Any]], decoded: DecodedImages, pool: np.ndarray, folds: Folds) -> _OutOfFold:
    """Every tested image's prediction by the child run of its fold (matched by path and content hash)."""
    from .runfiles import read_predictions

    where = {(decoded.samples[i].key, decoded.hashes[i]): k for k, i in enumerate(pool)}
    read = [read_predictions(c["run_dir"]) for c in children]
    classes = sorted({c for p in read for c in (p.classes if p is not None and p.classes else [])})
    column = {c: j for j, c in enumerate(classes)}
    probs = np.zeros((len(pool), len(classes)))
    seen = np.zeros(len(pool), dtype=bool)
    for child, p in zip(children, read):
        if p is None or p.probabilities is None or p.classes is None:
            raise AffinageError(f"child run '{child['run_dir']}' has no test_predictions.csv with probabilities",
                                "the cross-validation is damaged: run it again with a new --out")
        cols = [column[c] for c in p.classes]
        for path, sha, row in zip(p.paths, p.hashes, p.probabilities):
            k = where[(path, sha)]
            assert not seen[k], f"image {path} is tested by two folds"
            probs[k, cols] = row
            seen[k] = True
    expected = folds.fold > 0
    assert (seen == expected).all(), "every image of a tested class must be tested by exactly one fold"
    rows = np.flatnonzero(seen)
    samples = [decoded.samples[pool[k]] for k in rows]
    y = np.array([column[s.label] for s in samples], dtype=np.int64)
    return _OutOfFold(classes, probs[rows], rows, y, [s.key for s in samples], [decoded.hashes[pool[k]] for k in rows],
                      [s.label for s in samples], folds.fold[rows].tolist())


def _few_shot_choice(strategies: list[str], oof: dict[str, _OutOfFold], few_shot: bool,
                     log: Callable[[str], None]) -> tuple[str, dict[str, Any] | None]:
    """The classifier kept: the only one, or (few-shot) the one `selection.choose` prefers on the out-of-fold
    predictions, the prototype being the cheaper (it fits nothing but a temperature)."""
    from .selection import Scored, choose

    if len(strategies) == 1:
        return strategies[0], ({"candidates": strategies, "chosen": strategies[0],
                                "reason": f"{strategies[0]}: the only classifier asked for"} if few_shot else None)
    first = oof[strategies[0]]
    scored = [Scored.from_probs(s, oof[s].probabilities, 0.0 if s == PROTOTYPE else 1.0) for s in strategies]
    choice = choose(scored, first.y, prefer_cheaper=True, what="classifier")
    reason = choice.reason.replace("val accuracy", "out-of-fold accuracy").replace("val log loss",
                                                                                   "out-of-fold log loss")
    log(f"few-shot: {reason}")
    return choice.name, {"candidates": strategies, "chosen": choice.name, "reason": reason, "table": choice.table}


def _final_model(root: Path, cfg: TrainConfig, strategy: str, shared: _Shared, folds: Folds, progress: bool,
                 log: Callable[[str], None]) -> dict[str, Any] | None:
    """The kept classifier trained on every cross-validated image (train + a val carve, refitted on both where the
    strategy does) and evaluated on the given test split, once; without one, only with --refit on."""
    from .data import write_split_lists
    from .run import finetune
    from .runfiles import read_metrics
    from .selection import wilson

    given = shared.given_test
    if not given and cfg.refit != "on":
        return None
    samples, hashes = shared.decoded.samples, shared.decoded.hashes
    labels = [s.label for s in samples]
    clusters = np.zeros(len(samples), dtype=np.int64)
    clusters[shared.pool] = folds.clusters
    train, val = carve_val([int(i) for i in shared.pool], labels, clusters, cfg.val_fraction / (1 - cfg.test_fraction),
                           stage_seed(cfg.seed, "final-val"))
    how = "final model: every cross-validated image in train or val" + ("; the given test split" if given else
                                                                         "; no test split")
    write_split_lists(_lists(root, "final") / "splits", samples, hashes, Splits(train, val, list(given), how))
    log(f"final model: {strategy} on all {len(shared.pool)} cross-validated images" +
        (f", evaluated once on the {len(given)} given test images" if given else " (no held-out test: the "
         "cross-validation's figures are its estimate)"))
    run = finetune(data=cfg.data, model=cfg.model, strategy=strategy, out=root / "final", progress=progress,
                   log=lambda msg: log(f"  [final] {msg}"), **_child_options(cfg, _lists(root, "final"), cfg.refit))
    m = read_metrics(run.path, required=True)
    test = None
    if given:
        n, acc = m["test"]["n"], m["test"]["accuracy"]
        ci = wilson(round(acc * n), n)
        test = {"n": n, "accuracy": acc, "accuracy_ci95": [round(v, 4) for v in ci],
                "accuracy_ci95_width": round(ci[1] - ci[0], 4), "macro_f1": m["test"]["macro_f1"],
                "interval": "95% Wilson interval of the accuracy on the given test split"}
    return {"run_dir": str(run.path), "strategy": m["strategy"], "trained_on": len(train) + len(val),
            "targets": m.get("targets") or [] if given else [],
            "refit": (m.get("last_points") or {}).get("refit"), "test": test,
            **({} if given else {"why_no_test": "every image trains (train + val): the cross-validation's out-of-fold "
                                                "figures are this model's estimate"})}


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def fold_statistics(per_fold: Sequence[dict[str, Any]]) -> dict[str, float]:
    """<metric>_mean and <metric>_std (sample standard deviation, ddof=1) over the folds, for every headline metric
    that each fold has."""
    out: dict[str, float] = {}
    for key in HEADLINE:
        values = [r[key] for r in per_fold if r.get(key) is not None]
        if len(values) == len(per_fold) and values:
            out[f"{key}_mean"] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return out


def _oof_figures(oof: _OutOfFold) -> dict[str, Any]:
    """Classification figures of the pooled out-of-fold predictions, with the accuracy's 95% Wilson interval."""
    from .evaluate import classification_metrics
    from .selection import wilson

    logits = np.log(np.clip(oof.probabilities, 1e-12, None))
    m = classification_metrics(logits, oof.y, oof.classes)
    ci = wilson(int((logits.argmax(1) == oof.y).sum()), len(oof.y))
    return {**{k: m[k] for k in ("n", *HEADLINE) if k in m}, "accuracy_ci95": [round(v, 4) for v in ci],
            "accuracy_ci95_width": round(ci[1] - ci[0], 4), "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"], "classes": oof.classes}


def _summary(cfg: TrainConfig, shared: _Shared, pool: np.ndarray, folds: Folds, children: dict[str, list[dict[str, Any]]],
             oof: dict[str, _OutOfFold], kept: str, few: dict[str, Any] | None, final: dict[str, Any] | None,
             started: float) -> dict[str, Any]:
    """metrics.json of the cross-validation (runfiles.CV_METRICS_SCHEMA)."""
    from .data import class_counts

    samples = shared.decoded.samples
    per_fold = children[kept]
    if few is not None:
        few["figures"] = {s: {**fold_statistics(children[s]), "oof_accuracy": _oof_figures(oof[s])["accuracy"]}
                          for s in children}
    untested = [{"path": samples[pool[k]].key, "label": samples[pool[k]].label,
                 "reason": "its class has one image: it trains in every fold, no fold can test it"}
                for k in np.flatnonzero(folds.fold == 0)]
    oof_block = _oof_figures(oof[kept])
    cv = {"k": folds.k, "strategy": kept, "folds": folds.how, "n_images": len(pool),
          "source": (f"cross-validation: the out-of-fold predictions of {folds.k} child runs (each image tested once, "
                     "by the run of its fold, trained without it); mean and sample std (ddof=1) over the folds"),
          "per_fold": per_fold, **fold_statistics(per_fold), "oof": oof_block, "not_evaluated": untested,
          "few_shot": few, "final": final}
    footprint = dict(shared.footprint)
    for key in ("energy_kwh", "co2_kg", "water_l"):
        footprint[key] = (shared.footprint.get(key) or 0.0) + sum(r.get(key) or 0.0 for rows in children.values()
                                                                   for r in rows)
    footprint["method"] = ("the shared decoding and features, plus every child run's own footprint (summed); the shared "
                           f"stage's: {shared.footprint.get('method', '?')}")
    if "transfer_kwh" in footprint:  # the children read from the caches: the shared stage did the downloading
        footprint["total_energy_kwh"] = footprint["energy_kwh"] + footprint["transfer_kwh"]
        footprint["total_co2_kg"] = footprint["co2_kg"] + footprint["transfer_co2_kg"]
    return {"cv": cv, "strategy": kept,
            "data": {"source": shared.images.description, "classes": oof_block["classes"],
                     "counts": {"cross-validated": class_counts(samples, pool.tolist()),
                                "test": class_counts(samples, shared.given_test)},
                     "skipped": len(shared.decoded.skipped)},
            "timing": {**shared.timing, "wall_seconds": time.perf_counter() - started},
            "footprint": footprint}


def _write_outputs(root: Path, decoded: DecodedImages, oof: _OutOfFold, metrics: dict[str, Any]) -> None:
    from .data import write_skipped
    from .runfiles import OOF_PREDICTIONS, write_metrics, write_predictions

    write_skipped(root / "skipped_files.csv", decoded.skipped)
    write_metrics(root, metrics)
    write_predictions(root / OOF_PREDICTIONS, oof.keys, oof.hashes, oof.labels, oof.probabilities, oof.classes,
                      oof.folds)


def _summary_lines(metrics: dict[str, Any]) -> list[str]:
    cv = metrics["cv"]
    o = cv["oof"]
    lines = [f"cross-validation ({cv['k']} folds, {cv['strategy']}): accuracy {cv['accuracy_mean']:.4f} ± "
             f"{cv['accuracy_std']:.4f}, macro F1 {cv['macro_f1_mean']:.4f} ± {cv['macro_f1_std']:.4f} (mean ± sample "
             "std over the folds)",
             f"figures from cross-validation: out-of-fold accuracy {o['accuracy']:.4f} on {o['n']} images, 95% CI "
             f"{o['accuracy_ci95'][0]:.3f}–{o['accuracy_ci95'][1]:.3f} (width {o['accuracy_ci95_width']:.3f})"]
    if cv["not_evaluated"]:
        lines.append(f"not evaluated: {len(cv['not_evaluated'])} image(s) of one-image classes (they train in every "
                     "fold)")
    final = cv["final"]
    if final and final["test"]:
        t = final["test"]
        lines.append(f"final model ({final['strategy']}, trained on {final['trained_on']} images): test accuracy "
                     f"{t['accuracy']:.4f} on {t['n']} given test images, 95% CI {t['accuracy_ci95'][0]:.3f}–"
                     f"{t['accuracy_ci95'][1]:.3f} (width {t['accuracy_ci95_width']:.3f}) -> {final['run_dir']}")
    elif final:
        lines.append(f"final model ({final['strategy']}, trained on all {final['trained_on']} images) -> "
                     f"{final['run_dir']}; {final['why_no_test']}")
    return lines
