"""How reviewers' browsers get the thumbnails: served by Label Studio from this disk, or embedded in the tasks.

`local`: a Local Files storage on the project lets the server read `<run>/review/thumbs/`, and tasks hold
`/data/local-files/?d=...` URLs. `inline`: tasks hold `data:` URIs, stored in Label Studio's database.
`auto` tries local for a server on this machine; whichever mode is used, the caller is told why.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlparse

from annotations.tokens import server_detail
from surd import secrets
from surd.errors import SurdError

if TYPE_CHECKING:
    from annotations.labelstudio import Session

ImageMode = Literal["auto", "local", "inline"]
MODES = ("auto", "local", "inline")
STORAGE_TITLE = "surd review thumbnails"


class ImageServingError(SurdError):
    """`--images local` was asked for and the server cannot serve the thumbnails."""


@dataclass(frozen=True)
class Images:
    mode: str  # local | inline
    reason: str  # why this mode, in words for the user
    urls: dict[str, str]  # sample id -> image URL for the task


def is_loopback(url: str) -> bool:
    return secrets.is_loopback(urlparse(url).hostname or "")


def inline_urls(thumbs: dict[str, Path]) -> dict[str, str]:
    return {i: "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode() for i, p in thumbs.items()}


def local_urls(session: Session, project_id: int, thumbs: dict[str, Path]) -> tuple[dict[str, str] | None, str]:
    """(URLs served through a Local Files storage, "") or (None, the server's reason it cannot serve them)."""
    from label_studio_sdk.core.api_error import ApiError

    folder = next(iter(thumbs.values())).parent
    local = session.client.import_storage.local
    with session.errors():
        if not any(Path(s.path or "") == folder for s in local.list(project=project_id)):
            try:
                # Not synced on purpose: syncing would turn every thumbnail into a task of its own.
                local.create(project=project_id, path=str(folder), use_blob_urls=True, title=STORAGE_TITLE)
            except ApiError as e:
                if e.status_code == 400:  # the server cannot see this folder, or serves no local files
                    return None, server_detail(e.body) or "it refused a Local Files storage for it"
                raise
    # The URL is relative to the server's LOCAL_FILES_DOCUMENT_ROOT: find which ancestor that is.
    probe = next(iter(thumbs.values()))
    last = ""
    for root in probe.parents[1:]:
        rel = probe.relative_to(root).as_posix()
        response = session.get(f"/data/local-files/?d={quote(rel)}")
        if response.status_code == 200 and response.content == probe.read_bytes():
            return {i: f"/data/local-files/?d={quote(p.relative_to(root).as_posix())}" for i, p in thumbs.items()}, ""
        if response.status_code == 403:  # local files serving is off: no other root will do better
            return None, server_detail(response.text) or "local files serving is disabled (HTTP 403)"
        last = f"HTTP {response.status_code}"
    return None, f"no folder above it answered as LOCAL_FILES_DOCUMENT_ROOT (last answer {last})"


def image_urls(session: Session, project_id: int, thumbs: dict[str, Path], images: ImageMode) -> Images:
    """The image URL of each new task, the mode that gives them, and why that mode."""
    folder = next(iter(thumbs.values())).parent
    if images == "inline":
        return Images("inline", "as asked by --images inline", inline_urls(thumbs))
    if images == "auto" and not is_loopback(session.url):
        reason = f"{session.url} is not on this machine, so it cannot read {folder}; stored in its database"
        return Images("inline", reason, inline_urls(thumbs))
    urls, problem = local_urls(session, project_id, thumbs)
    if urls is not None:
        return Images("local", f"Label Studio reads them from {folder}", urls)
    if images == "local":
        raise ImageServingError(
            f"--images local: Label Studio at {session.url} cannot serve {folder}: {problem} "
            "(it needs LOCAL_FILES_SERVING_ENABLED=true and a LOCAL_FILES_DOCUMENT_ROOT above the run folder; "
            "or use --images inline)"
        )
    reason = f"Label Studio cannot serve {folder}: {problem}; stored in its database"
    return Images("inline", reason, inline_urls(thumbs))
