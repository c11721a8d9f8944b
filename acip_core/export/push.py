"""Upload an export folder to the Hugging Face hub (huggingface_hub: create_repo + upload_folder).

The token comes from the caller (the CLI's --token, the app's field) or HF_TOKEN. Offline (HF_HUB_OFFLINE,
or the hub not answering a TCP connect) it fails at once with a message instead of retrying for a minute.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from huggingface_hub import HfApi

from acip_core.export.folder import export_info
from acip_core.sources.models import hub_offline, hub_reachable

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_push(repo_id: str, token: str | None = None) -> str:
    """The token to upload with, or a clear error (bad repo id, no token, offline) before any work."""
    if not REPO_ID.match(repo_id or "") or ".." in repo_id:
        raise ValueError(f"the repo id must look like user/name, got {repo_id!r}")
    token = (token or os.environ.get("HF_TOKEN") or "").strip()
    if not token:
        raise ValueError("uploading needs a Hugging Face access token with write permission: "
                         "--token, or HF_TOKEN in the environment")
    if hub_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set: nothing can be uploaded (unset it to push)")
    if not hub_reachable():
        raise RuntimeError("the Hugging Face hub cannot be reached (offline?): nothing was uploaded")
    return token


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Creates (or reuses) the model repo `repo_id` and uploads `folder` to it; returns the repo's URL."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json): export one first")
    if export_info(folder) is None:
        raise ValueError(f"{folder} is not an ACIP Studio export (no acip_export.json)")
    token = check_push(repo_id, token)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    info = export_info(folder) or {}
    message = f"ACIP Studio export ({info.get('kind', 'model')}, {info.get('dtype', '')})".replace(", )", ")")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", token=token,
                      commit_message=message)
    log.info("uploaded %s to %s", folder, repo_id)
    return str(url)
