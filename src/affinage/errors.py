"""User-facing errors: one line naming the problem, one naming the fix."""
from __future__ import annotations


class AffinageError(ValueError):
    """Bad user input or an unusable environment; the CLI prints it without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} — fix: {fix}")


def missing_extra(package: str, extra: str) -> AffinageError:
    return AffinageError(f"this feature needs the optional package '{package}'",
                         f"pip install 'affinage[{extra}]'")
