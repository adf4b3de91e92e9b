"""Keep-the-old-task stage: add classes to a trained classifier without forgetting the old ones, forgetting measured.

The guides' case 2: the new task complements the old one (birds *while staying good at mammals*). A run started with
`--init-from SOURCE` (a finished run, or `pretrained`: the checkpoint's own classifier, e.g. ImageNet's 1000 classes)

- has the label space old classes + new classes (a new class named like an old one is that old class), and its head
  starts with the old rows bit for bit (`extend_head`), new rows added;
- keeps the old task with `--keep`: `replay` mixes the train split of `--old-data` into every batch
  (`ReplayBatchSampler`: `--replay-fraction` of each batch, half and half by default), `distill` adds
  Learning-without-Forgetting's loss (`DistillLoss`: the old model's softened outputs on the training images, on the
  old classes), `none` is plain fine-tuning on the union (the baseline that shows what is lost);
- measures forgetting on the old data's test split (`old_task_metrics`: Avalanche's definition, accuracy before -
  accuracy after, the after figure over the whole union label space). Without old data it cannot be measured, and
  the run says so instead of printing a figure.

`run.finetune` calls `start` (which classifier, which classes), `with_old_data` (the union of the images) and, after
the test pass, `old_task_metrics`; the training stage reads `OldTask` for the sampler, the loss and WiSE-FT's alpha.
"""
from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import AffinageError
from .labels import DEFAULT_TASK, LabelSpace

PRETRAINED = "pretrained"



@dataclass(frozen=True)
class OldTask:
    """The classifier a run starts from: its classes (the first outputs of the new head), its head (the teacher's
    head; on cached features the whole teacher), how the old task is kept, and which images are old data."""

    source: str  # "pretrained" or the run directory
    labels: LabelSpace
    head: nn.Module  # frozen copy of the old head
    hidden: int | None
    mode: str  # none | replay | distill | replay+distill
    data: str | None  # --old-data
    keys: frozenset[str] = frozenset()  # sample keys of the old data's images
    replay_fraction: float = 0.5
    temperature: float = 2.0
    weight: float = 1.0

    @property
    def replay(self) -> bool:
        return "replay" in self.mode and bool(self.keys)

    @property
    def distill(self) -> bool:
        return "distill" in self.mode

    @property
    def n_old(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        what = {"none": "plain fine-tuning on old + new classes (nothing keeps the old task)",
                "replay": f"replay: {self.replay_fraction:.0%} of each batch from {self.data}",
                "distill": f"distillation (LwF, T={self.temperature:g}, weight {self.weight:g})",
                "replay+distill": f"replay ({self.replay_fraction:.0%} of each batch from {self.data}) and "
                                  f"distillation (LwF, T={self.temperature:g}, weight {self.weight:g})"}[self.mode]
        return f"{self.n_old} old classes from {self.source}; keep: {what}"


def resolve_model(cfg: Any) -> Any:
    """`--init-from RUN`: the run is the backbone (its weights as trained, its head kept as the old classifier)."""
    if cfg.init_from is None or cfg.init_from == PRETRAINED:
        return cfg
    from .runfiles import is_run_dir

    path = Path(cfg.init_from).expanduser()
    if not is_run_dir(path):
        raise AffinageError(f"--init-from '{cfg.init_from}' is not a finished run directory",
                            "pass the --out of a finished `affinage train`, or --init-from pretrained")
    return cfg.replace(model=f"run:{path}")


def start(cfg: Any, net: Any) -> OldTask | None:
    """The old classifier of an `--init-from` run (None for a plain run)."""
    if cfg.init_from is None:
        return None
    old = getattr(net, "pretrained_head", None) if net is not None else None
    if old is None:
        raise AffinageError(f"{cfg.model} has no classifier of its own to keep (--init-from {cfg.init_from})",
                            "pass --init-from RUN_DIR (a finished run), or a checkpoint that ships its classifier")
    head = copy.deepcopy(old.layer).float().eval()
    for p in head.parameters():
        p.requires_grad_(False)
    labels = LabelSpace(DEFAULT_TASK, old.labels.classes, old.labels.source)
    return OldTask(cfg.init_from, labels, head, old.hidden, cfg.keep_mode, cfg.old_data,
                   replay_fraction=cfg.replay_fraction, temperature=cfg.distill_temperature, weight=cfg.distill_weight)


# ----------------------------------------------------------------------------------------------
# Data: the old images beside the new ones, labelled with the old class names
# ----------------------------------------------------------------------------------------------
def aliases(labels: LabelSpace) -> dict[str, str]:
    """Names an old-data label may use for an old class: its name, the first comma-separated word of it
    ("ant" for ImageNet's "ant, emmet, pismire") and, for ImageNet, its WordNet id (n02219486). Case-insensitive;
    a short name shared by two classes names neither."""
    names: dict[str, str] = {}
    shared: set[str] = set()
    wnids = _imagenet_wnids(labels)

    def add(alias: str, cls: str) -> None:
        alias = alias.strip().lower()
        if not alias:
            return
        if alias in names and names[alias] != cls:
            shared.add(alias)
        names.setdefault(alias, cls)

    for cls in labels.classes:
        add(cls, cls)
    for k, cls in enumerate(labels.classes):
        if "," in cls:
            add(cls.split(",")[0], cls)
        if wnids is not None:
            add(wnids[k], cls)
    full = {c.lower() for c in labels.classes}
    return {a: c for a, c in names.items() if a not in shared or a in full}


def _imagenet_wnids(labels: LabelSpace) -> list[str] | None:
    if len(labels) != 1000 or "imagenet" not in labels.source.lower():
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        return [info.index_to_label_name(i) for i in range(1000)]
    except Exception:  # noqa: BLE001 - WordNet ids are one more way to name a class; names still work
        return None


def with_old_data(images: Any, old: OldTask | None, refuse_small: Callable[[Any], None]) -> tuple[Any, OldTask | None]:
    """The new images followed by the `--old-data` images relabelled with the old class names (an unknown label is
    refused, naming it and the nearest old classes)."""
    if old is None or not old.data:
        return images, old
    from .data import LabelledImages, Sample, load_source

    extra = load_source(old.data)
    refuse_small(extra)
    names = aliases(old.labels)
    unknown = sorted({s.label for s in extra.samples if s.label.strip().lower() not in names})
    if unknown:
        near = difflib.get_close_matches(unknown[0].lower(), list(names), n=3, cutoff=0.6)
        raise AffinageError(f"label '{unknown[0]}' of --old-data {old.data} is not a class of {old.source}"
                            + (f" ({len(unknown)} such labels)" if len(unknown) > 1 else ""),
                            "relabel the old data with the old classes' names"
                            + (f" (nearest: {', '.join(repr(names[n]) for n in near)})" if near else ""))
    new_keys = {s.key for s in images.samples}
    clash = next((s.key for s in extra.samples if s.key in new_keys), None)
    if clash is not None:
        raise AffinageError(f"image '{clash}' is in both --data and --old-data",
                            "give the old task images of its own (the leak check would count them twice)")
    relabelled = [Sample(s.key, names[s.label.strip().lower()], s.split, s.group) for s in extra.samples]
    new_reader, old_reader, old_keys = images.read_bytes, extra.read_bytes, {s.key for s in relabelled}

    def read(sample: Any) -> bytes:
        return old_reader(sample) if sample.key in old_keys else new_reader(sample)

    union = LabelledImages(images.samples + relabelled, f"{images.description} + old task {extra.description}", read,
                           images.skipped + extra.skipped, images.keys_are_paths and extra.keys_are_paths)
    return union, replace(old, keys=frozenset(old_keys))


def union_labels(old: OldTask, new_classes: Sequence[str], source: str) -> LabelSpace:
    """Old classes first, in the old head's order, then the new ones (sorted) that are not old classes."""
    known = set(old.labels.classes)
    extra = sorted(c for c in set(new_classes) if c not in known)
    return LabelSpace(DEFAULT_TASK, old.labels.classes + tuple(extra),
                      f"{old.labels.source} ({old.n_old} old classes); + {len(extra)} new from {source}")


def split_parts(samples: Sequence[Any], is_old: np.ndarray, make: Callable[[list[Any]], Any]) -> Any:
    """Splits made for the new and the old images separately (each source keeps its own given splits, or gets its
    own stratified ones), then joined."""
    from .data import Splits

    parts = []
    for flag in (False, True):
        idx = [i for i in range(len(samples)) if bool(is_old[i]) == flag]
        if idx:
            parts.append((idx, make([samples[i] for i in idx]), "old data" if flag else "new data"))
    joined = {name: sorted(idx[j] for idx, s, _ in parts for j in getattr(s, name)) for name in ("train", "val", "test")}
    return Splits(joined["train"], joined["val"], joined["test"], "; ".join(f"{what}: {s.how}" for _, s, what in parts))


# ----------------------------------------------------------------------------------------------
# The head: old rows kept, new rows added
# ----------------------------------------------------------------------------------------------
def extend_head(head: nn.Module, old: nn.Module, n_old: int) -> nn.Module:
    """`head` (built for old + new classes, same architecture) with every parameter of `old` copied in: equal shapes
    whole, the output layer's first `n_old` rows (and biases). The new rows keep their fresh init."""
    state, source = head.state_dict(), old.state_dict()
    if set(state) != set(source):
        raise AffinageError("the old head's layers differ from the new head's", "start from a run with the same head")
    with torch.no_grad():
        for name, value in source.items():
            target = state[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif target.shape[1:] == value.shape[1:] and target.shape[0] >= n_old == value.shape[0]:
                target[:n_old].copy_(value)
            else:
                raise AffinageError(f"old head parameter '{name}' {tuple(value.shape)} does not fit "
                                    f"{tuple(target.shape)}", "start from a run with the same head")
    head.load_state_dict(state)
    return head


def imprint(head: nn.Module, features: torch.Tensor, y: np.ndarray, n_old: int) -> nn.Module:
    """Weight imprinting (Qi et al., 2018) of a linear head's new rows, centred: each new class's row points from
    the mean training feature to its class mean, scaled to the old rows' median norm, and its bias makes its logit at
    the mean feature the old rows' median logit there. Fresh rows next to a trained classifier start far smaller than
    the old ones, and the old classes win every image until the new rows have grown; uncentred imprinted rows (pooled
    features are all positive, so every image's feature is close to every class mean) win every image instead.
    MLP heads keep their fresh init."""
    if not isinstance(head, nn.Linear) or head.out_features <= n_old or n_old == 0:
        return head
    with torch.no_grad():
        w, b = head.weight, head.bias
        scale = w[:n_old].norm(dim=1).median()
        feats = features.float()
        centre = feats.mean(0)
        old_logit = (w[:n_old] @ centre + (b[:n_old] if b is not None else 0.0)).median()
        for k in range(n_old, head.out_features):
            members = feats[torch.as_tensor(y == k)]
            if len(members):
                direction = members.mean(0) - centre
                w[k] = direction / direction.norm().clamp_min(1e-12) * scale
                if b is not None:
                    b[k] = old_logit - w[k] @ centre
    return head


# ----------------------------------------------------------------------------------------------
# Training: replay batches and the distillation loss
# ----------------------------------------------------------------------------------------------
class ReplayBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of `batch_size` positions, `fraction` of each from `old` (drawn in a shuffled cycle, repeated when
    the old data is smaller), the rest from `new` (each new position once per epoch). The epoch is the pass over
    the new data; the order depends on `generator` only (seeded per epoch by the training loop)."""

    def __init__(self, new: Sequence[int], old: Sequence[int], batch_size: int, fraction: float,
                 generator: torch.Generator):
        if not new or not old:
            raise AffinageError("replay needs new and old training images", "check --data and --old-data")
        self.new, self.old = list(new), list(old)
        self.n_old = min(batch_size - 1, max(1, round(batch_size * fraction)))
        self.n_new = batch_size - self.n_old
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.new) / self.n_new)

    def __iter__(self) -> Iterator[list[int]]:
        new = [self.new[k] for k in torch.randperm(len(self.new), generator=self.generator).tolist()]
        need = len(self) * self.n_old
        cycles = math.ceil(need / len(self.old))
        old = [self.old[k] for _ in range(cycles) for k in torch.randperm(len(self.old), generator=self.generator).tolist()]
        for b in range(len(self)):
            yield new[b * self.n_new:(b + 1) * self.n_new] + old[b * self.n_old:(b + 1) * self.n_old]


def distill_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF's knowledge-distillation loss on the old classes: KL(teacher || student) at temperature T, times T^2 (the
    gradient scale of the hard-label loss, Hinton et al.); 0 when the student's old-class logits equal the teacher's."""
    t = temperature
    log_p = torch.log_softmax(student[:, :teacher.shape[1]].float() / t, dim=1)
    q = torch.log_softmax(teacher.float() / t, dim=1)
    return nn.functional.kl_div(log_p, q, log_target=True, reduction="batchmean") * t * t


class DistillLoss(nn.Module):
    """Cross-entropy on the labels (old and new classes) + weight x `distill_term` against the frozen teacher's
    outputs on the same (augmented) inputs."""

    def __init__(self, teacher: nn.Module, temperature: float, weight: float, label_smoothing: float):
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.weight = temperature, weight
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.teacher.to(x.device)
        with torch.no_grad():
            target = self.teacher(x).float()
        return self.ce(logits, y) + self.weight * distill_term(logits, target, self.temperature)


class Teacher(nn.Module):
    """The starting model as it was: its backbone (a frozen copy) and the old head."""

    def __init__(self, net: Any, head: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(net.backbone).eval()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())


def training_parts(old: OldTask | None, train: Sequence[int], is_old: np.ndarray | None, batch_size: int,
                   teacher: nn.Module | None, label_smoothing: float) -> tuple[Any, Any]:
    """(batch sampler factory, loss) for `LoopSettings` (None, None: plain training)."""
    if old is None:
        return None, None
    sampler = None
    if old.replay and is_old is not None:
        new_pos = [k for k, i in enumerate(train) if not is_old[i]]
        old_pos = [k for k, i in enumerate(train) if is_old[i]]

        def sampler(generator: torch.Generator) -> ReplayBatchSampler:
            return ReplayBatchSampler(new_pos, old_pos, batch_size, old.replay_fraction, generator)

    loss = DistillLoss(teacher, old.temperature, old.weight, label_smoothing) if old.distill and teacher else None
    return sampler, loss


def val_weights(old: OldTask | None, val: Sequence[int], is_old: np.ndarray | None) -> torch.Tensor | None:
    """Per val image weights whose weighted accuracy is the mean of the old-data and the new-data val accuracy
    (None where val holds one of them only): the epoch kept serves both tasks, not the one with more val images
    (oxford17's 340 old val images against hymenoptera's 37 new ones)."""
    if old is None or is_old is None:
        return None
    flags = is_old[list(val)]
    n_old, n_new = int(flags.sum()), int((~flags).sum())
    if not n_old or not n_new:
        return None
    return torch.as_tensor(np.where(flags, 0.5 / n_old, 0.5 / n_new), dtype=torch.float64)


def training_indices(old: OldTask | None, train: list[int], is_old: np.ndarray | None) -> list[int]:
    """The train split the model trains on: old-data images only where they are replayed."""
    if old is None or is_old is None or old.replay:
        return train
    return [i for i in train if not is_old[i]]


# ----------------------------------------------------------------------------------------------
# WiSE-FT on both tasks, and the figures of the run
# ----------------------------------------------------------------------------------------------
def both_tasks_accuracy(logits: np.ndarray, y: np.ndarray, is_old: np.ndarray) -> dict[str, float | None]:
    """Accuracy on the old-data and the new-data images of a split, and their mean (what `--interpolate auto` and
    the choice of an epoch maximise when old data is given)."""
    pred = logits.argmax(1)
    old = float((pred[is_old] == y[is_old]).mean()) if is_old.any() else None
    new = float((pred[~is_old] == y[~is_old]).mean()) if (~is_old).any() else None
    both = [v for v in (old, new) if v is not None]
    return {"old_accuracy": old, "new_accuracy": new, "mean": float(np.mean(both)) if both else None}


OFFSETS = np.round(np.arange(-6.0, 6.01, 0.25), 2)  # logit offsets of the new classes tried by `new_class_offset`


def new_class_offset(logits: np.ndarray, y: np.ndarray, is_old: np.ndarray, n_old: int) -> tuple[float, list[Any]]:
    """Bias correction (BiC, Wu et al. 2019, with one parameter): the offset added to the new classes' logits that
    maximises the mean of the old-data and new-data val accuracy (ties: the offset nearest 0). Training on new
    images pushes the new classes' logits up on every image (task-recency bias; plain and distilled fine-tuning
    both); val, which holds old images, says by how much. Returns the offset and the curve."""
    curve = []
    for delta in OFFSETS:
        shifted = logits.copy()
        shifted[:, n_old:] += delta
        curve.append({"offset": float(delta), **both_tasks_accuracy(shifted, y, is_old)})
    best = max(curve, key=lambda r: (round(r["mean"], 6), -abs(r["offset"])))
    return best["offset"], curve


def add_new_class_offset(head: nn.Module, n_old: int, delta: float) -> None:
    """Add `delta` to the bias of the new classes' outputs of `head`'s last linear layer."""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[n_old:] += delta


def old_task_metrics(old: OldTask, before_logits: np.ndarray | None, after_logits: np.ndarray, y: np.ndarray,
                     is_old: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """metrics.json's `old_task` and `new_task` blocks from the test split's logits (the union model's) and the old
    model's logits on the same images (`before_logits`, old classes only)."""
    new_mask = ~is_old
    new_block: dict[str, Any] = {"n": int(new_mask.sum())}
    if new_mask.any():
        new_block["accuracy"] = float((after_logits[new_mask].argmax(1) == y[new_mask]).mean())
    block: dict[str, Any] = {"source": old.source, "classes": list(old.labels.classes)[:50], "n_classes": old.n_old,
                             "keep": old.mode, "old_data": old.data}
    if not is_old.any() or before_logits is None:
        block.update(measured=False, reason="no --old-data: forgetting cannot be measured without labelled images "
                                            "of the old classes (pass --old-data DATA)")
        return {"old_task": block, "new_task": new_block}
    yo = y[is_old]
    before = before_logits[is_old].argmax(1)
    after = after_logits[is_old].argmax(1)
    acc_before, acc_after = float((before == yo).mean()), float((after == yo).mean())
    per_class = {}
    for k in sorted(set(yo.tolist())):
        m = yo == k
        per_class[classes[k]] = {"n": int(m.sum()), "recall_before": float((before[m] == k).mean()),
                                 "recall_after": float((after[m] == k).mean())}
    block.update(measured=True, n=int(is_old.sum()), accuracy_before=acc_before, accuracy_after=acc_after,
                 forgetting=acc_before - acc_after, per_class=per_class,
                 definition="accuracy of the starting model on the old data's test split (old classes) minus the "
                            "new model's on the same images (all classes: old and new compete)")
    return {"old_task": block, "new_task": new_block}
