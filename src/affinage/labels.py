"""Label spaces: the ordered class names of one task, where they came from, saved with every model.

A model holds one head per task; each head's output k means `LabelSpace.classes[k]`. The order is part of the
model: appending classes keeps every old index (a head can grow without touching the backbone).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import AffinageError

DEFAULT_TASK = "label"  # the task of single-label data (the CSV column `label`, or class folders)


@dataclass(frozen=True)
class LabelSpace:
    """The ordered classes of one task and their provenance (e.g. "train split of photos/")."""

    task: str
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes:
            raise AffinageError(f"task '{self.task}' has no classes", "give the data at least two labelled classes")
        seen: set[str] = set()
        for name in self.classes:
            if name in seen:
                raise AffinageError(f"class '{name}' appears twice in the label space of task '{self.task}'",
                                    "class names must be unique within a task")
            seen.add(name)

    @classmethod
    def from_labels(cls, labels: Iterable[str], source: str, task: str = DEFAULT_TASK) -> LabelSpace:
        """The sorted distinct labels (the order affinage has always used for new tasks)."""
        return cls(task, tuple(sorted(set(labels))), source)

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, label: str) -> int:
        try:
            return self._positions()[label]
        except KeyError:
            raise AffinageError(f"class '{label}' is not in the label space of task '{self.task}'",
                                f"known classes: {', '.join(self.classes[:20])}"
                                f"{' …' if len(self.classes) > 20 else ''}") from None

    def indices(self, labels: Iterable[str]) -> list[int]:
        positions = self._positions()
        out = []
        for label in labels:
            if label not in positions:
                self.index(label)  # raises with the message
            out.append(positions[label])
        return out

    def _positions(self) -> dict[str, int]:
        cached = self.__dict__.get("_pos")
        if cached is None:
            cached = {c: k for k, c in enumerate(self.classes)}
            object.__setattr__(self, "_pos", cached)
        return cached

    def extend(self, new_classes: Iterable[str], source: str) -> LabelSpace:
        """This space with `new_classes` appended (those already present keep their index)."""
        extra = [c for c in dict.fromkeys(new_classes) if c not in self._positions()]
        return LabelSpace(self.task, self.classes + tuple(extra), f"{self.source}; + {len(extra)} from {source}")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "classes": list(self.classes), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSpace:
        missing = [k for k in ("task", "classes", "source") if k not in d]
        if missing:
            raise AffinageError(f"label space is missing {', '.join(missing)}", "the model files are damaged: retrain")
        return cls(str(d["task"]), tuple(str(c) for c in d["classes"]), str(d["source"]))
