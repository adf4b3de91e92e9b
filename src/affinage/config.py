"""One typed, validated run configuration, saved whole to every run directory."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .errors import AffinageError

STRATEGY_NAMES = ("auto", "linear-probe", "head", "partial:N", "full", "progressive", "lora", "scratch", "prototype")
COMPARE_STRATEGIES = ("linear-probe", "head", "partial:2", "progressive", "full", "lora")  # `affinage compare`'s default
AUGMENT_PRESETS = ("none", "light", "strong")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "onnx")  # frozen-backbone forward passes (runtime.py)


def check_strategy(name: str) -> str:
    """Normalise a strategy name or raise naming the valid choices."""
    name = name.strip().lower()
    if name in ("linear-probe", "linear_probe", "probe"):
        return "linear-probe"
    if name in ("head", "full", "progressive", "lora", "auto", "scratch", "prototype"):
        return name
    match = re.fullmatch(r"partial:(\d+)", name)
    if match and int(match.group(1)) >= 1:
        return f"partial:{int(match.group(1))}"
    raise AffinageError(f"unknown strategy '{name}'",
                        f"choose one of {', '.join(STRATEGY_NAMES)} (N = number of last blocks to train, >= 1)")


TASK_WEIGHTINGS = ("equal", "uncertainty")  # --task-weighting: how the task losses of a multi-task run are summed
KEEP_MODES = ("none", "replay", "distill", "replay+distill")  # --keep: how an --init-from run keeps the old task
REPORT_TO = ("none", "tensorboard", "mlflow")  # --report-to: experiment trackers the finished run is logged to


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. None means "the strategy's default" (resolved before training)."""

    data: str
    model: str = "efficientnet_lite0"
    strategy: str = "auto"  # measured on val within `budget` (see auto.py); or one strategy by name
    seed: int = 0
    epochs: int | None = None
    lr: float | None = None  # peak LR of the head; backbone groups get less (layer decay / discriminative LRs)
    batch_size: int | None = None  # None: the strategy's (32 when the backbone trains, 128 on cached features)
    weight_decay: float | None = None  # never applied to biases and norm weights
    label_smoothing: float = 0.1
    augment: str | None = None  # None: the strategy's preset (strong for progressive, light otherwise)
    layer_decay: float | None = None  # LR multiplier per block going down from the head (full, partial)
    warmup_epochs: float = 0.5
    patience: int | None = None  # early stopping on val accuracy (None: the strategy's); the best weights are kept
    train_bn_stats: bool = False  # False: BatchNorm keeps its pretrained statistics while fine-tuning (Keras' advice)
    head_init: str = "probe"  # unfreezing strategies start from a head fitted on frozen features (LP-FT)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    image_size: int | None = None  # None: the checkpoint's own input size
    mean: list[float] | None = None  # None: the checkpoint's normalisation; needed where its config states none
    std: list[float] | None = None
    train_image_size: int | None = None  # None: 80% of image_size for convnets (FixRes: faster, as accurate), else equal
    pretrained: bool = True  # False: random init (tests, from-scratch baselines)
    precision: str = "auto"  # auto: bf16 autocast where the hardware runs it fast (inference on AVX512-BF16 CPUs, GPUs)
    runtime: str = "auto"  # frozen features: auto measures torch against onnxruntime on this machine (runtime.py)
    num_workers: int | None = None
    grad_accum: int = 1
    splits_from: str | None = None  # a run directory whose split lists to reuse
    group_by: str | None = None
    min_per_class: int | None = None  # leave out (and list) classes with fewer usable images; None: refuse such data
    trust_remote_code: bool = False
    lr_min: float | None = None  # discriminative LRs: the lowest trained block's LR (fastai's slice(lr_min, lr)); overrides layer_decay
    lora_rank: int = 8  # LoRA adapter rank (strategy lora)
    lora_alpha: float = 16.0
    targets: list[str] = field(default_factory=list)  # e.g. ["accuracy>=0.95", "recall[tulip]>=0.9"], checked on test
    drop_leaks: bool = False  # remove val/test images that duplicate a train image (see leaks.csv)
    country: str = "FRA"  # ISO 3166-1 alpha-3 code for codecarbon's offline carbon intensity
    water_l_per_kwh: float = 1.8  # litres of water per kWh: US data-centre average on-site WUE (see footprint.py)
    budget: str | None = None  # auto's wall-clock allowance for the whole run, e.g. "10m" (None: 10m CPU / 30m GPU)
    budget_factor: float | None = None  # auto: at most this many times the linear probe's cost (decode+features+probe)
    models: list[str] = field(default_factory=list)  # backbones to rank by a tuned probe on val (--model auto: built-ins)
    candidates: list[str] = field(default_factory=list)  # auto: only these strategies (default: all, in auto's order)
    interpolate: str = "auto"  # WiSE-FT: auto (alpha chosen on val among 0.5, 0.75, 1), none, or an alpha in (0, 1]
    tta: str = "auto"  # flip test-time augmentation: auto (kept where it helps on val), on, off
    refit: str = "auto"  # refit the kept configuration on train+val: auto (the probe only: cheap), on, off
    resume: bool = False  # continue an interrupted run in the same --out from its last checkpoint
    init_from: str | None = None  # keep what a classifier knew: a finished run directory, or "pretrained" (the
    # checkpoint's own classifier); the label space becomes its classes followed by the new ones (see keep.py)
    old_data: str | None = None  # labelled images of the old task: replayed in training, their test split measures forgetting
    keep: str | None = None  # none | replay | distill | replay+distill (None: replay with old_data, else distill)
    replay_fraction: float = 0.5  # share of each training batch drawn from old_data (the guides' half and half)
    distill_temperature: float = 2.0  # LwF's softening of the old model's outputs (Li & Hoiem use T = 2)
    distill_weight: float = 1.0  # LwF's lambda_o: the distillation loss counts as much as the new task's (Li & Hoiem)
    # several labels per image (tasks.py): the CSV's label columns, one head each on one backbone (default: `label`)
    tasks: list[str] = field(default_factory=list)
    task_weighting: str = "equal"  # equal: task losses summed; uncertainty: Kendall et al.'s learned weights
    train_tasks: list[str] = field(default_factory=list)  # the tasks whose losses train (default: all); others measured
    unknown_values: list[str] = field(default_factory=list)  # cells read as unknown (like an empty cell), e.g. NA
    extra: dict[str, Any] = field(default_factory=dict)
    # k-fold cross-validation and few-shot (issue #13, crossval.py)
    folds: int | None = None  # K stratified folds, K child runs, out-of-fold figures; None: one train/val/test split
    # issue #16: where else the run is logged, and the columns of an hf: dataset
    report_to: list[str] = field(default_factory=list)  # tensorboard, mlflow (tracking.py); [] or ["none"]: nowhere
    image_column: str | None = None  # hf: data: the image column (None: the dataset's one Image feature)
    label_column: str | None = None  # hf: data: the label column (None: its one ClassLabel feature)
    # the data audit (issue #14, audit.py / balance.py)
    audit: str = "auto"  # auto: on the run's cached features where the data has <= audit.AUTO_MAX_IMAGES images; on; off
    exclude: str | None = None  # a CSV (path or sha column) or text file of paths / content hashes to leave out
    balance: str = "none"  # none | weights (class-weighted loss, probe class_weight='balanced') | sampler

    def __post_init__(self) -> None:
        from .targets import parse_targets

        object.__setattr__(self, "strategy", check_strategy(self.strategy))
        parse_targets(self.targets)  # a typo in --target fails now, before any run starts (classes: checked later)
        object.__setattr__(self, "candidates", [check_strategy(c) for c in self.candidates])
        if "auto" in self.candidates:
            raise AffinageError("'auto' cannot be one of auto's candidates", "list strategies, e.g. linear-probe,partial:2")
        for name, value, choices in (("tta", self.tta, ("auto", "on", "off")), ("refit", self.refit, ("auto", "on", "off"))):
            if value not in choices:
                raise AffinageError(f"unknown {name} '{value}'", f"choose one of {', '.join(choices)}")
        if self.interpolate not in ("auto", "none"):
            try:
                alpha = float(self.interpolate)
            except ValueError:
                alpha = -1.0
            if not 0 < alpha <= 1:
                raise AffinageError(f"interpolate must be auto, none or an alpha in (0, 1], got '{self.interpolate}'",
                                    "pass e.g. --interpolate auto or --interpolate 0.5")
        if self.budget is not None:
            from .auto import parse_budget

            parse_budget(self.budget)
        if self.budget_factor is not None and not self.budget_factor > 0:
            raise AffinageError(f"budget_factor must be > 0, got {self.budget_factor}", "pass e.g. --budget-factor 20")
        self._check_keep()
        self._check_tasks()
        self._check_report_to()
        self._check_folds()
        self._check_audit()
        if self.min_per_class is not None and self.min_per_class < 1:
            raise AffinageError(f"min_per_class must be >= 1, got {self.min_per_class}", "pass e.g. --min-per-class 3")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise AffinageError(f"{name} must be >= 1, got {value}", f"pass --{name.replace('_', '-')} 1 or more")
        if self.patience is not None and self.patience < 1:
            raise AffinageError(f"patience must be >= 1, got {self.patience} (the epochs in a row without val "
                                "improvement before training stops; 1 stops at the first epoch that does not improve)",
                                "pass --patience 1 or more; to train every epoch, pass --patience equal to --epochs")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            numbers = [float(v) for v in value] if isinstance(value, (list, tuple)) else []
            if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers) or (name == "std" and min(numbers) <= 0):
                raise AffinageError(f"{name} must be 3 finite numbers (R, G, B){', each > 0' if name == 'std' else ''}, "
                                    f"got {value!r}", f"pass e.g. --{name} {'0.485,0.456,0.406' if name == 'mean' else '0.229,0.224,0.225'}")
            object.__setattr__(self, name, numbers)
        if self.epochs is not None and self.epochs < 1:
            raise AffinageError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.lr is not None and not self.lr > 0:
            raise AffinageError(f"lr must be > 0, got {self.lr}", "pass e.g. --lr 1e-3")
        if self.augment is not None and self.augment not in AUGMENT_PRESETS:
            raise AffinageError(f"unknown augmentation preset '{self.augment}'", f"choose one of {', '.join(AUGMENT_PRESETS)}")
        if self.precision not in PRECISIONS:
            raise AffinageError(f"unknown precision '{self.precision}'", f"choose one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise AffinageError(f"unknown runtime '{self.runtime}'", f"choose one of {', '.join(RUNTIMES)}")
        if self.head_init not in ("probe", "random"):
            raise AffinageError(f"unknown head_init '{self.head_init}'", "choose probe or random")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise AffinageError(f"val/test fractions {self.val_fraction}/{self.test_fraction} do not leave a train split",
                                "use fractions in (0, 1) that sum to less than 1, e.g. 0.15 and 0.15")
        if self.lr_min is not None and not self.lr_min > 0:
            raise AffinageError(f"lr_min must be > 0, got {self.lr_min}", "pass e.g. --lr-min 1e-5")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise AffinageError(f"LoRA rank {self.lora_rank} / alpha {self.lora_alpha} invalid",
                                "pass --lora-rank 1 or more and a positive --lora-alpha (e.g. 8 and 16)")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise AffinageError(f"layer_decay must be in (0, 1], got {self.layer_decay}", "pass e.g. --layer-decay 0.8")
        if not 0 <= self.label_smoothing < 1:
            raise AffinageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}", "pass e.g. 0.1")

    def _check_tasks(self) -> None:
        if self.task_weighting not in TASK_WEIGHTINGS:
            raise AffinageError(f"unknown --task-weighting '{self.task_weighting}'",
                                f"choose one of {', '.join(TASK_WEIGHTINGS)}")
        if len(set(t.lower() for t in self.tasks)) != len(self.tasks):
            raise AffinageError(f"--task names a column twice ({', '.join(self.tasks)})", "name each label column once")
        unknown = [t for t in self.train_tasks if t not in self.tasks]
        if unknown:
            raise AffinageError(f"--train-task {unknown[0]} is not one of the --task columns ({', '.join(self.tasks)})",
                                "name a task given with --task")
        if self.unknown_values and len(self.tasks) < 2:
            raise AffinageError(f"--unknown-value {self.unknown_values[0]} applies to the tasks after the first",
                                "pass several --task columns, or remove those rows from the CSV")
        if len(self.tasks) > 1 and self.init_from is not None:
            raise AffinageError("--init-from with several --task is not supported",
                                "extend a single-task model (one --task), or train the tasks without --init-from")

    def _check_report_to(self) -> None:
        names = [n.strip().lower() for n in self.report_to]
        unknown = [n for n in names if n not in REPORT_TO]
        if unknown:
            raise AffinageError(f"unknown --report-to '{unknown[0]}'", f"choose among {', '.join(REPORT_TO)} (repeatable)")
        if "none" in names and len(set(names)) > 1:
            raise AffinageError("--report-to none cannot be combined with a tracker", "drop 'none' or the others")
        object.__setattr__(self, "report_to", list(dict.fromkeys(n for n in names if n != "none")))

    def _check_keep(self) -> None:
        if self.keep is not None and self.keep not in KEEP_MODES:
            raise AffinageError(f"unknown --keep '{self.keep}'", f"choose one of {', '.join(KEEP_MODES)}")
        if self.init_from is None and (self.old_data or self.keep):
            raise AffinageError(f"--{'old-data' if self.old_data else 'keep'} needs --init-from (the model whose "
                                "classes to keep)", "pass --init-from RUN_DIR or --init-from pretrained")
        if self.keep is not None and "replay" in self.keep and not self.old_data:
            raise AffinageError(f"--keep {self.keep} replays old images, but no --old-data was given",
                                "pass --old-data DATA (labelled images of the old classes), or --keep distill")
        if not 0 < self.replay_fraction < 1:
            raise AffinageError(f"replay_fraction must be in (0, 1), got {self.replay_fraction}",
                                "pass e.g. --replay-fraction 0.5 (half of each batch from the old data)")
        if not self.distill_temperature > 0 or self.distill_weight < 0:
            raise AffinageError(f"distill temperature {self.distill_temperature} / weight {self.distill_weight} invalid",
                                "pass a positive --distill-temperature (e.g. 2) and a --distill-weight >= 0 (e.g. 1)")

    def _check_folds(self) -> None:
        """--folds K: K >= 2, and none of the options that fix one split or one starting model (checked on the data
        later: K against the smallest class)."""
        if self.folds is None:
            return
        if self.folds < 2:
            raise AffinageError(f"--folds must be 2 or more, got {self.folds}", "pass e.g. --folds 5")
        clashes = [(self.splits_from, "--splits-from", "the folds make their own split lists"),
                   (self.resume, "--resume", "a cross-validation is not resumed; start it again with a new --out"),
                   (self.init_from, "--init-from", "cross-validate the new classes without --init-from"),
                   (self.models or self.model == "auto", "--models / --model auto",
                    "choose the backbone first, then cross-validate it")]
        for value, option, fix in clashes:
            if value:
                raise AffinageError(f"--folds cannot be combined with {option}", f"drop one of them: {fix}")

    def _check_audit(self) -> None:
        from .balance import check_balance

        if self.audit not in ("auto", "on", "off"):
            raise AffinageError(f"unknown --audit '{self.audit}'", "choose one of auto, on, off")
        if check_balance(self.balance) != "none" and (len(self.tasks) > 1 or self.init_from is not None):
            raise AffinageError(f"--balance {self.balance} is for single-task runs without --init-from",
                                "drop --balance, or train one --task without --init-from")

    @property
    def keep_mode(self) -> str | None:
        """The effective --keep (None: not a run that extends a classifier)."""
        if self.init_from is None:
            return None
        return self.keep or ("replay" if self.old_data else "distill")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AffinageError(f"unknown config key(s): {', '.join(unknown)}", f"valid keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainConfig":
        return cls.from_dict(yaml.safe_load(text) or {})
