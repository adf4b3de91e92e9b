"""Several labels per image: one backbone, one head per task (a CSV's label columns, `--task COLUMN`).

A multi-task run trains one network whose head is a `MultiHead`: each task's head on the shared features, their
logits side by side in `--task` order. Every strategy trains it as it trains a single head, through
`TaskObjective`: the loss is the sum of the tasks' cross-entropies (equal weights, or Kendall et al.'s learned
uncertainty weights), each over the images whose label for that task is known, so an unknown label contributes
exactly zero loss; validation accuracy is the share of known (image, task) labels predicted right, the figure
every choice of the run (epoch, candidate, WiSE-FT alpha, TTA) is made on.

The first task is the primary one: the splits are stratified on it, it must be known for every image, and
metrics.json["test"] is its block; metrics.json["tasks"][NAME] holds every task's. Rules for the other tasks,
listed in the run: an empty cell is unknown; a class absent from the train split, or (with --min-per-class N) a
class with fewer than N usable images, is unknown too (masked, never a class the head cannot learn).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import AffinageError
from .labels import LabelSpace

UNKNOWN = -1  # the label index of an (image, task) pair whose label is not known: masked out of loss and metrics
MISSING_MARKERS = ("na", "n/a", "nan", "null", "none", "unknown", "-", "?")  # cells that often mean "not known"
PAD = -1e4  # log-probability of the columns a task does not have, when tasks are scored as one table


@dataclass(frozen=True)
class TaskSet:
    """The tasks of a multi-task run: their label spaces, every sample's label index per task, what was masked."""

    spaces: tuple[LabelSpace, ...]
    y: np.ndarray  # (samples, tasks) int64; UNKNOWN where the label is unknown
    masked: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {reason: labels masked}
    masked_classes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # task -> {reason: {class: n}}
    weighting: str = "equal"
    trained: tuple[bool, ...] = ()  # per task: its loss trains the network (--train-task; default: every task)

    def trains(self, j: int) -> bool:
        return not self.trained or self.trained[j]

    @property
    def names(self) -> list[str]:
        return [s.task for s in self.spaces]

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.spaces]

    def slices(self) -> list[slice]:
        """Each task's columns in the side-by-side logits."""
        ends = np.cumsum(self.sizes).tolist()
        return [slice(e - n, e) for e, n in zip(ends, self.sizes)]

    def split(self, logits: Any) -> list[Any]:
        """The side-by-side logits cut into one block per task."""
        return [logits[:, s] for s in self.slices()]

    def scoring_rows(self, logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One row per known (image, task) label: the task's log-probabilities (PAD beyond its classes) and the
        label. Selection (`selection.choose`) then compares candidates on every known label of every task."""
        width = max(self.sizes)
        rows, labels = [], []
        for j, block in enumerate(self.split(np.asarray(logits, dtype=np.float64))):
            if not self.trains(j):  # measured only: not what the run's choices are made on
                continue
            known = y[:, j] != UNKNOWN
            x = block[known]
            x = x - x.max(axis=1, keepdims=True)
            padded = np.full((len(x), width), PAD)
            padded[:, :x.shape[1]] = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            rows.append(padded)
            labels.append(y[known, j])
        return np.concatenate(rows), np.concatenate(labels).astype(np.int64)

    def describe_masked(self) -> list[str]:
        """One line per task and reason, naming the classes masked (an empty cell names none)."""
        lines = []
        for task, reasons in self.masked.items():
            for reason, n in reasons.items():
                named = self.masked_classes.get(task, {}).get(reason, {})
                which = ": " + ", ".join(f"'{c}' ({k})" for c, k in sorted(named.items())) if named else ""
                if n:
                    lines.append(f"{task}: {n} label(s) unknown ({reason}){which}")
        return lines


def build_tasks(names: Sequence[str], samples: Sequence[Any], train: Sequence[int], first: LabelSpace,
                min_per_class: int | None, weighting: str, trained: Sequence[str] = (),
                unknown_values: Sequence[str] = ()) -> TaskSet:
    """The TaskSet of `samples` (Sample.label is the first task's, Sample.more the others'), label spaces from the
    train split; see the module docstring for what is masked. `trained`: the tasks whose losses train (default
    all); the others get heads that are measured only (the single-task baselines of `compare --multitask-baseline`).
    `unknown_values`: cells that mean unknown, like an empty one (e.g. "NA"), in every task but the first."""
    for name in names:
        if "." in name or not name:
            raise AffinageError(f"task column '{name}' cannot name a head (no dots, not empty)",
                                "rename the column in the CSV, e.g. base_colour")
    y = np.full((len(samples), len(names)), UNKNOWN, dtype=np.int64)
    y[:, 0] = first.indices(s.label for s in samples)
    spaces, masked, classes = [LabelSpace(names[0], first.classes, first.source)], {}, {}
    for j, name in enumerate(names[1:], start=1):
        values = [s.more[j - 1] if len(s.more) >= j else "" for s in samples]
        declared = Counter(v for v in values if v in unknown_values)
        values = ["" if v in unknown_values else v for v in values]
        counts = Counter(v for v in values if v)
        in_train = Counter(values[i] for i in train if values[i])
        small = {c for c, n in counts.items() if min_per_class is not None and n < min_per_class}
        kept = sorted(c for c in in_train if c not in small)
        if len(kept) < 2:
            raise AffinageError(f"task '{name}' has {len(kept)} class(es) with training images "
                                f"({', '.join(kept) or 'none'})", "a task needs at least two classes: drop that --task")
        space = LabelSpace.from_labels(kept, f"train split, column {name}", task=name)
        position = {c: k for k, c in enumerate(space.classes)}
        reasons: Counter[str] = Counter()
        named: dict[str, Counter[str]] = {"--unknown-value": declared} if declared else {}
        for i, v in enumerate(values):
            why = ("empty cell" if not v else f"class with fewer than {min_per_class} images (--min-per-class)"
                   if v in small else "class absent from the train split" if v not in position else None)
            if why is None:
                y[i, j] = position[v]
                continue
            reasons[why] += 1
            if v:
                named.setdefault(why, Counter())[v] += 1
        if declared:  # their cells were emptied above: say which they were
            reasons["--unknown-value"] = sum(declared.values())
            reasons["empty cell"] -= sum(declared.values())
            reasons = Counter({k: n for k, n in reasons.items() if n})
        spaces.append(space)
        masked[name] = dict(reasons)
        classes[name] = {why: dict(c) for why, c in named.items()}
    return TaskSet(tuple(spaces), y, masked, classes, weighting, tuple(not trained or n in trained for n in names))


class MultiHead(nn.Module):
    """One head per task on the shared features; forward gives their logits side by side (task order)."""

    def __init__(self, heads: dict[str, nn.Module], uncertainty: bool = False):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.tasks = tuple(heads)
        # Kendall et al. (2018): s_t = log sigma_t^2 per task, learned with the network (uncertainty weighting)
        self.log_vars = nn.Parameter(torch.zeros(len(heads))) if uncertainty else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.heads[t](features) for t in self.tasks], dim=1)


def make_multihead(tasks: TaskSet, build: Callable[[LabelSpace], nn.Module]) -> MultiHead:
    """A MultiHead with `build(space)` as each task's head."""
    return MultiHead({s.task: build(s) for s in tasks.spaces}, uncertainty=tasks.weighting == "uncertainty")


def find_multihead(module: nn.Module) -> MultiHead | None:
    """The MultiHead that trains inside `module` (peft keeps a frozen original beside its trained copy)."""
    found = [m for m in module.modules() if isinstance(m, MultiHead)]
    trained = [m for m in found if any(p.requires_grad for p in m.parameters())]
    return (trained or found or [None])[0]


class TaskObjective:
    """The loss and the val figures of a multi-task run (train.LoopSettings.objective)."""

    def __init__(self, tasks: TaskSet, label_smoothing: float = 0.0):
        self.slices, self.label_smoothing = tasks.slices(), label_smoothing
        self.weighting, self.trains = tasks.weighting, [tasks.trains(j) for j in range(len(tasks.spaces))]
        self.head: MultiHead | None = None  # bound by `bind` to the module that trains (uncertainty weights)

    def bind(self, module: nn.Module) -> TaskObjective:
        self.head = find_multihead(module)
        return self

    def task_losses(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> list[torch.Tensor]:
        """Each task's mean cross-entropy over its known labels (a zero that keeps the graph where none is known)."""
        out = []
        for j, s in enumerate(self.slices):
            known = y[:, j] != UNKNOWN
            if not bool(known.any()) or not self.trains[j]:
                out.append(logits[:, s].sum() * 0.0)
                continue
            out.append(nn.functional.cross_entropy(logits[known][:, s], y[known, j], label_smoothing=smoothing))
        return out

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: Any = None) -> torch.Tensor:
        losses = self.task_losses(logits, y, self.label_smoothing)
        log_vars = self.head.log_vars if self.head is not None else None
        if self.weighting == "uncertainty" and log_vars is not None:
            return sum(torch.exp(-log_vars[j]) * term + log_vars[j] for j, term in enumerate(losses))
        return sum(losses)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """(known labels predicted right, known labels) of a batch."""
        right = count = 0
        for j, s in enumerate(self.slices):
            if not self.trains[j]:
                continue
            known = y[:, j] != UNKNOWN
            right += int((logits[known][:, s].argmax(1) == y[known, j]).sum())
            count += int(known.sum())
        return right, count

    def val_loss(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The sum of the tasks' mean cross-entropies (unsmoothed, unweighted)."""
        return float(sum(self.task_losses(logits, y, 0.0)))


def task_blocks(tasks: TaskSet, logits: np.ndarray, indices: Sequence[int],
                metrics: Callable[[np.ndarray, np.ndarray, list[str]], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every task's test block (`metrics(logits, labels, classes)` over its known labels), with how many were
    unknown."""
    y = tasks.y[list(indices)]
    out = {}
    for j, (space, block) in enumerate(zip(tasks.spaces, tasks.split(logits))):
        known = y[:, j] != UNKNOWN
        out[space.task] = {**metrics(block[known], y[known, j], list(space.classes)), "unknown": int((~known).sum())}
    return out


def fit_probes(fit: Callable[..., Any], tasks: TaskSet, feats: np.ndarray, train: Sequence[int],
               val: Sequence[int], seed: int) -> tuple[MultiHead, np.ndarray, dict[str, float], Any]:
    """The tuned probe of each task on its known training labels (`fit` is probe.fit_probe): the MultiHead of
    their linear heads, the side-by-side val logits, each task's C, and the first task's fit."""
    heads, logits, cs, first = {}, [], {}, None
    train, val = np.asarray(train), np.asarray(val)
    for j, space in enumerate(tasks.spaces):
        tr = train[tasks.y[train, j] != UNKNOWN]
        va = val[tasks.y[val, j] != UNKNOWN]
        if not tasks.trains(j):  # measured only: an untrained (zero) head
            heads[space.task], cs[space.task] = _zero_head(feats.shape[1], len(space)), 1.0
            logits.append(np.zeros((len(val), len(space)), dtype=np.float32))
            continue
        result = fit(feats[tr], tasks.y[tr, j], feats[va], tasks.y[va, j], len(space), seed=seed)
        heads[space.task], cs[space.task] = result.head, result.C
        with torch.no_grad():
            logits.append(result.head(torch.as_tensor(feats[val], dtype=torch.float32)).numpy())
        first = first or result
    return make_multihead(tasks, lambda s: heads[s.task]), np.concatenate(logits, axis=1), cs, first


def refit_probes(refit: Callable[..., Any], tasks: TaskSet, feats: np.ndarray, indices: Sequence[int],
                 cs: dict[str, float], seed: int) -> MultiHead:
    """Each task's probe at its C, fitted again on `indices` (train + val) where its label is known."""
    idx = np.asarray(indices)
    heads = {}
    for j, space in enumerate(tasks.spaces):
        if not tasks.trains(j):
            heads[space.task] = _zero_head(feats.shape[1], len(space))
            continue
        rows = idx[tasks.y[idx, j] != UNKNOWN]
        heads[space.task] = refit(cs[space.task], feats[rows], tasks.y[rows, j], len(space), seed)
    return make_multihead(tasks, lambda s: heads[s.task])


def _zero_head(n_features: int, n_classes: int) -> nn.Linear:
    head = nn.Linear(n_features, n_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head


def task_states(head: MultiHead) -> dict[str, torch.Tensor]:
    """The state-dict entries of each task's head as a saved model names them (`heads.<task>.*`)."""
    return {f"heads.{t}.{k}": v.detach().cpu().contiguous() for t in head.tasks
            for k, v in head.heads[t].state_dict().items()}
