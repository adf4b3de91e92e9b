"""A finished run directory, reloaded for inference with nothing else: `Run.load(path)`.

It reads its files through `runfiles` and infers through `inference`; it never calls back into training.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Preprocessing
from .labels import LabelSpace
from .runfiles import ModelInfo, read_config, read_metrics, read_model_info


@dataclass
class Run:
    """A finished run directory: config, metrics, and the model ready for inference."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    info: ModelInfo
    _model: Any = field(default=None, repr=False)
    _runtime: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Run:
        root = Path(path)
        info = read_model_info(root)
        return cls(root, read_config(root), read_metrics(root), info)

    def _repr_html_(self) -> str:
        """Jupyter's view of a run: headline metrics, learning curves and confusion matrix (notebook.py)."""
        from .notebook import run_html

        return run_html(self.path, self.metrics)

    @property
    def labels(self) -> LabelSpace:
        return self.info.labels

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def inference(self) -> str:
        return self.info.inference

    @property
    def strategy(self) -> str:
        return self.info.strategy

    @property
    def model(self) -> Any:
        if self._model is None:
            from .backbones import load_saved_model

            self._model = load_saved_model(self.path).eval()
        return self._model

    def dtype(self, device: Any) -> Any:
        """The autocast dtype the run was evaluated with (fp16 is a GPU precision: CPUs run it in fp32)."""
        from .inference import Precision

        if device.type == "cpu" and self.inference == "fp16":
            return None
        return Precision("no", self.inference).inference_dtype

    def logits(self, pixels: Any, indices: list[int] | None = None, progress: bool = False) -> np.ndarray:
        """Logits for rows of decoded uint8 images, through the exact inference path used at test time."""
        return self._forward(pixels, indices, progress, every_task=False)

    def _forward(self, pixels: Any, indices: list[int] | None, progress: bool, every_task: bool) -> np.ndarray:
        import torch

        from .inference import default_device, run_batches

        device = default_device()
        model = self.model.to(device).to(memory_format=torch.channels_last)
        idx = list(range(len(pixels))) if indices is None else indices
        runtime = self.runtime(device)
        if runtime is not None:  # a frozen backbone evaluated through onnxruntime: its features, then the heads
            return self._through(runtime, model, pixels, idx, progress, every_task)
        fn = model.forward_tasks if every_task else model
        return run_batches(fn, pixels, idx, self.preprocessing, device, self.dtype(device), progress=progress,
                           flip_tta=self.tta).numpy()

    def _through(self, runtime: Any, model: Any, pixels: Any, idx: list[int], progress: bool,
                 every_task: bool) -> np.ndarray:
        """Logits from the runtime's features (flip TTA: the mean of the plain and mirrored probabilities, as
        `inference.run_batches` gives for a torch model)."""
        import torch

        heads = [model.heads[t] for t in model.tasks] if every_task else [model.head]
        heads = [h.cpu().float() for h in heads]
        outs = []
        with torch.no_grad():
            for flip in (False, True) if self.tta else (False,):
                f = runtime.features_of(pixels, idx, flip=flip, progress=progress).float()
                outs.append(torch.cat([h(f) for h in heads], dim=1))
        if not self.tta:
            return outs[0].numpy()
        probs = (torch.softmax(outs[0], 1) + torch.softmax(outs[1], 1)) / 2  # as inference.run_batches' flip_tta
        return torch.log(probs.clamp_min(1e-12)).numpy()

    def runtime(self, device: Any) -> Any:
        """The runtime.Runtime of a run whose frozen features came from onnxruntime (None: torch, the model whole);
        made once per Run."""
        if self.info.extra.get("runtime") != "onnx" or device.type != "cpu":
            return None
        if self._runtime is None:
            from .backbones import fingerprint
            from .runtime import runtime_for_run

            self._runtime = runtime_for_run("onnx", self.model, fingerprint(self.model), self.preprocessing,
                                            self.dtype(device))
        return self._runtime

    @property
    def tasks(self) -> list[LabelSpace]:
        """Every task's label space, the default (first) task first: one for single-label runs."""
        heads = self.info.heads
        return [heads[self.info.task].labels] + [h.labels for t, h in heads.items() if t != self.info.task]

    def task_logits(self, pixels: Any, indices: list[int] | None = None, progress: bool = False) -> np.ndarray:
        """Every task's logits side by side (`tasks` order), through the test-time inference path."""
        if len(self.tasks) == 1:
            return self.logits(pixels, indices, progress)
        return self._forward(pixels, indices, progress, every_task=True)

    def probabilities(self, pixels: Any) -> np.ndarray:
        """Class probabilities of decoded images, every task's side by side (each task's row sums to 1)."""
        from .evaluate import softmax

        logits = self.task_logits(pixels)
        ends = np.cumsum([len(t) for t in self.tasks])
        return np.concatenate([softmax(block) for block in np.split(logits, ends[:-1], axis=1)], axis=1)

    def split_tasks(self, row: np.ndarray) -> list[np.ndarray]:
        """One image's side-by-side probabilities cut per task."""
        return np.split(row, np.cumsum([len(t) for t in self.tasks])[:-1])

    @property
    def tta(self) -> bool:
        """True: the run kept flip test-time augmentation (it helped on val); every prediction averages the plain
        and mirrored images' probabilities, as the test figures did."""
        return bool(self.info.extra.get("tta", False))

    def split_logits(self, pixels: Any, hashes: Sequence[str], indices: list[int], progress: bool = False) -> np.ndarray:
        """Logits for some rows of a decoded dataset, the way the run was evaluated: a frozen backbone's head on the
        (cached) features of every row, others through the whole model."""
        if self.info.evaluated_on != "features" or self.tta:  # TTA: the mirrored images have no cached features
            return self.logits(pixels, indices, progress=progress)
        import torch

        from .backbones import fingerprint
        from .inference import cached_features, default_device

        device = default_device()
        model = self.model.to(device).to(memory_format=torch.channels_last)
        feats, _ = cached_features(model, fingerprint(model), pixels, list(hashes), self.preprocessing, device,
                                   self.dtype(device), progress, self.runtime(device))
        with torch.no_grad():
            return model.head.cpu()(feats[indices]).numpy()

    def predict(self, files: Sequence[str], top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k labels with probabilities per image file; unreadable files get an `error` instead."""
        from .predict import predict_files

        return predict_files(self, files, top_k)
