"""Inference: devices, precision, batched forward passes over decoded images, and the on-disk feature cache.

A saved run (predict, serve, eval) infers through these functions without importing the training loop.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .data import PixelDataset, Preprocessing, eval_transform
from .storage import atomic_path, cache_dir, digest

if TYPE_CHECKING:
    from .runtime import Runtime


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
    """This process's device: the GPU if there is one (in a multi-GPU launch, this process's own), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from . import distributed

    return distributed.state().device if distributed.launched() else torch.device("cuda")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to `device`; image batches (4-d) go channels-last, the fast layout for convolutions."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, indices: list[int], pp: Preprocessing,
                device: torch.device, dtype: torch.dtype | None, batch_size: int | None = None, desc: str = "",
                progress: bool = True, sharded: bool = True, flip_tta: bool = False) -> torch.Tensor:
    """Apply `fn` to the eval-transformed images at `indices`, batch by batch; float32 CPU output, one row per index.

    `flip_tta` (fn returns logits): the log of the mean of the plain and horizontally mirrored images' probabilities
    (fastai's `tta` with a flip), which is what a run trained with `--tta` kept reports and predicts.

    In a multi-process run (`sharded`, the default; every process must call it) each process runs only its shard
    of `indices` and the rows are gathered back in order, so every process returns the same full tensor. Fewer
    rows than processes: every process runs them all (no process is left with an empty shard)."""
    from . import distributed

    progress = progress and distributed.is_main()
    if sharded and distributed.world_size() > 1 and len(indices) >= distributed.world_size():
        mine = distributed.shard(indices)
        local = _run_local(_flipped(fn) if flip_tta else fn, pixels, mine, pp, device, dtype, batch_size, desc,
                           progress)
        return distributed.gather(local)
    return _run_local(_flipped(fn) if flip_tta else fn, pixels, indices, pp, device, dtype, batch_size, desc, progress)


def _flipped(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def both(x: torch.Tensor) -> torch.Tensor:
        probs = (torch.softmax(fn(x).float(), 1) + torch.softmax(fn(x.flip(3)).float(), 1)) / 2
        return torch.log(probs.clamp_min(1e-12))

    return both


def _run_local(fn: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, indices: list[int], pp: Preprocessing,
               device: torch.device, dtype: torch.dtype | None, batch_size: int | None, desc: str,
               progress: bool) -> torch.Tensor:
    dataset = PixelDataset(pixels, indices, [0] * len(indices), eval_transform(pp))
    batch_size = batch_size or (64 if device.type == "cuda" else 16)  # small batches stay in CPU cache: faster
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    outs = []
    from tqdm.auto import tqdm

    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0):
        with autocast(device, dtype):
            outs.append(fn(to_device(x, device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def feature_cache_path(model_key: str, dtype: torch.dtype | None, hashes: list[str],
                       runtime: Runtime | None = None) -> Path:
    """Where the features of these files (content hashes, in order) under this backbone and precision (or runtime)
    live."""
    tag = runtime.cache_tag if runtime is not None else str(dtype)
    return cache_dir() / "features" / f"{digest('features-v1', model_key, tag, *hashes)}.safetensors"


def load_cached_features(model_key: str, dtype: torch.dtype | None, hashes: list[str],
                         runtime: Runtime | None = None) -> torch.Tensor | None:
    """The cached features, or None when they were never computed (or the file is unreadable)."""
    from safetensors.torch import load_file

    path = feature_cache_path(model_key, dtype, hashes, runtime)
    try:
        return load_file(str(path))["features"] if path.exists() else None
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
        return None


def cached_features(model: nn.Module, model_key: str, pixels: np.ndarray, hashes: list[str], pp: Preprocessing,
                    device: torch.device, dtype: torch.dtype | None, progress: bool = True,
                    runtime: Runtime | None = None) -> tuple[torch.Tensor, bool]:
    """Pooled backbone features for every row of `pixels`, computed once and cached on disk, keyed by
    backbone weights + preprocessing + precision (or `runtime`, see runtime.py; None: torch in `dtype`) + file
    contents.

    In a multi-process run every process must call this (it is collective): the cache is used only when every
    process can read it (on several machines, each has its own cache directory); otherwise each process computes
    its shard, every process gets the gathered features, and only the main process writes the cache file."""
    from safetensors.torch import save_file

    from . import distributed

    cached = load_cached_features(model_key, dtype, hashes, runtime)
    if distributed.all_true(cached is not None):
        return cached, True  # type: ignore[return-value]
    path = feature_cache_path(model_key, dtype, hashes, runtime)
    model.eval()
    if runtime is not None and runtime.name == "onnx":  # chosen on one CPU process only (runtime.choose_runtime)
        feats = runtime.features_of(pixels, list(range(len(hashes))), progress=progress)
    else:
        feats = run_batches(model.forward_features, pixels, list(range(len(hashes))), pp,  # type: ignore[arg-type]
                            device, dtype, desc="extracting features", progress=progress)
    if distributed.is_main():
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
    distributed.barrier()  # the file is on disk before any process goes on (and may look for it again)
    return feats, False
