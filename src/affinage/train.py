"""Training stage: one short loop on Accelerate (device placement, mixed precision, accumulation,
multi-GPU through `accelerate launch`), plus batched inference for features and logits."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import PixelDataset, Preprocessing, eval_transform
from .storage import cache_dir, digest


# ----------------------------------------------------------------------------------------------
# Devices, precision, seeds
# ----------------------------------------------------------------------------------------------
def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """Mixed precision for training (Accelerate's names) and the autocast dtype used for inference."""

    train: str  # "no" | "bf16" | "fp16"
    inference: str  # "fp32" | "bf16" | "fp16"

    @property
    def inference_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.inference)


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16/fp16 on GPUs; on CPUs fp32 training (faster there than bf16 backward) and bf16 inference
    where the CPU has AVX512-BF16/AMX (5x faster forward than fp32)."""
    if choice == "fp32":
        return Precision("no", "fp32")
    if device.type == "cuda":
        half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        chosen = half if choice == "auto" else choice
        return Precision(chosen, chosen)
    if choice == "auto":
        return Precision("no", "bf16" if cpu_has_fast_bf16() else "fp32")
    return Precision("no", "bf16") if choice in ("bf16", "fp16") else Precision("no", "fp32")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, indices: list[int], pp: Preprocessing,
                device: torch.device, dtype: torch.dtype | None, batch_size: int | None = None, desc: str = "",
                progress: bool = True) -> torch.Tensor:
    """Apply `fn` to the eval-transformed images at `indices`, batch by batch; float32 CPU output."""
    dataset = PixelDataset(pixels, indices, [0] * len(indices), eval_transform(pp))
    batch_size = batch_size or (64 if device.type == "cuda" else 16)  # small batches stay in CPU cache: faster
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    outs = []
    from tqdm.auto import tqdm

    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0):
        with autocast(device, dtype):
            outs.append(fn(_to_device(x, device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def cached_features(model: nn.Module, model_key: str, pixels: np.ndarray, hashes: list[str], pp: Preprocessing,
                    device: torch.device, dtype: torch.dtype | None, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Pooled backbone features for every row of `pixels`, computed once and cached on disk, keyed by
    backbone weights + preprocessing + precision + file contents."""
    from safetensors.torch import load_file, save_file

    from .storage import atomic_path

    key = digest("features-v1", model_key, str(dtype), *hashes)
    path = cache_dir() / "features" / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["features"], True
    model.eval()
    feats = run_batches(model.forward_features, pixels, list(range(len(hashes))), pp, device, dtype,  # type: ignore[operator]
                        desc="extracting features", progress=progress)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats, False


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class EpochRecord:
    phase: str
    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float
    val_accuracy: float
    lr: float
    trainable_params: int
    seconds: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    train_seconds: float = 0.0
    samples_seen: int = 0

    def as_rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.history]


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    label_smoothing: float
    warmup_epochs: float
    patience: int
    seed: int
    precision: Precision
    grad_accum: int = 1
    num_workers: int = 0
    phase: str = "train"
    progress: bool = True


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(module: nn.Module, train_data: Any, val_data: Any, groups: list[dict[str, Any]], settings: LoopSettings,
        on_epoch_start: Callable[[int], int] | None = None, after_train_mode: Callable[[nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `module` with AdamW + warmup/cosine, evaluating on val each epoch; restores the best weights.

    Epoch 0 is the starting point (e.g. a head already fitted on features): fine-tuning never returns a
    model worse on val than the one it started from.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    device = default_device()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=settings.precision.train,
                              gradient_accumulation_steps=settings.grad_accum)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=settings.batch_size, shuffle=True, generator=generator, drop_last=len(train_data) > settings.batch_size,
        num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0,
        worker_init_fn=_seed_worker if settings.num_workers else None)
    val_loader = torch.utils.data.DataLoader(val_data, batch_size=max(64, settings.batch_size), shuffle=False,
                                             num_workers=settings.num_workers)
    if device.type == "cpu" or any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)  # 2x faster convolutions on CPU
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=groups[0]["lr"])
    steps_per_epoch = math.ceil(len(train_loader) / settings.grad_accum)
    total = steps_per_epoch * settings.epochs
    warmup = int(settings.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    module, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        module, optimizer, train_loader, val_loader, scheduler)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    infer_dtype = settings.precision.inference_dtype

    def validate() -> tuple[float, float]:
        module.eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for x, y in val_loader:
                with autocast(accelerator.device, infer_dtype):
                    logits = module(_to_device(x, accelerator.device)).float()
                y = y.to(logits.device)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
        return loss_sum / max(1, count), correct / max(1, count)

    result = FitResult()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    val_loss, val_acc = validate()
    result.history.append(EpochRecord(settings.phase, 0, None, None, val_loss, val_acc, 0.0, trainable, 0.0))
    best_key = (val_acc, -val_loss)
    best_state = copy.deepcopy(accelerator.unwrap_model(module).state_dict())
    result.best_val_accuracy = val_acc
    bad_epochs = 0
    start = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        if on_epoch_start is not None:
            trainable = on_epoch_start(epoch - 1)
        module.train()
        if after_train_mode is not None:
            after_train_mode(module)
        loss_sum, correct, count = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"{settings.phase} epoch {epoch}/{settings.epochs}", unit="batch", leave=False,
                   disable=not settings.progress or not accelerator.is_local_main_process, mininterval=1.0)
        for x, y in bar:
            with accelerator.accumulate(module):
                logits = module(_to_device(x, accelerator.device))
                loss = loss_fn(logits.float(), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                log(f"stopping: the training loss became {loss_value} in epoch {epoch}; the best weights so far are kept "
                    "(try a lower --lr)")
                result.stopped_early = True
                break
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        result.samples_seen += count
        val_loss, val_acc = validate()
        record = EpochRecord(settings.phase, epoch, loss_sum / max(1, count), correct / max(1, count), val_loss, val_acc,
                             float(scheduler.get_last_lr()[0]), trainable, time.perf_counter() - t0)
        result.history.append(record)
        if (val_acc, -val_loss) > best_key:
            best_key, bad_epochs = (val_acc, -val_loss), 0
            best_state = copy.deepcopy(accelerator.unwrap_model(module).state_dict())
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
        else:
            bad_epochs += 1
        if settings.progress or epoch == settings.epochs:
            log(f"  {settings.phase} epoch {epoch}/{settings.epochs}: train loss {record.train_loss:.3f} "
                f"acc {record.train_accuracy:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} | {record.seconds:.1f}s")
        if result.stopped_early:
            break
        if bad_epochs >= settings.patience:
            result.stopped_early = True
            log(f"  early stop: val accuracy has not improved for {settings.patience} epochs (best: epoch {result.best_epoch})")
            break
    result.train_seconds = time.perf_counter() - start
    unwrapped = accelerator.unwrap_model(module)
    unwrapped.load_state_dict(best_state)
    accelerator.free_memory()
    return result


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers() -> int:
    return 0 if not torch.cuda.is_available() else min(8, os.cpu_count() or 1)
