"""Runs: `finetune` (data -> backbone -> strategy -> train -> evaluate -> run directory) and `Run`,
which reloads a run directory to predict or re-evaluate with nothing else."""
from __future__ import annotations

import csv
import os
import platform
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
    DecodedImages,
    PixelDataset,
    Preprocessing,
    Sample,
    Splits,
    UnreadableImage,
    class_counts,
    decode_all,
    eval_transform,
    load_pixels,
    load_source,
    make_splits,
    read_split_lists,
    train_transform,
    write_skipped,
    write_split_lists,
)
from .errors import AffinageError
from .storage import read_json, write_json, write_text

MODEL_DIR = "model"


def _say(msg: str) -> None:
    print(msg, flush=True)


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
        from .evaluate import softmax

        results: list[dict[str, Any]] = [{} for _ in files]
        arrays, positions = [], []
        for i, f in enumerate(files):
            try:
                with open(f, "rb") as fh:
                    arrays.append(load_pixels(fh.read(), self.preprocessing))
                positions.append(i)
            except UnreadableImage as exc:
                results[i] = {"file": str(f), "error": str(exc)}
            except OSError as exc:
                results[i] = {"file": str(f), "error": f"cannot be read: {exc.strerror or exc}"}
        if arrays:
            probs = softmax(self.logits(np.stack(arrays)))
            k = max(1, min(top_k, len(self.classes)))
            for row, i in zip(probs, positions):
                order = np.argsort(-row, kind="stable")[:k]
                top = [{"label": self.classes[j], "probability": float(row[j])} for j in order]
                results[i] = {"file": str(files[i]), "label": top[0]["label"], "probability": top[0]["probability"],
                              "top_k": top}
        return results


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
    import torch

    from .backbones import create_model, fingerprint
    from .evaluate import classification_metrics
    from .strategies import get_strategy, set_norms_eval
    from .train import (
        LoopSettings,
        cached_features,
        default_device,
        default_workers,
        fit,
        resolve_precision,
        seed_everything,
    )

    t_start = time.perf_counter()
    cfg = TrainConfig(data=str(data), model=model, strategy=strategy, **options)
    strat = get_strategy(cfg.strategy)
    images = load_source(cfg.data, cfg.group_by)  # validates the data path before anything slow
    t0 = time.perf_counter()
    net = create_model(cfg.model, num_classes=2, pretrained=cfg.pretrained, head_hidden=strat.head_hidden,
                       image_size=cfg.image_size, trust_remote_code=cfg.trust_remote_code)
    pp = net.preprocessing
    model_seconds = time.perf_counter() - t0
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
    if not decoded.samples:
        raise AffinageError(f"none of the images in '{cfg.data}' could be read", f"see {run_dir / 'skipped_files.csv'}")

    samples = decoded.samples
    splits = (read_split_lists(Path(cfg.splits_from) / "splits", samples) if cfg.splits_from
              else make_splits(samples, cfg.seed, cfg.val_fraction, cfg.test_fraction))
    classes = sorted({samples[i].label for i in splits.train})
    _check_split_classes(samples, splits, classes)
    write_split_lists(run_dir / "splits", samples, decoded.hashes, splits)
    label_of = {c: k for k, c in enumerate(classes)}
    y = np.array([label_of[s.label] for s in samples])
    log(f"data: {len(classes)} classes, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
        f"images ({splits.how})")

    net.reset_classifier(len(classes), strat.head_hidden)
    hp = strat.resolve(cfg)
    history: list[dict[str, Any]] = []
    feature_seconds = 0.0
    features_cached = None
    torch.manual_seed(cfg.seed)
    base_settings = dict(label_smoothing=cfg.label_smoothing, seed=cfg.seed, precision=precision,
                         grad_accum=cfg.grad_accum)

    t_train = time.perf_counter()
    if strat.uses_cached_features or cfg.head_init == "probe":
        t0 = time.perf_counter()
        net.to(device).to(memory_format=torch.channels_last)
        feats, features_cached = cached_features(net, fingerprint(net), decoded.pixels, decoded.hashes, pp, device,
                                                 precision.inference_dtype, progress)
        feature_seconds = time.perf_counter() - t0
        log(f"features: {tuple(feats.shape)} {'from cache' if features_cached else 'computed'} in {feature_seconds:.1f}s")
        probe_hp = hp if strat.uses_cached_features else get_strategy("linear-probe").resolve(
            TrainConfig(data=cfg.data, seed=cfg.seed))
        head = net.head
        tensors = {name: torch.utils.data.TensorDataset(feats[idx], torch.as_tensor(y[idx])) for name, idx in splits.items()}
        from .strategies import param_groups as make_groups

        groups = [g for g in make_groups(net, 0, probe_hp["lr"], probe_hp["weight_decay"], 1.0)]
        torch.manual_seed(cfg.seed)
        probe = fit(head, tensors["train"], tensors["val"], groups,
                    LoopSettings(epochs=probe_hp["epochs"], batch_size=probe_hp["batch_size"],
                                 warmup_epochs=cfg.warmup_epochs, patience=probe_hp["patience"], num_workers=0,
                                 phase="head" if strat.uses_cached_features else "head-init", progress=False,
                                 **base_settings),
                    log=log)
        net.head = head.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)
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
                                train_transform(pp, cfg.augment, train_size))
        val_ds = PixelDataset(decoded.pixels, splits.val, y[splits.val].tolist(), eval_transform(pp))
        groups = strat.param_groups(net, hp)
        strat.apply(net, 0, hp["epochs"])
        torch.manual_seed(cfg.seed)
        trained = fit(net, train_ds, val_ds, groups,
                      LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                                   patience=hp["patience"], num_workers=workers, phase="fine-tune", progress=progress,
                                   **base_settings),
                      on_epoch_start=lambda e: strat.apply(net, e, hp["epochs"]), after_train_mode=lambda m: set_norms_eval(m, not cfg.train_bn_stats),
                      log=log)
        history += trained.as_rows()
    train_seconds = time.perf_counter() - t_train

    # Test: always through the full model, the same path `affinage eval` and `predict` use.
    net = net.cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _save_model(run_dir, net, classes, precision.inference, cfg.strategy)
    run = Run.load(run_dir)
    run._model = net
    t0 = time.perf_counter()
    test_logits = run.split_logits(decoded, splits.test, progress=progress)
    eval_seconds = time.perf_counter() - t0
    test = classification_metrics(test_logits, y[splits.test], classes)
    _write_predictions(run_dir / "test_predictions.csv", samples, splits.test, test_logits, classes)

    trainable = sum(p.numel() for p in net.head.parameters())
    if trained is not None:
        trainable = max(r["trainable_params"] for r in trained.as_rows())
    metrics = {
        "strategy": cfg.strategy,
        "test": test,
        "val": {"accuracy": max((r["val_accuracy"] for r in history), default=None)},
        "hyperparameters": {k: v for k, v in hp.items()},
        "data": {"source": images.description, "classes": classes, "split": splits.how,
                 "counts": {name: class_counts(samples, idx) for name, idx in splits.items()},
                 "skipped": len(decoded.skipped)},
        "model": {**net.describe(), "trainable_params": trainable, "inference_precision": precision.inference},
        "timing": {"wall_seconds": time.perf_counter() - t_start, "model_load_seconds": model_seconds,
                   "decode_seconds": decode_seconds, "decode_cache_hit": decoded.cache_hit,
                   "feature_seconds": feature_seconds, "features_cached": features_cached,
                   "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "eval_samples_per_second": len(splits.test) / max(eval_seconds, 1e-9),
                   "train_samples_per_second": (trained.samples_seen / max(trained.train_seconds, 1e-9)) if trained else None},
        "environment": environment(device),
    }
    write_json(run_dir / "history.json", history)
    _write_history_csv(run_dir / "history.csv", history)
    write_json(run_dir / "metrics.json", metrics)
    run.metrics = metrics
    log(f"test accuracy {test['accuracy']:.4f} (macro F1 {test['macro_f1']:.4f}, n={test['n']}) "
        f"in {metrics['timing']['wall_seconds']:.1f}s -> {run_dir}")
    return run


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _check_split_classes(samples: Sequence[Sample], splits: Splits, classes: list[str]) -> None:
    for name, idx in splits.items():
        unknown = sorted({samples[i].label for i in idx} - set(classes))
        if unknown:
            raise AffinageError(f"class '{unknown[0]}' appears in the {name} split but not in train",
                                "give every class some training images")


def _save_model(run_dir: Path, net: Any, classes: list[str], inference: str, strategy: str) -> None:
    from safetensors.torch import save_file

    from .storage import atomic_path

    folder = run_dir / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "affinage"})
    write_json(folder / "model.json", {
        "classes": classes, "id2label": {str(i): c for i, c in enumerate(classes)},
        "backbone": net.spec.to_dict(), "head_hidden": net.head_hidden,
        "preprocessing": net.preprocessing.to_dict(), "inference": inference, "strategy": strategy})


def _write_predictions(path: Path, samples: Sequence[Sample], idx: list[int], logits: np.ndarray,
                       classes: list[str]) -> None:
    from .evaluate import softmax
    from .storage import atomic_path

    probs = softmax(logits)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
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

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "transformers", "accelerate", "torchvision", "numpy", "PIL"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {"device": str(device), "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "versions": versions}


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
