"""Training stage: one short loop on Accelerate (device placement, mixed precision, accumulation, several
processes through `torchrun` or `accelerate launch`). Batched inference lives in `inference`."""
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

from . import distributed
from .balance import ClassWeightedLoss
from .errors import AffinageError
from .inference import (  # noqa: F401 - re-exported: inference lived here before it had its own module
    Precision,
    autocast,
    cached_features,
    cpu_has_fast_bf16,
    default_device,
    feature_cache_path,
    load_cached_features,
    resolve_precision,
    run_batches,
    to_device,
)
from .storage import atomic_path


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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
    stop_reason: str | None = None  # why `LoopSettings.stop` ended the phase early (budget, cannot catch the best)

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
    # with several processes: True trains one model together (DDP, each process takes its share of every batch);
    # False trains the same model in every process on all the data (a head on cached features: its epochs take
    # milliseconds, which communication would only slow down). One process: no difference.
    distributed: bool = True
    # asked after every epoch but the last with (epoch, val loss, val accuracy, epoch seconds): a reason to stop now
    # (auto's budget and successive halving), or None to go on. The best weights so far are kept, as for patience.
    stop: Callable[[int, float, float, float], str | None] | None = None
    # the batches of an epoch, built from the loop's generator (keep.ReplayBatchSampler: a share of old images in
    # every batch); None: shuffled batches of batch_size
    batch_sampler: Callable[[torch.Generator], Any] | None = None
    # loss(logits, y, x) in place of cross-entropy with label smoothing (keep.DistillLoss reads the inputs)
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # per val image, in val order, summing to 1: val accuracy is the weighted one (keep.val_weights: the mean of the
    # old task's and the new task's accuracy, whatever their val sizes); None: the plain accuracy
    val_weights: torch.Tensor | None = None
    # several labels per image (tasks.TaskObjective): y is (batch, tasks); accuracy counts every known (image, task)
    # label and the val loss sums the tasks'. None: one task, y is (batch,)
    objective: Any = None
    # --balance weights (balance.py): per-class weights of the cross-entropy; None: unweighted
    class_weights: torch.Tensor | None = None


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


def global_batch_size(batch_size: int, processes: int) -> int:
    """The batch of one optimizer step over all processes, each taking an equal share of it: `batch_size` rounded
    down to a multiple of the number of processes (at least one image per process)."""
    return max(processes, batch_size // processes * processes)


class _FrozenUnderDDP:
    """Progressive unfreezing with a fixed set of parameters. DDP fixes the parameters it synchronises when it wraps
    the model, so with several processes every parameter of the optimizer's groups requires grad from the start,
    and those the strategy leaves frozen in an epoch (requires_grad=False after `on_epoch_start`) have their
    gradients dropped before each optimizer step: AdamW then neither moves them nor builds state for them, exactly
    what requires_grad=False does in one process (an lr of 0 would keep them still, but Adam's moments and step
    count would grow during the frozen epochs and change their first steps once unfrozen). The cost: backward
    runs through the frozen blocks too. Inactive (one process, or `distributed=False`): nothing changes."""

    def __init__(self, groups: list[dict[str, Any]], active: bool):
        self.active = active
        self.params = [p for g in groups for p in g["params"]] if active else []
        self.frozen: list[nn.Parameter] = []
        self.read_strategy()

    def read_strategy(self) -> None:
        """Take the strategy's choice for this epoch from requires_grad, then let every parameter require grad."""
        if self.active:
            self.frozen = [p for p in self.params if not p.requires_grad]
            for p in self.frozen:
                p.requires_grad_(True)

    def drop_frozen_grads(self) -> None:
        for p in self.frozen:
            p.grad = None

    @contextlib.contextmanager
    def as_strategy_set(self) -> Iterator[None]:
        """requires_grad as the strategy set it, while a hook reads it (set_norms_eval: frozen BatchNorms stay in eval)."""
        self.restore()
        try:
            yield
        finally:
            for p in self.frozen:
                p.requires_grad_(True)

    def restore(self) -> None:
        for p in self.frozen:
            p.requires_grad_(False)


def _has_unused_parameters(module: nn.Module, data: Any, params: list[nn.Parameter]) -> bool:
    """Whether a forward pass leaves some of `params` without a gradient (an HF pooler whose output is not used).
    One image, in eval mode: no BatchNorm statistic moves; every epoch re-seeds the random streams, so the
    augmentation drawn for it changes nothing."""
    was_training = module.training
    module.eval()
    x = torch.as_tensor(data[0][0]).unsqueeze(0).to(next(module.parameters()).device)
    try:
        module(x).float().sum().backward()
        return any(p.grad is None for p in params if p.requires_grad)
    finally:
        for p in module.parameters():
            p.grad = None
        module.train(was_training)


def _loop_parts(module: nn.Module, train_data: Any, val_data: Any, groups: list[dict[str, Any]],
                settings: LoopSettings, processes: int) -> tuple[Any, ...]:
    """The accelerator and the prepared model, optimizer, loaders and scheduler.

    One process: as accelerate prepares them. Several, training together (`settings.distributed`): DDP, and every
    batch of the configured (global) size is split between the processes (accelerate's split_batches), so that the
    data order, the number of steps and the LR schedule are those of one process; a batch size that is not a
    multiple of the number of processes is rounded down to one. Several, each alone: every process prepares its
    loaders as one process would (no sharding, no DDP), and all train the same model on the same data."""
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    device = default_device()
    together = settings.distributed and processes > 1
    options: dict[str, Any] = {}
    if processes > 1:  # split_batches also makes accelerate's scheduler step once per step, not once per process
        options["dataloader_config"] = DataLoaderConfiguration(split_batches=True)
    if together and _has_unused_parameters(module, train_data, [p for g in groups for p in g["params"]]):
        # DDP would stop at the second step, waiting for their gradients; so it looks for them at every step
        options["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=settings.precision.train,
                              gradient_accumulation_steps=settings.grad_accum, **options)
    batch_size = global_batch_size(settings.batch_size, processes) if together else settings.batch_size
    val_batch = global_batch_size(max(64, settings.batch_size) + processes - 1, processes) if together else max(64, settings.batch_size)
    generator = torch.Generator()  # re-seeded at every epoch start (seed_epoch)
    # Workers are not persistent: started afresh each epoch, they take that epoch's seed (resumable augmentation).
    if settings.batch_sampler is not None:
        train_loader = torch.utils.data.DataLoader(
            train_data, batch_sampler=settings.batch_sampler(generator), num_workers=settings.num_workers,
            worker_init_fn=_seed_worker if settings.num_workers else None)
    else:
        train_loader = torch.utils.data.DataLoader(
            train_data, batch_size=batch_size, shuffle=True, generator=generator,
            drop_last=len(train_data) > batch_size, num_workers=settings.num_workers,
            worker_init_fn=_seed_worker if settings.num_workers else None)
    val_loader = torch.utils.data.DataLoader(val_data, batch_size=val_batch, shuffle=False,
                                             num_workers=settings.num_workers)
    if device.type == "cpu" or any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)  # 2x faster convolutions on CPU
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=groups[0]["lr"])
    steps_per_epoch = math.ceil(len(train_loader) / settings.grad_accum)
    total = steps_per_epoch * settings.epochs
    warmup = int(settings.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    if processes == 1 or together:
        module, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
            module, optimizer, train_loader, val_loader, scheduler)
    else:
        module = accelerator.prepare_model(module, evaluation_mode=True)  # mixed precision and device, no DDP
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        train_loader, val_loader = (prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                                        put_on_device=True, rng_types=None)
                                    for loader in (train_loader, val_loader))
    return accelerator, module, optimizer, train_loader, val_loader, scheduler, generator, batch_size


@dataclass
class _Loop:
    """The prepared pieces of one `fit` call (see `_loop_parts`) and its progress: what validation, an epoch and a
    checkpoint work on."""

    settings: LoopSettings
    accelerator: Any
    module: nn.Module  # what trains (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    together: bool  # several processes training one model
    frozen: _FrozenUnderDDP
    result: FitResult = field(default_factory=FitResult)
    best_key: tuple[float, float] = (-1.0, 0.0)
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module)

    def validate(self) -> tuple[float, float]:
        """Val loss and accuracy over the whole val split, the same on every process."""
        model, device = self.unwrapped, self.accelerator.device
        model.eval()  # not through DDP: its forward would synchronise buffers
        loss_sum, correct, count = 0.0, 0, 0
        weights, weighted = self.settings.val_weights, 0.0
        objective, batches = self.settings.objective, []
        with torch.no_grad():
            for x, y in self.val_loader:
                with autocast(device, self.settings.precision.inference_dtype):
                    logits = model(to_device(x, device)).float()
                y = y.to(logits.device)
                if self.together:  # every process's share of the batch, the padding of an uneven last batch dropped
                    logits, y = self.accelerator.gather_for_metrics((logits, y))
                if objective is not None:  # the tasks' losses are means over their known labels: whole split
                    batches.append((logits.cpu(), y.cpu()))
                    continue
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                hits = logits.argmax(1) == y
                if weights is not None:
                    weighted += float((hits.double().cpu() * weights[count:count + len(y)].double()).sum())
                correct += int(hits.sum())
                count += len(y)
        if objective is not None:
            logits, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            right, known = objective.hits(logits, y)
            return objective.val_loss(logits, y), right / max(1, known)
        return loss_sum / max(1, count), weighted if weights is not None else correct / max(1, count)

    def train_epoch(self, epoch: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], progress: bool) -> tuple[float, int, int, int]:
        """One pass over the training data: (loss sum, correct, images, labels) over all processes. Sets `result.diverged`
        (and stops) on a NaN/inf loss, at the same step on every process."""
        from tqdm.auto import tqdm

        settings, accelerator, module = self.settings, self.accelerator, self.module
        loss_sum, correct, count, labels = 0.0, 0, 0, 0
        bar = tqdm(self.train_loader, desc=f"{settings.phase} epoch {epoch}/{settings.epochs}", unit="batch",
                   leave=False, disable=not progress, mininterval=1.0)
        for step, (x, y) in enumerate(bar, start=1):
            with accelerator.accumulate(module):
                x = to_device(x, accelerator.device)
                logits = module(x)
                loss = loss_fn(logits.float(), y) if settings.loss is None else settings.loss(logits.float(), y, x)
                accelerator.backward(loss)
                self.frozen.drop_frozen_grads()
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            right, known = (settings.objective.hits(logits.detach(), y) if settings.objective is not None
                            else (int((logits.argmax(1) == y).sum()), len(y)))
            if self.together:  # the whole batch's figures on every process
                batch = accelerator.reduce(torch.tensor([float(loss.detach()) * len(y), right, len(y), known],
                                                        dtype=torch.float64, device=y.device), "sum")
                batch_loss, batch_correct, batch_count = float(batch[0]), int(batch[1]), int(batch[2])
                known = int(batch[3])
                loss_value = batch_loss / max(1, batch_count)
            else:
                loss_value = loss.item()
                batch_loss, batch_correct, batch_count = loss_value * len(y), right, len(y)
            if not math.isfinite(loss_value):
                self.result.diverged = f"the training loss became {loss_value} at step {step} of epoch {epoch}"
                break
            loss_sum += batch_loss
            correct += batch_correct
            count += batch_count
            labels += known
        bar.close()
        if self.together:
            distributed.sync_buffers(self.unwrapped)  # running statistics of BatchNorms in train mode: the main one's
        return loss_sum, correct, count, labels

    def keep_if_best(self, epoch: int, val_loss: float, val_acc: float) -> None:
        if (val_acc, -val_loss) > self.best_key:
            self.best_key, self.bad_epochs = (val_acc, -val_loss), 0
            self.best_state = copy.deepcopy(self.unwrapped.state_dict())
            self.result.best_epoch, self.result.best_val_accuracy = epoch, val_acc
        else:
            self.bad_epochs += 1

    def start(self, trainable: int, log: Callable[[str], None]) -> tuple[int, bool]:
        """Epoch 0 (validate the starting point), or the state of the checkpoint; returns (epochs done, finished)."""
        settings = self.settings
        saved = load_checkpoint(settings.checkpoint, settings.checkpoint_key)
        if saved is None:
            val_loss, val_acc = self.validate()
            self.result.history.append(EpochRecord(settings.phase, 0, None, None, val_loss, val_acc, 0.0, trainable, 0.0))
            self.best_key, self.best_state = (val_acc, -val_loss), copy.deepcopy(self.unwrapped.state_dict())
            self.result.best_val_accuracy = val_acc
            return 0, False
        self.result = FitResult([EpochRecord(**r) for r in saved["history"]], **saved["result"])
        self.best_key, self.bad_epochs = tuple(saved["best_key"]), saved["bad_epochs"]  # type: ignore[assignment]
        if not saved["finished"]:
            self.unwrapped.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        self.best_state = saved["best_model"] if saved["best_model"] is not None else copy.deepcopy(self.unwrapped.state_dict())
        self.result.resumed_after = saved["epoch"]
        log(f"  {settings.phase}: resumed after epoch {saved['epoch']} from {settings.checkpoint}")
        return saved["epoch"], saved["finished"]

    def save(self, epoch: int, finished: bool) -> None:
        """Write the checkpoint (main process only): plain containers of tensors and numbers, loadable with
        torch.load(weights_only=True)."""
        settings, result = self.settings, self.result
        if not distributed.is_main() or settings.checkpoint is None:
            return
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "key": settings.checkpoint_key, "phase": settings.phase, "epoch": epoch,
            "finished": finished, "history": result.as_rows(), "best_key": list(self.best_key),
            "bad_epochs": self.bad_epochs,
            "result": {k: getattr(result, k) for k in ("best_epoch", "best_val_accuracy", "stopped_early",
                                                        "train_seconds", "samples_seen", "diverged")}}
        if finished:
            state["best_model"] = self.best_state
        else:
            state.update(model=self.unwrapped.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(),
                         best_model=None if result.best_epoch == epoch else self.best_state)  # None: the current weights
        save_checkpoint(settings.checkpoint, state)


# long-function: the epoch loop with its stop rules (divergence, patience, LoopSettings.stop) read in order
def fit(module: nn.Module, train_data: Any, val_data: Any, groups: list[dict[str, Any]], settings: LoopSettings,
        on_epoch_start: Callable[[int], int] | None = None, after_train_mode: Callable[[nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `module` with AdamW + warmup/cosine, evaluating on val each epoch; restores the best weights.

    Epoch 0 is the starting point (e.g. a head already fitted on features): fine-tuning never returns a
    model worse on val than the one it started from. A NaN/inf loss stops training with a diagnosis and the
    best weights before it. With `settings.checkpoint`, a run killed at any point resumes bit-identically (CPU).

    With several processes every process must call it: they train together (DDP, see `_loop_parts`) or, with
    `settings.distributed=False`, each alone on all the data. Validation is gathered over every process, so every
    process sees the same val figures and takes the same early-stopping and best-epoch decisions; only the main
    process logs and writes the checkpoint (every process reads it to resume).
    """
    processes = distributed.world_size()
    together = settings.distributed and processes > 1
    log = log if distributed.is_main() else _silent
    distributed.warn_single_cpu_launch(log)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = _FrozenUnderDDP(groups, active=together)
    accelerator, module, optimizer, train_loader, val_loader, scheduler, generator, batch_size = _loop_parts(
        module, train_data, val_data, groups, settings, processes)
    if together and batch_size != settings.batch_size:
        log(f"  {settings.phase}: batch size {settings.batch_size} is not a multiple of {processes} processes: "
            f"{batch_size} images per step ({batch_size // processes} per process)")
    loop = _Loop(settings, accelerator, module, optimizer, scheduler, train_loader, val_loader, together, frozen)
    loss_fn = (nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing) if settings.class_weights is None
               else ClassWeightedLoss(settings.class_weights, settings.label_smoothing))  # --balance weights
    done, finished = loop.start(trainable, log)
    result = loop.result
    spent_before, start = result.train_seconds, time.perf_counter()
    last_checkpoint = start
    for epoch in range(done + 1, settings.epochs + 1):
        if finished:
            break
        t0 = time.perf_counter()
        seed_epoch(generator, settings.seed, epoch)
        if on_epoch_start is not None:
            trainable = on_epoch_start(epoch - 1)
            frozen.read_strategy()
        module.train()
        if after_train_mode is not None:
            with frozen.as_strategy_set():
                after_train_mode(module)
        loss_sum, correct, count, labels = loop.train_epoch(epoch, loss_fn, settings.progress and distributed.is_main())
        if result.diverged is None:
            val_loss, val_acc = loop.validate()
            if not math.isfinite(val_loss):
                result.diverged = f"the validation loss became {val_loss} after epoch {epoch}"
        if result.diverged is not None:  # the weights are garbage now: no record, no checkpoint of them
            log(f"  {settings.phase} diverged: {result.diverged} (peak lr {groups[0]['lr']:g}); stopped, keeping the "
                f"best weights before it (epoch {result.best_epoch}, val accuracy {result.best_val_accuracy:.3f}). "
                "The learning rate is probably too high: try a 10x lower --lr")
            result.stopped_early = finished = True
            break
        result.samples_seen += count
        record = EpochRecord(settings.phase, epoch, loss_sum / max(1, count), correct / max(1, labels), val_loss, val_acc,
                             float(scheduler.get_last_lr()[0]), trainable, time.perf_counter() - t0)
        result.history.append(record)
        loop.keep_if_best(epoch, val_loss, val_acc)
        if settings.progress or epoch == settings.epochs:
            log(f"  {settings.phase} epoch {epoch}/{settings.epochs}: train loss {record.train_loss:.3f} "
                f"acc {record.train_accuracy:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} | {record.seconds:.1f}s")
        if loop.bad_epochs >= settings.patience and epoch < settings.epochs:
            result.stopped_early = True
            log(f"  early stop: val accuracy has not improved for {settings.patience} epochs (best: epoch {result.best_epoch})")
        if not result.stopped_early and settings.stop is not None and epoch < settings.epochs:
            why = settings.stop(epoch, val_loss, val_acc, record.seconds)
            if why:
                result.stopped_early, result.stop_reason = True, why
                log(f"  {settings.phase}: stopped after epoch {epoch}: {why}")
        finished = result.stopped_early or epoch == settings.epochs
        result.train_seconds = spent_before + time.perf_counter() - start
        if not finished and time.perf_counter() - last_checkpoint >= settings.checkpoint_every:
            loop.save(epoch, finished=False)
            last_checkpoint = time.perf_counter()
    result.train_seconds = spent_before + time.perf_counter() - start
    loop.unwrapped.load_state_dict(loop.best_state)
    frozen.restore()
    loop.save(len(result.history) - 1, finished=True)
    if accelerator.device.type != "cpu":
        accelerator.free_memory()  # give the device memory back before the next phase (it also runs a full gc:
        # 0.2 s on a CPU, where the accelerator's references simply go with it when this function returns)
    return result


def _silent(message: str) -> None:
    """The log of a process other than the main one: only the main process prints."""


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
