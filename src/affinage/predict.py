"""Batch prediction: files, folders and globs -> image files -> labels, in batches, through the run's own
decoding (`data.load_pixels`) and inference (`Run.logits`) path, so predictions match the test-time ones."""
from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .data import PATH_ERRORS, UnreadableImage, list_files, load_pixels, printable, read_image_file
from .errors import AffinageError

if TYPE_CHECKING:
    from .saved import Run

DEFAULT_BATCH_SIZE = 32  # images decoded and held in memory at once (the model sees them in run_batches' batches)
GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named by `inputs` (files, folders searched recursively, globs such as 'photos/**/*.jpg'), in
    order and without repeats; and the arguments that name nothing, with the reason.

    A plain path that does not exist is kept as a file: reading it reports the problem next to the others.
    Every file inside a folder is tried (like training does): what cannot be decoded is listed with the reason.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            files.append(path)

    for arg in inputs:
        path = Path(arg).expanduser()
        if path.is_dir():
            found, unusable = list_files(path)
            problems += unusable  # link loops, broken links, pipes: listed with the reason, never dropped
            if not found and not unusable:
                problems.append((arg, "folder holds no files"))
            for f in found:
                add(str(f))
        elif not path.exists() and GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                problems.append((arg, "no file matches this pattern"))
            for m in matches:
                if os.path.isdir(m):
                    found, unusable = list_files(Path(m))
                    problems += unusable
                    for f in found:
                        add(str(f))
                else:
                    add(m)
        else:
            add(str(path) if arg.startswith("~") else arg)
    return files, problems


def held_out_photos(run: Run, limit: int | None = None) -> list[str]:
    """Photos of the run's test split that still exist on disk, one class after the other in turn (paths as stored
    in splits/test.csv; in-memory sources such as digits or hf: datasets have none)."""
    path = run.path / "splits" / "test.csv"
    if not path.exists():
        return []
    by_class: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        for row in csv.DictReader(fh):
            if os.path.isfile(row["path"]):
                by_class.setdefault(row["label"], []).append(row["path"])
    columns = [files for _, files in sorted(by_class.items())]
    picked = [files[depth] for depth in range(max(map(len, columns), default=0)) for files in columns if depth < len(files)]
    return picked[:limit]


def decode_file(path: str, run: Run) -> np.ndarray | str:
    """The stored uint8 CHW array of an image file, or the reason it cannot be used."""
    try:
        return load_pixels(read_image_file(path), run.preprocessing)  # a pipe or a huge file is refused, not read
    except UnreadableImage as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


def top_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k most probable labels of one image, most probable first (ties keep class order)."""
    order = np.argsort(-probabilities, kind="stable")[:max(1, min(k, len(classes)))]
    return [{"label": classes[j], "probability": float(probabilities[j])} for j in order]


def label_arrays(run: Run, arrays: Sequence[np.ndarray], top_k: int = 5) -> list[list[list[dict[str, Any]]]]:
    """Top-k labels of every task (`run.tasks` order) for decoded images (rows of `load_pixels` output)."""
    if not arrays:
        return []
    tasks = run.tasks
    return [[top_labels(p, list(space.classes), top_k) for p, space in zip(run.split_tasks(row), tasks)]
            for row in run.probabilities(np.stack(arrays))]


def iter_predictions(run: Run, files: Sequence[str], top_k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: bool = False, workers: int | None = None) -> Iterator[dict[str, Any]]:
    """One result per file, in order: `file`, top-1 `label` and `probability`, and the `top_k` list; or `file` and
    `error` for a file that cannot be used. Files are decoded in threads while the previous batch runs."""
    if batch_size < 1:
        raise AffinageError(f"batch size must be >= 1, got {batch_size}", "pass --batch-size 32 (or any positive number)")
    from tqdm.auto import tqdm

    chunks = [list(files[i:i + batch_size]) for i in range(0, len(files), batch_size)]
    bar = tqdm(total=len(files), desc="predicting", unit="img", file=sys.stderr, leave=False, disable=not progress,
               mininterval=0.5)
    with bar, ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        def submit(chunk: list[str]) -> list[Future[np.ndarray | str]]:
            return [pool.submit(decode_file, f, run) for f in chunk]

        pending = submit(chunks[0]) if chunks else []
        for c, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            tops = iter(label_arrays(run, [decoded[i] for i in good], top_k))  # type: ignore[misc]
            for f, d in zip(chunk, decoded):
                if isinstance(d, str):
                    yield {"file": str(f), "error": d}
                else:
                    per_task = next(tops)
                    top = per_task[0]
                    result = {"file": str(f), "label": top[0]["label"], "probability": top[0]["probability"],
                              "top_k": top}
                    if len(per_task) > 1:  # several labels per image: every task's answer (the first one above)
                        result["tasks"] = {space.task: {"label": t[0]["label"], "probability": t[0]["probability"],
                                                        "top_k": t} for space, t in zip(run.tasks, per_task)}
                    yield result
            bar.update(len(chunk))


def predict_files(run: Run, files: Sequence[str], top_k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = False) -> list[dict[str, Any]]:
    """`iter_predictions` as a list."""
    return list(iter_predictions(run, files, top_k, batch_size, progress))


# ----------------------------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------------------------
def text_line(result: dict[str, Any]) -> str:
    """`file: label — probability   [top-k]`, or `file: skipped (reason)`; printable on any terminal."""
    name = printable(result["file"])
    if "error" in result:
        return f"{name}: skipped ({printable(result['error'])})"
    if "tasks" in result:
        return f"{name}: " + "; ".join(f"{task} {r['label']} — {r['probability']:.3f}" for task, r in result["tasks"].items())
    tops = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in result["top_k"])
    return f"{name}: {result['label']} — {result['probability']:.3f}   [{tops}]"


class CsvWriter:
    """file,label,probability[,label_2,probability_2,...],error -- one row per image, written as results arrive.
    With several tasks: file, then <task>,<task>_probability per task (each task's top label), then error."""

    def __init__(self, stream: IO[str], k: int, tasks: Sequence[str] = ()):
        self.k, self.tasks = k, list(tasks)
        self.writer = csv.writer(stream)
        if len(self.tasks) > 1:
            self.writer.writerow(["file", *(c for t in self.tasks for c in (t, f"{t}_probability")), "error"])
            return
        extra = [c for i in range(2, k + 1) for c in (f"label_{i}", f"probability_{i}")]
        self.writer.writerow(["file", "label", "probability", *extra, "error"])

    def write(self, result: dict[str, Any]) -> None:
        if len(self.tasks) > 1:
            answers = result.get("tasks", {})
            cells = [c for t in self.tasks for c in ((answers[t]["label"], f"{answers[t]['probability']:.6f}")
                                                     if t in answers else ("", ""))]
            self.writer.writerow([printable(result["file"]), *cells, printable(result.get("error", ""))])
            return
        if "error" in result:
            self.writer.writerow([printable(result["file"]), "", "", *[""] * (2 * (self.k - 1)),
                                  printable(result["error"])])
            return
        cells = [printable(result["file"])]
        for i in range(self.k):
            top = result["top_k"][i] if i < len(result["top_k"]) else None
            cells += [top["label"], f"{top['probability']:.6f}"] if top else ["", ""]
        self.writer.writerow([*cells, ""])
