"""Runs: `finetune` (data -> backbone -> strategy -> train -> evaluate -> run directory) and `Run`,
which reloads a run directory to predict or re-evaluate with nothing else."""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import (
    PATH_ERRORS,
    DecodedImages,
    PixelDataset,
    Preprocessing,
    Sample,
    Splits,
    check_usable,
    class_counts,
    decode_all,
    eval_transform,
    load_source,
    make_splits,
    printable,
    read_split_lists,
    train_transform,
    write_skipped,
    write_split_lists,
)
from .errors import AffinageError
from .storage import digest, read_json, write_json, write_text

MODEL_DIR = "model"


def _say(msg: str) -> None:
    print(printable(msg), flush=True)


def prepare_run_dir(out: str | os.PathLike[str] | None, strategy: str) -> Path:
    """A new, empty run directory; an existing run is never overwritten."""
    if out is None:
        out = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{strategy.replace(':', '')}"
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AffinageError(f"run directory '{path}' already exists and is not empty",
                            "choose a new --out, or move the old run away (affinage never overwrites a run)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_run_dir(out: str | os.PathLike[str] | None, cfg: TrainConfig) -> Path:
    """`--resume`: the run directory of an interrupted run made with the same config, holding a checkpoint."""
    import yaml

    from .train import CHECKPOINT_DIR

    if out is None:
        raise AffinageError("--resume needs the run directory to continue", "pass --out RUN, the interrupted run's directory")
    path = Path(out)
    if not (path / "config.yaml").is_file():
        raise AffinageError(f"'{path}' is not an affinage run directory (no config.yaml), so it cannot be resumed",
                            "pass the --out of the interrupted run, or drop --resume to start a new run")
    saved = TrainConfig.from_dict(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}).to_dict()
    wanted = cfg.to_dict()
    changed = [k for k in wanted if k != "resume" and saved.get(k) != wanted[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} in the run, {wanted[k]!r} now" for k in changed)
        raise AffinageError(f"--resume with options that differ from the interrupted run's config.yaml ({diffs})",
                            f"resume with the same options as {path / 'config.yaml'}, or drop --resume and use a new --out")
    if not any((path / CHECKPOINT_DIR).glob("*.pt")):
        if (path / MODEL_DIR / "model.json").exists() and (path / "metrics.json").exists():
            raise AffinageError(f"run '{path}' has already finished; there is nothing to resume",
                                "use it as it is (affinage predict/eval), or train again with a new --out")
        raise AffinageError(f"run '{path}' has no checkpoint to resume from (it stopped before its first epoch ended)",
                            "start it again: remove that directory or choose a new --out, without --resume")
    return path


@dataclass
class Run:
    """A finished run directory: config, metrics, and the model ready for inference."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    classes: list[str]
    preprocessing: Preprocessing
    inference: str
    strategy: str
    _model: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Run":
        root = Path(path)
        info_path = root / MODEL_DIR / "model.json"
        if not info_path.exists():
            raise AffinageError(f"'{root}' is not a finished affinage run (no {MODEL_DIR}/model.json)",
                                "pass the --out directory of a completed `affinage train`")
        info = read_json(info_path)
        metrics = read_json(root / "metrics.json") if (root / "metrics.json").exists() else {}
        config = {}
        if (root / "config.yaml").exists():
            import yaml

            config = yaml.safe_load((root / "config.yaml").read_text()) or {}
        return cls(root, config, metrics, info["classes"], Preprocessing.from_dict(info["preprocessing"]),
                   info.get("inference", "fp32"), info.get("strategy", "full"))

    @property
    def model(self) -> Any:
        if self._model is None:
            from safetensors.torch import load_file

            from .backbones import BackboneSpec, rebuild_model

            info = read_json(self.path / MODEL_DIR / "model.json")
            model = rebuild_model(BackboneSpec.from_dict(info["backbone"]), self.preprocessing, len(self.classes),
                                  info.get("head_hidden"))
            model.load_state_dict(load_file(str(self.path / MODEL_DIR / "model.safetensors")), strict=True)
            self._model = model.eval()
        return self._model

    def logits(self, pixels: np.ndarray, indices: list[int] | None = None, progress: bool = False) -> np.ndarray:
        """Logits for rows of a decoded uint8 array, through the exact inference path used at test time."""
        import torch

        from .train import default_device, run_batches

        device = default_device()
        model = self.model.to(device).to(memory_format=torch.channels_last)
        idx = list(range(len(pixels))) if indices is None else indices
        return run_batches(model, pixels, idx, self.preprocessing, device, self.dtype(device), progress=progress).numpy()

    def split_logits(self, decoded: DecodedImages, indices: list[int], progress: bool = False) -> np.ndarray:
        """Logits for some rows of a decoded dataset, the way the run was evaluated: frozen-backbone runs apply
        the head to the (cached) features, others run the whole model."""
        import torch

        from .backbones import fingerprint
        from .strategies import get_strategy
        from .train import cached_features, default_device

        if not get_strategy(self.strategy).uses_cached_features:
            return self.logits(decoded.pixels, indices, progress=progress)
        device = default_device()
        model = self.model.to(device).to(memory_format=torch.channels_last)
        feats, _ = cached_features(model, fingerprint(model), decoded.pixels, decoded.hashes, self.preprocessing, device,
                                   self.dtype(device), progress)
        with torch.no_grad():
            return model.head.cpu()(feats[indices]).numpy()

    def dtype(self, device: Any) -> Any:
        import torch

        if device.type == "cpu" and self.inference == "fp16":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.inference)

    def predict(self, files: Sequence[str], top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k labels with probabilities per image file; unreadable files get an `error` instead."""
        from .predict import predict_files

        return predict_files(self, files, top_k)


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
    from .targets import parse_targets

    cfg = TrainConfig(data=str(data), model=model, strategy=strategy, **options)
    parse_targets(cfg.targets)  # a typo in --target fails now, not after training
    footprint = FootprintTracker(cfg.country, cfg.water_l_per_kwh).start()  # energy, CO2 and water of the whole run
    try:
        return _finetune(cfg, out, progress, log, footprint)
    finally:
        footprint.stop()


def _finetune(cfg: TrainConfig, out: str | os.PathLike[str] | None, progress: bool, log: Callable[[str], None],
              footprint: Any) -> Run:
    import torch

    from .backbones import card_key, create_model, fingerprint, load_card, make_head, save_card
    from .diagnosis import diagnose, format_findings
    from .evaluate import calibration, classification_metrics, group_metrics
    from .strategies import choose_strategy, decay_groups, get_strategy, set_norms_eval
    from .targets import check_targets, format_result, parse_targets
    from .train import (
        CHECKPOINT_DIR,
        LoopSettings,
        cached_features,
        default_device,
        default_workers,
        fit,
        load_cached_features,
        resolve_precision,
        seed_everything,
    )

    t_start = time.perf_counter()
    auto = cfg.strategy == "auto"
    strat = get_strategy("linear-probe" if auto else cfg.strategy)  # auto: decided once the features are known
    images = load_source(cfg.data, cfg.group_by)  # validates the data path before anything slow
    parse_targets(cfg.targets, images.classes)  # a class named in --target must exist, checked before any run dir
    t0 = time.perf_counter()

    def build() -> Any:
        return create_model(cfg.model, num_classes=2, pretrained=cfg.pretrained, head_hidden=strat.head_hidden,
                            image_size=cfg.image_size, trust_remote_code=cfg.trust_remote_code)

    # A frozen pretrained backbone seen before has a card (spec, preprocessing, weights, features key): when every
    # feature is cached too, the run never builds the network (a second linear-probe run skips timm entirely).
    key = card_key(cfg.model, cfg.image_size) if strat.uses_cached_features and cfg.pretrained and not auto else None
    card = load_card(key)
    net = None if card is not None else build()
    pp = card.preprocessing if card is not None else net.preprocessing
    model_seconds = time.perf_counter() - t0
    if cfg.resume:
        run_dir = resume_run_dir(out, cfg)  # its config.yaml is the same; the checkpoints carry the progress
    else:
        run_dir = prepare_run_dir(out, cfg.strategy)
        write_text(run_dir / "config.yaml", cfg.to_yaml())
    seed_everything(cfg.seed)
    device = default_device()
    precision = resolve_precision(cfg.precision, device)
    log(f"affinage: {cfg.strategy} on {images.description} with {cfg.model} -> {run_dir}")


    t0 = time.perf_counter()
    decoded = decode_all(images, pp, progress=progress)
    decode_seconds = time.perf_counter() - t0
    write_skipped(run_dir / "skipped_files.csv", decoded.skipped)
    if decoded.skipped:
        shown = "; ".join(f"{Path(k).name}: {r}" for k, r in decoded.skipped[:5])
        more = f" (+{len(decoded.skipped) - 5} more)" if len(decoded.skipped) > 5 else ""
        log(f"skipped {len(decoded.skipped)} file(s) — {shown}{more}; full list in {run_dir / 'skipped_files.csv'}")
    check_usable(decoded.samples, cfg.data, run_dir / "skipped_files.csv")

    samples = decoded.samples
    splits = (read_split_lists(Path(cfg.splits_from) / "splits", samples) if cfg.splits_from
              else make_splits(samples, cfg.seed, cfg.val_fraction, cfg.test_fraction))
    splits, leak_info = _leak_check(run_dir, decoded, splits, cfg.drop_leaks, pp, log)
    classes = sorted({samples[i].label for i in splits.train})
    _check_split_classes(samples, splits, classes)
    parse_targets(cfg.targets, classes)  # again for the classes left in train (unreadable files are skipped)
    write_split_lists(run_dir / "splits", samples, decoded.hashes, splits)
    label_of = {c: k for k, c in enumerate(classes)}
    y = np.array([label_of[s.label] for s in samples])
    log(f"data: {len(classes)} classes, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
        f"images ({splits.how})")

    feats = None
    known_fingerprint = card.fingerprint if card is not None else None  # a card on disk: neither rehashed nor rewritten
    if card is not None:
        feats = load_cached_features(card.fingerprint, precision.inference_dtype, decoded.hashes)
        if feats is None:  # new images: the backbone must run after all (its random init must not move the seed)
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                net = build()
            model_seconds += time.perf_counter() - t0
            card = None
    if net is not None:
        net.reset_classifier(len(classes), strat.head_hidden)
        head = net.head
    else:
        head = make_head(card.num_features, len(classes), strat.head_hidden)
    hp = strat.resolve(cfg, len(splits.train))
    reason = f"{strat.name}, as requested"
    history: list[dict[str, Any]] = []
    feature_seconds = 0.0
    features_cached = None
    probe = None
    torch.manual_seed(cfg.seed)
    # checkpoints are only resumed with the same images in the same splits under the same labels
    data_key = digest(*(f"{name}/{samples[i].label}/{decoded.hashes[i]}" for name, idx in splits.items() for i in idx))
    base_settings = dict(label_smoothing=cfg.label_smoothing, seed=cfg.seed, precision=precision,
                         grad_accum=cfg.grad_accum, checkpoint_key=data_key)

    t_train = time.perf_counter()
    if auto or strat.uses_cached_features or cfg.head_init == "probe":
        t0 = time.perf_counter()
        if feats is not None:
            features_cached = True
        else:
            net.to(device).to(memory_format=torch.channels_last)
            model_key = known_fingerprint or fingerprint(net)
            feats, features_cached = cached_features(net, model_key, decoded.pixels, decoded.hashes, pp, device,
                                                     precision.inference_dtype, progress)
            if known_fingerprint is None:
                save_card(key, net, model_key)
        feature_seconds = time.perf_counter() - t0
        log(f"features: {tuple(feats.shape)} {'from cache' if features_cached else 'computed'} in {feature_seconds:.1f}s")
        if auto:
            choice = choose_strategy(feats[splits.train], y[splits.train], net.pretrained_head, cfg.seed)
            strat, reason, auto_evidence = get_strategy(choice.strategy), choice.reason, choice.evidence
            if strat.head_hidden != net.head_hidden:
                net.reset_classifier(len(classes), strat.head_hidden)
                head = net.head
            hp = strat.resolve(cfg, len(splits.train))
            log(reason)
        probe_hp = hp if strat.uses_cached_features else get_strategy("linear-probe").resolve(
            TrainConfig(data=cfg.data, seed=cfg.seed))
        tensors = {name: torch.utils.data.TensorDataset(feats[idx], torch.as_tensor(y[idx])) for name, idx in splits.items()}
        groups = decay_groups("head", list(head.named_parameters()), probe_hp["lr"], probe_hp["weight_decay"])
        torch.manual_seed(cfg.seed)
        probe = fit(head, tensors["train"], tensors["val"], groups,
                    LoopSettings(epochs=probe_hp["epochs"], batch_size=probe_hp["batch_size"],
                                 warmup_epochs=cfg.warmup_epochs, patience=probe_hp["patience"], num_workers=0,
                                 phase="head" if strat.uses_cached_features else "head-init", progress=False,
                                 checkpoint=run_dir / CHECKPOINT_DIR / "head.pt", checkpoint_every=10.0,
                                 **base_settings),
                    log=log)
        head = head.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)
        if net is not None:
            net.head = head
        history += probe.as_rows()
        log(f"head on frozen features: val accuracy {probe.best_val_accuracy:.3f} (epoch {probe.best_epoch})")

    trained = None
    if not strat.uses_cached_features:
        if cfg.head_init == "random":
            net.reset_classifier(len(classes), strat.head_hidden)
        workers = cfg.num_workers if cfg.num_workers is not None else default_workers()
        train_size = cfg.train_image_size or (_round_to(pp.input_size * 0.8, 16) if net.flexible_input_size else None)
        hp["train_image_size"] = train_size or pp.input_size
        train_ds = PixelDataset(decoded.pixels, splits.train, y[splits.train].tolist(),
                                train_transform(pp, hp["augment"], train_size))
        val_ds = PixelDataset(decoded.pixels, splits.val, y[splits.val].tolist(), eval_transform(pp))
        module = strat.wrap(net, hp)
        groups = strat.param_groups(module, hp)
        strat.apply(module, 0, hp["epochs"])
        torch.manual_seed(cfg.seed)
        trained = fit(module, train_ds, val_ds, groups,
                      LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                                   patience=hp["patience"], num_workers=workers, phase="fine-tune", progress=progress,
                                   checkpoint=run_dir / CHECKPOINT_DIR / "fine-tune.pt", **base_settings),
                      on_epoch_start=lambda e: strat.apply(module, e, hp["epochs"]), after_train_mode=lambda m: set_norms_eval(m, not cfg.train_bn_stats),
                      log=log)
        history += trained.as_rows()
        if module is not net:  # LoRA: keep the adapter (with its head) as peft saves it, then merge for inference
            _save_adapter(run_dir, module)
            net = strat.unwrap(module)
        head = net.head
    train_seconds = time.perf_counter() - t_train

    # Test: the way `affinage eval` evaluates the saved run: frozen backbones through the head on the cached
    # features, others through the whole model.
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    if net is not None:
        net = net.cpu().eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _save_model(run_dir, net.state_dict(), net.spec, net.head_hidden, net.preprocessing, classes,
                    precision.inference, strat.name)
    else:
        _save_model(run_dir, card.state_dict(head), card.spec, strat.head_hidden, card.preprocessing, classes,
                    precision.inference, strat.name)
    run = Run.load(run_dir)
    run._model = net  # None for a card-only run: loaded from the run directory when first used
    t0 = time.perf_counter()
    if strat.uses_cached_features:
        with torch.no_grad():
            test_logits = head(feats[splits.test]).numpy()
    else:
        test_logits = run.split_logits(decoded, splits.test, progress=progress)
    eval_seconds = time.perf_counter() - t0
    test = classification_metrics(test_logits, y[splits.test], classes)
    _write_predictions(run_dir / "test_predictions.csv", samples, splits.test, test_logits, classes)

    trainable = sum(p.numel() for p in head.parameters())
    if trained is not None:
        trainable = max(r["trainable_params"] for r in trained.as_rows())
    metrics = {
        "strategy": strat.name,
        "strategy_reason": reason,
        **({"strategy_evidence": auto_evidence} if auto else {}),
        "test": test,
        "val": {"accuracy": max((r["val_accuracy"] for r in history), default=None)},
        "diverged": trained.diverged if trained is not None else probe.diverged,  # NaN/inf loss: why training stopped
        "hyperparameters": {k: v for k, v in hp.items()},
        "data": {"source": images.description, "classes": classes, "split": splits.how,
                 "counts": {name: class_counts(samples, idx) for name, idx in splits.items()},
                 "skipped": len(decoded.skipped)},
        "model": {**(net.describe() if net is not None else card.describe(trainable)), "trainable_params": trainable,
                  "inference_precision": precision.inference},
        "timing": {"wall_seconds": time.perf_counter() - t_start, "model_load_seconds": model_seconds,
                   "decode_seconds": decode_seconds, "decode_cache_hit": decoded.cache_hit,
                   "feature_seconds": feature_seconds, "features_cached": features_cached,
                   "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "eval_samples_per_second": len(splits.test) / max(eval_seconds, 1e-9),
                   "train_samples_per_second": _throughput(trained or probe),
                   "peak_memory_mb": peak_memory_mb(device)},
        "environment": environment(device),
    }
    metrics["calibration"] = calibration(test_logits, y[splits.test])
    if any(s.group is not None for s in samples):
        metrics["groups"] = group_metrics(test_logits, y[splits.test],
                                          [samples[i].group or "(none)" for i in splits.test], classes)
    metrics["leaks"] = leak_info
    metrics["targets"] = check_targets(parse_targets(cfg.targets, classes), test)
    metrics["diagnosis"] = diagnose(history, test, classes, leaks=0 if leak_info["dropped"] else leak_info["pairs"])
    metrics["footprint"] = footprint.stop()
    write_json(run_dir / "history.json", history)
    _write_history_csv(run_dir / "history.csv", history)
    write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete: model/ and history.json suffice
    run.metrics = metrics
    log(f"test accuracy {test['accuracy']:.4f} (macro F1 {test['macro_f1']:.4f}, n={test['n']}) "
        f"in {metrics['timing']['wall_seconds']:.1f}s -> {run_dir}")
    for line in _trust_lines(metrics) + [format_result(r) for r in metrics["targets"]] + format_findings(metrics["diagnosis"]):
        log(line)
    _write_report(run_dir, log)
    return run


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
                log: Callable[[str], None]) -> tuple[Splits, dict[str, Any]]:
    """Find duplicates across splits (leaks.csv), and with `drop` remove them from val/test."""
    from .leaks import (
        NEAR_DUPLICATE_BITS,
        cached_perceptual_hashes,
        drop_leaked,
        find_leaks,
        label_conflicts,
        summary,
        write_leaks,
    )

    codes = cached_perceptual_hashes(decoded.pixels, decoded.hashes, json.dumps(pp.to_dict(), sort_keys=True))
    leaks = find_leaks(decoded.pixels, decoded.hashes, splits, codes=codes)
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
    return splits, info


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
    """report.html; a failure here must not lose a finished run, so it is reported, not raised."""
    from .report import write_report

    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - matplotlib/font problems: the run itself is complete
        log(f"report.html could not be written ({type(exc).__name__}: {exc}); retry with `affinage report {run_dir}`")


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _check_split_classes(samples: Sequence[Sample], splits: Splits, classes: list[str]) -> None:
    for name, idx in splits.items():
        unknown = sorted({samples[i].label for i in idx} - set(classes))
        if unknown:
            raise AffinageError(f"class '{unknown[0]}' appears in the {name} split but not in train",
                                "give every class some training images")


def _save_adapter(run_dir: Path, module: Any) -> None:
    """peft's own adapter folder (adapter_config.json + adapter_model.safetensors, head included), written to a
    temporary folder and renamed into place."""
    import tempfile

    target = run_dir / MODEL_DIR / "adapter"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
    try:
        module.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_model(run_dir: Path, state: dict[str, Any], spec: Any, head_hidden: int | None, preprocessing: Preprocessing,
                classes: list[str], inference: str, strategy: str) -> None:
    """model/: the whole model's state dict (safetensors) and what rebuilds it (model.json)."""
    from safetensors.torch import save_file

    from .storage import atomic_path

    folder = run_dir / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "affinage"})
    write_json(folder / "model.json", {
        "classes": classes, "id2label": {str(i): c for i, c in enumerate(classes)},
        "backbone": spec.to_dict(), "head_hidden": head_hidden,
        "preprocessing": preprocessing.to_dict(), "inference": inference, "strategy": strategy})


def _write_predictions(path: Path, samples: Sequence[Sample], idx: list[int], logits: np.ndarray,
                       classes: list[str]) -> None:
    from .evaluate import softmax
    from .storage import atomic_path

    probs = softmax(logits)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "probability"])
        for i, row in zip(idx, probs):
            j = int(row.argmax())
            w.writerow([samples[i].key, samples[i].label, classes[j], f"{row[j]:.6f}"])


def _write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from .storage import atomic_path

    if not history:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


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
    splits = read_split_lists(run.path / "splits", decoded.samples)
    label_of = {c: k for k, c in enumerate(run.classes)}
    y = np.array([label_of[decoded.samples[i].label] for i in splits.test])
    logits = run.split_logits(decoded, splits.test, progress=progress)
    return classification_metrics(logits, y, run.classes)
