"""The pipeline. `finetune` reads as its stages, each a function over typed state, usable alone from Python:

    load_data -> build_backbone -> open_run_dir -> prepare_data -> extract_features -> plan_training
    -> train_model -> evaluate_model -> write_run

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
from dataclasses import dataclass, replace
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
    load_source,
    make_splits,
    printable,
    read_split_lists,
    refuse_small_classes,
    write_skipped,
    write_split_lists,
)
from .errors import AffinageError
from .labels import LabelSpace
from .runfiles import (
    CHECKPOINT_DIR,
    HeadInfo,
    ModelInfo,
    prepare_run_dir,
    remove_checkpoints,
    resume_run_dir,
    save_adapter,
    write_config,
    write_history,
    write_metrics,
    write_model,
    write_predictions,
)
from .saved import Run
from .seeding import seeded, stage_seed
from .storage import digest

__all__ = ["finetune", "Run", "evaluate_run", "load_data", "build_backbone", "open_run_dir", "prepare_data",
           "extract_features", "plan_training", "train_model", "evaluate_model", "write_run"]


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


@dataclass(frozen=True)
class Features:
    """Pooled frozen-backbone features of every decoded image (None: the plan does not need them)."""

    values: Any  # torch.Tensor | None
    cached: bool | None
    seconds: float


@dataclass(frozen=True)
class Plan:
    strategy: Any  # Strategy
    hp: dict[str, Any]
    reason: str
    evidence: dict[str, Any] | None
    device: Any
    precision: Any  # inference.Precision


@dataclass(frozen=True)
class Trained:
    net: Any  # ImageClassifier | None (None: card-only run, the head alone was trained)
    head: Any
    history: list[dict[str, Any]]
    probe: Any  # FitResult of the head on features, or None
    fine_tune: Any  # FitResult of the fine-tuning phase, or None
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    logits: np.ndarray
    test: dict[str, Any]
    seconds: float


# ----------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------
def finetune(data: str, model: str = "efficientnet_lite0", strategy: str = "linear-probe",
             out: str | os.PathLike[str] | None = None, progress: bool = True,
             log: Callable[[str], None] = _say, **options: Any) -> Run:
    """Adapt a pretrained backbone to labelled images and write a complete run directory.

    >>> run = finetune(data="digits", model="efficientnet_lite0", strategy="linear-probe", out="runs/digits")
    >>> run.metrics["test"]["accuracy"]
    """
    from .footprint import FootprintTracker

    cfg = TrainConfig(data=str(data), model=model, strategy=strategy, **options)
    main = dist.is_main()
    log = log if main else _silent
    dist.warn_single_cpu_launch(log)  # `accelerate launch --cpu --num_processes 2` starts one process: say so now
    progress = progress and main
    footprint = FootprintTracker(cfg.country, cfg.water_l_per_kwh).start() if main else None  # the whole run's
    started = time.perf_counter()
    try:
        images = load_data(cfg)
        backbone = build_backbone(cfg)
        run_dir = open_run_dir(cfg, out)
        log(f"affinage: {cfg.strategy} on {images.description} with {cfg.model} -> {run_dir}")
        prepared = prepare_data(cfg, images, backbone.preprocessing, run_dir, progress, log)
        plan = plan_device(cfg)
        backbone, features = extract_features(cfg, backbone, prepared, plan, progress, log)
        plan = plan_training(cfg, backbone, prepared, features, plan, log)
        trained = train_model(cfg, plan, backbone, prepared, features, run_dir, progress, log)
        evaluation = evaluate_model(plan, trained, prepared, features, progress)
        return write_run(run_dir, cfg, images, backbone, prepared, features, plan, trained, evaluation,
                         footprint, started, log)
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
    from .targets import parse_targets

    images = load_source(cfg.data, cfg.group_by)
    parse_targets(cfg.targets, images.classes)  # a class named in --target must exist, checked before any run dir
    if cfg.min_per_class is None:  # classes too small to split even if every file decodes: refused before any run dir
        refuse_small_classes(images.samples, any(s.split is not None for s in images.samples), usable=False)
    return images


def build_backbone(cfg: TrainConfig) -> Backbone:
    """The pretrained network; or, for a frozen backbone seen before, its card (a second linear-probe run whose
    features are all cached never builds the network)."""
    from .backbones import card_key, load_card
    from .strategies import get_strategy

    t0 = time.perf_counter()
    frozen = cfg.strategy != "auto" and get_strategy(cfg.strategy).uses_cached_features
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
                 log: Callable[[str], None]) -> PreparedData:
    """Decode (cached), list skipped files, make or reuse the splits, check them for leaks, fix the label space."""
    from .targets import parse_targets

    t0 = time.perf_counter()
    with dist.main_first():  # the main process fills the shared image store, the others then read it
        decoded = decode_all(images, pp, progress=progress)
    decoded, small = drop_small_classes(decoded, cfg.min_per_class, any(s.split is not None for s in decoded.samples))
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
    splits = (read_split_lists(Path(cfg.splits_from) / "splits", samples, decoded.hashes) if cfg.splits_from
              else make_splits(samples, cfg.seed, cfg.val_fraction, cfg.test_fraction))
    splits, leak_info, dropped = _leak_check(run_dir, decoded, splits, cfg.drop_leaks, pp, log)
    labels = LabelSpace.from_labels((samples[i].label for i in splits.train), f"train split of {images.description}")
    _check_split_classes(samples, splits, labels)
    targets = parse_targets(cfg.targets, list(labels.classes))  # the classes left in train (unreadable files skipped)
    if dist.is_main():
        write_split_lists(run_dir / "splits", samples, decoded.hashes, splits,
                          reasons={i: "duplicate of an image in an earlier split (--drop-leaks)" for i in dropped})
    y = np.array(labels.indices(s.label for s in samples), dtype=np.int64)
    key = digest(*(f"{name}/{samples[i].label}/{decoded.hashes[i]}" for name, idx in splits.items() for i in idx))
    log(f"data: {len(labels)} classes, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
        f"images ({splits.how})")
    return PreparedData(decoded, splits, labels, y, leak_info, targets, seconds, key, small)


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
    from .strategies import get_strategy

    needed = cfg.strategy == "auto" or get_strategy(cfg.strategy).uses_cached_features or cfg.head_init == "probe"
    if not needed:
        return backbone, Features(None, None, 0.0)
    t0 = time.perf_counter()
    dtype, hashes = plan.precision.inference_dtype, data.decoded.hashes
    if backbone.card is not None:
        feats = load_cached_features(backbone.card.fingerprint, dtype, hashes)
        if feats is not None:
            log(f"features: {tuple(feats.shape)} from cache in {time.perf_counter() - t0:.1f}s")
            return backbone, Features(feats, True, time.perf_counter() - t0)
        backbone = replace(backbone, net=_build_net(cfg), seconds=backbone.seconds + time.perf_counter() - t0)
    net = backbone.net
    net.to(plan.device).to(memory_format=torch.channels_last)
    known = backbone.card.fingerprint if backbone.card is not None else None  # a card: neither rehashed nor rewritten
    model_key = known or fingerprint(net)
    feats, cached = cached_features(net, model_key, data.decoded.pixels, hashes, backbone.preprocessing, plan.device,
                                    dtype, progress)
    if known is None and dist.is_main():
        save_card(backbone.card_key, net, model_key)
    seconds = time.perf_counter() - t0
    log(f"features: {tuple(feats.shape)} {'from cache' if cached else 'computed'} in {seconds:.1f}s")
    return replace(backbone, card=None), Features(feats, cached, seconds)


def plan_training(cfg: TrainConfig, backbone: Backbone, data: PreparedData, features: Features, plan: Plan,
                  log: Callable[[str], None]) -> Plan:
    """The strategy (auto: chosen from the training split's features) and its effective hyper-parameters."""
    from .strategies import choose_strategy, get_strategy

    train = data.splits.train
    evidence = None
    if cfg.strategy == "auto":
        pretrained = backbone.net.pretrained_head.linear() if backbone.net.pretrained_head is not None else None
        choice = choose_strategy(features.values[train], data.y[train], pretrained, stage_seed(cfg.seed, "auto"))
        strategy, reason, evidence = get_strategy(choice.strategy), choice.reason, choice.evidence
        log(reason)
    else:
        strategy = get_strategy(cfg.strategy)
        reason = f"{strategy.name}, as requested"
    hp = strategy.resolve(cfg, len(train))
    if not strategy.uses_cached_features:
        net, pp = backbone.net, backbone.preprocessing
        hp["train_image_size"] = cfg.train_image_size or (_round_to(pp.input_size * 0.8, 16) if net.flexible_input_size
                                                          else pp.input_size)
    return replace(plan, strategy=strategy, hp=hp, reason=reason, evidence=evidence)


def train_model(cfg: TrainConfig, plan: Plan, backbone: Backbone, data: PreparedData, features: Features,
                run_dir: Path, progress: bool, log: Callable[[str], None]) -> Trained:
    """Fit the head on the frozen features (the whole training of frozen strategies, the start of the others),
    then fine-tune the backbone when the strategy unfreezes it."""
    strategy, t0 = plan.strategy, time.perf_counter()
    num_features = backbone.net.num_features if backbone.net is not None else backbone.card.num_features
    head = _new_head(cfg, num_features, data.labels, strategy.head_hidden, backbone.net)
    history: list[dict[str, Any]] = []
    probe = fitted = None
    if features.values is not None:
        head, probe = _fit_head(cfg, plan, head, features, data, run_dir, log)
        history += probe.as_rows()
    net = backbone.net
    if net is not None:
        net.set_head(net.task, head, strategy.head_hidden, data.labels)
    if not strategy.uses_cached_features:
        if cfg.head_init == "random":
            net.set_head(net.task, _new_head(cfg, num_features, data.labels, strategy.head_hidden, None, "head-random"),
                         strategy.head_hidden, data.labels)
        net, fitted = _fine_tune(cfg, plan, net, data, run_dir, progress, log)
        history += fitted.as_rows()
        head = net.head
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    if net is not None:
        net = net.cpu().eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return Trained(net, head, history, probe, fitted, time.perf_counter() - t0)


def evaluate_model(plan: Plan, trained: Trained, data: PreparedData, features: Features,
                   progress: bool) -> Evaluation:
    """Test logits and metrics, computed once over the whole test split, the way `affinage eval` re-evaluates the
    saved run: frozen backbones through the head on the cached features, others through the whole model."""
    import torch

    from .evaluate import classification_metrics
    from .inference import run_batches

    t0, test = time.perf_counter(), data.splits.test
    if plan.strategy.uses_cached_features:
        with torch.no_grad():
            logits = trained.head(features.values[test]).numpy()
    else:
        model = trained.net.to(plan.device).to(memory_format=torch.channels_last)
        logits = run_batches(model, data.decoded.pixels, test, trained.net.preprocessing, plan.device,
                             plan.precision.inference_dtype, progress=progress).numpy()
        trained.net.cpu()
    metrics = classification_metrics(logits, data.y[test], list(data.labels.classes))
    return Evaluation(logits, metrics, time.perf_counter() - t0)


def write_run(run_dir: Path, cfg: TrainConfig, images: LabelledImages, backbone: Backbone, data: PreparedData,
              features: Features, plan: Plan, trained: Trained, evaluation: Evaluation, footprint: Any,
              started: float, log: Callable[[str], None]) -> Run:
    """model/, test_predictions.csv, metrics.json, history, report.html (main process only); the finished Run."""
    from .diagnosis import format_findings
    from .evaluate import softmax
    from .targets import format_result

    if dist.is_main():
        _write_model(run_dir, plan, backbone, trained, data.labels)
        test = data.splits.test
        samples, hashes = data.decoded.samples, data.decoded.hashes
        write_predictions(run_dir / "test_predictions.csv", [samples[i].key for i in test], [hashes[i] for i in test],
                          [samples[i].label for i in test], softmax(evaluation.logits), list(data.labels.classes))
        metrics = _metrics(cfg, images, backbone, data, features, plan, trained, evaluation, started)
        metrics["footprint"] = footprint.stop()
        write_history(run_dir, trained.history)
        write_metrics(run_dir, metrics)
        remove_checkpoints(run_dir)
        test_block = metrics["test"]
        log(f"test accuracy {test_block['accuracy']:.4f} (macro F1 {test_block['macro_f1']:.4f}, n={test_block['n']}) "
            f"in {metrics['timing']['wall_seconds']:.1f}s -> {run_dir}")
        for line in (_trust_lines(metrics) + [format_result(r) for r in metrics["targets"]]
                     + format_findings(metrics["diagnosis"])):
            log(line)
        _write_report(run_dir, log)
    dist.barrier()  # the other processes return once the run directory is complete
    run = Run.load(run_dir)
    run._model = trained.net  # None for a card-only run: loaded from the run directory when first used
    return run


# ----------------------------------------------------------------------------------------------
# Pieces of the stages
# ----------------------------------------------------------------------------------------------
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


def _new_head(cfg: TrainConfig, num_features: int, labels: LabelSpace, hidden: int | None, net: Any,
              stage: str = "head") -> Any:
    """A fresh head for the task, seeded for its own stage; a starting run's head when its label space is the same
    (a run continued on the same classes keeps what it learned)."""
    from .backbones import make_head

    with seeded(cfg.seed, stage):
        head = make_head(num_features, len(labels), hidden)
    start = getattr(net, "pretrained_head", None) if net is not None else None
    if start is not None and start.labels.classes == labels.classes and start.hidden == hidden:
        head.load_state_dict(start.layer.state_dict())
    return head


def _fit_head(cfg: TrainConfig, plan: Plan, head: Any, features: Features, data: PreparedData, run_dir: Path,
              log: Callable[[str], None]) -> tuple[Any, Any]:
    """Train the head on the cached features (the whole training of linear-probe/head; the LP of LP-FT otherwise)."""
    import torch

    from .strategies import decay_groups, get_strategy
    from .train import LoopSettings, fit

    strategy = plan.strategy
    hp = plan.hp if strategy.uses_cached_features else get_strategy("linear-probe").resolve(
        TrainConfig(data=cfg.data, seed=cfg.seed))
    feats, y = features.values, torch.as_tensor(data.y)
    tensors = {name: torch.utils.data.TensorDataset(feats[idx], y[idx]) for name, idx in data.splits.items()}
    groups = decay_groups("head", list(head.named_parameters()), hp["lr"], hp["weight_decay"])
    phase = "head" if strategy.uses_cached_features else "head-init"
    result = fit(head, tensors["train"], tensors["val"], groups,
                 LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                              patience=hp["patience"], num_workers=0, phase=phase, progress=False,
                              checkpoint=run_dir / CHECKPOINT_DIR / "head.pt", checkpoint_every=10.0,
                              distributed=False, **_loop_settings(cfg, plan, data, phase)),
                 log=log)
    head = head.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)
    log(f"head on frozen features: val accuracy {result.best_val_accuracy:.3f} (epoch {result.best_epoch})")
    return head, result


def _fine_tune(cfg: TrainConfig, plan: Plan, net: Any, data: PreparedData, run_dir: Path, progress: bool,
               log: Callable[[str], None]) -> tuple[Any, Any]:
    """Train the blocks the strategy unfreezes (and the head) on augmented images; LoRA merges its adapters."""
    from .data import PixelDataset, eval_transform, train_transform
    from .strategies import set_norms_eval
    from .train import LoopSettings, default_workers, fit

    strategy, hp, pp, splits, y = plan.strategy, plan.hp, net.preprocessing, data.splits, data.y
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers()
    train_size = hp["train_image_size"] if hp["train_image_size"] != pp.input_size else None
    train_ds = PixelDataset(data.decoded.pixels, splits.train, y[splits.train].tolist(),
                            train_transform(pp, hp["augment"], train_size))
    val_ds = PixelDataset(data.decoded.pixels, splits.val, y[splits.val].tolist(), eval_transform(pp))
    module = strategy.wrap(net, hp)
    groups = strategy.param_groups(module, hp)
    strategy.apply(module, 0, hp["epochs"])
    result = fit(module, train_ds, val_ds, groups,
                 LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                              patience=hp["patience"], num_workers=workers, phase="fine-tune", progress=progress,
                              checkpoint=run_dir / CHECKPOINT_DIR / "fine-tune.pt",
                              **_loop_settings(cfg, plan, data, "fine-tune")),
                 on_epoch_start=lambda e: strategy.apply(module, e, hp["epochs"]),
                 after_train_mode=lambda m: set_norms_eval(m, not cfg.train_bn_stats), log=log)
    if module is not net:  # LoRA: keep the adapter (with its head) as peft saves it, then merge for inference
        if dist.is_main():
            save_adapter(run_dir, module)
        net = strategy.unwrap(module)
    return net, result


def _loop_settings(cfg: TrainConfig, plan: Plan, data: PreparedData, phase: str) -> dict[str, Any]:
    return dict(label_smoothing=cfg.label_smoothing, seed=stage_seed(cfg.seed, phase), precision=plan.precision,
                grad_accum=cfg.grad_accum, checkpoint_key=data.key)


def _write_model(run_dir: Path, plan: Plan, backbone: Backbone, trained: Trained, labels: LabelSpace) -> None:
    from .labels import DEFAULT_TASK

    strategy, hidden = plan.strategy, plan.strategy.head_hidden
    if trained.net is not None:
        net = trained.net
        state, spec, pp, task = net.state_dict(), net.spec, net.preprocessing, net.task
    else:
        card = backbone.card
        state, spec, pp, task = card.state_dict(trained.head, DEFAULT_TASK), card.spec, card.preprocessing, DEFAULT_TASK
    info = ModelInfo(spec.to_dict(), pp, {task: HeadInfo(labels, hidden)}, strategy.name, plan.precision.inference,
                     "features" if strategy.uses_cached_features else "pixels", task)
    write_model(run_dir, state, info)


def _metrics(cfg: TrainConfig, images: LabelledImages, backbone: Backbone, data: PreparedData, features: Features,
             plan: Plan, trained: Trained, evaluation: Evaluation, started: float) -> dict[str, Any]:
    """metrics.json's content (runfiles.METRICS_SCHEMA), the footprint added by the caller."""
    from .diagnosis import diagnose
    from .evaluate import calibration, group_metrics
    from .targets import check_targets

    samples, splits, test_y = data.decoded.samples, data.splits, data.y[data.splits.test]
    classes = list(data.labels.classes)
    trainable = sum(p.numel() for p in trained.head.parameters())
    if trained.fine_tune is not None:
        trainable = max(r["trainable_params"] for r in trained.fine_tune.as_rows())
    last = trained.fine_tune or trained.probe  # the phase whose best weights were kept
    net = trained.net
    metrics: dict[str, Any] = {
        "strategy": plan.strategy.name, "strategy_reason": plan.reason,
        **({"strategy_evidence": plan.evidence} if plan.evidence is not None else {}),
        "task": data.labels.task,
        "test": evaluation.test,
        "val": {"accuracy": last.best_val_accuracy if last is not None else None,
                "kept_phase": last.history[0].phase if last is not None else None,
                "kept_epoch": last.best_epoch if last is not None else None},
        "diverged": last.diverged if last is not None else None,  # NaN/inf loss: why training stopped
        "hyperparameters": dict(plan.hp),
        "data": {"source": images.description, "classes": classes, "label_source": data.labels.source,
                 "split": splits.how, "counts": {name: class_counts(samples, idx) for name, idx in splits.items()},
                 "skipped": len(data.decoded.skipped),
                 "classes_left_out": {c: n for c, n in data.left_out}},
        "model": {**(net.describe() if net is not None else backbone.card.describe(trainable)),
                  "trainable_params": trainable, "inference_precision": plan.precision.inference},
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
    if any(s.group is not None for s in samples):
        metrics["groups"] = group_metrics(evaluation.logits, test_y, [samples[i].group or "(none)" for i in splits.test],
                                          classes)
    metrics["leaks"] = data.leaks
    metrics["targets"] = check_targets(data.targets, evaluation.test)
    metrics["diagnosis"] = diagnose(trained.history, evaluation.test, classes,
                                    leaks=0 if data.leaks["dropped"] else data.leaks["pairs"])
    return metrics


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


def _trust_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    groups = metrics.get("groups")
    if groups:
        worst, best = groups["worst_group"], groups["best_group"]
        lines.append(f"groups: worst '{worst}' accuracy {groups['by_group'][worst]['accuracy']:.3f}, best '{best}' "
                     f"{groups['by_group'][best]['accuracy']:.3f} (gap {groups['accuracy_gap']:.3f}"
                     f"{' > ' + format(groups['threshold'], '.2f') + ': FLAGGED' if groups['flagged'] else ''})")
    fp = metrics["footprint"]
    lines.append(f"footprint: {fp['energy_kwh'] * 1000:.3g} Wh, {fp['co2_kg'] * 1000:.3g} g CO2e ({fp['country']}), "
                 f"{fp['water_l']:.3g} L water — {fp['method']}")
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


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


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
    images = load_source(cfg.data, cfg.group_by)
    decoded = decode_all(images, run.preprocessing, progress=progress)
    splits = read_split_lists(run.path / "splits", decoded.samples, decoded.hashes, complete=False)
    y = np.array(run.labels.indices(decoded.samples[i].label for i in splits.test))
    logits = run.split_logits(decoded.pixels, decoded.hashes, splits.test, progress=progress)
    return classification_metrics(logits, y, run.classes)
