"""Export a run to a folder that loads without affinage: ONNX (onnxruntime), transformers (`from_pretrained`) or
timm (`create_model("local-dir:...")`). Every folder carries an HF-style `config.json` with the label map, a
`preprocessor_config.json` describing the run's preprocessing, and a model card; and every export is reloaded
the way a user would load it and compared with the run's own model before the folder appears."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .data import Preprocessing, UnreadableImage, eval_transform, load_pixels, printable, read_image_file
from .errors import AffinageError, missing_extra
from .predict import held_out_photos
from .storage import read_json, write_json, write_text

if TYPE_CHECKING:
    import torch

    from .saved import Run

FORMATS = ("onnx", "hf", "timm")
ONNX_OPSET = 18  # >= 17: LayerNormalization is a single op; 18 is the newest the torch exporter targets natively
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "logits"
TOLERANCE = 1e-3  # max |logit difference| accepted between the export and the run's model (fp32 both)
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


def _say(msg: str) -> None:
    print(msg, flush=True)


def export_run(run_dir: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], opset: int = ONNX_OPSET,
               log: Callable[[str], None] = _say) -> dict[str, Any]:
    """Write `out` (a new folder) in format `fmt` and return what was checked: how the folder was reloaded,
    on how many inputs, the max absolute logit difference to the run's model and the top-1 agreement."""
    from .saved import Run

    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise AffinageError(f"unknown export format '{fmt}'", f"choose one of {', '.join(FORMATS)}")
    if opset < 17:
        raise AffinageError(f"ONNX opset {opset} is too old", "use --opset 17 or newer (default 18)")
    run = Run.load(run_dir)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AffinageError(f"export folder '{target}' already exists and is not empty", "choose a new --out")
    refusal = incompatibility(run, fmt)
    if refusal:
        raise AffinageError(f"cannot export this run as {fmt}: {refusal}",
                            f"use --format {' or '.join(working_formats(run))}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with _quiet_transformers():
            checked = _check_inputs(run)
            pixels = checked.pixels
            reference = _torch_logits(run.model, pixels)
            writer = {"onnx": _write_onnx, "hf": _write_hf, "timm": _write_timm}[fmt]
            report = writer(run, tmp, pixels, reference, opset)
        report.update(format=fmt, inputs=len(pixels), inputs_described=checked.describe(),
                      held_out_photos=len(checked.photos), held_out_in_memory=len(checked.in_memory),
                      noise_images=checked.noise, inputs_skipped=[list(s) for s in checked.skipped])
        write_json(tmp / "preprocessor_config.json", preprocessor_config(run.preprocessing))
        write_text(tmp / "README.md", model_card(run, fmt, report, str(target)))
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["folder"] = str(target)
    if len(run.tasks) > 1 and fmt != "onnx":
        log(f"note: this {fmt} export holds the first task ({run.tasks[0].task}) only; --format onnx holds all "
            f"{len(run.tasks)} tasks")
    log(f"exported {run.path} as {fmt} -> {target}: {report['checked_with']} on {report['inputs']} inputs "
        f"({report['inputs_described']}), max abs logit diff {report['max_abs_diff']:.2e}, same top-1 on "
        f"{report['top1_agree']}/{report['inputs']}")
    return report


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bars from transformers while exporting (the export prints one summary line)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Which formats fit which runs
# ----------------------------------------------------------------------------------------------
def _info(run: Run) -> dict[str, Any]:
    return {**run.info.to_dict(), "head_hidden": run.info.heads[run.info.task].hidden}


def incompatibility(run: Run, fmt: str) -> str | None:
    """Why `fmt` cannot hold this run's model (None when it can). ONNX holds any model; timm and transformers
    folders hold a backbone of their own library plus their standard classifier, a single linear layer."""
    info = _info(run)
    source, arch, hidden = info["backbone"]["source"], info["backbone"]["arch"], info.get("head_hidden")
    if fmt == "onnx":
        return None
    if hidden:
        return (f"the run's head is an MLP (hidden size {hidden}); {fmt} classifiers are a single linear layer, "
                "so the folder would not reload with the trained head")
    if fmt == "timm" and source != "timm":
        return f"the backbone is a transformers model ({arch}), not a timm one"
    if fmt == "hf" and source == "hf":
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        if arch not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            return f"transformers has no image-classification class for '{arch}'"
    return None


def working_formats(run: Run) -> list[str]:
    return [f for f in FORMATS if incompatibility(run, f) is None]


# ----------------------------------------------------------------------------------------------
# Checking: held-out test images through the run's own preprocessing, plus one noise image
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckInputs:
    """What the export is compared on, so that the model card says exactly that."""

    pixels: torch.Tensor
    photos: list[str] = field(default_factory=list)  # held-out test files
    in_memory: list[str] = field(default_factory=list)  # held-out test images of an in-memory source (digits, hf:)
    noise: int = 0  # random-noise images (also a batch size other than the one exported with)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # held-out images that could not be used, and why

    def describe(self) -> str:
        parts = []
        if self.photos:
            parts.append(f"{len(self.photos)} held-out test photo(s) ({', '.join(printable(p) for p in self.photos)})")
        if self.in_memory:
            parts.append(f"{len(self.in_memory)} held-out test image(s) decoded from the in-memory data source "
                         f"({', '.join(printable(k) for k in self.in_memory)})")
        if not self.photos and not self.in_memory:
            parts.append("no held-out test image")
        parts.append(f"{self.noise} random-noise image(s)")
        text = " and ".join(parts)
        if self.skipped:
            text += "; not usable: " + "; ".join(f"{printable(k)} ({why})" for k, why in self.skipped)
        return text


def _check_inputs(run: Run, photos: int = 2) -> CheckInputs:
    """Held-out test photos of the run (files), else held-out images of its in-memory source, then noise."""
    import torch

    pp = run.preprocessing
    transform = eval_transform(pp)
    found = CheckInputs(torch.empty(0))
    rows = []
    for path in held_out_photos(run)[:photos * 4]:
        if len(rows) == photos:
            break
        try:
            rows.append(transform(torch.from_numpy(load_pixels(read_image_file(path), pp))))
            found.photos.append(path)
        except UnreadableImage as exc:  # read_image_file turns every OSError into one, with the reason
            found.skipped.append((path, str(exc)))
    if not rows:
        for key, pixels in _in_memory_test_images(run, photos, found.skipped):
            rows.append(transform(torch.from_numpy(pixels)))
            found.in_memory.append(key)
    generator = torch.Generator().manual_seed(0)
    while len(rows) < photos + 1:  # noise too, and a batch size other than the one exported with
        rows.append(torch.randn(3, pp.input_size, pp.input_size, generator=generator))
        found.noise += 1
    found.pixels = torch.stack(rows)
    return found


def _in_memory_test_images(run: Run, limit: int, skipped: list[tuple[str, str]]) -> list[tuple[str, np.ndarray]]:
    """Decoded test images of a run whose data is not files (digits, hf: datasets); [] for file sources or when the
    source cannot be loaded here (the reason goes to `skipped`)."""
    from .data import load_source, read_split_lists

    data = str(run.config.get("data") or "")
    if not (data == "digits" or data.startswith("hf:")):
        return []
    try:
        images = load_source(data, image_column=run.config.get("image_column"),
                             label_column=run.config.get("label_column"))
        test = read_split_lists(run.path / "splits", images.samples).test
    except AffinageError as exc:
        skipped.append((data, f"its test images cannot be read here: {exc.problem}"))
        return []
    out = []
    for i in test[:limit]:
        sample = images.samples[i]
        try:
            out.append((sample.key, load_pixels(images.read_bytes(sample), run.preprocessing)))
        except UnreadableImage as exc:
            skipped.append((sample.key, str(exc)))
    return out


def _torch_logits(model: Any, pixels: torch.Tensor) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.cpu().eval()(pixels).float().numpy()


def _compare(reference: np.ndarray, logits: np.ndarray, how: str) -> dict[str, Any]:
    diff = float(np.abs(reference - logits).max())
    scale = max(1.0, float(np.abs(reference).max()))
    if not np.isfinite(diff) or diff > TOLERANCE * scale:
        raise AffinageError(f"the exported model gives different logits ({how}: max abs diff {diff:.3g})",
                            "report this with the run's model.json; --format onnx reproduces any run")
    agree = int((reference.argmax(1) == logits.argmax(1)).sum())
    return {"checked_with": how, "max_abs_diff": diff, "top1_agree": agree}


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def _label_maps(run: Run) -> dict[str, Any]:
    return {"id2label": {str(i): c for i, c in enumerate(run.classes)},
            "label2id": {c: i for i, c in enumerate(run.classes)}}


def _write_onnx(run: Run, folder: Path, pixels: torch.Tensor, reference: np.ndarray, opset: int) -> dict[str, Any]:
    import torch

    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise missing_extra(exc.name or "onnxruntime", "export") from exc
    tasks = run.tasks
    model = run.model.cpu().eval() if len(tasks) == 1 else _TaskOutputs(run.model.cpu().eval(), [len(t) for t in tasks])
    outputs = [ONNX_OUTPUT] + [f"{ONNX_OUTPUT}_{t.task}" for t in tasks[1:]]  # one output per task, the first `logits`
    size = run.preprocessing.input_size
    path = folder / "model.onnx"
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # protobuf's 2 GB limit
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(path), input_names=[ONNX_INPUT],
                              output_names=outputs, opset_version=opset, dynamo=True, external_data=big,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    except Exception as exc:
        raise AffinageError(f"torch cannot export this model to ONNX: {str(exc).splitlines()[0][:200]}",
                            "report this with the run's model.json") from exc
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {ONNX_INPUT: pixels.numpy()})
    report = _compare(reference, got[0], f"onnxruntime {ort.__version__}")
    if len(tasks) > 1:  # every task's output checked against the run's model
        with torch.no_grad():
            every = run.model.cpu().eval().forward_tasks(pixels).float().numpy()
        report["tasks_checked"] = {t.task: _compare(block, logits, f"onnxruntime {ort.__version__}")
                                   for t, block, logits in zip(tasks, np.split(every, np.cumsum(
                                       [len(t) for t in tasks])[:-1], axis=1), got)}
    info = _info(run)
    write_json(folder / "config.json", {
        "format": "onnx", "model_file": path.name, "opset": opset, "input_name": ONNX_INPUT,
        "input_shape": ["batch", 3, size, size], "input_layout": "NCHW", "input_dtype": "float32",
        "input_normalised": True, "output_name": ONNX_OUTPUT, "num_labels": len(run.classes), **_label_maps(run),
        "backbone": info["backbone"]["origin"], "architecture": info["backbone"]["arch"],
        "head_hidden": info.get("head_hidden"), "producer": f"affinage {__version__}",
        **({"tasks": [{"task": t.task, "output_name": name, "num_labels": len(t),
                       "id2label": {str(i): c for i, c in enumerate(t.classes)}} for t, name in zip(tasks, outputs)]}
           if len(tasks) > 1 else {})})
    return report


def _TaskOutputs(model: Any, sizes: list[int]) -> Any:  # noqa: N802 - builds a module, named as the class it is
    """The run's model with one output per task (what ONNX export traces for a multi-task run)."""
    import torch

    class TaskOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(torch.split(self.model.forward_tasks(pixels), sizes, dim=1))

    return TaskOutputs()


def _write_timm(run: Run, folder: Path, pixels: torch.Tensor, reference: np.ndarray, opset: int,
                check_with: str = "timm") -> dict[str, Any]:
    """timm's Hub folder (config.json + model.safetensors), which transformers also loads (TimmWrapper)."""
    import timm

    info = _info(run)
    spec = info["backbone"]
    net = timm.create_model(spec["arch"], pretrained=False, num_classes=len(run.classes),
                            **(spec.get("timm_kwargs") or {}))
    classifier = net.pretrained_cfg.get("classifier") or "fc"
    state = {k: v for k, v in run.model.backbone.state_dict().items()}
    head = run.model.head.state_dict()
    state.update({f"{classifier}.weight": head["weight"], f"{classifier}.bias": head["bias"]})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AffinageError(f"cannot export this run as timm: timm's {spec['arch']} does not take the trained "
                            f"weights ({str(exc).splitlines()[0][:160]})", "use --format onnx") from exc
    pp = run.preprocessing
    data_config = {"input_size": (3, pp.input_size, pp.input_size), "mean": tuple(pp.mean), "std": tuple(pp.std),
                   "interpolation": pp.interpolation, "crop_pct": pp.crop_pct, "crop_mode": pp.crop_mode}
    timm.models.save_for_hf(net.eval(), str(folder), model_config={"label_names": list(run.classes)},
                            safe_serialization=True, data_config=data_config)
    config = read_json(folder / "config.json")
    config["pretrained_cfg"].pop("tag", None)  # names the source checkpoint, not these weights
    # transformers' TimmWrapper passes num_classes itself: a copy in model_args breaks AutoModel loading
    (config.get("model_args") or {}).pop("num_classes", None)
    config.update(_label_maps(run))
    write_json(folder / "config.json", config)
    if check_with == "timm":
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
        how = f"timm {timm.__version__} create_model('local-dir:...')"
    else:
        from transformers import AutoModelForImageClassification

        loaded = _LogitsOf(AutoModelForImageClassification.from_pretrained(str(folder)))
        how = "transformers AutoModelForImageClassification (TimmWrapper)"
    return _compare(reference, _torch_logits(loaded, pixels), how)


class _LogitsOf:
    """A transformers classifier called like a plain module: pixels -> logits."""

    def __init__(self, model: Any):
        self.model = model

    def cpu(self) -> _LogitsOf:
        self.model.cpu()
        return self

    def eval(self) -> _LogitsOf:
        self.model.eval()
        return self

    def __call__(self, pixels: Any) -> Any:
        return self.model(pixel_values=pixels).logits


def _write_hf(run: Run, folder: Path, pixels: torch.Tensor, reference: np.ndarray, opset: int) -> dict[str, Any]:
    info = _info(run)
    if info["backbone"]["source"] == "timm":
        return _write_timm(run, folder, pixels, reference, opset, check_with="transformers")
    from transformers import AutoConfig, AutoModelForImageClassification

    from .backbones import POOLING_KEY

    settings = {k: v for k, v in (info["backbone"]["hf_config"] or {}).items() if k != POOLING_KEY}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings, **_label_maps(run))
    config.label2id = {c: i for i, c in enumerate(run.classes)}
    config.id2label = dict(enumerate(run.classes))
    net = AutoModelForImageClassification.from_config(config)
    base = net.base_model
    missing, _ = base.load_state_dict(run.model.backbone.model.state_dict(), strict=False)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(f"{net.base_model_prefix}.")}
    head = run.model.head.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    weight = [k for k, s in shapes.items() if s == tuple(head["weight"].shape)]
    bias = [k for k, s in shapes.items() if s == tuple(head["bias"].shape)]
    if missing or len(own) != 2 or len(weight) != 1 or len(bias) != 1:
        raise AffinageError(f"cannot export this run as hf: {type(net).__name__} is built differently from the run's "
                            f"backbone + linear head ({len(missing)} backbone weights missing, classifier {shapes})",
                            "use --format onnx")
    net.load_state_dict({**net.state_dict(), weight[0]: head["weight"], bias[0]: head["bias"]}, strict=True)
    try:
        _compare(reference, _torch_logits(_LogitsOf(net), pixels), "")
    except AffinageError:
        raise AffinageError(f"cannot export this run as hf: {type(net).__name__} pools the backbone's features "
                            "differently from the run's model, so it would not reproduce its predictions",
                            "use --format onnx") from None
    net.save_pretrained(str(folder), safe_serialization=True)
    loaded = _LogitsOf(AutoModelForImageClassification.from_pretrained(str(folder)))
    import transformers

    return _compare(reference, _torch_logits(loaded, pixels),
                    f"transformers {transformers.__version__} AutoModelForImageClassification")


# ----------------------------------------------------------------------------------------------
# Preprocessing and model card
# ----------------------------------------------------------------------------------------------
def preprocessor_config(pp: Preprocessing) -> dict[str, Any]:
    """The run's preprocessing in transformers' image-processor vocabulary: resize (shortest edge, or both sides
    for `squash`), centre crop, rescale to [0, 1], normalise. `AutoImageProcessor` loads it."""
    stored = pp.stored_size
    if pp.crop_mode == "squash":
        size: dict[str, int] = {"height": stored, "width": stored}
        processor = "ViTImageProcessor" if stored == pp.input_size else "DeiTImageProcessor"
        crop = stored != pp.input_size
    else:
        size = {"shortest_edge": stored}
        processor, crop = "BitImageProcessor", True
    return {"image_processor_type": processor, "do_convert_rgb": True, "do_resize": True, "size": size,
            "resample": PIL_RESAMPLE.get(pp.interpolation, 3), "do_center_crop": crop,
            "crop_size": {"height": pp.input_size, "width": pp.input_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pp.mean), "image_std": list(pp.std),
            "crop_pct": pp.crop_pct, "crop_mode": pp.crop_mode, "interpolation": pp.interpolation}


HOW_TO_LOAD = {
    "onnx": '''```python
import json, numpy as np, onnxruntime as ort
from PIL import Image

pp = json.load(open("DIR/preprocessor_config.json"))
labels = json.load(open("DIR/config.json"))["id2label"]
session = ort.InferenceSession("DIR/model.onnx")

def pixels(path):
    img = Image.open(path).convert("RGB")
    side, crop = pp["size"].get("shortest_edge"), pp["crop_size"]["height"]
    if side:  # shortest edge to `side`, keeping the aspect ratio
        w, h = img.size
        img = img.resize((max(side, round(w * side / min(w, h))), max(side, round(h * side / min(w, h)))), pp["resample"])
    else:
        img = img.resize((pp["size"]["width"], pp["size"]["height"]), pp["resample"])
    left, top = (img.width - crop) // 2, (img.height - crop) // 2
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), np.float32) * pp["rescale_factor"]
    return ((x - pp["image_mean"]) / pp["image_std"]).transpose(2, 0, 1).astype(np.float32)

logits = session.run(["logits"], {"pixel_values": np.stack([pixels("photo.jpg")])})[0]
print(labels[str(int(logits[0].argmax()))])
```''',
    "hf": '''```python
from transformers import AutoImageProcessor, AutoModelForImageClassification
from PIL import Image

processor = AutoImageProcessor.from_pretrained("DIR")
model = AutoModelForImageClassification.from_pretrained("DIR").eval()
logits = model(**processor(Image.open("photo.jpg").convert("RGB"), return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax())])
```''',
    "timm": '''```python
import json, timm
from PIL import Image

model = timm.create_model("local-dir:DIR", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
logits = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0))
print(json.load(open("DIR/config.json"))["id2label"][str(int(logits.argmax()))])
```''',
}


def _old_task_lines(m: dict[str, Any]) -> list[str]:
    """A run that added classes to a classifier (--init-from): which classes are old, and the forgetting measured."""
    old = m.get("old_task")
    if not old:
        return []
    lines = ["", "## Old and new classes", "",
             f"The first {old['n_classes']} classes are those of `{old['source']}`, kept with `--keep {old['keep']}`; "
             "the others are new."]
    if old.get("measured"):
        lines.append(f"On the old data's test split (n={old['n']}) the starting model scored {old['accuracy_before']:.4f}"
                     f" and this one {old['accuracy_after']:.4f} (all classes competing): forgetting "
                     f"{old['forgetting']:+.4f}.")
    else:
        lines.append(f"Forgetting was not measured: {old['reason']}.")
    new = m.get("new_task") or {}
    if "accuracy" in new:
        lines.append(f"New classes' test images (n={new['n']}): accuracy {new['accuracy']:.4f}.")
    return lines


def _task_lines(run: Run, fmt: str, m: dict[str, Any]) -> list[str]:
    """A run with several tasks: each task's labels and test accuracy, and which of them this export holds."""
    tasks = run.tasks
    if len(tasks) == 1:
        return []
    figures = m.get("tasks") or {}
    holds = (f"every task: one ONNX output each (`{ONNX_OUTPUT}` for {tasks[0].task}, `{ONNX_OUTPUT}_<task>` for the "
             "others; config.json lists them)" if fmt == "onnx" else
             f"**the first task ({tasks[0].task}) only**: {fmt} has one classifier per model. `--format onnx` "
             "exports every task")
    lines = ["## Tasks", "", f"This model has one head per task on one backbone; this export holds {holds}.", ""]
    for t in tasks:
        acc = (figures.get(t.task) or {}).get("accuracy")
        lines.append(f"- {t.task} ({len(t)} classes{f', test accuracy {acc:.4f}' if acc is not None else ''}): "
                     + ", ".join(t.classes[:30]) + (" …" if len(t) > 30 else ""))
    return lines + [""]


def model_card(run: Run, fmt: str, report: dict[str, Any], folder: str = "DIR") -> str:
    """README.md: what the model is, the data and figures behind it, how to load it, and what it is not for."""
    m, info = run.metrics, _info(run)
    data, test, model = m.get("data") or {}, m.get("test") or {}, m.get("model") or {}
    backbone = model.get("backbone") or info["backbone"]["origin"]
    library = {"onnx": "onnx", "hf": "transformers", "timm": "timm"}[fmt]
    if fmt == "hf" and info["backbone"]["source"] == "timm":
        library = "timm"
    pp = run.preprocessing
    lines = ["---", f"library_name: {library}", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- affinage", f"- {run.strategy}", "---", "",
             f"# {run.path.name}: {len(run.classes)}-class image classifier", "",
             f"Fine-tuned with [affinage](https://pypi.org/project/affinage/) {__version__} from `{backbone}` "
             f"with the `{run.strategy}` strategy, exported as {fmt}.", "",
             "## Labels", "", ", ".join(f"{i}: {c}" for i, c in enumerate(run.classes)), ""]
    lines += _task_lines(run, fmt, m)
    lines += ["## Data", ""]
    if data:
        counts = data.get("counts") or {}
        lines += [f"- source: {data.get('source', '?')}", f"- split: {data.get('split', '?')}"]
        lines += [f"- {name}: {sum(c.values())} images" for name, c in counts.items()]
        lines += [f"- files skipped as unusable: {data.get('skipped', 0)}"]
    else:
        lines.append("Not recorded in this run.")
    lines += ["", f"## Metrics (held-out test split, n={test.get('n', '?')})", ""]
    if test:
        lines += ["| metric | value |", "|---|---|"]
        for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "top5_accuracy", "loss"):
            if isinstance(test.get(key), (int, float)):
                lines.append(f"| {key.replace('_', ' ')} | {test[key]:.4f} |")
        if isinstance((m.get("val") or {}).get("accuracy"), (int, float)):
            lines.append(f"| best val accuracy | {m['val']['accuracy']:.4f} |")
        per_class = test.get("per_class") or {}
        if per_class:
            worst = sorted(per_class.items(), key=lambda kv: kv[1].get("recall", 1.0))[:3]
            lines += ["", "Lowest per-class recall: " + ", ".join(f"{c} {v.get('recall', 0):.2f} "
                                                                  f"(n={v.get('support', '?')})" for c, v in worst)]
    else:
        lines.append("Not recorded in this run.")
    lines += _old_task_lines(m)
    lines += ["", "## Footprint", ""]
    footprint = {k: v for k, v in (m.get("footprint") or {}).items() if isinstance(v, (int, float, str))}
    facts = {"parameters": model.get("params"), "trained parameters": model.get("trainable_params"),
             "inference precision in the run": model.get("inference_precision"),
             "eval images/s in the run": (m.get("timing") or {}).get("eval_samples_per_second"),
             "device": (m.get("environment") or {}).get("device"), **footprint}
    lines += [f"- {k}: {v:,.4g}" if isinstance(v, float) else f"- {k}: {v:,}" if isinstance(v, int) else f"- {k}: {v}"
              for k, v in facts.items() if v is not None] or ["Not recorded in this run."]
    resize = (f"resize to {pp.stored_size}x{pp.stored_size}" if pp.crop_mode == "squash"
              else f"resize the shortest edge to {pp.stored_size}")
    lines += ["", "## Preprocessing", "",
              f"RGB; {resize} ({pp.interpolation}); centre-crop {pp.input_size}x{pp.input_size}; scale to [0, 1]; "
              f"normalise with mean {list(pp.mean)} and std {list(pp.std)}; channels first (NCHW, float32). "
              "`preprocessor_config.json` holds the same in transformers' vocabulary.", "",
              "## How to use", "", HOW_TO_LOAD[fmt].replace("DIR", folder), "",
              "## Export check", "",
              f"Reloaded with {report['checked_with']} and compared with the run's model on {report['inputs']} "
              f"inputs: {report['inputs_described']}. Max absolute logit difference {report['max_abs_diff']:.2e}, "
              f"same top-1 on {report['top1_agree']}/{report['inputs']}.", "",
              "## Intended use and limits", "",
              f"- Intended for sorting photos like the training data into these {len(run.classes)} classes.",
              "- It always answers with one of these labels, even for a photo of something else: there is no "
              "'none of these' class, and the probability is not a reliable out-of-distribution detector.",
              "- The test figures come from photos of the same source as the training data; photos from other "
              "cameras, places or populations can score lower. Measure on your own data before relying on it.",
              "- Small test sets give wide error bars: a class with 20 test photos moves 5 points per photo.",
              f"- The run computed in {model.get('inference_precision', 'fp32')}; this export computes in fp32, so "
              "the rare near-tie can come out differently.",
              "- Not for decisions about people (identity, health, eligibility) without its own evaluation.", ""]
    return "\n".join(lines)
