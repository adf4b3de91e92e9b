"""Strategy stage: small objects that decide which parameters train, and at which LR and weight decay.

A strategy sets `requires_grad` and returns optimizer param groups (fastai's freeze/unfreeze, timm's
layer decay). Frozen BatchNorm layers are kept in eval mode so their running statistics never move.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .backbones import ImageClassifier
from .config import TrainConfig, check_strategy


@dataclass(frozen=True)
class Defaults:
    epochs: int
    lr: float
    weight_decay: float
    layer_decay: float = 1.0
    batch_size: int | None = None
    patience: int = 3


class Strategy:
    """Base: everything frozen but the head."""

    name = "base"
    uses_cached_features = False  # True: the backbone never runs during training, only once for features
    head_hidden: int | None = None
    defaults = Defaults(epochs=1, lr=1e-3, weight_decay=1e-4)

    def resolve(self, cfg: TrainConfig) -> dict[str, Any]:
        """Effective hyper-parameters: the user's where given, else this strategy's defaults."""
        return {"epochs": cfg.epochs or self.defaults.epochs, "lr": cfg.lr or self.defaults.lr,
                "weight_decay": self.defaults.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
                "layer_decay": cfg.layer_decay or self.defaults.layer_decay,
                "patience": cfg.patience or self.defaults.patience,
                "batch_size": cfg.batch_size or self.defaults.batch_size or 32}

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        """How many backbone blocks (from the top) train during `epoch`; the stem counts as a block."""
        return 0

    def param_groups(self, model: ImageClassifier, hp: dict[str, Any]) -> list[dict[str, Any]]:
        """All groups this strategy may ever train (head and the blocks it may unfreeze), with their LR/decay."""
        depth = max(self.trainable_depth(model, e, hp["epochs"]) for e in range(hp["epochs"]))
        return param_groups(model, depth, hp["lr"], hp["weight_decay"], hp["layer_decay"])

    def apply(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        """Set requires_grad for `epoch`; returns the number of trainable parameters."""
        return freeze_all_but(model, self.trainable_depth(model, epoch, epochs))


class LinearProbe(Strategy):
    """Frozen backbone; features computed once (cached on disk); a linear head trained on them."""

    name = "linear-probe"
    uses_cached_features = True
    defaults = Defaults(epochs=100, lr=3e-3, weight_decay=1e-3, batch_size=128, patience=20)


class Head(Strategy):
    """Frozen backbone; an MLP head (one hidden layer) trained on the cached features."""

    name = "head"
    uses_cached_features = True
    head_hidden = 512
    defaults = Defaults(epochs=100, lr=1e-3, weight_decay=1e-2, batch_size=128, patience=20)


class Partial(Strategy):
    """The last N blocks and the head train; everything below stays frozen."""

    defaults = Defaults(epochs=4, lr=5e-4, weight_decay=0.05, layer_decay=0.7)

    def __init__(self, blocks: int):
        self.blocks = blocks
        self.name = f"partial:{blocks}"

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        return min(self.blocks, len(model.block_names) + 1)


class Full(Strategy):
    """Every parameter trains; LR decays layer-wise from the head down (timm's layer decay)."""

    name = "full"
    defaults = Defaults(epochs=3, lr=3e-4, weight_decay=0.05, layer_decay=0.8)

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        return len(model.block_names) + 1


class Progressive(Strategy):
    """Head first (fitted on frozen features), then blocks unfrozen from the top, a few more each epoch,
    each deeper block at a lower LR (fastai's discriminative LRs)."""

    name = "progressive"
    defaults = Defaults(epochs=4, lr=3e-4, weight_decay=0.05, layer_decay=0.7)

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        total = len(model.block_names) + 1
        step = math.ceil(total / max(1, epochs))
        return min(total, step * (epoch + 1))


def get_strategy(name: str) -> Strategy:
    name = check_strategy(name)
    if name.startswith("partial:"):
        return Partial(int(name.split(":")[1]))
    return {"linear-probe": LinearProbe, "head": Head, "full": Full, "progressive": Progressive}[name]()


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------
def freeze_all_but(model: ImageClassifier, depth: int) -> int:
    """Train the head and the top `depth` backbone blocks (stem included when depth covers it)."""
    blocks = model.blocks()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - depth:] if depth > 0 else []:
        for _, p in block:
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: ImageClassifier, depth: int, lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: the head at `lr`, block k from the top at lr * layer_decay**k; no decay on
    biases, norm weights, tokens and position embeddings."""
    groups: list[dict[str, Any]] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], group_lr: float, no_decay: set[str]) -> None:
        decay = [p for n, p in named if n not in no_decay and p.ndim > 1]
        plain = [p for n, p in named if n in no_decay or p.ndim <= 1]
        for suffix, params, wd in (("", decay, weight_decay), ("/no_decay", plain, 0.0)):
            if params:
                groups.append({"params": params, "lr": group_lr, "initial_lr": group_lr, "weight_decay": wd,
                               "name": name + suffix})

    add("head", list(model.head.named_parameters()), lr, set())
    blocks = model.blocks()
    for k in range(min(depth, len(blocks))):
        index = len(blocks) - 1 - k
        add("stem" if index == 0 else f"block{index}", blocks[index], lr * layer_decay ** (k + 1), model.no_weight_decay())
    return groups


def set_norms_eval(model: nn.Module, all_norms: bool = True) -> None:
    """Call after model.train(): BatchNorm layers keep their pretrained running statistics.

    Frozen ones always do. With `all_norms` (the default, as Keras' transfer-learning guide advises) the
    trainable ones do too: their affine parameters still learn, but small batches of a new domain no
    longer overwrite the statistics the pretrained weights expect (on digits, batch statistics took a
    probe-initialised model from 0.95 to 0.25 val accuracy in one epoch).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if all_norms or (params and not any(p.requires_grad for p in params)):
                module.eval()
