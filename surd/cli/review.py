"""`surd review push|pull|status`: human review in Label Studio. Thin: parse, call, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

# soft_wrap: one result per line, whatever the terminal width (scripts grep these lines).
console = Console(soft_wrap=True, highlight=False)

review_app = typer.Typer(help="Review samples in Label Studio and bring the decisions back.", no_args_is_help=True)

UrlOpt = typer.Option("http://localhost:8080", "--url", envvar="LABEL_STUDIO_URL", help="Label Studio server URL")
# The key is read from the environment or the flag and never echoed: show_default stays off.
KeyOpt = typer.Option(None, "--api-key", envvar="LABEL_STUDIO_API_KEY", show_default=False, show_envvar=True,
                      help="Label Studio API key: a personal access token, or a legacy token")  # fmt: skip
ProjectOpt = typer.Option("SURD review", "--project", help="project title (created by push when missing)")


def say(message: str) -> None:
    console.print(message, markup=False)


def register(app: typer.Typer) -> None:
    """Add the `review` sub-app to the `surd` command line."""
    app.add_typer(review_app, name="review")


@review_app.command()
def push(
    run_dir: Path = typer.Argument(..., help="run folder (reads surd/data/, else its last stage)"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    project: str = ProjectOpt,
    limit: int | None = typer.Option(None, "--limit", min=1, help="review at most this many samples"),
    where: str | None = typer.Option(None, "--where", help="filter: 'clip_narrative < 0.25 and source == civitai'"),
    stratify_by: str | None = typer.Option(None, "--stratify-by", help="sample proportionally within this column"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (same seed, same selection)"),
    images: str = typer.Option("auto", "--images", help="local (the server reads this disk), inline (data: URIs in "
                               "its database), auto (local for a server on this machine; says which and why)"),
) -> None:
    """Push samples of RUN_DIR to a Label Studio project (no duplicates: pushing again adds only new ids)."""
    from annotations.labelstudio import Session
    from annotations.labelstudio import push as push_samples

    session = Session(url, api_key)
    result = push_samples(session, run_dir, project, limit=limit, where=where, stratify_by=stratify_by, seed=seed,
                          images=images)  # type: ignore[arg-type]  # fmt: skip
    made = "created" if result.created_project else "existing"
    say(
        f"project {project!r} ({made}, id {result.project_id}): {result.selected} selected, "
        f"{result.imported} imported, {result.already_there} already there; images: {result.images} "
        f"({result.images_reason})"
    )
    say(f"review at {session.url}/projects/{result.project_id}/data")


@review_app.command()
def pull(
    run_dir: Path = typer.Argument(..., help="run folder; writes RUN_DIR/reviews.parquet"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    project: str = ProjectOpt,
) -> None:
    """Export the project's annotations into RUN_DIR/reviews.parquet (applied by `surd export`)."""
    from annotations.labelstudio import Session
    from annotations.labelstudio import pull as pull_reviews
    from annotations.reviews import summary

    path, table = pull_reviews(Session(url, api_key), run_dir, project)
    s = summary(table)
    say(f"wrote {path}: {s['reviewed']} reviewed ({s['accepted']} accepted, {s['rejected']} rejected, "
                  f"{s['edited']} edited){_agreement(s)}")  # fmt: skip


@review_app.command()
def status(
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    project: str = ProjectOpt,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Tasks, annotated tasks, accepted/rejected/edited and agreement of a review project."""
    from annotations.labelstudio import Session
    from annotations.labelstudio import status as review_status

    s = review_status(Session(url, api_key), project)
    if as_json:
        console.print_json(json.dumps(s))
        return
    say(f"project {project!r} (id {s['project_id']}): {s['tasks']} tasks, {s['annotated']} annotated")
    say(f"decisions: {s['accepted']} accepted, {s['rejected']} rejected, {s['edited']} edited"
                  f"{_agreement(s)}")  # fmt: skip
    if s["undecided"]:
        say(f"{s['undecided']} annotation(s) submitted with no decision and an unchanged narrative: not counted")


def _agreement(s: dict) -> str:
    if s["agreement"] is None:
        return ""
    return f"; agreement {s['agreement']:.2f} over {s['multi_annotated']} samples with several annotators"
