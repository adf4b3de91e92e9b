"""The pipeline. `finetune` reads as its stages, each a function over typed state, usable alone from Python:

    load_data -> choose_backbone -> build_backbone -> attach_old_task -> open_run_dir -> prepare_data
    -> extract_features -> audit_data -> plan_training -> train_model -> evaluate_model -> write_run -> track_run

(`attach_old_task` matters to `--init-from` runs only: the classifier whose classes are kept, and its old data;
`audit_data` is `--audit`: audit.find_issues on the run's own splits and cached features, into RUN/audit/.)

Under `torchrun`/`accelerate launch` every process runs every stage; only the main one writes the run directory
and prints, decoding fills the shared cache on the main process first, and features, fine-tuning and test
logits are sharded across processes and gathered (affinage.distributed).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed as dist
from .config import TrainConfig
from .data import (
    DecodedImages,
    LabelledImages,
    Preprocessing,
    Sample,
    Splits,
    check_usable,
    class_counts,
    decode_all,
    drop_small_classes,
    exclude_listed,
    load_source,
    make_splits,
    printable,
    read_split_lists,
    refuse_small_classes,
    write_skipped,
    write_split_lists,
)
from .errors import AffinageError
from .labels import DEFAULT_TASK, LabelSpace
from .runfiles import (
    HeadInfo,
    ModelInfo,
    prepare_run_dir,
    remove_checkpoints,
    resume_run_dir,
    write_config,
    write_history,
    write_metrics,
    write_model,
    write_predictions,
)
from .saved import Run
from .seeding import seeded, stage_seed
from .storage import digest

__all__ = ["finetune", "Run", "evaluate_run", "load_data", "choose_backbone", "build_backbone", "open_run_dir", "prepare_data",
           "extract_features", "plan_training", "train_model", "evaluate_model", "write_run", "track_run"]


def _say(msg: str) -> None:
    print(printable(msg), flush=True)


# ----------------------------------------------------------------------------------------------
# Typed state passed between stages
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """The pretrained network, or its card when a frozen backbone's features are all cached (no network built)."""

    net: Any  # ImageClassifier | None
    card: Any  # BackboneCard | None
    card_key: str | None
    preprocessing: Preprocessing
    seconds: float
    ranking: Any = None  # ranking.Ranking of --models / --model auto, or None


@dataclass(frozen=True)
class PreparedData:
    """Decoded images, their splits, the task's label space and the integer labels of every sample."""

    decoded: DecodedImages
    splits: Splits
    labels: LabelSpace
    y: np.ndarray
    leaks: dict[str, Any]
    targets: list[Any]  # the parsed --target expressions, checked against the label space
    seconds: float
    key: str  # identity of images, splits and labels: checkpoints are only resumed with the same
    left_out: list[tuple[str, int]]  # (class, usable images) left out by --min-per-class
    old: Any = None  # keep.OldTask of an --init-from run (None: a plain run)
    is_old: np.ndarray | None = None  # per decoded sample: from --old-data
    tasks: Any = None  # tasks.TaskSet of a run with several --task (labels is the first task's); None: one task
    audit: dict[str, Any] | None = None  # --audit: the summary of RUN/audit/audit.json (None: not audited)


@dataclass(frozen=True)
class Features:
    """Pooled frozen-backbone features of every decoded image (None: the plan does not need them)."""

    values: Any  # torch.Tensor | None
    cached: bool | None
    seconds: float
    runtime: Any = None  # runtime.Runtime that computed them (None: no features)


@dataclass(frozen=True)
class Plan:
    strategy: Any  # Strategy
    hp: dict[str, Any]
    reason: str
    evidence: dict[str, Any] | None
    device: Any
    precision: Any  # inference.Precision
    candidates: tuple[str, ...] = ()  # the strategies to try, in order (one for a named strategy)
    runtime: Any = None  # runtime.Runtime of the frozen features (None: no features in this run)


@dataclass(frozen=True)
class Trained:
    net: Any  # ImageClassifier | None (None: card-only run, the head alone was trained)
    head: Any
    history: list[dict[str, Any]]
    probe: Any  # FitResult of the head on features, or None
    fine_tune: Any  # FitResult of the fine-tuning phase, or None
    seconds: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate tried: val figures, cost, status
    extras: dict[str, Any] = field(default_factory=dict)  # tta, wise_alpha, refit, probe_C: what was kept and why


@dataclass(frozen=True)
class Evaluation:
    logits: np.ndarray  # the (first) task's test logits
    test: dict[str, Any]
    seconds: float
    tasks: dict[str, Any] = field(default_factory=dict)  # --init-from: the old_task and new_task blocks
    by_task: dict[str, Any] = field(default_factory=dict)  # several --task: each task's test block
    task_logits: np.ndarray | None = None  # several --task: every task's test logits side by side


# ----------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------
def finetune(data: str, model: str = "efficientnet_lite0", strategy: str = "auto",
             out: str | os.PathLike[str] | None = None, progress: bool = True,
             log: Callable[[str], None] = _say, **options: Any) -> Run:
    """Adapt a pretrained backbone to labelled images and write a complete run directory.

    >>> run = finetune(data="digits", model="efficientnet_lite0", strategy="linear-probe", out="runs/digits")
    >>> run.metrics["test"]["accuracy"]
    """
    from .footprint import FootprintTracker

    cfg = TrainConfig(data=str(data), model=model, strategy=strategy, **options)
    if cfg.folds is not None:  # K runs, not one: affinage.crossval (`affinage train --folds K` goes there)
        raise AffinageError(f"finetune trains one run; folds={cfg.folds} asks for {cfg.folds} of them",
                            "call affinage.crossval.cross_validate(...) with the same arguments")
    main = dist.is_main()
    log = log if main else _silent
    dist.warn_single_cpu_launch(log)  # `accelerate launch --cpu --num_processes 2` starts one process: say so now
    progress = progress and main
    footprint = FootprintTracker(cfg.country, cfg.water_l_per_kwh).start() if main else None  # the whole run's
    started = time.perf_counter()
    try:
        images = load_data(cfg)
        cfg, ranking = choose_backbone(cfg, images, progress, log)
        backbone = replace(build_backbone(cfg), ranking=ranking)
        images, old = attach_old_task(cfg, images, backbone, log)
        run_dir = open_run_dir(cfg, out)
        log(f"affinage: {cfg.strategy} on {images.description} with {cfg.model} -> {run_dir}")
        prepared = prepare_data(cfg, images, backbone.preprocessing, run_dir, progress, log, old)
        plan = plan_device(cfg)
        backbone, features = extract_features(cfg, backbone, prepared, plan, progress, log)
        prepared = audit_data(cfg, backbone, prepared, features, run_dir, log)
        plan = plan_training(cfg, backbone, prepared, features, plan, log)
        plan, trained = train_model(cfg, plan, backbone, prepared, features, run_dir, progress, log)
        evaluation = evaluate_model(plan, trained, prepared, features, progress)
        run = write_run(run_dir, cfg, images, backbone, prepared, features, plan, trained, evaluation,
                        footprint, started, log)
        return track_run(cfg, run, log)
    finally:
        if footprint is not None:
            footprint.stop()


def _silent(msg: str) -> None:
    """The log of processes other than the main one."""


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def load_data(cfg: TrainConfig) -> LabelledImages:
    """The labelled samples of `cfg.data`, validated before anything slow, as are the --target expressions (a typo
    or an unknown class fails now, before any run directory exists)."""
    from .keep import PRETRAINED
    from .targets import parse_targets
    from .tracking import check_trackers

    check_trackers(cfg.report_to)  # a missing tracker library fails now, not after the training
    images = load_source(cfg.data, cfg.group_by, cfg.tasks, cfg.image_column, cfg.label_column)
    if cfg.init_from is None or cfg.init_from == PRETRAINED:  # (a run's old classes may be named too: checked later)
        parse_targets(cfg.targets, images.classes, _task_classes(images))  # a class named in --target must exist
    if cfg.min_per_class is None:  # classes too small to split even if every file decodes: refused before any run dir
        refuse_small_classes(images.samples, _given_splits(cfg, images.samples), usable=False)
    return images


def _task_classes(images: LabelledImages) -> dict[str, list[str]] | None:
    """Several --task: each task's classes (non-empty cells), for checking --target before any run dir."""
    if len(images.tasks) < 2:
        return None
    out = {images.tasks[0]: images.classes}
    for j, name in enumerate(images.tasks[1:]):
        out[name] = sorted({s.more[j] for s in images.samples if len(s.more) > j and s.more[j]})
    return out


def choose_backbone(cfg: TrainConfig, images: LabelledImages, progress: bool,
                    log: Callable[[str], None]) -> tuple[TrainConfig, Any]:
    """`--models a,b,c` / `--model auto`: the backbone whose tuned probe does best on val (the smaller where val
    cannot separate them); the config then names it. Otherwise the config as it is."""
    from .keep import resolve_model
    from .ranking import candidate_models, rank_backbones

    cfg = resolve_model(cfg)  # --init-from RUN: that run's network is the backbone
    if not candidate_models(cfg) or cfg.init_from is not None:
        return cfg, None
    ranking = rank_backbones(cfg, images, log, progress)
    return cfg.replace(model=ranking.chosen), ranking


def build_backbone(cfg: TrainConfig) -> Backbone:
    """The pretrained network; or, for a frozen backbone seen before, its card (a second linear-probe run whose
    features are all cached never builds the network)."""
    from .backbones import card_key, load_card
    from .strategies import get_strategy

    t0 = time.perf_counter()
    frozen = cfg.strategy != "auto" and get_strategy(cfg.strategy).uses_cached_features and cfg.init_from is None
    key = card_key(cfg.model, cfg.image_size, cfg.mean, cfg.std) if frozen and cfg.pretrained else None
    card = load_card(key)
    net = None if card is not None else _build_net(cfg)
    pp = card.preprocessing if card is not None else net.preprocessing
    return Backbone(net, card, key, pp, time.perf_counter() - t0)


def _build_net(cfg: TrainConfig) -> Any:
    from .backbones import create_model

    with seeded(cfg.seed, "backbone"):  # random inits (pretrained=False, fresh layers) move no other stream
        return create_model(cfg.model, num_classes=2, pretrained=cfg.pretrained, image_size=cfg.image_size,
                            trust_remote_code=cfg.trust_remote_code, mean=cfg.mean, std=cfg.std)


def attach_old_task(cfg: TrainConfig, images: LabelledImages, backbone: Backbone,
                    log: Callable[[str], None]) -> tuple[LabelledImages, Any]:
    """`--init-from`: the classifier whose classes are kept (keep.OldTask) and the images: the new ones followed by
    those of `--old-data`, relabelled with the old class names. A plain run: the images as they are, and None."""
    from . import keep

    old = keep.start(cfg, backbone.net)
    if old is None:
        return images, None

    def refuse(extra: LabelledImages) -> None:
        if cfg.min_per_class is None:
            refuse_small_classes(extra.samples, any(s.split is not None for s in extra.samples), usable=False)

    images, old = keep.with_old_data(images, old, refuse)
    log(f"keep: {old.describe()}" + ("" if old.keys else "; no --old-data: forgetting cannot be measured"))
    return images, old


def open_run_dir(cfg: TrainConfig, out: str | os.PathLike[str] | None) -> Path:
    """A new run directory with config.yaml (or, with --resume, the interrupted one). Made by the main process;
    the others get its path, or the same error."""
    def make() -> Path:
        if cfg.resume:  # its config.yaml is the same; the checkpoints carry the progress
            return resume_run_dir(out, cfg.to_dict(), normalise=lambda d: TrainConfig.from_dict(d).to_dict())
        path = prepare_run_dir(out, cfg.strategy)
        write_config(path, cfg.to_yaml())
        return path

    return _on_main(make)


def prepare_data(cfg: TrainConfig, images: LabelledImages, pp: Preprocessing, run_dir: Path, progress: bool,
                 log: Callable[[str], None], old: Any = None) -> PreparedData:
    """Decode (cached), list skipped files, make or reuse the splits, check them for leaks, fix the label space
    (`old`, an --init-from run's keep.OldTask: its classes first, then the new ones; old data split on its own)."""
    from .keep import split_parts, union_labels
    from .targets import parse_targets

    t0 = time.perf_counter()
    with dist.main_first():  # the main process fills the shared image store, the others then read it
        decoded = decode_all(images, pp, progress=progress)
    decoded, small = drop_small_classes(decoded, cfg.min_per_class, _given_splits(cfg, decoded.samples))
    decoded, unmatched = exclude_listed(decoded, cfg.exclude)
    if cfg.exclude:
        gone = sum(reason == f"excluded by {cfg.exclude}" for _, reason in decoded.skipped)
        log(f"excluded {gone} image(s) listed in {cfg.exclude} (--exclude; listed in skipped_files.csv)"
            + (f"; {unmatched} of its entries match no image" if unmatched else ""))
    if small:
        log(f"left out {len(small)} class(es) with fewer than {cfg.min_per_class} usable images (--min-per-class): "
            + ", ".join(f"'{c}' ({n})" for c, n in small[:10]) + (" …" if len(small) > 10 else ""))
    seconds = time.perf_counter() - t0
    log(f"images: {len(decoded.samples)} usable, {decoded.decoded_count} decoded by this run (the others from the "
        f"image store), {decoded.hashed_count} file(s) read to hash them, in {seconds:.1f}s")
    skipped_csv = run_dir / "skipped_files.csv"
    if dist.is_main():
        write_skipped(skipped_csv, decoded.skipped)
    if decoded.skipped:
        shown = "; ".join(f"{Path(k).name}: {r}" for k, r in decoded.skipped[:5])
        more = f" (+{len(decoded.skipped) - 5} more)" if len(decoded.skipped) > 5 else ""
        log(f"skipped {len(decoded.skipped)} file(s) — {shown}{more}; full list in {skipped_csv}")
    check_usable(decoded.samples, cfg.data, skipped_csv)
    samples = decoded.samples
    is_old = np.array([s.key in old.keys for s in samples], dtype=bool) if old is not None else None

    def split(part: Sequence[Sample]) -> Splits:
        return make_splits(part, cfg.seed, cfg.val_fraction, cfg.test_fraction)

    splits = (read_split_lists(Path(cfg.splits_from) / "splits", samples, decoded.hashes) if cfg.splits_from
              else split_parts(samples, is_old, split) if is_old is not None and is_old.any() else split(samples))
    splits, leak_info, dropped = _leak_check(run_dir, decoded, splits, cfg.drop_leaks, pp, log)
    train_labels = [samples[i].label for i in splits.train]
    task = cfg.tasks[0] if len(cfg.tasks) > 1 else DEFAULT_TASK
    labels = (union_labels(old, train_labels, f"train split of {images.description}") if old is not None else
              LabelSpace.from_labels(train_labels, f"train split of {images.description}", task=task))
    _check_split_classes(samples, splits, labels)
    tasks = _tasks(cfg, samples, splits, labels, log)
    targets = parse_targets(cfg.targets, list(labels.classes),  # the classes left in train (unreadable files skipped)
                            {s.task: list(s.classes) for s in tasks.spaces} if tasks is not None else None)
    if dist.is_main():
        write_split_lists(run_dir / "splits", samples, decoded.hashes, splits,
                          reasons={i: "duplicate of an image in an earlier split (--drop-leaks)" for i in dropped})
    y = np.array(labels.indices(s.label for s in samples), dtype=np.int64)
    key = digest(*(f"{name}/{samples[i].label}/{'/'.join(samples[i].more) if tasks is not None else ''}"
                   f"/{decoded.hashes[i]}" for name, idx in splits.items() for i in idx))
    log(f"data: {len(labels)} classes, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
        f"images ({splits.how})")
    return PreparedData(decoded, splits, labels, y, leak_info, targets, seconds, key, small, old, is_old, tasks)


def _tasks(cfg: TrainConfig, samples: Sequence[Sample], splits: Splits, first: LabelSpace,
           log: Callable[[str], None]) -> Any:
    """Several --task: every task's label space and labels (tasks.build_tasks), what was masked said; else None."""
    from .tasks import MISSING_MARKERS, build_tasks

    if len(cfg.tasks) < 2:
        return None
    tasks = build_tasks(cfg.tasks, samples, splits.train, first, cfg.min_per_class, cfg.task_weighting,
                        cfg.train_tasks, cfg.unknown_values)
    if cfg.train_tasks:
        log(f"tasks trained: {', '.join(cfg.train_tasks)}; the others' heads are measured only (--train-task)")
    log(f"tasks: {', '.join(f'{s.task} ({len(s)} classes)' for s in tasks.spaces)}; one backbone, one head each, "
        f"losses {'summed' if cfg.task_weighting == 'equal' else 'weighted by learned uncertainty'}")
    for line in tasks.describe_masked():
        log(f"  {line}: masked out of that task's loss and metrics")
    for space in tasks.spaces[1:]:
        for c in space.classes:
            if c.strip().lower() in MISSING_MARKERS:
                log(f"  {space.task}: class '{c}' looks like a missing-value marker; it is kept as a class "
                    f"(--unknown-value {c} makes it unknown, masked like an empty cell)")
    return tasks


def plan_device(cfg: TrainConfig) -> Plan:
    """Where and in which precision this process runs (the strategy is decided by `plan_training`)."""
    from .inference import default_device, resolve_precision

    device = default_device()
    return Plan(None, {}, "", None, device, resolve_precision(cfg.precision, device))


def extract_features(cfg: TrainConfig, backbone: Backbone, data: PreparedData, plan: Plan, progress: bool,
                     log: Callable[[str], None]) -> tuple[Backbone, Features]:
    """Frozen-backbone features of every image (cached on disk), when the strategy or the head init needs them.
    A card whose features are missing (new images) builds the network after all."""
    import torch

    from .backbones import fingerprint, save_card
    from .inference import cached_features, load_cached_features
    from .runtime import choose_runtime
    from .strategies import get_strategy

    needed = (cfg.strategy == "auto" or get_strategy(cfg.strategy).uses_cached_features or cfg.head_init == "probe"
              or cfg.init_from is not None)  # --init-from: the old model's test figures come from the features
    if not needed:
        return backbone, Features(None, None, 0.0)
    t0 = time.perf_counter()
    dtype, hashes, pixels = plan.precision.inference_dtype, data.decoded.hashes, data.decoded.pixels
    if backbone.card is not None:  # a remembered runtime decision is all a card run needs to find its features
        runtime = choose_runtime(cfg.runtime, None, backbone.card.fingerprint, pixels, backbone.preprocessing,
                                 plan.device, dtype, len(hashes), log)
        feats = load_cached_features(backbone.card.fingerprint, dtype, hashes, runtime)
        if feats is not None:
            log(f"features: {tuple(feats.shape)} from cache in {time.perf_counter() - t0:.1f}s")
            return backbone, Features(feats, True, time.perf_counter() - t0, runtime)
        backbone = replace(backbone, net=_build_net(cfg), seconds=backbone.seconds + time.perf_counter() - t0)
    net = backbone.net
    net.to(plan.device).to(memory_format=torch.channels_last)
    known = backbone.card.fingerprint if backbone.card is not None else None  # a card: neither rehashed nor rewritten
    model_key = known or fingerprint(net)
    runtime = choose_runtime(cfg.runtime, net, model_key, pixels, backbone.preprocessing, plan.device, dtype,
                             len(hashes), log)
    feats, cached = cached_features(net, model_key, pixels, hashes, backbone.preprocessing, plan.device, dtype,
                                    progress, runtime)
    if known is None and dist.is_main():
        save_card(backbone.card_key, net, model_key)
    seconds = time.perf_counter() - t0
    log(f"features: {tuple(feats.shape)} {'from cache' if cached else 'computed'} in {seconds:.1f}s "
        f"({runtime.name}{'' if cached else ': ' + runtime.reason})")
    return replace(backbone, card=None), Features(feats, cached, seconds, runtime)


def audit_data(cfg: TrainConfig, backbone: Backbone, data: PreparedData, features: Features, run_dir: Path,
               log: Callable[[str], None]) -> PreparedData:
    """`--audit`: label issues, image quality, duplicates, balance and outliers on this run's splits and cached
    features (audit.find_issues) -> RUN/audit/. auto: where the features are at hand and the data has at most
    audit.AUTO_MAX_IMAGES images (the k-fold probe on them takes seconds); on: wherever the features are."""
    from .audit import AUTO_MAX_IMAGES, AuditData, audit_into, summary_lines

    n = len(data.decoded.samples)
    if cfg.audit == "off" or not dist.is_main() or data.old is not None:
        return data
    if features.values is None or (cfg.audit == "auto" and n > AUTO_MAX_IMAGES):
        why = ("no frozen features in this run" if features.values is None else
               f"{n:,} images, over {AUTO_MAX_IMAGES:,}")
        log(f"audit: not run ({why}); `affinage audit --data {cfg.data}` or `--audit on` runs it")
        return data
    split_of = [""] * n
    for name, idx in data.splits.items():
        for i in idx:
            split_of[i] = name
    pp = backbone.preprocessing
    key = digest("audit-v1", data.key, cfg.model, str(cfg.image_size), json.dumps(pp.to_dict(), sort_keys=True),
                 str(cfg.seed))
    try:
        findings = audit_into(AuditData(data.decoded, split_of, features.values.float().numpy(), cfg.data, pp), key,
                              run_dir / "audit", cfg.seed, log)
    except Exception as exc:  # auto: a check that cannot run on these data never stops the training
        if cfg.audit == "on":
            raise
        log(f"audit: not run ({type(exc).__name__}: {str(exc)[:200]}); `affinage audit` runs it alone")
        return data
    for line in summary_lines(findings, run_dir / "audit"):
        log(line)
    summary = {"label_issues": len(findings["label_issues"]["candidates"]),
               "image_issues": findings["image_issues"]["counts"],
               "duplicate_clusters": len(findings["duplicates"]["clusters"]),
               "outliers": len(findings["outliers"]["outliers"]),
               "imbalance_ratio": findings["balance"]["imbalance_ratio"],
               "warnings": findings["balance"]["warnings"], "seconds": findings["seconds"]["total"],
               "files": str(run_dir / "audit")}
    return replace(data, audit=summary)


def plan_training(cfg: TrainConfig, backbone: Backbone, data: PreparedData, features: Features, plan: Plan,
                  log: Callable[[str], None]) -> Plan:
    """The candidates to try, in order (auto: the guides' rule of thumb from the train split's evidence orders them;
    a named strategy: that one), and the budget they share."""
    from .auto import describe_evidence, domain_evidence, trial_order
    from .search import resolve_hp
    from .strategies import get_strategy

    if cfg.strategy != "auto":
        strategy = get_strategy(cfg.strategy)
        return replace(plan, strategy=strategy, hp=resolve_hp(cfg, strategy, backbone, len(data.splits.train)),
                       reason=f"{strategy.name}, as requested", candidates=(strategy.name,), runtime=features.runtime)
    train = data.splits.train
    pretrained = backbone.net.pretrained_head.linear() if backbone.net.pretrained_head is not None else None
    evidence = domain_evidence(features.values[train], data.y[train], pretrained, stage_seed(cfg.seed, "auto"))
    order, why = trial_order(evidence)
    if cfg.candidates:  # the user's list, in the evidence's order where it names the same strategies
        order = [n for n in order if n in cfg.candidates] + [n for n in cfg.candidates if n not in order]
    log(f"auto: trying {', '.join(order)} ({why}; {describe_evidence(evidence)})")
    return replace(plan, reason=f"order of trial: {why} ({describe_evidence(evidence)})",
                   evidence={**evidence, "order": order}, candidates=tuple(order), runtime=features.runtime)


def train_model(cfg: TrainConfig, plan: Plan, backbone: Backbone, data: PreparedData, features: Features,
                run_dir: Path, progress: bool, log: Callable[[str], None]) -> tuple[Plan, Trained]:
    """Train every candidate of the plan on train, measured on val (the test split is not given to them), keep the
    one `selection.choose` prefers, then the switches that help on val (WiSE-FT, flip TTA) and the refit."""
    from .keep import training_indices
    from .search import run_search

    t0 = time.perf_counter()
    train = training_indices(data.old, data.splits.train, data.is_old)  # old data trains only where it is replayed
    unseen = replace(data, splits=Splits(train, data.splits.val, [], data.splits.how))  # no test
    outcome = run_search(cfg, plan, backbone, unseen, features, run_dir, progress, log)
    plan = replace(plan, strategy=outcome.strategy, hp=outcome.hp,
                   reason=outcome.reason if cfg.strategy == "auto" else plan.reason,
                   evidence={**(plan.evidence or {}), "selection": outcome.selection} if cfg.strategy == "auto"
                   else plan.evidence)
    net, head = outcome.net, outcome.head
    if net is not None:  # frozen winners: the kept head goes on the backbone (fine-tuned ones already carry it)
        net.set_head(net.task, head, outcome.strategy.head_hidden, data.labels if data.tasks is None else None)
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    if net is not None:
        net = net.cpu().eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return plan, Trained(net, head, outcome.history, outcome.probe, outcome.fine_tune, time.perf_counter() - t0,
                         outcome.candidates, outcome.extras)


def evaluate_model(plan: Plan, trained: Trained, data: PreparedData, features: Features,
                   progress: bool) -> Evaluation:
    """Test logits and metrics of the kept model, computed once over the whole test split (the only time the test
    split is used), the way `affinage eval` re-evaluates the saved run."""
    from .evaluate import classification_metrics
    from .search import split_logits

    t0, test = time.perf_counter(), data.splits.test
    logits = split_logits(plan, trained.net, trained.head, data, features, test, trained.extras.get("tta", False),
                          progress)
    by_task, task_logits = {}, None
    if data.tasks is not None:  # every task's block; the first task's logits are the run's
        from .tasks import task_blocks

        by_task, task_logits = task_blocks(data.tasks, logits, test, classification_metrics), logits
        logits = data.tasks.split(logits)[0]
    metrics = classification_metrics(logits, data.y[test], list(data.labels.classes))
    tasks: dict[str, Any] = {}
    if data.old is not None:  # the old model's figures on the same test images: what forgetting is measured from
        import torch

        from .keep import old_task_metrics, training_indices

        with torch.no_grad():
            before = data.old.head(features.values[test].float()).numpy() if features.values is not None else None
        is_old = data.is_old[test] if data.is_old is not None else np.zeros(len(test), dtype=bool)
        tasks = old_task_metrics(data.old, before, logits, data.y[test], is_old, list(data.labels.classes))
        trained_on = training_indices(data.old, data.splits.train, data.is_old)
        tasks["old_task"]["old_images_trained_on"] = (int(data.is_old[trained_on].sum()) if data.is_old is not None
                                                      else 0)
    return Evaluation(logits, metrics, time.perf_counter() - t0, tasks, by_task, task_logits)


def write_run(run_dir: Path, cfg: TrainConfig, images: LabelledImages, backbone: Backbone, data: PreparedData,
              features: Features, plan: Plan, trained: Trained, evaluation: Evaluation, footprint: Any,
              started: float, log: Callable[[str], None]) -> Run:
    """model/, test_predictions.csv, metrics.json, history, report.html (main process only); the finished Run."""
    from .diagnosis import format_findings
    from .evaluate import softmax
    from .intervals import headline, warnings
    from .targets import format_result

    if dist.is_main():
        _write_model(run_dir, plan, backbone, trained, data)
        test = data.splits.test
        samples, hashes = data.decoded.samples, data.decoded.hashes
        write_predictions(run_dir / "test_predictions.csv", [samples[i].key for i in test], [hashes[i] for i in test],
                          [samples[i].label for i in test], softmax(evaluation.logits), list(data.labels.classes))
        if data.tasks is not None:
            _write_task_predictions(run_dir, data, evaluation)
        val, val_logits = data.splits.val, trained.extras.get("val_logits")
        if val_logits is not None and data.tasks is not None:
            val_logits = data.tasks.split(val_logits)[0]  # compare chooses on the first task
        if val_logits is not None:  # what the choice was made on (affinage compare chooses on these)
            write_predictions(run_dir / "val_predictions.csv", [samples[i].key for i in val], [hashes[i] for i in val],
                              [samples[i].label for i in val], softmax(val_logits), list(data.labels.classes))
        metrics = _metrics(cfg, images, backbone, data, features, plan, trained, evaluation, started)
        metrics["footprint"] = footprint.stop(data.decoded.bytes_read)
        write_history(run_dir, trained.history)
        write_metrics(run_dir, metrics)
        remove_checkpoints(run_dir)
        log(f"{headline(metrics['test'])} in {metrics['timing']['wall_seconds']:.1f}s -> {run_dir}")
        for line in (_keep_lines(metrics) + _task_lines(metrics) + _trust_lines(metrics)
                     + [format_result(r) for r in metrics["targets"]] + warnings(metrics)
                     + format_findings(metrics["diagnosis"])):
            log(line)
        _write_report(run_dir, log)
    dist.barrier()  # the other processes return once the run directory is complete
    run = Run.load(run_dir)
    # None for a card-only run, or one with several tasks (saved as one head each): loaded from the run directory
    run._model = trained.net if data.tasks is None else None
    return run


def track_run(cfg: TrainConfig, run: Run, log: Callable[[str], None]) -> Run:
    """`--report-to`: the finished run directory logged to TensorBoard / MLflow (main process only)."""
    if cfg.report_to and dist.is_main():
        from .tracking import log_run

        log_run(run.path, cfg.report_to, log)
    return run


# ----------------------------------------------------------------------------------------------
# Pieces of the stages
# ----------------------------------------------------------------------------------------------
def _given_splits(cfg: TrainConfig, samples: Sequence[Sample]) -> bool:
    """Whether the splits come with the data or from --splits-from lists: nothing is carved, so no class is too small."""
    return cfg.splits_from is not None or any(s.split is not None for s in samples)


def _on_main(make: Callable[[], Path]) -> Path:
    """`make()` on the main process; its result, or its AffinageError, on every process."""
    if dist.world_size() == 1:
        return make()
    outcome: tuple[str, Any, Any] = ("ok", None, None)
    if dist.is_main():
        try:
            outcome = ("ok", str(make()), None)
        except AffinageError as exc:
            outcome = ("error", exc.problem, exc.fix)
    kind, value, fix = dist.broadcast_object(outcome)
    if kind == "error":
        raise AffinageError(value, fix)
    return Path(value)


def _write_model(run_dir: Path, plan: Plan, backbone: Backbone, trained: Trained, data: PreparedData) -> None:
    labels = data.labels
    strategy, hidden = plan.strategy, plan.strategy.head_hidden
    if trained.net is not None:
        net = trained.net
        state, spec, pp, task = net.state_dict(), net.spec, net.preprocessing, net.task
    else:
        card = backbone.card
        state, spec, pp, task = card.state_dict(trained.head, DEFAULT_TASK), card.spec, card.preprocessing, DEFAULT_TASK
    heads = {task: HeadInfo(labels, hidden)}
    if data.tasks is not None:  # the MultiHead saved as one head per task (`heads.<task>.*`), the first the default
        from .tasks import find_multihead, task_states

        multi = find_multihead(trained.net) if trained.net is not None else trained.head
        state = {k: v for k, v in state.items() if not k.startswith("heads.")} | task_states(multi)
        heads = {s.task: HeadInfo(s, hidden) for s in data.tasks.spaces}
        task = data.tasks.names[0]
    on_features = strategy.uses_cached_features and plan.runtime is not None
    info = ModelInfo(spec.to_dict(), pp, heads, strategy.name,
                     plan.runtime.precision if on_features else plan.precision.inference,
                     "features" if strategy.uses_cached_features else "pixels", task,
                     extra={**({"tta": True} if trained.extras.get("tta") else {}),
                            **({"runtime": "onnx"} if on_features and plan.runtime.name == "onnx" else {}),
                            **({"old_classes": data.old.n_old, "init_from": data.old.source, "keep": data.old.mode}
                               if data.old is not None else {})})
    write_model(run_dir, state, info)


def _metrics(cfg: TrainConfig, images: LabelledImages, backbone: Backbone, data: PreparedData, features: Features,
             plan: Plan, trained: Trained, evaluation: Evaluation, started: float) -> dict[str, Any]:
    """metrics.json's content (runfiles.METRICS_SCHEMA), the footprint added by the caller."""
    from .diagnosis import diagnose
    from .evaluate import calibration, group_metrics
    from .intervals import interval_blocks
    from .targets import check_targets

    samples, splits, test_y = data.decoded.samples, data.splits, data.y[data.splits.test]
    classes = list(data.labels.classes)
    groups = ([samples[i].group or "(none)" for i in splits.test] if any(s.group is not None for s in samples)
              else None)
    own = [t for t in data.targets if t.task is None or t.task == data.labels.task]  # `task:` targets: their task's
    ci = interval_blocks(evaluation.logits, test_y, classes, own, groups, cfg.seed)  # 95% bootstrap
    trainable = sum(p.numel() for p in trained.head.parameters())
    if trained.fine_tune is not None:
        trainable = max(r["trainable_params"] for r in trained.fine_tune.as_rows())
    last = trained.fine_tune or trained.probe  # the phase whose best weights were kept
    net = trained.net
    metrics: dict[str, Any] = {
        "strategy": plan.strategy.name, "strategy_reason": plan.reason,
        **({"strategy_evidence": plan.evidence} if plan.evidence is not None else {}),
        "task": data.labels.task,
        "test": ci.on_test(evaluation.test),
        "val": {**trained.extras.get("val", {}),
                "kept_phase": last.history[0].phase if last is not None else None,
                "kept_epoch": last.best_epoch if last is not None else None},
        "candidates": trained.candidates,
        **({"backbone_choice": {"chosen": backbone.ranking.chosen, "reason": backbone.ranking.reason,
                                "candidates": backbone.ranking.table}} if backbone.ranking is not None else {}),
        "last_points": {k: v for k, v in trained.extras.items() if k not in ("val", "val_logits")},
        "diverged": last.diverged if last is not None else None,  # NaN/inf loss: why training stopped
        "hyperparameters": dict(plan.hp),
        "data": {"source": images.description, "classes": classes, "label_source": data.labels.source,
                 "split": splits.how, "counts": {name: class_counts(samples, idx) for name, idx in splits.items()},
                 "skipped": len(data.decoded.skipped),
                 "classes_left_out": {c: n for c, n in data.left_out}},
        "model": {**(net.describe() if net is not None else backbone.card.describe(trainable)),
                  "trainable_params": trainable,
                  "inference_precision": (plan.runtime.precision if plan.strategy.uses_cached_features
                                          and plan.runtime is not None else plan.precision.inference),
                  **({"feature_runtime": plan.runtime.to_dict()} if plan.runtime is not None else {})},
        "timing": {"wall_seconds": time.perf_counter() - started, "model_load_seconds": backbone.seconds,
                   "decode_seconds": data.seconds, "decode_cache_hit": data.decoded.cache_hit,
                   "decoded_images": data.decoded.decoded_count, "hashed_files": data.decoded.hashed_count,
                   "feature_seconds": features.seconds, "features_cached": features.cached,
                   "train_seconds": trained.seconds, "eval_seconds": evaluation.seconds,
                   "eval_samples_per_second": len(splits.test) / max(evaluation.seconds, 1e-9),
                   "train_samples_per_second": _throughput(last), "peak_memory_mb": peak_memory_mb(plan.device)},
        "environment": environment(plan.device),
        "distributed": {"world_size": dist.world_size()},
        "calibration": calibration(evaluation.logits, test_y),
    }
    if groups is not None:
        metrics["groups"] = ci.on_groups(group_metrics(evaluation.logits, test_y, groups, classes))
    metrics.update(evaluation.tasks)  # --init-from: old_task (forgetting), new_task
    if evaluation.by_task:
        metrics["tasks"] = _task_metrics(data, evaluation, cfg.seed)
    metrics["leaks"] = data.leaks
    if data.audit is not None:
        metrics["audit"] = data.audit
    if cfg.balance != "none":
        from .balance import describe

        metrics["balance"] = describe(cfg.balance, data.y[splits.train], classes)
    metrics["targets"] = check_targets(data.targets, metrics["test"], metrics.get("tasks"))
    metrics["diagnosis"] = diagnose(trained.history, evaluation.test, classes,
                                    leaks=0 if data.leaks["dropped"] else data.leaks["pairs"],
                                    old_task=evaluation.tasks.get("old_task"))
    return metrics


def _task_metrics(data: PreparedData, evaluation: Evaluation, seed: int) -> dict[str, Any]:
    """metrics.json["tasks"]: each task's full test block with its 95% intervals, its classes, what was masked, and
    its per-group figures."""
    from .evaluate import group_metrics
    from .intervals import interval_blocks
    from .tasks import UNKNOWN

    samples, test = data.decoded.samples, data.splits.test
    tasks = data.tasks
    y = tasks.y[test]
    out = {}
    for j, (space, block) in enumerate(zip(tasks.spaces, tasks.split(evaluation.task_logits))):
        known = y[:, j] != UNKNOWN
        named = [t for t in data.targets if t.task == space.task or (j == 0 and t.task is None)]
        groups = ([samples[i].group or "(none)" for i, k in zip(test, known) if k]
                  if any(s.group is not None for s in samples) and known.any() else None)
        ci = interval_blocks(block[known], y[known, j], list(space.classes), named, groups, seed)
        entry = {**ci.on_test(evaluation.by_task[space.task]), "classes": list(space.classes),
                 "masked": tasks.masked.get(space.task, {}),
                 "masked_classes": tasks.masked_classes.get(space.task, {})}
        if groups is not None:
            entry["groups"] = ci.on_groups(group_metrics(block[known], y[known, j], groups, list(space.classes)))
        out[space.task] = entry
    return out


def _write_task_predictions(run_dir: Path, data: PreparedData, evaluation: Evaluation) -> None:
    """test_predictions-<task>.csv for every task but the first (test_predictions.csv), over its known labels."""
    from .evaluate import softmax
    from .tasks import UNKNOWN

    samples, hashes, test = data.decoded.samples, data.decoded.hashes, data.splits.test
    tasks = data.tasks
    y = tasks.y[test]
    for j, (space, block) in list(enumerate(zip(tasks.spaces, tasks.split(evaluation.task_logits))))[1:]:
        rows = [k for k in range(len(test)) if y[k, j] != UNKNOWN]
        write_predictions(run_dir / f"test_predictions-{space.task}.csv", [samples[test[k]].key for k in rows],
                          [hashes[test[k]] for k in rows], [space.classes[y[k, j]] for k in rows],
                          softmax(block[rows]), list(space.classes))


def _task_lines(metrics: dict[str, Any]) -> list[str]:
    """Several --task: one line per task (its test accuracy and how many labels were unknown)."""
    return [f"task {name}: accuracy {b['accuracy']:.4f} (macro F1 {b['macro_f1']:.4f}, n={b['n']}"
            + (f", {b['unknown']} unknown" if b.get("unknown") else "") + ")"
            for name, b in (metrics.get("tasks") or {}).items()]


def _throughput(result: Any) -> float | None:
    """Training samples per second of training (on cached features for the frozen strategies)."""
    return result.samples_seen / max(result.train_seconds, 1e-9) if result is not None and result.samples_seen else None


def peak_memory_mb(device: Any) -> float:
    """Peak memory of this run: GPU memory allocated on CUDA, else the process's peak resident set size (on its
    own for `affinage train` processes, e.g. under `affinage compare`)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _leak_check(run_dir: Path, decoded: DecodedImages, splits: Splits, drop: bool, pp: Preprocessing,
                log: Callable[[str], None]) -> tuple[Splits, dict[str, Any], list[int]]:
    """Find duplicates across splits (leaks.csv), and with `drop` remove them from val/test (returned)."""
    from .leaks import (
        NEAR_DUPLICATE_BITS,
        cached_perceptual_hashes,
        drop_leaked,
        find_leaks,
        label_conflicts,
        summary,
        write_leaks,
    )

    with dist.main_first():  # the hashes are cached: computed once, by the main process
        codes = cached_perceptual_hashes(decoded.pixels, decoded.hashes, json.dumps(pp.to_dict(), sort_keys=True))
    leaks = find_leaks(decoded.pixels, decoded.hashes, splits, codes=codes)
    if dist.is_main():
        write_leaks(run_dir / "leaks.csv", leaks, decoded.samples)
    dropped: list[int] = []
    if leaks and drop:
        splits, dropped = drop_leaked(splits, leaks)
    info = {"pairs": len(leaks), "exact": sum(leak.kind == "exact" for leak in leaks),
            "near": sum(leak.kind == "near" for leak in leaks), "dropped": len(dropped),
            "label_conflicts": label_conflicts(leaks, decoded.samples), "max_hash_distance": NEAR_DUPLICATE_BITS}
    if leaks:
        then = (f"dropped {len(dropped)} val/test image(s) (--drop-leaks)" if dropped else
                "--drop-leaks removes them from val/test")
        log(f"{summary(leaks, decoded.samples)}; pairs in {run_dir / 'leaks.csv'}; {then}")
    return splits, info, dropped


def _keep_lines(metrics: dict[str, Any]) -> list[str]:
    """--init-from: the old task's accuracy before and after (forgetting), or why it was not measured."""
    old, new = metrics.get("old_task"), metrics.get("new_task") or {}
    if old is None:
        return []
    new_line = f"new task: accuracy {new['accuracy']:.4f} (n={new['n']})" if "accuracy" in new else ""
    if not old.get("measured"):
        return [f"old task ({old['n_classes']} classes of {old['source']}): not measured — {old['reason']}", new_line]
    return [f"old task: accuracy {old['accuracy_before']:.4f} before, {old['accuracy_after']:.4f} after "
            f"(forgetting {old['forgetting']:+.4f}, n={old['n']}, keep {old['keep']})", new_line]


def _trust_lines(metrics: dict[str, Any]) -> list[str]:
    from .intervals import fmt

    lines = []
    groups = metrics.get("groups")
    if groups:
        worst, best = groups["worst_group"], groups["best_group"]
        lines.append(f"groups: worst '{worst}' accuracy {groups['by_group'][worst]['accuracy']:.3f}, best '{best}' "
                     f"{groups['by_group'][best]['accuracy']:.3f} (gap {groups['accuracy_gap']:.3f}"
                     + (f", 95% CI {fmt(groups['accuracy_gap_ci95'])}" if "accuracy_gap_ci95" in groups else "")
                     + f"{' > ' + format(groups['threshold'], '.2f') + ': FLAGGED' if groups['flagged'] else ''})")
    fp = metrics["footprint"]
    lines.append(f"footprint: {fp['energy_kwh'] * 1000:.3g} Wh, {fp['co2_kg'] * 1000:.3g} g CO2e ({fp['country']}), "
                 f"{fp['water_l']:.3g} L water; {fp.get('bytes_downloaded', 0) / 1e6:.3g} MB downloaded "
                 f"({fp.get('transfer_kwh', 0) * 1000:.3g} Wh of transfer), {(fp.get('bytes_read') or 0) / 1e6:.3g} MB "
                 f"of images read — {fp['method']}")
    return lines


def _write_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """report.html, written last: when it fails the run is complete all the same, and the error says so."""
    from .report import write_report

    try:
        log(f"report: {write_report(run_dir)}")
    except AffinageError:
        raise
    except Exception as exc:  # matplotlib/font problems: the run itself is complete, the user must still know
        raise AffinageError(f"the run in '{run_dir}' is complete, but report.html could not be written "
                            f"({type(exc).__name__}: {exc})", f"retry with `affinage report {run_dir}`") from exc


def _check_split_classes(samples: Sequence[Sample], splits: Splits, labels: LabelSpace) -> None:
    for name, idx in splits.items():
        unknown = sorted({samples[i].label for i in idx} - set(labels.classes))
        if unknown:
            raise AffinageError(f"class '{unknown[0]}' appears in the {name} split but not in train",
                                "give every class some training images")


def environment(device: Any) -> dict[str, Any]:
    import torch

    from . import __version__

    versions = {"affinage": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "transformers", "accelerate", "peft", "torchvision", "numpy", "PIL", "sklearn", "scipy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    env = {"device": str(device), "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
           "cpu_count": os.cpu_count(), "versions": versions}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), for reproducibility notes; '' where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def evaluate_run(path: str | os.PathLike[str], progress: bool = True) -> dict[str, Any]:
    """Re-evaluate a run directory on its saved test split (same data, same code path)."""
    from .evaluate import classification_metrics

    run = Run.load(path)
    cfg = TrainConfig.from_dict(run.config)
    images = load_source(cfg.data, cfg.group_by, cfg.tasks, cfg.image_column, cfg.label_column)
    decoded = decode_all(images, run.preprocessing, progress=progress)
    splits = read_split_lists(run.path / "splits", decoded.samples, decoded.hashes, complete=False)
    y = np.array(run.labels.indices(decoded.samples[i].label for i in splits.test))
    logits = run.split_logits(decoded.pixels, decoded.hashes, splits.test, progress=progress)
    return classification_metrics(logits, y, run.classes)
