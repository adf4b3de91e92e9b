"""affinage: adapt pretrained image models to your own classification problem, measured honestly."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["finetune", "load_run", "evaluate_run", "__version__"]


def finetune(*args: Any, **kwargs: Any) -> Any:
    """See affinage.run.finetune (imported lazily: `import affinage` stays fast)."""
    from .run import finetune as _finetune

    return _finetune(*args, **kwargs)


def load_run(path: str) -> Any:
    """Reload a run directory for prediction: `load_run("runs/x").predict(["a.jpg"])`."""
    from .run import Run

    return Run.load(path)


def evaluate_run(path: str, **kwargs: Any) -> Any:
    from .run import evaluate_run as _evaluate_run

    return _evaluate_run(path, **kwargs)
