"""`affinage export RUN --format hf --push-to-hub ORG/NAME`: the checked export folder uploaded to the Hugging
Face Hub through `huggingface_hub` (its login, its endpoint). Offline, or where the Hub cannot be reached, it
fails with one line saying so; the export folder is written all the same."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import AffinageError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
LOGIN_FIX = "log in with `hf auth login` (or set HF_TOKEN), then push again"


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME as the Hub spells it, and a Hub that is not switched off (checked before the export starts)."""
    if not REPO_ID.match(repo_id or ""):
        raise AffinageError(f"--push-to-hub '{repo_id}' is not a Hub repository id", "pass ORG/NAME, e.g. me/flowers-lite0")
    if _offline():
        raise AffinageError(f"cannot push to the Hub ({repo_id}): offline mode is on (HF_HUB_OFFLINE=1)",
                            "unset HF_HUB_OFFLINE on a connected machine, then push the export folder again")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - a core dependency (transformers needs it)
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def push_folder(folder: str | os.PathLike[str], repo_id: str, private: bool = False,
                log: Callable[[str], None] = print) -> str:
    """Upload an export folder as a model repository (created when missing); returns its URL."""
    check_repo_id(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"affinage export of {Path(folder).name}")
    except Exception as exc:  # httpx/requests connection errors, HfHubHTTPError (401, 403), missing token
        raise AffinageError(f"cannot push to the Hub ({repo_id} at {api.endpoint}): {_reason(exc)}",
                            f"the export is in {folder}; {LOGIN_FIX}") from None
    log(f"pushed {folder} -> {url}")
    return str(url)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
    name = type(exc).__name__
    if "Token" in name or "401" in first:
        return f"not logged in or no write access ({name})"
    return f"{name}: {first}" if first else name
