"""`--strategy auto`: choose by measurement on val, within a wall-clock budget.

The evidence the guides reason with (data size, how far the images are from what the backbone knows) only sets the
*order* of trial; the choice is measured:

1. what is nearly free first: the tuned linear probe and the MLP head on cached features;
2. then the unfreezing strategies in the order the evidence suggests (near and few: the top blocks first; far:
   everything / gradual unfreezing first, and training from scratch as the negative-transfer check);
3. every candidate that trains the backbone is stopped early when it cannot catch the best one (successive halving,
   at equal points of the schedules: at half its schedule it must be within two standard errors of the best val
   accuracy another backbone-training candidate had at half *its* schedule; a half-trained network is never held
   against the finished frozen probe: mid-schedule, at a high LR, it is routinely below where it ends; schedules
   under HALVING_MIN_EPOCHS epochs always complete) or when the
   budget would run out before its next epoch ends; one whose first epoch cannot fit in what is left is not started;
4. the winner is chosen by `selection.choose` on val. The test split is never given to the search: the winner alone
   is evaluated on it, once, after the search.

This module holds the rules and the bookkeeping; `run.train_model` runs the candidates.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FROZEN = ("linear-probe", "head")
DEFAULT_BUDGET_CPU = 10 * 60  # seconds: the whole run on a 2-core laptop CPU (decode, features, candidates, test)
DEFAULT_BUDGET_GPU = 30 * 60
DEFAULT_FROZEN_MULTIPLE = 5  # ... or this many times the frozen stage (decode, features, probe) where that is more
NEAR_KNN = 0.80  # chance-corrected 5-NN accuracy on frozen train features at or above this: near domain
NEAR_ENTROPY = 0.45  # the backbone's own classifier at most this unsure (normalised entropy): near domain
FEW_PER_CLASS = 100  # median training images per class under this: few
HALVING_MIN_EPOCHS = 6  # successive halving stops long schedules only: a 3-5 epoch cosine schedule is still at a
# high LR at its half (oxford17: partial:2 at 0.956 after 2 of 4 epochs, where it ends at 0.979 in compare), and
# stopping it there saves little

# training cost of one image relative to one inference forward pass at the checkpoint's size (forward + backward of
# the trained part, fp32 training against autocast inference), measured on efficientnet_lite0 on 2 CPU cores (digits:
# full 74 s per epoch of 1,259 images at 9.5 ms per inference forward); scaled by the training image size. The search
# corrects them with the ratio measured on the candidates it has trained (`Search.speed`).
TRAIN_COST = {"partial": 4.0, "full": 9.7, "progressive": 7.0, "lora": 8.0, "scratch": 10.0}


def parse_budget(text: str | float | int | None) -> float | None:
    """'90s', '10m', '1.5h' or a number of seconds -> seconds (None: no budget)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text).lower())
        if not match:
            from .errors import AffinageError

            raise AffinageError(f"budget '{text}' is not a duration", "pass e.g. --budget 10m, 90s or 1h")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not seconds > 0:
        from .errors import AffinageError

        raise AffinageError(f"budget must be positive, got {text}", "pass e.g. --budget 10m")
    return seconds


def default_budget(device: Any, frozen_seconds: float = 0.0) -> float:
    """10 minutes on a CPU, 30 on a GPU, or five times what the frozen stage took where that is more: a large
    collection (fashion's 9,583 images: ~4 min of decoding and features on 2 CPU cores) still leaves room for a
    short fine-tune after the nearly free candidates."""
    fixed = DEFAULT_BUDGET_GPU if getattr(device, "type", "cpu") == "cuda" else DEFAULT_BUDGET_CPU
    return max(fixed, DEFAULT_FROZEN_MULTIPLE * frozen_seconds)


def domain_evidence(features: Any, labels: Any, pretrained_head: tuple[Any, Any] | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Train-split evidence: classes, images per class, and domain distance as (a) a chance-corrected leave-one-out
    5-NN accuracy on the frozen features and (b) the normalised entropy of the backbone's own classifier."""
    import torch

    feats = torch.as_tensor(features).float()
    y = np.asarray(labels)
    _, counts = np.unique(y, return_counts=True)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(y), size=min(len(y), 3000), replace=False))
    f = torch.nn.functional.normalize(feats[keep], dim=1)
    sims = f @ f.T
    sims.fill_diagonal_(-2.0)
    neighbours = sims.topk(min(5, len(keep) - 1), dim=1).indices.numpy()
    votes = y[keep][neighbours]
    pred = np.array([np.bincount(v, minlength=int(y.max()) + 1).argmax() for v in votes])
    knn = float((pred == y[keep]).mean())
    chance = float(counts.max() / counts.sum())
    gain = (knn - chance) / max(1e-9, 1 - chance)
    entropy = None
    if pretrained_head is not None:
        w, b = pretrained_head
        logp = torch.log_softmax(feats[keep] @ w.float().T + b.float(), dim=1)
        entropy = float((-(logp.exp() * logp).sum(1)).mean() / math.log(w.shape[0]))
    near = gain >= NEAR_KNN and (entropy is None or entropy <= NEAR_ENTROPY)
    return {"classes": len(counts), "images_per_class": int(np.median(counts)), "knn_accuracy": round(knn, 4),
            "chance": round(chance, 4), "knn_gain": round(gain, 4),
            "pretrained_entropy": None if entropy is None else round(entropy, 4), "near_domain": near}


def trial_order(evidence: dict[str, Any]) -> tuple[list[str], str]:
    """The candidates in the order to try them, and why that order (the guides' rule of thumb)."""
    few = evidence["images_per_class"] < FEW_PER_CLASS
    if evidence["near_domain"]:
        rest = ["partial:2", "full", "lora", "progressive"] if few else ["partial:2", "full", "progressive", "lora"]
        why = ("near domain: the top blocks first" + (", few images per class" if few else ""))
    else:
        rest = (["progressive", "full", "partial:2", "lora", "scratch"] if few
                else ["full", "progressive", "partial:2", "lora", "scratch"])
        why = "far domain: deeper adaptation first, and training from scratch as the negative-transfer check"
    return [*FROZEN, *rest], why


def describe_evidence(evidence: dict[str, Any]) -> str:
    bits = [f"{evidence['classes']} classes, median {evidence['images_per_class']} training images per class",
            f"5-NN on frozen features {evidence['knn_accuracy']:.2f} (chance-corrected {evidence['knn_gain']:.2f}; "
            f"near needs >= {NEAR_KNN})"]
    if evidence.get("pretrained_entropy") is not None:
        bits.append(f"pretrained classifier's normalised entropy {evidence['pretrained_entropy']:.2f} "
                    f"(near needs <= {NEAR_ENTROPY})")
    return "; ".join(bits)


def predicted_epoch_seconds(name: str, n_train: int, n_val: int, forward_seconds: float, train_size: int,
                            size: int) -> float:
    """One epoch's predicted wall time from the measured per-image forward time at the checkpoint's size."""
    kind = name.split(":")[0]
    factor = TRAIN_COST.get(kind, 3.0) * (train_size / max(1, size)) ** 2
    return n_train * forward_seconds * factor + n_val * forward_seconds


@dataclass
class Budget:
    """The run's wall-clock allowance: a deadline for the search, with the final test pass kept aside."""

    seconds: float | None
    started: float
    reserve: float = 0.0  # kept for what follows the search (test pass, report)
    source: str = ""

    @property
    def deadline(self) -> float:
        return math.inf if self.seconds is None else self.started + self.seconds - self.reserve

    def left(self) -> float:
        return self.deadline - time.perf_counter()


@dataclass
class Search:
    """The search's state: what is best so far (val accuracy and its standard error), and every candidate's row."""

    n_val: int
    budget: Budget
    best_accuracy: float = -1.0
    best_name: str | None = None
    speed: float = 1.0  # measured / predicted epoch time of the candidates trained so far
    rungs: dict[str, float] = field(default_factory=dict)  # val accuracy at half its schedule, per fine-tuned candidate

    def learn_speed(self, predicted: float, measured: list[float]) -> None:
        if predicted > 0 and measured:
            self.speed = float(np.median(measured)) / predicted

    def fit_epochs(self, epochs: int, epoch_seconds: float) -> int:
        """The epochs of a candidate's schedule that fit in the budget left (0: not even one): a shorter schedule
        that completes its LR decay beats a long one cut in the middle."""
        left = self.budget.left()
        if math.isinf(left):
            return epochs
        return min(epochs, int(left / max(epoch_seconds, 1e-9)))

    def margin(self, accuracy: float | None = None) -> float:
        """Two binomial standard errors of the best val accuracy: closer than this, val cannot tell."""
        p = min(max(self.best_accuracy if accuracy is None else accuracy, 0.0), 1.0)
        return 2 * math.sqrt(max(p * (1 - p), 1.0 / max(1, self.n_val)) / max(1, self.n_val))

    def record(self, name: str, val_accuracy: float) -> None:
        if val_accuracy > self.best_accuracy:
            self.best_accuracy, self.best_name = val_accuracy, name

    def stopper(self, name: str, epochs: int) -> Any:
        """`LoopSettings.stop` for a candidate: budget, then successive halving at half its schedule against the
        other backbone-training candidates at half theirs."""
        rung = max(1, math.ceil(epochs / 2))

        def stop(epoch: int, val_loss: float, val_acc: float, epoch_seconds: float) -> str | None:
            if time.perf_counter() + epoch_seconds > self.budget.deadline:
                return (f"the budget ({self.budget.source}) would run out before epoch {epoch + 1} ends "
                        f"(an epoch takes {epoch_seconds:.0f}s, {max(0.0, self.budget.left()):.0f}s left)")
            if epoch != rung or epochs < HALVING_MIN_EPOCHS:
                return None
            others = {k: v for k, v in self.rungs.items() if k != name}
            self.rungs[name] = val_acc
            if others:
                leader, at = max(others.items(), key=lambda kv: kv[1])
                if val_acc < at - self.margin(at):
                    return (f"cannot catch {leader} (val accuracy {val_acc:.3f} at half its schedule, {leader} had "
                            f"{at:.3f} at half its own; margin {self.margin(at):.3f})")
            return None

        return stop
