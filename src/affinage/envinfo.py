"""`affinage env`: versions, hardware, accelerate config and cache locations in one block to paste into a bug
report (as `transformers env` and `accelerate env` do)."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "peft", "safetensors",
            "huggingface_hub", "scikit-learn", "numpy", "pillow", "codecarbon", "gradio", "onnx", "onnxruntime",
            "tensorboard", "mlflow")
ENV_VARS = ("AFFINAGE_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_ENDPOINT", "MLFLOW_TRACKING_URI", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def collect() -> dict[str, Any]:
    """Everything `affinage env` prints, as data."""
    from . import __version__

    versions = {"affinage": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"versions": versions, "platform": platform.platform(), "hardware": _hardware(),
            "accelerate": _accelerate(), "caches": _caches(),
            "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}


def _hardware() -> dict[str, Any]:
    import torch

    from .run import _cpu_model

    out: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import psutil

        out["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - a core dependency
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
        out["cpu_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["gpus"] = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GB)"
                   for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(mps is not None and mps.is_available())
    return out


def _accelerate() -> dict[str, Any]:
    """accelerate's default config file and its content (None where `accelerate config` was never run)."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return {"config_file": None, "config": "accelerate not installed"}
    path = Path(default_config_file)
    if not path.is_file():
        return {"config_file": str(path), "config": None}
    import yaml

    try:
        return {"config_file": str(path), "config": yaml.safe_load(path.read_text(encoding="utf-8"))}
    except (OSError, yaml.YAMLError) as exc:
        return {"config_file": str(path), "config": f"unreadable: {exc}"}


def _caches() -> dict[str, str]:
    from .storage import cache_dir

    out = {"affinage": str(cache_dir())}
    try:
        from huggingface_hub import constants

        out["huggingface_hub"] = str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - a core dependency
        pass
    out["datasets"] = os.environ.get("HF_DATASETS_CACHE") or str(Path(os.environ.get("HF_HOME") or
                                                                      Path.home() / ".cache" / "huggingface") / "datasets")
    import torch

    out["torch_hub"] = torch.hub.get_dir()
    return out


def format_env(info: dict[str, Any]) -> str:
    """The block to paste: one `- key: value` line each, grouped."""
    lines = ["affinage environment (paste this into a bug report)", "", f"- platform: {info['platform']}",
             f"- python: {sys.executable}"]
    lines += ["", "versions:"] + [f"- {k}: {v}" for k, v in info["versions"].items()]
    lines += ["", "hardware:"] + [f"- {k}: {v}" for k, v in info["hardware"].items()]
    acc = info["accelerate"]
    lines += ["", "accelerate:", f"- config file: {acc['config_file']}",
              f"- config: {acc['config'] if acc['config'] is not None else 'none (accelerate config never run)'}"]
    lines += ["", "caches:"] + [f"- {k}: {v}" for k, v in info["caches"].items()]
    lines += ["", "environment variables:"] + ([f"- {k}={v}" for k, v in info["environment"].items()] or ["- (none set)"])
    return "\n".join(lines)
