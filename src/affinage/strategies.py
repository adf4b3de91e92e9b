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
from .errors import AffinageError


@dataclass(frozen=True)
class Defaults:
    epochs: int
    lr: float
    weight_decay: float
    layer_decay: float = 1.0
    batch_size: int | None = None
    patience: int = 3
    lr_min: float | None = None  # set: discriminative LRs from lr (head) down to lr_min (lowest trained block)
    steps: int | None = None  # set: train for about this many optimizer steps (big_vision's transfer configs count
    max_epochs: int | None = None  # steps, not epochs): epochs = ceil(steps / steps per epoch), in [epochs, max_epochs]
    augment: str = "light"


class Strategy:
    """Base: everything frozen but the head."""

    name = "base"
    uses_cached_features = False  # True: the backbone never runs during training, only once for features
    head_hidden: int | None = None
    defaults = Defaults(epochs=1, lr=1e-3, weight_decay=1e-4)

    def resolve(self, cfg: TrainConfig, n_train: int | None = None) -> dict[str, Any]:
        """Effective hyper-parameters: the user's where given, else this strategy's defaults (the number of epochs
        may depend on the number of training images `n_train`)."""
        lr = cfg.lr or self.defaults.lr
        batch_size = cfg.batch_size or self.defaults.batch_size or 32
        epochs = cfg.epochs or self.defaults.epochs
        if cfg.epochs is None and self.defaults.steps and n_train:
            per_epoch = math.ceil(n_train / (batch_size * cfg.grad_accum))
            epochs = min(max(epochs, math.ceil(self.defaults.steps / per_epoch)), self.defaults.max_epochs or epochs)
        if cfg.lr_min is not None and cfg.lr_min > lr:
            raise AffinageError(f"lr_min {cfg.lr_min:g} is above the head's lr {lr:g}",
                                "pass --lr-min below --lr (fastai's slice(lr/100, lr) is --lr-min 1e-5 --lr 1e-3)")
        return {"epochs": epochs, "lr": lr, "augment": cfg.augment or self.defaults.augment,
                "weight_decay": self.defaults.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
                "layer_decay": cfg.layer_decay or self.defaults.layer_decay,
                "lr_min": cfg.lr_min if cfg.lr_min is not None else self.defaults.lr_min,
                "patience": self.defaults.patience if cfg.patience is None else cfg.patience,
                "batch_size": batch_size,
                **self.extra_hyperparameters(cfg)}

    def extra_hyperparameters(self, cfg: TrainConfig) -> dict[str, Any]:
        return {}

    def wrap(self, model: ImageClassifier, hp: dict[str, Any]) -> nn.Module:
        """The module the training loop optimises (LoRA wraps the model in adapters; others train it as is)."""
        return model

    def unwrap(self, module: nn.Module) -> ImageClassifier:
        """Back to a plain ImageClassifier for saving and inference (LoRA merges its adapters)."""
        return module  # type: ignore[return-value]

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        """How many backbone blocks (from the top) train during `epoch`; the stem counts as a block."""
        return 0

    def param_groups(self, model: ImageClassifier, hp: dict[str, Any]) -> list[dict[str, Any]]:
        """All groups this strategy may ever train (head and the blocks it may unfreeze), with their LR/decay."""
        depth = max(self.trainable_depth(model, e, hp["epochs"]) for e in range(hp["epochs"]))
        return param_groups(model, depth, hp["lr"], hp["weight_decay"], hp["layer_decay"], hp.get("lr_min"))

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


class Prototype(Strategy):
    """Frozen backbone; nearest-class-mean on centred, L2-normalised cached features (cosine), as a linear head
    (fewshot.py): nothing to tune but a temperature, so it works from one image per class."""

    name = "prototype"
    uses_cached_features = True
    defaults = Defaults(epochs=1, lr=1.0, weight_decay=0.0, batch_size=128, patience=1)  # unused: no optimiser

    def resolve(self, cfg: TrainConfig, n_train: int | None = None) -> dict[str, Any]:
        return {"classifier": "cosine nearest class mean (centred, L2-normalised features)",
                "temperature": "chosen on val"}


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
    # short and light: on oxford17 0.956 test accuracy in ~2.5 min on 2 CPU cores (the HF Trainer recipe: 0.615 in
    # ~3 min); `progressive` is the long, strongly augmented schedule
    defaults = Defaults(epochs=3, lr=3e-4, weight_decay=0.05, layer_decay=0.8)

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        return len(model.block_names) + 1


class Scratch(Strategy):
    """The same architecture from random weights, every parameter training: the negative-transfer check (does the
    pretrained start help at all?). Longer, strongly augmented, no layer decay, BatchNorm statistics trained."""

    name = "scratch"
    defaults = Defaults(epochs=10, lr=2e-3, weight_decay=0.05, layer_decay=1.0, augment="strong", patience=5)

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        return len(model.block_names) + 1


class Progressive(Strategy):
    """Head first (fitted on frozen features), then blocks unfrozen from the top, a few more each epoch,
    each deeper block at a lower LR (fastai's discriminative LRs)."""

    name = "progressive"
    # ~250 optimizer steps (at least 4 epochs, at most 15) with strong augmentation: one more block unfrozen per
    # epoch on oxford17 (680 images -> 12 epochs)
    defaults = Defaults(epochs=4, lr=3e-4, weight_decay=0.05, layer_decay=0.7, steps=250, max_epochs=15,
                        augment="strong", patience=5)

    def trainable_depth(self, model: ImageClassifier, epoch: int, epochs: int) -> int:
        total = len(model.block_names) + 1
        step = math.ceil(total / max(1, epochs))
        return min(total, step * (epoch + 1))


class Lora(Strategy):
    """Low-rank adapters (peft) on the backbone's linear and 1x1/full convolution layers; the pretrained
    weights stay frozen, the head trains with the adapters and is saved with them (peft's `modules_to_save`).
    At the end the adapters are merged, so the saved model runs at the original speed."""

    name = "lora"
    defaults = Defaults(epochs=5, lr=1e-3, weight_decay=1e-4)

    def extra_hyperparameters(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}

    def wrap(self, model: ImageClassifier, hp: dict[str, Any]) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model)
        if not targets:
            raise AffinageError(f"no layer of {model.spec.origin} can take a LoRA adapter (no Linear or Conv2d layers)",
                                "use --strategy partial:N or full for this backbone")
        config = LoraConfig(r=int(hp["lora_rank"]), lora_alpha=float(hp["lora_alpha"]), lora_dropout=0.0, bias="none",
                            target_modules=targets, modules_to_save=[f"heads.{model.task}"])
        return get_peft_model(model, config)

    def unwrap(self, module: nn.Module) -> ImageClassifier:
        return module.merge_and_unload() if hasattr(module, "merge_and_unload") else module  # type: ignore[return-value]

    def param_groups(self, model: nn.Module, hp: dict[str, Any]) -> list[dict[str, Any]]:
        """Adapters and head at the same LR; no decay on biases (the head's), decay on the adapter matrices."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return (decay_groups("head", [(n, p) for n, p in named if "lora_" not in n], hp["lr"], hp["weight_decay"])
                + decay_groups("lora", [(n, p) for n, p in named if "lora_" in n], hp["lr"], hp["weight_decay"]))

    def apply(self, model: nn.Module, epoch: int, epochs: int) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_targets(model: ImageClassifier) -> list[str]:
    """Module names (relative to the ImageClassifier) LoRA can adapt: Linear layers, and ungrouped Conv2d layers
    whose padding is static (timm's Conv2dSame pads in forward, which a LoRA conv would not reproduce).

    The task's head is trained and saved whole (peft's `modules_to_save=["heads.<task>"]`, matched by name
    suffix: no backbone layer ends in "heads.<task>"), which keeps the adapter folder loadable by plain
    `PeftModel.from_pretrained`."""
    names = []
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear):
            names.append(f"backbone.{name}")
        elif type(module) is nn.Conv2d and module.groups == 1 and isinstance(module.padding, tuple):
            names.append(f"backbone.{name}")
    return names


def get_strategy(name: str) -> Strategy:
    name = check_strategy(name)
    if name.startswith("partial:"):
        return Partial(int(name.split(":")[1]))
    return {"linear-probe": LinearProbe, "head": Head, "full": Full, "progressive": Progressive, "lora": Lora,
            "scratch": Scratch, "prototype": Prototype}[name]()


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
                 layer_decay: float, lr_min: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: the head at `lr`, block k from the top at lr * layer_decay**k (layer-wise decay) or,
    with `lr_min`, spread geometrically from lr down to lr_min at the lowest trained block (fastai's
    discriminative `slice(lr_min, lr)`); no decay on biases, norm weights, tokens and position embeddings."""
    groups = decay_groups("head", list(model.head.named_parameters()), lr, weight_decay)
    blocks = model.blocks()
    trained = min(depth, len(blocks))
    for k in range(trained):
        index = len(blocks) - 1 - k
        block_lr = lr * (lr_min / lr) ** ((k + 1) / trained) if lr_min else lr * layer_decay ** (k + 1)
        groups += decay_groups("stem" if index == 0 else f"block{index}", blocks[index], block_lr, weight_decay,
                               model.no_weight_decay())
    return groups


def decay_groups(name: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 no_decay: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """One LR for `named`, split in two optimizer groups: matrices with weight decay, and biases, norm weights and
    the `no_decay` names without ("<name>/no_decay")."""
    decay = [p for n, p in named if n not in no_decay and p.ndim > 1]
    plain = [p for n, p in named if n in no_decay or p.ndim <= 1]
    return [{"params": params, "lr": lr, "initial_lr": lr, "weight_decay": wd, "name": name + suffix}
            for suffix, params, wd in (("", decay, weight_decay), ("/no_decay", plain, 0.0)) if params]


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
