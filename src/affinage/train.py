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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import PixelDataset, Preprocessing, eval_transform
from .errors import AffinageError
from .storage import atomic_path, cache_dir, digest


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


def feature_cache_path(model_key: str, dtype: torch.dtype | None, hashes: list[str]) -> Path:
    """Where the features of these files (content hashes, in order) under this backbone and precision live."""
    return cache_dir() / "features" / f"{digest('features-v1', model_key, str(dtype), *hashes)}.safetensors"


def load_cached_features(model_key: str, dtype: torch.dtype | None, hashes: list[str]) -> torch.Tensor | None:
    """The cached features, or None when they were never computed (or the file is unreadable)."""
    from safetensors.torch import load_file

    path = feature_cache_path(model_key, dtype, hashes)
    try:
        return load_file(str(path))["features"] if path.exists() else None
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
        return None


def cached_features(model: nn.Module, model_key: str, pixels: np.ndarray, hashes: list[str], pp: Preprocessing,
                    device: torch.device, dtype: torch.dtype | None, progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Pooled backbone features for every row of `pixels`, computed once and cached on disk, keyed by
    backbone weights + preprocessing + precision + file contents."""
    from safetensors.torch import save_file

    cached = load_cached_features(model_key, dtype, hashes)
    if cached is not None:
        return cached, True
    path = feature_cache_path(model_key, dtype, hashes)
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


# Checkpoints live in RUN/checkpoint/<phase>.pt, rewritten atomically after every epoch (model, optimizer,
# scheduler, history, best weights, early-stopping counters). When a phase ends, its file shrinks to the final
# weights and history (a finished phase never needs its optimizer state again), and `finetune` deletes the
# folder once the run directory is complete. RNG states are not saved: each epoch's randomness is a pure
# function of (seed, epoch) -- see `seed_epoch`.
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = 1


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    train_seconds: float = 0.0
    samples_seen: int = 0
    diverged: str | None = None  # why training stopped on a NaN/inf loss; the weights are the best ones before it
    resumed_after: int | None = None  # the last epoch restored from a checkpoint, if any

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
    checkpoint: Path | None = None  # saved after epochs (see checkpoint_every); if it exists, training resumes from it
    checkpoint_key: str = ""  # what the checkpoint must have been made with (data, settings); checked on resume
    # at least this many seconds between mid-phase checkpoints (0: after every epoch). A head on cached features
    # runs 100 epochs of milliseconds each: rewriting its checkpoint every time would cost more than the epochs.
    checkpoint_every: float = 0.0


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_epoch(generator: torch.Generator, seed: int, epoch: int) -> None:
    """Data order and augmentation of an epoch depend only on (seed, epoch): a resumed run replays them exactly."""
    epoch_seed = seed * 1000 + epoch
    generator.manual_seed(epoch_seed)
    seed_everything(epoch_seed)


def fit(module: nn.Module, train_data: Any, val_data: Any, groups: list[dict[str, Any]], settings: LoopSettings,
        on_epoch_start: Callable[[int], int] | None = None, after_train_mode: Callable[[nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `module` with AdamW + warmup/cosine, evaluating on val each epoch; restores the best weights.

    Epoch 0 is the starting point (e.g. a head already fitted on features): fine-tuning never returns a
    model worse on val than the one it started from. A NaN/inf loss stops training with a diagnosis and the
    best weights before it. With `settings.checkpoint`, a run killed at any point resumes bit-identically (CPU).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    device = default_device()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=settings.precision.train,
                              gradient_accumulation_steps=settings.grad_accum)
    generator = torch.Generator()  # re-seeded at every epoch start (seed_epoch)
    # Workers are not persistent: started afresh each epoch, they take that epoch's seed (resumable augmentation).
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=settings.batch_size, shuffle=True, generator=generator, drop_last=len(train_data) > settings.batch_size,
        num_workers=settings.num_workers, worker_init_fn=_seed_worker if settings.num_workers else None)
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
    unwrapped = accelerator.unwrap_model(module)
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

    def checkpoint_state(epoch: int, finished: bool) -> dict[str, Any]:
        """Plain containers of tensors and numbers only: loadable with torch.load(weights_only=True)."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "key": settings.checkpoint_key, "phase": settings.phase, "epoch": epoch,
            "finished": finished, "history": result.as_rows(), "best_key": list(best_key), "bad_epochs": bad_epochs,
            "result": {k: getattr(result, k) for k in ("best_epoch", "best_val_accuracy", "stopped_early",
                                                        "train_seconds", "samples_seen", "diverged")}}
        if finished:
            state["best_model"] = best_state
        else:
            state.update(model=unwrapped.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         best_model=None if result.best_epoch == epoch else best_state)  # None: the current weights
        return state

    saved = load_checkpoint(settings.checkpoint, settings.checkpoint_key)
    if saved is None:
        result = FitResult()
        val_loss, val_acc = validate()
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        result.history.append(EpochRecord(settings.phase, 0, None, None, val_loss, val_acc, 0.0, trainable, 0.0))
        best_key = (val_acc, -val_loss)
        best_state = copy.deepcopy(unwrapped.state_dict())
        result.best_val_accuracy = val_acc
        bad_epochs, done, finished = 0, 0, False
    else:
        result = FitResult([EpochRecord(**r) for r in saved["history"]], **saved["result"])
        best_key, bad_epochs, done, finished = tuple(saved["best_key"]), saved["bad_epochs"], saved["epoch"], saved["finished"]
        if not finished:
            unwrapped.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        best_state = saved["best_model"] if saved["best_model"] is not None else copy.deepcopy(unwrapped.state_dict())
        result.resumed_after = done
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log(f"  {settings.phase}: resumed after epoch {done} from {settings.checkpoint}")
    spent_before, start = result.train_seconds, time.perf_counter()
    last_checkpoint = start
    for epoch in range(done + 1, settings.epochs + 1):
        if finished:
            break
        t0 = time.perf_counter()
        seed_epoch(generator, settings.seed, epoch)
        if on_epoch_start is not None:
            trainable = on_epoch_start(epoch - 1)
        module.train()
        if after_train_mode is not None:
            after_train_mode(module)
        loss_sum, correct, count = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"{settings.phase} epoch {epoch}/{settings.epochs}", unit="batch", leave=False,
                   disable=not settings.progress or not accelerator.is_local_main_process, mininterval=1.0)
        for step, (x, y) in enumerate(bar, start=1):
            with accelerator.accumulate(module):
                logits = module(_to_device(x, accelerator.device))
                loss = loss_fn(logits.float(), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                result.diverged = f"the training loss became {loss_value} at step {step} of epoch {epoch}"
                break
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        bar.close()
        if result.diverged is None:
            val_loss, val_acc = validate()
            if not math.isfinite(val_loss):
                result.diverged = f"the validation loss became {val_loss} after epoch {epoch}"
        if result.diverged is not None:  # the weights are garbage now: no record, no checkpoint of them
            log(f"  {settings.phase} diverged: {result.diverged} (peak lr {groups[0]['lr']:g}); stopped, keeping the "
                f"best weights before it (epoch {result.best_epoch}, val accuracy {result.best_val_accuracy:.3f}). "
                "The learning rate is probably too high: try a 10x lower --lr")
            result.stopped_early = finished = True
            break
        result.samples_seen += count
        record = EpochRecord(settings.phase, epoch, loss_sum / max(1, count), correct / max(1, count), val_loss, val_acc,
                             float(scheduler.get_last_lr()[0]), trainable, time.perf_counter() - t0)
        result.history.append(record)
        if (val_acc, -val_loss) > best_key:
            best_key, bad_epochs = (val_acc, -val_loss), 0
            best_state = copy.deepcopy(unwrapped.state_dict())
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
        else:
            bad_epochs += 1
        if settings.progress or epoch == settings.epochs:
            log(f"  {settings.phase} epoch {epoch}/{settings.epochs}: train loss {record.train_loss:.3f} "
                f"acc {record.train_accuracy:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} | {record.seconds:.1f}s")
        if bad_epochs >= settings.patience and epoch < settings.epochs:
            result.stopped_early = True
            log(f"  early stop: val accuracy has not improved for {settings.patience} epochs (best: epoch {result.best_epoch})")
        finished = result.stopped_early or epoch == settings.epochs
        result.train_seconds = spent_before + time.perf_counter() - start
        if (settings.checkpoint is not None and not finished
                and time.perf_counter() - last_checkpoint >= settings.checkpoint_every):
            save_checkpoint(settings.checkpoint, checkpoint_state(epoch, finished=False))
            last_checkpoint = time.perf_counter()
    result.train_seconds = spent_before + time.perf_counter() - start
    unwrapped.load_state_dict(best_state)
    if settings.checkpoint is not None:
        save_checkpoint(settings.checkpoint, checkpoint_state(len(result.history) - 1, finished=True))
    if accelerator.device.type != "cpu":
        accelerator.free_memory()  # give the device memory back before the next phase (it also runs a full gc:
        # 0.2 s on a CPU, where the accelerator's references simply go with it when this function returns)
    return result


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (temp file + rename): a kill leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | None, key: str) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none; refuses one made with other data or settings."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers, never code
    except Exception as exc:
        raise AffinageError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                            "start the run again with a new --out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
        raise AffinageError(f"checkpoint '{path}' was made with other data or settings than this run",
                            "resume with the same data and options, or start the run again with a new --out")
    return state


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers() -> int:
    return 0 if not torch.cuda.is_available() else min(8, os.cpu_count() or 1)
