"""Data stage: sources -> labelled samples -> safe decoding (cached) -> splits -> torch datasets.

Every image, in training, prediction and serving, goes through `open_image` then `prepare_image`,
so the pixels a model is evaluated on are produced by one implementation.
"""
from __future__ import annotations

import codecs
import csv
import errno
import io
import os
import re
import stat
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AffinageError
from .storage import atomic_path, digest
from .store import FileHashes, ImageRows, ImageStore

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
# Formats decoded as photos. GIF is refused on purpose: in real folders it is nearly always a
# placeholder ("image not found") or an animation, not a photo of the class.
PHOTO_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"}
MAX_IMAGE_PIXELS = 64_000_000  # above this a file is treated as a decompression bomb and skipped
MAX_FILE_BYTES = 512 * 2**20  # larger files are not read into memory (no photo format needs that much)
# File names that are not UTF-8 (Linux allows any bytes) live in str as surrogate escapes (os.fsdecode).
# CSVs that list paths write and read them back as the raw bytes, so split lists round-trip exactly.
PATH_ERRORS = "surrogateescape"
MAX_STRIP = 64  # aspect ratio above which only the centre square of an image is resized (memory bound)


# ----------------------------------------------------------------------------------------------
# Samples and sources
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One labelled image. `key` is a file path, or `<source>/<index>` for in-memory sources."""

    key: str
    label: str  # the first task's label (the one splits are stratified on)
    split: str | None = None
    group: str | None = None
    more: tuple[str, ...] = ()  # the labels of the other tasks (LabelledImages.tasks[1:]); "" = unknown for that task


@dataclass
class LabelledImages:
    """What a data source yields: samples, plus how to read each one's encoded bytes."""

    samples: list[Sample]
    description: str
    read_bytes: Callable[[Sample], bytes]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) found while scanning
    keys_are_paths: bool = False  # sample keys are files: their hashes are memoised by (path, size, mtime)
    tasks: tuple[str, ...] = ()  # the label columns of a CSV read with several --task (the first one is `label`)

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for s in self.samples})


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, or UnreadableImage naming why not (missing, a folder, a link loop, a pipe, too big)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UnreadableImage(_os_reason(exc, path)) from None
    if stat.S_ISDIR(info.st_mode):
        raise UnreadableImage("a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImage("not a regular file (device, pipe or socket)")  # reading a pipe could block forever
    if info.st_size > MAX_FILE_BYTES:
        raise UnreadableImage(f"file too large ({info.st_size / 2**20:,.0f} MiB; over {MAX_FILE_BYTES // 2**20} MiB)")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UnreadableImage(_os_reason(exc, path)) from None


def _os_reason(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    if exc.errno == errno.ELOOP:
        return "cannot be read: symbolic link loop"
    if exc.errno == errno.ENOENT and path is not None and os.path.islink(path):
        return "cannot be read: broken symbolic link (its target does not exist)"
    return f"cannot be read: {exc.strerror or exc}"


def _read_file(sample: Sample) -> bytes:
    return read_image_file(sample.key)


def _escape_unencodable(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a byte of a non-UTF-8 file name (surrogate escape) -> \\xNN; any other -> \\uNNNN."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}" for c in bad), exc.end


PRINTABLE_ERRORS = "affinage.escape"  # for streams: sys.stdout.reconfigure(errors=PRINTABLE_ERRORS)
codecs.register_error(PRINTABLE_ERRORS, _escape_unencodable)


def printable(text: str) -> str:
    """`text` safe to print on any terminal: bytes of non-UTF-8 file names are shown as \\xNN."""
    return text.encode("utf-8", PRINTABLE_ERRORS).decode("utf-8")


def html_text(text: Any) -> str:
    """HTML-escaped text for the UTF-8 pages (report, gallery, audit); non-UTF-8 file names shown as \\xNN."""
    import html

    return html.escape(printable(str(text)), quote=True)


def jpeg_data_uri(image: "Image.Image", quality: int = 80) -> str:  # noqa: F821
    """A data: URI of `image` as a JPEG: thumbnails inside self-contained HTML pages."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_source(spec: str, group_by: str | None = None, tasks: Sequence[str] = (), image_column: str | None = None,
                label_column: str | None = None) -> LabelledImages:
    """Resolve a data spec: a class-folder tree, a train/val[/test] tree, a CSV, `hf:<id>[:config]` or `digits`.
    `tasks`: the CSV's label columns to read (default its `label` column); the first one is each sample's label.
    `image_column` / `label_column`: an hf: dataset's columns (default: its one Image and one ClassLabel feature)."""
    if (image_column or label_column) and not spec.startswith("hf:"):
        raise AffinageError(f"--{'image' if image_column else 'label'}-column applies to hf: datasets, not '{spec}'",
                            "drop it (a CSV's columns are path,label[,split][,group]; --task names other label columns)")
    if tasks and list(tasks) != ["label"] and (spec == "digits" or spec.startswith("hf:") or
                                               not Path(spec).expanduser().is_file()):
        raise AffinageError(f"--task {' --task '.join(tasks)} needs a CSV with those columns; '{spec}' is not a CSV",
                            "write a CSV with columns path,<task 1>,<task 2>,... and pass it as --data")
    if spec == "digits":
        images = _load_digits()
    elif spec.startswith("hf:"):
        images = _load_hf_dataset(spec[3:], image_column, label_column)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise AffinageError(f"data path '{spec}' does not exist",
                                "pass a folder of class subfolders, a train/val folder, a CSV, hf:<dataset id> or digits")
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise AffinageError(f"data file '{spec}' is not a CSV",
                                    "pass a CSV with columns path,label[,split][,group] or a folder of class subfolders")
            images = _load_csv(path, tuple(tasks) or ("label",))
        else:
            images = _load_folder(path)
    if group_by:
        pattern = re.compile(group_by)
        regrouped = []
        for s in images.samples:
            m = pattern.search(s.key)
            regrouped.append(replace(s, group=(m.group(1) if m.groups() else m.group(0)) if m else "other"))
        images.samples = regrouped
    _check_classes(images, spec)
    return images


def _check_classes(images: LabelledImages, spec: str) -> None:
    if not images.samples:
        raise AffinageError(f"no images found in '{spec}'", "check the path; expected DIR/<class>/<image files>")
    if len(images.classes) < 2:
        raise AffinageError(f"'{spec}' has a single class ({images.classes[0]}); a classifier needs at least two",
                            "add a folder (or CSV rows) for at least one more class")


def check_usable(samples: Sequence[Sample], spec: str, skipped_list: str | os.PathLike[str]) -> None:
    """After decoding: refuse data where fewer than two classes kept a readable image."""
    classes = sorted({s.label for s in samples})
    if not classes:
        raise AffinageError(f"none of the images in '{spec}' could be read", f"see {skipped_list} for the reasons")
    if len(classes) < 2:
        raise AffinageError(f"only one class ({classes[0]}) of '{spec}' has readable images; a classifier needs at least two",
                            f"replace the unreadable files listed in {skipped_list}")


def list_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """All regular files below `folder`, sorted, symbolic links followed but each folder listed once (link loops
    are cut); and what cannot be used, with the reason."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def unlistable(exc: OSError) -> None:
        skipped.append((str(exc.filename or folder), f"folder cannot be listed: {exc.strerror or exc}"))

    try:
        info = os.stat(folder)
    except OSError as exc:
        return [], [(str(folder), _os_reason(exc, folder))]
    seen = {(info.st_dev, info.st_ino)}
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=unlistable):
        kept = []
        for name in sorted(dirs):
            p = os.path.join(root, name)
            try:
                info = os.stat(p)
            except OSError as exc:
                skipped.append((p, _os_reason(exc, p)))
                continue
            if (info.st_dev, info.st_ino) in seen:
                skipped.append((p, "symbolic link to a folder already listed (a loop or a duplicate): not followed"))
                continue
            seen.add((info.st_dev, info.st_ino))
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            p = Path(root) / name
            problem = _file_problem(p)
            if problem is None:
                files.append(p)
            else:
                skipped.append((str(p), problem))
    return files, skipped


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be an image file, or None for a regular file (following symbolic links)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _os_reason(exc, path)
    return None if stat.S_ISREG(mode) else "not a regular file (device, pipe or socket)"


def _class_folders(root: Path) -> tuple[list[Sample], list[tuple[str, str]]]:
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files, bad = list_files(entry)
            skipped += bad
            if not files:
                skipped.append((str(entry), "empty class folder: the class is left out"))
            samples += [Sample(str(f), entry.name) for f in files]
        else:
            skipped.append((str(entry), _file_problem(entry) or "not inside a class folder"))
    return samples, skipped


def _load_folder(root: Path) -> LabelledImages:
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {SPLIT_ALIASES[name]: p for name, p in subdirs.items() if name in SPLIT_ALIASES}
    if "train" in split_dirs:
        samples, skipped = [], []
        for split, folder in sorted(split_dirs.items()):
            found, bad = _class_folders(folder)
            samples += [Sample(s.key, s.label, split) for s in found]
            skipped += bad
        for name, p in subdirs.items():
            if name not in SPLIT_ALIASES:
                skipped.append((str(p), "folder beside train/val is not a split: ignored"))
        description = f"folder with splits {', '.join(sorted(split_dirs))}: {root}"
    else:
        samples, skipped = _class_folders(root)
        description = f"class folders: {root}"
    return LabelledImages(samples, description, _read_file, skipped, keys_are_paths=True)


def _load_csv(path: Path, tasks: tuple[str, ...] = ("label",)) -> LabelledImages:
    base = path.parent
    try:
        return _read_csv_rows(path, base, tasks)
    except csv.Error as exc:
        raise AffinageError(f"CSV '{path}' cannot be parsed: {exc}",
                            "save it as plain CSV text with a header line path,label[,split][,group]") from None


def _read_csv_rows(path: Path, base: Path, tasks: tuple[str, ...] = ("label",)) -> LabelledImages:
    """The rows of a CSV: path, the task columns (an empty cell of a task other than the first is "unknown for
    that task"), split and group when present."""
    several = tasks != ("label",)
    with open(path, newline="", encoding="utf-8-sig", errors=PATH_ERRORS) as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        by_lower = {c.lower(): c for c in header}
        wanted = [by_lower.get(t.lower()) for t in tasks]
        if "path" not in by_lower or None in wanted:
            missing = ["path"] * ("path" not in by_lower) + [t for t, w in zip(tasks, wanted) if w is None]
            raise AffinageError(f"CSV '{path}' has columns {str(header)[:200]}, it needs {' and '.join(missing)}",
                                "write a header line path,label[,split][,group]" if not several else
                                f"name label columns of this CSV with --task (it has: {', '.join(header)[:200]})")
        columns = [w for w in wanted if w is not None]
        samples = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            lower = {k.lower(): v for k, v in row.items()}
            file = Path(lower["path"]).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise AffinageError(f"CSV '{path}' line {line} names a missing file '{lower['path']}' (looked at {file})",
                                    "fix the path (absolute, or relative to the CSV's folder) or remove the row")
            label = row.get(columns[0], "")
            if not label:
                raise AffinageError(f"CSV '{path}' line {line} has an empty "
                                    + ("label" if not several else f"{columns[0]!r} cell (the first --task)"),
                                    "give every row a label" if not several else
                                    "the first --task is the one the splits are stratified on and must be given on every "
                                    "row: put a task without empty cells first (empty cells of the others mean unknown)")
            split = lower.get("split") or None
            if split is not None:
                if split.lower() not in SPLIT_ALIASES:
                    raise AffinageError(f"CSV '{path}' line {line} has split '{split}'", "use train, val or test")
                split = SPLIT_ALIASES[split.lower()]
            samples.append(Sample(str(file), label, split, lower.get("group") or None,
                                  tuple(row.get(c, "") for c in columns[1:])))
    return LabelledImages(samples, f"CSV: {path}", _read_file, keys_are_paths=True,
                          tasks=tuple(columns) if several else ())


def _encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _load_digits() -> LabelledImages:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside scikit-learn): the offline default."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    encoded = [_encode_png(img) for img in pixels]
    samples = [Sample(f"digits/{i}", str(int(t))) for i, t in enumerate(digits.target)]
    return LabelledImages(samples, "scikit-learn digits (8x8 handwritten, 10 classes)",
                          lambda s: encoded[int(s.key.split("/")[1])])


def _hf_columns(features: dict[str, Any], name: str, image_column: str | None,
                label_column: str | None) -> tuple[str, str, list[str] | None]:
    """The image and label columns of an hf: dataset (given, or its one Image / ClassLabel feature) and the class
    names (None: a plain label column, whose values are the names)."""
    import datasets

    def pick(given: str | None, kind: type, option: str, what: str) -> str:
        if given is not None:
            if given not in features:
                raise AffinageError(f"dataset '{name}' has no column '{given}' (--{option}); its columns: "
                                    f"{', '.join(features)}", f"pass --{option} with one of them")
            return given
        found = [k for k, f in features.items() if isinstance(f, kind)]
        if len(found) != 1:
            described = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
            raise AffinageError(f"dataset '{name}' has {'no' if not found else 'several'} {what} column(s) "
                                f"({described})", f"name it: --{option} COLUMN")
        return found[0]

    image_col = pick(image_column, datasets.Image, "image-column", "Image")
    label_col = pick(label_column, datasets.ClassLabel, "label-column", "ClassLabel")
    feature = features[label_col]
    return image_col, label_col, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _load_hf_dataset(spec: str, image_column: str | None = None, label_column: str | None = None) -> LabelledImages:
    """`<id>[:config]` from the Hub, or a local folder written by `datasets.save_to_disk`."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise AffinageError("hf: data needs the 'datasets' package", "pip install datasets") from exc
    local = Path(spec).expanduser()
    if local.exists():
        loaded = datasets.load_from_disk(str(local))
        name = str(local)
    else:
        dataset_id, _, config = spec.partition(":")
        try:
            loaded = datasets.load_dataset(dataset_id, config or None)
        except Exception as exc:
            raise AffinageError(f"cannot load Hugging Face dataset '{spec}': {str(exc).splitlines()[0][:200]}",
                                "check the dataset id and your network, or save it locally with save_to_disk") from exc
        name = spec
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    first = next(iter(splits.values()))
    image_col, label_col, names = _hf_columns(dict(first.features), name, image_column, label_column)
    unknown = [n for n in splits if n.lower() not in SPLIT_ALIASES]
    if len(unknown) == len(splits):
        raise AffinageError(f"dataset '{name}' has split(s) {unknown}, none of them train, val or test",
                            f"save it with a split named train (known names: {', '.join(SPLIT_ALIASES)})")
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    raw: dict[str, Any] = {}
    for split_name, ds in splits.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is None:  # e.g. SVHN's 'extra': listed, like a folder beside train/val
            skipped.append((f"hf/{split_name}", f"split '{split_name}' ({len(ds):,} images) is not train, val or test: "
                                                f"left out (known names: {', '.join(SPLIT_ALIASES)})"))
            continue
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        raw[split_name] = ds
        unlabelled = 0
        for i, label in enumerate(ds[label_col]):
            if label is None or (names is not None and label < 0) or str(label) == "":  # ClassLabel -1: no label
                unlabelled += 1
            else:
                samples.append(Sample(f"hf/{split_name}/{i}", names[label] if names is not None else str(label), split))
        if unlabelled:
            skipped.append((f"hf/{split_name}", f"{unlabelled:,} image(s) of split '{split_name}' have no label (-1): "
                                                "left out"))

    def read(sample: Sample) -> bytes:
        _, split_name, index = sample.key.split("/")
        image = raw[split_name][int(index)][image_col]
        if image.get("bytes"):
            return image["bytes"]
        with open(image["path"], "rb") as fh:
            return fh.read()

    return LabelledImages(samples, f"Hugging Face dataset: {name}", read, skipped)


# ----------------------------------------------------------------------------------------------
# Safe decoding and preprocessing
# ----------------------------------------------------------------------------------------------
# timm's DEFAULT_CROP_PCT: eval resizes to input_size / 0.875 and centre-crops input_size. The one default, for
# the class and `from_dict` alike (every model.json affinage wrote stores crop_pct; this fills only hand-made ones).
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """How the pretrained model saw images (read from the checkpoint, never guessed)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"  # center: resize short side, centre crop; squash: resize both sides

    @property
    def stored_size(self) -> int:
        """Side of the square uint8 image kept in the decoded cache (eval crops `input_size` out of it)."""
        return max(self.input_size, int(self.input_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),  # type: ignore[arg-type]
                   d.get("interpolation", defaults["interpolation"]), float(d.get("crop_pct", defaults["crop_pct"])),
                   d.get("crop_mode", defaults["crop_mode"]))


class UnreadableImage(Exception):
    """A file that cannot be used as a photo; the message is the reason listed in the run."""


# Image.open only parses the header; it is serialised so that silencing Pillow's bomb warning (a process-wide
# filter) cannot race between decoding threads. The size is checked here instead, before any pixel is decoded.
_OPEN_LOCK = threading.Lock()


def open_image(data: bytes, draft_size: int | None = None) -> "Image.Image":  # noqa: F821
    """Decode bytes into an upright RGB PIL image, or raise UnreadableImage with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    too_large = f"image too large (over {MAX_IMAGE_PIXELS:,} pixels: possible decompression bomb)"
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format not in PHOTO_FORMATS:
            hint = "; GIF is not used (usually a placeholder or animation): convert it to PNG to include it" \
                if img.format == "GIF" else ""
            raise UnreadableImage(f"unsupported image format {img.format}{hint}")
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise UnreadableImage(f"{too_large}: declared {width:,}x{height:,}")
        if width < 1 or height < 1:
            raise UnreadableImage(f"image has no pixels ({width}x{height})")
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # DCT-domain downscale: decoding large JPEGs 2-8x faster
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised file content)") from None
    except Image.DecompressionBombError:
        raise UnreadableImage(too_large) from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        lowered = msg.lower()
        reason = "truncated or corrupt image data" if "truncated" in lowered or "broken" in lowered else f"cannot decode: {msg}"
        raise UnreadableImage(reason) from None
    except Exception as exc:  # malformed files can make any decoder raise (struct.error, IndexError, MemoryError, ...)
        raise UnreadableImage(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _to_rgb(img: "Image.Image") -> "Image.Image":  # noqa: F821
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def _pil_interpolation(name: str) -> int:
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}.get(name, Image.Resampling.BICUBIC)


def prepare_image(img: "Image.Image", pp: Preprocessing) -> np.ndarray:  # noqa: F821
    """RGB PIL image -> uint8 CHW array of side `pp.stored_size` (short side resized, centre-cropped square)."""
    side = pp.stored_size
    resample = _pil_interpolation(pp.interpolation)
    w, h = img.size
    if pp.crop_mode == "squash":
        img = img.resize((side, side), resample)
    else:
        scale = side / min(w, h)
        nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
        if max(nw, nh) > MAX_STRIP * side:  # a thin strip (e.g. 1x50000): resizing it whole could take gigabytes,
            cw, ch = min(w, h), min(w, h)  # so only its centre square is resized
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
            img = img.resize((side, side), resample, box=box)
        else:
            img = img.resize((nw, nh), resample)
            left, top = (nw - side) // 2, (nh - side) // 2
            img = img.crop((left, top, left + side, top + side))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_pixels(data: bytes, pp: Preprocessing) -> np.ndarray:
    """Encoded bytes -> the stored uint8 CHW array; raises UnreadableImage."""
    return prepare_image(open_image(data, draft_size=pp.stored_size), pp)


@dataclass
class DecodedImages:
    """Usable samples with their decoded pixels: views of rows of the image store (store.py), never a copy."""

    samples: list[Sample]
    hashes: list[str]
    pixels: ImageRows  # (N, 3, S, S) uint8, aligned with samples; pixels[i] is a read-only memory-mapped view
    skipped: list[tuple[str, str]]
    cache_hit: bool  # nothing had to be decoded: every image was in the store (or known not to decode)
    decoded_count: int = 0  # images this call decoded (content the store had never seen; failures included)
    hashed_count: int = 0  # files read to hash them (the others' size and mtime were unchanged: memoised hash)
    hash_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_read: int = 0  # bytes of image files read by this call (to hash them, and to decode new content)


MIN_SPLITTABLE = 3  # images a class needs when its val and test images are carved from it (one each, one to train)


def small_classes(samples: Sequence[Sample], minimum: int) -> list[tuple[str, int]]:
    """(class, usable images) of every class with fewer than `minimum`, smallest first."""
    counts = Counter(s.label for s in samples)
    return sorted(((c, n) for c, n in counts.items() if n < minimum), key=lambda cn: (cn[1], cn[0]))


def refuse_small_classes(samples: Sequence[Sample], given_splits: bool, usable: bool = True) -> None:
    """Without --min-per-class: refuse data whose classes are too small to carve val and test from, naming them."""
    too_small = [] if given_splits else small_classes(samples, MIN_SPLITTABLE)
    if too_small:
        shown = ", ".join(f"'{c}' ({n})" for c, n in too_small[:10]) + (" …" if len(too_small) > 10 else "")
        raise AffinageError(f"{len(too_small)} class(es) have fewer than {MIN_SPLITTABLE} {'usable ' if usable else ''}"
                            f"images, too few to split into train/val/test: {shown}",
                            f"add images to them, or pass --min-per-class {MIN_SPLITTABLE} to leave them out "
                            "(they are listed in skipped_files.csv)")


def drop_small_classes(decoded: DecodedImages, minimum: int | None,
                       given_splits: bool) -> tuple[DecodedImages, list[tuple[str, int]]]:
    """`--min-per-class N`: the classes under N usable images leave the data, each of their files listed as skipped
    with the reason. Without it, data whose classes are too small to split are refused, naming those classes."""
    if minimum is None:
        refuse_small_classes(decoded.samples, given_splits)
        return decoded, []
    dropped = small_classes(decoded.samples, minimum)
    if not dropped:
        return decoded, []
    counts = dict(dropped)
    keep = [i for i, s in enumerate(decoded.samples) if s.label not in counts]
    reasons = [(s.key, f"class '{s.label}' has {counts[s.label]} usable image(s), fewer than --min-per-class {minimum}")
               for s in decoded.samples if s.label in counts]
    return replace(decoded, samples=[decoded.samples[i] for i in keep], hashes=[decoded.hashes[i] for i in keep],
                   pixels=decoded.pixels.subset(keep), skipped=decoded.skipped + reasons), dropped


def read_exclusions(path: str | os.PathLike[str]) -> dict[str, str]:
    """The paths and content hashes listed in an --exclude FILE (a CSV with a `path` and/or `sha` column: an audit's
    label_issues.csv, image_issues.csv or duplicates.csv, edited; or a text file of one path or hash a line), as
    {form: entry}, each entry also under its absolute form (relative paths: from FILE's folder and as given)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig", errors=PATH_ERRORS)
    except OSError as exc:
        raise AffinageError(f"--exclude file '{path}' cannot be read: {exc.strerror or exc}",
                            "pass a CSV with a path or sha column, or a text file of one path or content hash a line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    header = [c.strip().lower() for c in next(csv.reader(lines[:1]), [])] if lines else []
    if "path" in header or "sha" in header:
        entries = [(v or "").strip() for row in csv.DictReader(lines) for c, v in row.items()
                   if c and c.strip().lower() in ("path", "sha")]
    else:
        entries = lines
    forms: dict[str, str] = {}
    for entry in filter(None, entries):
        for form in (entry, os.path.abspath(entry), os.path.abspath(file.parent / entry)):
            forms.setdefault(form, entry)
    return forms


def exclude_listed(decoded: DecodedImages, path: str | None) -> tuple[DecodedImages, int]:
    """`--exclude FILE`: the samples whose path or content hash FILE lists leave the data, each listed as skipped with
    the reason 'excluded by FILE'; and how many of FILE's entries matched no sample."""
    if path is None:
        return decoded, 0
    forms = read_exclusions(path)
    gone, matched = [], set()
    for i, (s, h) in enumerate(zip(decoded.samples, decoded.hashes)):
        hit = forms.get(s.key) or forms.get(os.path.abspath(s.key)) or forms.get(h)
        if hit is not None:
            gone.append(i)
            matched.add(hit)
    unmatched = len(set(forms.values()) - matched)
    if not gone:
        return decoded, unmatched
    drop = set(gone)
    keep = [i for i in range(len(decoded.samples)) if i not in drop]
    reasons = [(decoded.samples[i].key, f"excluded by {path}") for i in gone]
    return replace(decoded, samples=[decoded.samples[i] for i in keep], hashes=[decoded.hashes[i] for i in keep],
                   pixels=decoded.pixels.subset(keep), skipped=decoded.skipped + reasons), unmatched


def decode_all(images: LabelledImages, pp: Preprocessing, workers: int | None = None,
               progress: bool = True) -> DecodedImages:
    """Hash every file (a file whose size and mtime are unchanged is not read), decode into the image store only
    the contents it has never seen, and list the unusable files with their reasons."""
    workers = workers or min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    images, bytes_read = _counting_reads(images)
    results, hashed_count = _content_hashes(images, workers)
    skipped = list(images.skipped)
    hashes: list[str | None] = []
    for sample, result in zip(images.samples, results):
        if isinstance(result, UnreadableImage):
            skipped.append((sample.key, str(result)))
        hashes.append(result if isinstance(result, str) else None)
    t1 = time.perf_counter()
    store = ImageStore.for_decoding(pp.stored_size, pp.interpolation, pp.crop_mode)
    try:
        decoder = _decoder_version()
        slots, failed = store.lookup([h for h in hashes if h is not None], decoder)
        todo: dict[str, int] = {}  # hash -> its first sample: duplicate files are decoded once and share a row
        for i, h in enumerate(hashes):
            if h is not None and h not in slots and h not in failed:
                todo.setdefault(h, i)
        transient: dict[str, str] = {}
        decoded_count = 0
        if todo:
            decoded_count, transient = _decode_into(store, images, pp, todo, decoder, workers, progress)
            added, refused = store.lookup(list(todo), decoder)
            slots.update(added)
            failed.update(refused)
    finally:
        store.close()
    keep: list[int] = []
    for i, h in enumerate(hashes):
        if h is None:
            continue
        if h in slots:
            keep.append(i)
        else:
            skipped.append((images.samples[i].key, failed.get(h) or transient.get(h) or "cannot be decoded"))
    pixels = ImageRows(store.folder, store.side, [slots[hashes[i]] for i in keep])  # type: ignore[index]
    return DecodedImages([images.samples[i] for i in keep], [hashes[i] for i in keep], pixels,  # type: ignore[misc]
                         skipped, cache_hit=not todo, decoded_count=decoded_count, hashed_count=hashed_count,
                         hash_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1, bytes_read=bytes_read[0])


def _counting_reads(images: LabelledImages) -> tuple[LabelledImages, list[int]]:
    """`images` whose reads add their size to the returned counter (reads run in threads: under a lock)."""
    total, lock, read = [0], threading.Lock(), images.read_bytes

    def counted(sample: Sample) -> bytes:
        data = read(sample)
        with lock:
            total[0] += len(data)
        return data

    return replace(images, read_bytes=counted), total


def _decoder_version() -> str:
    """What a decode failure depends on besides the bytes: a file Pillow cannot read is tried again after an upgrade."""
    from PIL import __version__

    return f"pillow-{__version__}"


def _decode_into(store: ImageStore, images: LabelledImages, pp: Preprocessing, todo: dict[str, int], decoder: str,
                 workers: int, progress: bool) -> tuple[int, dict[str, str]]:
    """Decode the contents `todo` (hash -> sample index) into the store, under its lock. Returns how many it
    decoded (or tried to), and the reasons of files that could not be read now (not remembered: the next run tries again);
    content that cannot be decoded is remembered in the store."""
    transient: dict[str, str] = {}
    with store.appending() as writer:
        missing = writer.missing(todo, decoder)  # another run may have decoded some while this one waited

        def work(sha: str) -> None:
            sample = images.samples[todo[sha]]
            try:
                data = images.read_bytes(sample)
            except UnreadableImage as exc:
                transient[sha] = str(exc)
                return
            except OSError as exc:
                transient[sha] = _os_reason(exc)
                return
            if digest(data) != sha:  # rewritten since it was hashed: these pixels would be filed under another hash
                transient[sha] = "the file changed while it was being read: run again"
                return
            try:
                pixels = load_pixels(data, pp)
            except UnreadableImage as exc:
                if "MemoryError" in str(exc):
                    transient[sha] = str(exc)
                else:
                    writer.fail(sha, str(exc), decoder)
                return
            writer.put(sha, pixels)

        with ThreadPoolExecutor(workers) as pool:
            for _ in _progress(pool.map(work, missing), len(missing), "decoding images", progress):
                pass
    return writer.written + writer.refused, transient


def _content_hashes(images: LabelledImages, workers: int) -> tuple[list[str | UnreadableImage], int]:
    """The content hash of every sample (or why its file cannot be read), and how many files were read for it.
    Files hashed before with the same size and mtime are not read again."""
    samples = images.samples
    memo = FileHashes() if images.keys_are_paths else None
    keys: list[tuple[bytes, int, int] | None] = [None] * len(samples)
    results: list[str | UnreadableImage | None] = [None] * len(samples)
    if memo is not None:
        for i, sample in enumerate(samples):
            try:
                info = os.stat(sample.key)
            except OSError:
                continue  # read below, which names the reason
            if stat.S_ISREG(info.st_mode):
                keys[i] = (os.fsencode(os.path.abspath(sample.key)), info.st_size, info.st_mtime_ns)
        present = [i for i, k in enumerate(keys) if k is not None]
        for i, sha in zip(present, memo.known([keys[i] for i in present])):  # type: ignore[misc]
            results[i] = sha
    todo = [i for i, r in enumerate(results) if r is None]
    with ThreadPoolExecutor(workers) as pool:
        for i, result in zip(todo, pool.map(lambda i: _hash_sample(images, samples[i]), todo)):
            results[i] = result
    if memo is not None:
        try:
            memo.remember([(*keys[i], results[i]) for i in todo  # type: ignore[misc]
                           if keys[i] is not None and isinstance(results[i], str)])
        finally:
            memo.close()
    return results, len(todo)  # type: ignore[return-value]


def _hash_sample(images: LabelledImages, sample: Sample) -> str | UnreadableImage:
    try:
        return digest(images.read_bytes(sample))
    except UnreadableImage as exc:
        return exc
    except OSError as exc:
        return UnreadableImage(_os_reason(exc))


def _progress(it: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", leave=False, mininterval=1.0)


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """Indices into DecodedImages.samples for each split, plus how they were made."""

    train: list[int]
    val: list[int]
    test: list[int]
    how: str

    def items(self) -> list[tuple[str, list[int]]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def make_splits(samples: Sequence[Sample], seed: int, val_fraction: float = 0.15,
                test_fraction: float = 0.15) -> Splits:
    """Use the given splits; carve what is missing from train, stratified and seeded."""
    given = {s.split for s in samples}
    if given == {None}:
        pool = list(range(len(samples)))
        train, test = _stratified_carve(samples, pool, test_fraction, seed, "test")
        train, val = _stratified_carve(samples, train, val_fraction / (1 - test_fraction), seed + 1, "val")
        return Splits(train, val, test, f"stratified {1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/"
                                         f"{test_fraction:.0%} split, seed {seed}")
    if None in given:
        missing = next(s.key for s in samples if s.split is None)
        raise AffinageError(f"some samples have a split and others not (e.g. '{missing}')",
                            "give every row a split, or none at all")
    by_split = {name: [i for i, s in enumerate(samples) if s.split == name] for name in SPLITS}
    if not by_split["train"]:
        raise AffinageError("the data has splits but no train split", "name one split 'train'")
    how = "given splits"
    if not by_split["test"]:
        if by_split["val"]:
            by_split["test"], by_split["val"] = by_split["val"], []
            how += "; the val split is used as test"
        else:
            by_split["train"], by_split["test"] = _stratified_carve(samples, by_split["train"], test_fraction, seed, "test")
            how += f"; test carved from train ({test_fraction:.0%}, seed {seed})"
    if not by_split["val"]:
        by_split["train"], by_split["val"] = _stratified_carve(samples, by_split["train"], val_fraction, seed + 1, "val")
        how += f"; val carved from train ({val_fraction:.0%}, seed {seed})"
    return Splits(by_split["train"], by_split["val"], by_split["test"], how)


def _stratified_carve(samples: Sequence[Sample], pool: list[int], fraction: float, seed: int,
                      name: str) -> tuple[list[int], list[int]]:
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in sorted(pool, key=lambda i: samples[i].key):
        by_class[samples[i].label].append(i)
    rng = np.random.default_rng(seed)
    keep, carved = [], []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < 2:
            raise AffinageError(f"class '{label}' has {len(members)} usable image(s), too few to split off a {name} set",
                                "add images to that class (at least 3 per class without given splits), or remove it")
        order = rng.permutation(len(members))
        n = min(len(members) - 1, max(1, round(len(members) * fraction)))
        carved += [members[k] for k in order[:n]]
        keep += [members[k] for k in order[n:]]
    return sorted(keep), sorted(carved)


LIST_COLUMNS = ["path", "label", "group", "sha"]
EXCLUDED_LIST = "excluded"  # excluded.csv: usable images this run put in no split (e.g. --drop-leaks), with why


def write_split_lists(folder: Path, samples: Sequence[Sample], hashes: Sequence[str], splits: Splits,
                      reasons: Mapping[int, str] | None = None) -> None:
    """One CSV per split: path,label,group,sha (content hash) -- the exact lists a rerun reuses; and excluded.csv,
    every sample in no split with the reason (`reasons`, by sample index), so a rerun knows them too."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = {i for _, idx in splits.items() for i in idx}
    excluded = [i for i in range(len(samples)) if i not in listed]
    lists = [*splits.items(), (EXCLUDED_LIST, excluded)]
    for name, idx in lists:
        with atomic_path(folder / f"{name}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                            errors=PATH_ERRORS) as fh:
            w = csv.writer(fh)
            w.writerow(LIST_COLUMNS + (["reason"] if name == EXCLUDED_LIST else []))
            for i in idx:
                row = [samples[i].key, samples[i].label, samples[i].group or "", hashes[i]]
                w.writerow(row + ([(reasons or {}).get(i, "in no split")] if name == EXCLUDED_LIST else []))


def _read_list(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        rows = list(csv.DictReader(fh))
    if rows and "path" not in rows[0]:
        raise AffinageError(f"split list '{path}' has no path column", "point --splits-from at an affinage run directory")
    return rows


def read_split_lists(folder: Path, samples: Sequence[Sample], hashes: Sequence[str] | None = None,
                     complete: bool = True) -> Splits:
    """Re-apply split lists saved by an earlier run. Rows are matched by content hash when `hashes` is given (a moved
    or renamed file is the same image), else by path (also for old lists without a sha). Refused, in one line each:
    a listed image the data lacks, a class the lists lack, and (with `complete`) an image in no list."""
    lists = {}
    for name in SPLITS:
        path = folder / f"{name}.csv"
        if not path.exists():
            raise AffinageError(f"split list '{path}' is missing", "point --splits-from at a complete affinage run directory")
        lists[name] = _read_list(path)
    excluded_path = folder / f"{EXCLUDED_LIST}.csv"
    lists[EXCLUDED_LIST] = _read_list(excluded_path) if excluded_path.exists() else []  # older runs have none
    matched, missing = _match_list_rows(lists, samples, hashes)
    taken = {i for idx in matched.values() for i in idx}
    unlisted = [i for i in range(len(samples)) if i not in taken]
    listed_classes = {row.get("label", "") for rows in lists.values() for row in rows}
    considered = range(len(samples)) if complete else taken
    new_classes = sorted({samples[i].label for i in considered} - listed_classes)
    if new_classes:
        count = sum(samples[i].label in new_classes for i in considered)
        raise AffinageError(f"the data has {len(new_classes)} class(es) that the split lists in '{folder}' do not have: "
                            f"{', '.join(new_classes[:5])}{' ...' if len(new_classes) > 5 else ''} ({count} image(s))",
                            "drop --splits-from to make new splits with every class, or remove those classes from the data")
    if missing:
        name, row = missing[0]
        changed = " (a file at that path has other content now)" if any(s.key == row["path"] for s in samples) else ""
        raise AffinageError(f"the split lists in '{folder}' name {len(missing)} image(s) that are not in the data, "
                            f"e.g. '{row['path']}' ({name}){changed}",
                            "use the data the run was made with, or drop --splits-from to make new splits")
    if complete and unlisted:
        raise AffinageError(f"the data has {len(unlisted)} image(s) that are in none of the split lists in '{folder}' "
                            f"(added since that run?), e.g. '{samples[unlisted[0]].key}'",
                            "drop --splits-from to make new splits that include them, or remove them from the data "
                            "to reuse the lists exactly")
    how = f"split lists from {folder}"
    relabelled = sum(samples[i].label != row.get("label") for name in SPLITS
                     for i, row in zip(matched[name], lists[name]))
    if relabelled:
        how += f"; {relabelled} image(s) relabelled since (the data's labels are used)"
    return Splits(matched["train"], matched["val"], matched["test"], how)


def _match_list_rows(lists: dict[str, list[dict[str, str]]], samples: Sequence[Sample], hashes: Sequence[str] | None
                     ) -> tuple[dict[str, list[int]], list[tuple[str, dict[str, str]]]]:
    """Sample index of every list row (same content and path first, then same content elsewhere: a moved file; rows
    without a sha, or no `hashes`: same path), and the rows that match no sample. Each sample matches one row."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_path[s.key].append(i)
        if hashes is not None:
            by_sha[hashes[i]].append(i)
    taken: set[int] = set()
    found: dict[tuple[str, int], int] = {}
    rows = [(name, k, row) for name, rows in lists.items() for k, row in enumerate(rows)]
    by_content = [(name, k, row) for name, k, row in rows if hashes is not None and row.get("sha")]
    by_path_only = [(name, k, row) for name, k, row in rows if not (hashes is not None and row.get("sha"))]
    for name, k, row in by_content:  # pass 1: same content at the same path
        i = next((i for i in by_path.get(row["path"], ()) if hashes[i] == row["sha"] and i not in taken), None)  # type: ignore[index]
        if i is not None:
            found[(name, k)] = i
            taken.add(i)
    for name, k, row in by_content:  # pass 2: same content elsewhere (moved or renamed)
        if (name, k) not in found:
            i = next((i for i in by_sha.get(row["sha"], ()) if i not in taken), None)
            if i is not None:
                found[(name, k)] = i
                taken.add(i)
    for name, k, row in by_path_only:
        i = next((i for i in by_path.get(row["path"], ()) if i not in taken), None)
        if i is not None:
            found[(name, k)] = i
            taken.add(i)
    matched = {name: [found[(name, k)] for k in range(len(rows_)) if (name, k) in found] for name, rows_ in lists.items()}
    missing = [(name, row) for name, k, row in rows if (name, k) not in found]
    return matched, missing


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """skipped_files.csv: path,reason for every file that is in no split."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows(skipped)


def class_counts(samples: Sequence[Sample], idx: Iterable[int]) -> dict[str, int]:
    return dict(sorted(Counter(samples[i].label for i in idx).items()))


# ----------------------------------------------------------------------------------------------
# Torch datasets and augmentation
# ----------------------------------------------------------------------------------------------
def eval_transform(pp: Preprocessing) -> Any:
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.CenterCrop(pp.input_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(pp.mean), list(pp.std))])


def train_transform(pp: Preprocessing, preset: str, size: int | None = None) -> Any:
    """Augmentation on the stored uint8 images; `size` (default: the eval size) may be smaller, since a
    random-resized crop zooms in and testing at a higher resolution than training compensates (FixRes)."""
    import torch
    from torchvision.transforms import v2

    size = size or pp.input_size
    if preset == "none":
        if size == pp.input_size:
            return eval_transform(pp)
        return v2.Compose([v2.CenterCrop(pp.input_size), v2.Resize(size, antialias=True),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pp.mean), list(pp.std))])
    interpolation = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                     "nearest": v2.InterpolationMode.NEAREST}.get(pp.interpolation, v2.InterpolationMode.BILINEAR)
    ops: list[Any] = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interpolation, antialias=True),
                      v2.RandomHorizontalFlip()]
    if preset == "strong":
        # its rotations/shears run on tensors, which torchvision supports only with nearest or bilinear
        ops.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pp.mean), list(pp.std))]
    if preset == "strong":
        ops.append(v2.RandomErasing(p=0.25))
    return v2.Compose(ops)


class PixelDataset:
    """A torch-style dataset over rows of decoded uint8 images: store views (ImageRows, which DataLoader workers
    receive as a slot table and open themselves) or an in-memory array."""

    def __init__(self, pixels: ImageRows | np.ndarray, indices: Sequence[int], labels: Sequence[int], transform: Any):
        self.pixels, self.indices, self.labels, self.transform = pixels, list(indices), list(labels), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        x = torch.from_numpy(np.array(self.pixels[self.indices[i]]))
        return self.transform(x), self.labels[i]
