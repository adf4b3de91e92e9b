"""Targets such as `accuracy>=0.95` or `recall[tulip]>=0.9`: parsed with a grammar (never eval), validated
before training against the metric and class names, and checked on the test metrics. Where the test block holds
the figure's 95% interval (`ci95`, affinage.intervals), a target is *established* when the interval's bound on the
passing side passes too (the lower bound of a `>=` target); one that passes on its value alone is reported as
"passed, not established"."""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AffinageError
from .evaluate import TOP5_MIN_CLASSES
from .intervals import figure_key, fmt, images_needed

# Figures of metrics.json["test"] a target can name; per-class ones take a class in brackets.
OVERALL_METRICS = ("accuracy", "loss", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "specificity")
PER_CLASS_METRICS = ("recall", "precision", "f1", "specificity")
ALIASES = {"acc": "accuracy", "top5": "top5_accuracy", "f1": "macro_f1", "recall": "macro_recall",
           "precision": "macro_precision", "sensitivity": "macro_recall"}
OPERATORS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                         "<": operator.lt}
_GRAMMAR = re.compile(r"""\s*(?:(?P<task>[A-Za-z_][A-Za-z0-9_-]*)\s*:)?\s*(?P<metric>[A-Za-z][A-Za-z0-9_]*)\s*
                          (?:\[\s*(?P<cls>[^\[\]]+?)\s*\])?\s*
                          (?P<op>>=|<=|>|<)\s*
                          (?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<percent>%?)\s*""", re.X)


@dataclass(frozen=True)
class Target:
    """One parsed target: `[task:]metric[cls] op threshold`."""

    expr: str  # as the user wrote it
    metric: str
    cls: str | None
    op: str
    threshold: float
    task: str | None = None  # several --task: the task whose test figures it names (None: the first task)

    def value(self, test: dict[str, Any]) -> float:
        if self.cls is None:
            if self.metric not in test:  # parse_targets with the classes refuses these before training
                raise AffinageError(f"target '{self.expr}': the test metrics have no {self.metric}",
                                    "check the target with parse_targets(exprs, classes) before training")
            return float(test[self.metric])
        return float(test["per_class"][self.cls][self.metric])

    @property
    def key(self) -> str:
        """The figure's name in a ci95 block: `accuracy`, `recall[tulip]`."""
        return figure_key(self.metric, self.cls)

    def check(self, test: dict[str, Any]) -> dict[str, Any]:
        """{"expr", "value", "passed"}, and where the test block has the figure's interval: "ci95", "established"
        (the bound on the passing side passes too) and, passed but not established, "images_needed"."""
        value = self.value(test)
        passed = math.isfinite(value) and OPERATORS[self.op](value, self.threshold)
        result: dict[str, Any] = {"expr": self.expr, "value": value, "passed": bool(passed)}
        ci = (test.get("ci95") or {}).get(self.key)
        if ci is not None:
            bound = ci[0] if self.op in (">=", ">") else ci[1]
            established = bool(passed and OPERATORS[self.op](bound, self.threshold))
            result.update(ci95=list(ci), established=established)
            if passed and not established:
                result["images_needed"] = images_needed(int(test.get("n") or 0), value, bound, self.threshold)
        return result


def _valid_names() -> str:
    return (f"valid metrics: {', '.join(OVERALL_METRICS)}; per class: "
            f"{', '.join(f'{m}[CLASS]' for m in PER_CLASS_METRICS)}")


def parse_target(expr: str) -> Target:
    """`metric[class] op number` -> Target; raises AffinageError naming the valid metric names."""
    match = _GRAMMAR.fullmatch(expr)
    if match is None:
        raise AffinageError(f"cannot read target '{expr}'",
                            f"write METRIC>=NUMBER or METRIC[CLASS]>=NUMBER (operators >=, >, <=, <), e.g. "
                            f"accuracy>=0.95 or recall[tulip]>=0.9; {_valid_names()}")
    metric, cls = match["metric"].lower(), match["cls"]
    if cls is None:
        metric = ALIASES.get(metric, metric)
        if metric not in OVERALL_METRICS:
            raise AffinageError(f"unknown metric '{match['metric']}' in target '{expr}'", _valid_names())
    else:
        metric = {"sensitivity": "recall"}.get(metric, metric)
        if metric not in PER_CLASS_METRICS:
            raise AffinageError(f"metric '{match['metric']}' in target '{expr}' is not a per-class metric",
                                _valid_names())
    threshold = float(match["number"]) / (100.0 if match["percent"] else 1.0)
    if not math.isfinite(threshold):
        raise AffinageError(f"target '{expr}' has a non-finite threshold", "use a number such as 0.9 or 90%")
    return Target(expr.strip(), metric, cls, match["op"], threshold, match["task"])


def parse_targets(exprs: Iterable[str], classes: Sequence[str] | None = None,
                  tasks: dict[str, Sequence[str]] | None = None) -> list[Target]:
    """Parse every target; with `classes` (and `tasks`: each task's classes), also check each task and class name
    and that top-5 accuracy exists."""
    targets = [parse_target(e) for e in exprs]
    if classes is not None:
        for t in targets:
            if t.task is not None and t.task not in (tasks or {}):
                raise AffinageError(f"target '{t.expr}' names task '{t.task}', which this run does not train",
                                    f"tasks: {', '.join(tasks)}" if tasks else
                                    "train several labels per image with --task COLUMN (repeated), or drop the prefix")
            names = list((tasks or {}).get(t.task, classes)) if t.task is not None else classes
            if t.cls is not None and t.cls not in names:
                raise AffinageError(f"class '{t.cls}' in target '{t.expr}' is not a class of this data",
                                    f"classes: {', '.join(names)}")
            if t.metric == "top5_accuracy" and len(names) <= TOP5_MIN_CLASSES:
                raise AffinageError(f"target '{t.expr}' needs top-5 accuracy, which is only measured with more than "
                                    f"{TOP5_MIN_CLASSES} classes (this data has {len(names)}: every image's class "
                                    "is among the top 5, so it would always be 1.0)", "use accuracy instead")
    return targets


def check_targets(targets: Sequence[Target], test: dict[str, Any],
                  tasks: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """[{"expr", "value", "passed", "ci95", "established"}] for the test metrics of a run (see Target.check;
    `tasks`: each task's test block, for `task:` targets)."""
    return [t.check(tasks[t.task] if t.task is not None and tasks else test) for t in targets]


def format_result(result: dict[str, Any]) -> str:
    """`PASS  accuracy>=0.9  (test: 0.9500, 95% CI 0.930–0.968)`, or "passed, not established" where the value
    passes and the interval's bound does not (with the test images that would establish a margin this size)."""
    line = f"{'PASS' if result['passed'] else 'FAIL'}  {result['expr']}  (test: {result['value']:.4f}"
    if "ci95" not in result:
        return line + ")"
    if not result["passed"] or result.get("established"):
        return line + f", 95% CI {fmt(result['ci95'])})"
    need = result.get("images_needed")
    return (line + f"): passed, not established (95% CI {fmt(result['ci95'])}); "
            + (f"the test split is too small: about {need:,} test images would establish a margin this size" if need
               else "the value is the threshold itself: no test split can establish it"))
