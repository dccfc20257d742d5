"""Label Studio over its API (label-studio-sdk): push samples as tasks, pull annotations back, report status.

A project is found by its title (created when missing) and always gets `interface.xml`. Each task carries
the SURD `sample_id`, so pushing again never duplicates a sample, and the columns a lead sorts and filters
by in the data manager (`source`, `clip_narrative`, `clip_keyword`, `nsfw_score`). The interface pre-fills
the corrected-narrative box with the narrative, so correcting it is typing and submitting.
The API key (a personal access token or a legacy token, see `tokens.py`) is only ever sent in the
Authorization header: never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa

from annotations import reviews, selection
from annotations.images import MODES, ImageMode, image_urls
from annotations.tokens import TokenAuth, refused, server_detail
from surd import layout
from surd.errors import SurdError

INTERFACE = Path(__file__).with_name("interface.xml")
# Scores copied into task data (with `source`) for the data manager's columns, sorting and filters.
SCORE_COLUMNS = ("clip_narrative", "clip_keyword", "nsfw_score")
SCORE_DECIMALS = 4
IMPORT_BATCH = 100
PAGE_SIZE = 500  # tasks per page when listing a project


class LabelStudioError(SurdError):
    """Label Studio cannot be reached, refuses the key, or rejects a request."""


@contextlib.contextmanager
def api_errors(url: str, kind: str = "API key") -> Iterator[None]:
    """Turn transport and API failures into one-line errors that name the server (never the key)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except httpx.HTTPError as e:
        raise LabelStudioError(f"cannot reach Label Studio at {url}: {type(e).__name__}: {e}") from None
    except ApiError as e:
        if e.status_code in (401, 403):
            raise refused(url, kind, e.status_code, server_detail(e.body)) from None
        raise LabelStudioError(f"Label Studio at {url} answered HTTP {e.status_code}: {str(e.body)[:300]}") from None


class Session:
    """An authenticated connection to one Label Studio server, with either kind of API token."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        key = api_key or os.environ.get("LABEL_STUDIO_API_KEY")
        if not key:
            raise LabelStudioError("no Label Studio API key: set LABEL_STUDIO_API_KEY or pass --api-key")
        # Checked before the SDK sees it: an expired or wrong-kind token is a clear error, not an SDK traceback.
        self.auth = TokenAuth(self.url, key)
        self.token_kind = self.auth.kind
        with self.errors():
            self.client = LabelStudio(base_url=self.url, api_key=key, timeout=timeout)
            self.user = self.client.users.whoami()

    def __repr__(self) -> str:  # no key in tracebacks or logs
        return f"Session({self.url!r})"

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return api_errors(self.url, self.token_kind)

    def get(self, path: str) -> httpx.Response:
        """A raw authenticated GET (for local-files probes the SDK has no call for)."""
        with self.errors():
            response = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        if response.status_code == 401:
            raise refused(self.url, self.token_kind, 401, server_detail(response.text))
        return response

    def find_project(self, title: str) -> Any | None:
        with self.errors():
            for project in self.client.projects.list(title=title):
                if project.title == title:
                    return project
        return None

    def ensure_project(self, title: str) -> tuple[int, bool]:
        """(project id, created) for the project titled `title`, with our interface set."""
        config = INTERFACE.read_text()
        project = self.find_project(title)
        with self.errors():
            if project is None:
                return self.client.projects.create(title=title, label_config=config).id, True
            if project.label_config != config:
                self.client.projects.update(project.id, label_config=config)
        return project.id, False

    def project_id(self, title: str) -> int:
        project = self.find_project(title)
        if project is None:
            raise LabelStudioError(f"no project titled {title!r} on {self.url} (push first; check --project)")
        return project.id

    def tasks(self, project_id: int, with_annotations: bool) -> list[Any]:
        with self.errors():
            fields = "all" if with_annotations else "task_only"
            return list(self.client.tasks.list(project=project_id, fields=fields, page_size=PAGE_SIZE))

    def annotator_names(self) -> dict[int, str]:
        with self.errors():
            return {u.id: u.email or u.username or str(u.id) for u in self.client.users.list()}

    def delete_project(self, project_id: int) -> None:
        with self.errors():
            self.client.projects.delete(project_id)


@dataclass
class PushResult:
    project_id: int
    created_project: bool
    selected: int
    imported: int
    already_there: int
    images: str  # local | inline | none (nothing new to import)
    images_reason: str


def _score(value: Any) -> float | None:
    return None if value is None else round(float(value), SCORE_DECIMALS)


def task_for(row: dict[str, Any], image_url: str) -> dict[str, Any]:
    """One Label Studio task for a SURD row: what the page shows, and what the data manager sorts and filters by."""
    narrative = row.get("narrative_prompt") or ""
    others = [c for c in (row.get("narrative_candidates") or []) if c and c != narrative]
    data: dict[str, Any] = {
        "sample_id": row["id"],
        "image": image_url,
        "narrative_prompt": narrative,  # also pre-fills the corrected-narrative box (interface.xml)
        "keyword_prompt": row.get("keyword_prompt") or "",
        "other_candidates": ("Other candidates:\n" + "\n".join(f"- {c}" for c in others)) if others else "",
        "source": row.get("source"),
    }
    for column in SCORE_COLUMNS:
        data[column] = _score(row.get(column))
    return {"data": data}


def push(
    session: Session,
    run_dir: Path,
    project: str,
    *,
    limit: int | None = None,
    where: str | None = None,
    stratify_by: str | None = None,
    seed: int = 0,
    images: ImageMode = "auto",
) -> PushResult:
    """Select samples of the run's dataset and import the ones not yet in the project as tasks.

    A push that fails after creating the project deletes it again, so a retry starts clean.
    """
    if images not in MODES:
        raise SurdError(f"--images {images!r}: expected {', '.join(MODES)}")
    ids = selection.select_ids(run_dir, limit=limit, where=where, stratify_by=stratify_by, seed=seed)
    if not ids:  # before the project exists: an empty selection must not leave an empty project behind
        rows = selection.read_parquet_folder(selection.dataset_folder(run_dir), ["id"]).num_rows
        what = f"--where {where!r} matched no rows of {rows}" if where else f"the dataset of {run_dir} has no rows"
        raise SurdError(f"nothing to review: {what}; no project was created")
    project_id, created = session.ensure_project(project)
    try:
        existing = {t.data.get("sample_id") for t in session.tasks(project_id, with_annotations=False)}
        new_ids = [i for i in ids if i not in existing]
        if not new_ids:
            return PushResult(project_id, created, len(ids), 0, len(ids), "none", "no new samples to import")
        order = {sample_id: n for n, sample_id in enumerate(new_ids)}
        table = selection.read_parquet_folder(selection.dataset_folder(run_dir), ids=set(new_ids))
        rows = sorted(table.to_pylist(), key=lambda r: order[r["id"]])
        shown = image_urls(session, project_id, selection.write_thumbnails(run_dir, rows), images)
        tasks = [task_for(row, shown.urls[row["id"]]) for row in rows]
        with session.errors():
            for start in range(0, len(tasks), IMPORT_BATCH):
                session.client.projects.import_tasks(project_id, request=tasks[start : start + IMPORT_BATCH])
    except BaseException as e:
        if created:
            _remove_failed_project(session, project_id, project, e)
        raise
    return PushResult(project_id, created, len(ids), len(new_ids), len(ids) - len(new_ids), shown.mode, shown.reason)


def _remove_failed_project(session: Session, project_id: int, title: str, error: BaseException) -> None:
    """Delete the project a failed push created; the message says so (the original error still wins)."""
    try:
        session.delete_project(project_id)
    except SurdError:
        return
    if isinstance(error, SurdError) and error.args:
        error.args = (f"{error.args[0]}; removed the project {title!r} that this push had created",)


def _parse_time(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc)
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(dt.timezone.utc)


@dataclass
class Collected:
    votes: list[reviews.Vote]  # each annotator's latest vote per sample
    tasks: int
    annotated: int  # tasks with at least one submitted (not skipped) annotation
    undecided: int  # annotations with neither a decision nor a changed narrative: they count for nothing


def collect_votes(session: Session, project_id: int) -> Collected:
    """Read every annotation of the project as a vote."""
    names = session.annotator_names()
    tasks = session.tasks(project_id, with_annotations=True)
    votes: list[tuple[int, reviews.Vote]] = []
    annotated = undecided = 0
    for task in tasks:
        data = task.data or {}
        sample_id = data.get("sample_id")
        annotations = [a if isinstance(a, dict) else a.model_dump() for a in (task.annotations or [])]
        live = [a for a in annotations if not a.get("was_cancelled")]
        annotated += bool(live)
        if not sample_id:
            continue  # a task someone added by hand: not ours to interpret
        for annotation in live:
            who = annotation.get("completed_by")
            who = who.get("id") if isinstance(who, dict) else who
            vote = reviews.vote_from_result(
                sample_id, names.get(who, str(who)), _parse_time(annotation.get("updated_at")),
                annotation.get("result") or [], data.get("narrative_prompt"),
            )  # fmt: skip
            if vote is None:
                undecided += 1
            else:
                votes.append((int(annotation.get("id") or 0), vote))
    return Collected(reviews.latest_votes(votes), len(tasks), annotated, undecided)


def pull(session: Session, run_dir: Path, project: str) -> tuple[Path, pa.Table]:
    """Export the project's annotations into `<run>/reviews.parquet`."""
    table = reviews.resolve(collect_votes(session, session.project_id(project)).votes)
    path = layout.reviews_path(run_dir)
    reviews.write_reviews(path, table)
    return path, table


def status(session: Session, project: str) -> dict[str, Any]:
    """Tasks, annotated tasks, decisions and agreement, straight from the server."""
    project_id = session.project_id(project)
    got = collect_votes(session, project_id)
    return {"project": project, "project_id": project_id, "tasks": got.tasks, "annotated": got.annotated,
            "undecided": got.undecided, **reviews.summary(reviews.resolve(got.votes))}  # fmt: skip
