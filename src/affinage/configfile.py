"""`affinage train --config FILE`: the options of a run from a YAML or JSON file (timm's `-c args.yaml`).

The keys are TrainConfig's field names, which are the `train` options' names (`batch_size` or `batch-size`), plus
the command-line-only `out`, `quiet` and `fail_on_target`; an unknown key is refused with the list of valid ones
(nanoGPT's `Unknown config key`). Options given on the command line override the file. A run's own `config.yaml`
is such a file, so `affinage train --config RUN/config.yaml --out NEW` trains the same run again.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig
from .errors import AffinageError

CLI_ONLY = ("out", "quiet", "fail_on_target")  # what the command does with the run, not what defines it
ALIASES = {"no_pretrained": "pretrained"}  # the flag's name -> the field (negated)


def valid_keys() -> list[str]:
    return sorted({f.name for f in fields(TrainConfig)} | set(CLI_ONLY))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's options, key names normalised (`-` -> `_`), unknown keys refused naming every valid one."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise AffinageError(f"cannot read config file '{file}': {exc.strerror or exc}",
                            "pass an existing YAML or JSON file, e.g. --config RUN/config.yaml") from None
    try:
        values = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise AffinageError(f"config file '{file}' is not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} "
                            f"({str(exc).splitlines()[0]})", "fix its syntax") from None
    values = values or {}
    if not isinstance(values, dict):
        raise AffinageError(f"config file '{file}' holds a {type(values).__name__}, not a mapping of options",
                            "write one `option: value` per line (YAML) or a JSON object")
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        if name in ALIASES:
            name, value = ALIASES[name], not value
        out[name] = value
    unknown = sorted(set(out) - set(valid_keys()))
    if unknown:
        raise AffinageError(f"unknown key(s) in config file '{file}': {', '.join(unknown)}",
                            f"valid keys: {', '.join(valid_keys())}")
    lists = {f.name for f in fields(TrainConfig) if f.default_factory is list}  # type: ignore[comparison-overlap]
    for name in lists & set(out):  # `report_to: mlflow` or `models: a,b` as the command line writes them
        if isinstance(out[name], str):
            out[name] = [v.strip() for v in out[name].split(",") if v.strip()]
    return out


def merge(file_values: dict[str, Any], cli_values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The options of the run: the command line's where given explicitly (`explicit`: their names), else the
    file's, else the command line's defaults. The result is checked as a TrainConfig (plus CLI_ONLY keys)."""
    merged = dict(cli_values)
    for name, value in file_values.items():
        if name not in explicit:
            merged[name] = value
    if not merged.get("data"):
        raise AffinageError("no data given", "pass --data, or put `data: ...` in the config file")
    run_options = {k: v for k, v in merged.items() if k not in CLI_ONLY}
    TrainConfig.from_dict(run_options)  # a wrong value fails now, with its own message, before any run starts
    return merged
