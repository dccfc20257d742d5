"""Review in Label Studio: selection, vote logic, the applier, and a round trip against a real server."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from labelstudio_server import _free_port, make_review_run, run_surd
from labelstudio_server import labelstudio as labelstudio  # noqa: F401  (the session fixture)
from typer.testing import CliRunner

from annotations import labelstudio as ls
from annotations import reviews, selection
from annotations.reviews import ReviewApplier, Vote
from pipelines.executor import Stage
from surd import shards
from surd.errors import SurdError
from surd.schema import from_rows

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def _result(decision: str | None = None, reason: str | None = None, text: str | None = None) -> list[dict]:
    """An annotation result as the interface stores it."""
    out = []
    for name, choice in (("decision", decision), ("reject_reason", reason)):
        if choice:
            out.append({"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [choice]}})
    if text is not None:
        out.append({"from_name": "corrected_narrative", "to_name": "image", "type": "textarea",
                    "value": {"text": [text]}})  # fmt: skip
    return out


# --- selection -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sel") / "run"
    make_review_run(run, 24)
    return run


def test_dataset_folder_prefers_export_then_last_stage(run24: Path, tmp_path: Path) -> None:
    assert selection.dataset_folder(run24) == run24 / "surd" / "data"
    only_stage = tmp_path / "run"
    make_review_run(only_stage, 4)
    for p in (only_stage / "surd" / "data").glob("*.parquet"):
        p.unlink()
    assert selection.dataset_folder(only_stage) == only_stage / "score"
    assert selection.read_parquet_folder(only_stage / "score", ["id"]).num_rows == 4
    with pytest.raises(SurdError, match="no dataset to review"):
        selection.dataset_folder(tmp_path / "empty")


def test_where_filters_and_names_the_flag(run24: Path) -> None:
    ids = selection.select_ids(run24, where="clip_narrative < 0.05 and source == 'civitai'")
    assert sorted(ids) == ["civitai:00", "civitai:02", "civitai:04"]
    assert sorted(selection.select_ids(run24, where="narrative_candidates is null and clip_narrative >= 0.2")) == [
        f"{'civitai' if i % 2 == 0 else 'diffusiondb'}:{i:02d}" for i in range(20, 24) if i % 3
    ]
    for bad, msg in [("nope < 1", "unknown column"), ("clip_narrative <", "expected"),
                     ("source < 3", "quoted string"), ("clip_narrative < 0.1 or id == 'x'", "joined with `and`"),
                     ("clip_narrative ~ 1", "cannot parse")]:  # fmt: skip
        with pytest.raises(SurdError, match="--where") as err:
            selection.select_ids(run24, where=bad)
        assert msg in str(err.value)


def test_selection_is_seeded_and_stratified(run24: Path) -> None:
    a = selection.select_ids(run24, limit=10, seed=1)
    assert a == selection.select_ids(run24, limit=10, seed=1)
    assert len(set(a)) == 10 and a != selection.select_ids(run24, limit=10, seed=2)
    strat = selection.select_ids(run24, limit=9, seed=5, stratify_by="source")
    by_source = sorted(i.split(":")[0] for i in strat)
    # 12 + 12 rows: 9 splits 5/4 or 4/5, never more lopsided.
    assert {by_source.count("civitai"), by_source.count("diffusiondb")} == {4, 5}
    everything = sorted(selection.read_parquet_folder(run24 / "score", ["id"]).column("id").to_pylist())
    assert sorted(selection.select_ids(run24)) == sorted(selection.select_ids(run24, limit=100)) == everything
    with pytest.raises(SurdError, match="--stratify-by"):
        selection.select_ids(run24, limit=3, stratify_by="colour")


def test_thumbnails_are_small_jpegs(run24: Path) -> None:
    rows = selection.read_parquet_folder(selection.dataset_folder(run24), ids={"civitai:00"}).to_pylist()
    paths = selection.write_thumbnails(run24, rows)
    data = paths["civitai:00"].read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and paths["civitai:00"].parent == (run24 / "review" / "thumbs").resolve()
    with pytest.raises(SurdError, match="civitai:xx"):
        selection.make_thumbnail(b"not an image", "civitai:xx")


# --- votes, majority, applier ----------------------------------------------------------------------------


def test_vote_reading_treats_untouched_prefill_as_unchanged() -> None:
    shown = "a cat on a mat"
    vote = reviews.vote_from_result
    assert vote("s", "a", T0, _result("accept", text=shown), shown).decision == "accepted"
    assert vote("s", "a", T0, _result("edit", text="  a cat on  a mat "), shown).decision == "accepted"
    assert vote("s", "a", T0, _result("edit", text=""), shown).decision == "accepted"
    edited = vote("s", "a", T0, _result("accept", text="a black cat"), shown)
    assert (edited.decision, edited.corrected_narrative) == ("edited", "a black cat")
    rejected = vote("s", "a", T0, _result("reject", "Bad or NSFW image", text="changed"), shown)
    assert (rejected.decision, rejected.reject_reason, rejected.corrected_narrative) == ("rejected", "bad_image", None)
    assert vote("s", "a", T0, _result("reject", "keyword_mismatch"), shown).reject_reason == "keyword_mismatch"
    assert vote("s", "a", T0, _result(text=shown), shown) is None
    assert vote("s", "a", T0, [], shown) is None


def test_majority_agreement_and_latest_vote_per_annotator() -> None:
    later = T0 + dt.timedelta(minutes=5)
    votes = reviews.latest_votes(
        [
            (1, Vote("x", "ann", "rejected", None, "other", T0)),
            (2, Vote("x", "ann", "accepted", None, None, later)),  # ann changed their mind: accept counts
            (3, Vote("x", "bob", "accepted", None, None, T0)),
            (4, Vote("x", "cy", "rejected", None, "bad_image", T0)),
            (5, Vote("y", "ann", "edited", "one", None, T0)),
            (6, Vote("y", "bob", "accepted", None, None, T0)),
        ]
    )
    table = reviews.resolve(votes).to_pylist()
    x, y = table
    assert (x["id"], x["decision"], x["annotators"], x["annotator"]) == ("x", "accepted", 3, "ann,bob,cy")
    assert x["agreement"] == pytest.approx(2 / 3) and x["updated_at"] == later
    # A 1-1 tie resolves to the more conservative decision (edited over accepted).
    assert (y["decision"], y["corrected_narrative"], y["agreement"]) == ("edited", "one", 0.5)
    s = reviews.summary(reviews.resolve(votes))
    assert (s["accepted"], s["edited"], s["rejected"], s["multi_annotated"]) == (1, 1, 0, 2)
    assert s["agreement"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-4)


def test_review_applier_drops_edits_and_marks(tmp_path: Path) -> None:
    votes = [
        Vote("r1", "a", "rejected", None, "narrative_mismatch", T0),
        Vote("e1", "a", "edited", "a human sentence", None, T0),
        Vote("a1", "a", "accepted", None, None, T0),
    ]
    path = tmp_path / "reviews.parquet"
    reviews.write_reviews(path, reviews.resolve(votes))
    rows = [{"id": i, "narrative_prompt": f"gen {i}", "narrative_origin": "llm:m@1"} for i in ("r1", "e1", "a1", "n1")]
    kept, dropped = Stage("review", ReviewApplier(path))(from_rows(rows))
    got = {r["id"]: (r["narrative_prompt"], r["narrative_origin"], r["review"]) for r in kept.to_pylist()}
    assert got == {
        "e1": ("a human sentence", "human", "edited"),
        "a1": ("gen a1", "llm:m@1", "accepted"),
        "n1": ("gen n1", "llm:m@1", None),
    }
    assert dropped.select(["id", "drop_reason", "drop_detail"]).to_pylist() == [
        {"id": "r1", "drop_reason": "review_rejected", "drop_detail": "narrative_mismatch"}
    ]


def test_read_reviews_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SurdError, match="not found"):
        ReviewApplier(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(reviews.resolve([Vote("x", "a", "accepted", None, None, T0)]).drop(["decision"]), bad)
    with pytest.raises(SurdError, match="missing column"):
        reviews.read_reviews(bad)


def test_unreachable_server_and_missing_key_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(SurdError, match="LABEL_STUDIO_API_KEY"):
        ls.Session("http://127.0.0.1:9")
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(SurdError, match=f"cannot reach Label Studio at {url}"):
        ls.Session(url, "secret-key-123", timeout=5)


# --- against a real Label Studio -------------------------------------------------------------------------


@pytest.mark.labelstudio
def test_bad_token_is_a_clear_error_and_never_printed(labelstudio) -> None:  # noqa: F811
    bad = "0123456789abcdef-not-the-token"
    out = run_surd("review", "status", "--url", labelstudio.url, "--project", "x", key=bad)
    assert out.returncode == 1
    assert "refused the API key" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert bad not in out.stderr + out.stdout


@pytest.mark.labelstudio
def test_round_trip_push_annotate_pull_export(labelstudio, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from label_studio_sdk import LabelStudio

    from surd.cli import app

    monkeypatch.setattr(ls, "PAGE_SIZE", 7)  # make listing cross page boundaries
    run = labelstudio.files_root / "roundtrip"
    rows = {r["id"]: r for r in make_review_run(run, 24)}
    runner = CliRunner()
    env = {"LABEL_STUDIO_API_KEY": labelstudio.token}
    push = ["review", "push", str(run), "--url", labelstudio.url, "--project", "SURD round trip",
            "--limit", "20", "--seed", "3", "--stratify-by", "source"]  # fmt: skip

    first = runner.invoke(app, push, env=env)
    assert first.exit_code == 0, first.output
    assert "20 selected, 20 imported, 0 already there; images: local" in first.output
    assert labelstudio.token not in first.output
    again = runner.invoke(app, push, env=env)
    assert "20 selected, 0 imported, 20 already there" in again.output, again.output
    everything = runner.invoke(app, push[:7], env=env)  # no --limit: the 4 others are added
    assert "24 selected, 4 imported, 20 already there" in everything.output, everything.output

    client = LabelStudio(base_url=labelstudio.url, api_key=labelstudio.token)
    project = next(p for p in client.projects.list(title="SURD round trip") if p.title == "SURD round trip")
    tasks = list(client.tasks.list(project=project.id))
    by_id = {t.data["sample_id"]: t for t in tasks}
    assert len(tasks) == 24 and set(by_id) == set(rows)  # no duplicates
    some = by_id["civitai:00"]
    assert some.data["image"].startswith("/data/local-files/?d=")
    assert labelstudio.files_root.joinpath("roundtrip/review/thumbs").is_dir()
    assert "an abstract picture 0" in some.data["other_candidates"]
    # The corrected-narrative box is pre-filled from the task's narrative by the interface (no prediction).
    assert some.data["narrative_prompt"] == "a plain colour square number 0"
    assert re.search(r'<TextArea name="corrected_narrative"[^>]*value="\$narrative_prompt"', project.label_config)
    image = ls.Session(labelstudio.url, labelstudio.token).get(some.data["image"])
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"

    bob = client.users.create(username="bob", email="bob@surd.test", password="bob-password-1")
    cy = client.users.create(username="cy", email="cy@surd.test", password="cy-password-1")

    def annotate(sample_id: str, result: list[dict], who: int | None = None, cancelled: bool = False) -> int:
        extra = {"completed_by": who} if who else {}
        made = client.annotations.create(id=by_id[sample_id].id, result=result, was_cancelled=cancelled, **extra)
        return made.id

    shown = {i: r["narrative_prompt"] for i, r in rows.items()}
    annotate("civitai:00", _result("accept", text=shown["civitai:00"]))  # untouched pre-fill: accepted
    annotate("diffusiondb:01", _result("edit", text="a teal square with a pink dot"))
    annotate("civitai:02", _result("accept", text="a brown square and a round spot"))  # changed text: edited
    annotate("diffusiondb:03", _result("reject", "narrative_mismatch", text=shown["diffusiondb:03"]))
    first_try = annotate("civitai:04", _result("reject", "bad_image"))
    client.annotations.update(first_try, result=_result("accept", text=shown["civitai:04"]))  # latest wins
    annotate("diffusiondb:05", _result("edit", text=shown["diffusiondb:05"]))  # edit, unchanged: accepted
    annotate("civitai:06", _result("accept"))
    annotate("civitai:06", _result("reject", "keyword_mismatch"), who=bob.id)
    annotate("civitai:06", _result("reject", "keyword_mismatch"), who=cy.id)
    annotate("diffusiondb:07", _result("edit", text="a small violet square"))
    annotate("diffusiondb:07", _result("accept"), who=bob.id)  # 1-1 tie: edited wins
    annotate("civitai:08", [], cancelled=True)  # skipped: no review

    pull = ["review", "pull", str(run), "--url", labelstudio.url, "--project", "SURD round trip"]
    out = runner.invoke(app, pull, env=env)
    assert out.exit_code == 0, out.output
    path = run / "reviews.parquet"
    first_bytes = path.read_bytes()
    assert runner.invoke(app, pull, env=env).exit_code == 0
    assert path.read_bytes() == first_bytes  # pulling twice gives the same file

    table = reviews.read_reviews(path)
    got = {r["id"]: (r["decision"], r["corrected_narrative"], r["reject_reason"]) for r in table.to_pylist()}
    assert got == {
        "civitai:00": ("accepted", None, None),
        "diffusiondb:01": ("edited", "a teal square with a pink dot", None),
        "civitai:02": ("edited", "a brown square and a round spot", None),
        "diffusiondb:03": ("rejected", None, "narrative_mismatch"),
        "civitai:04": ("accepted", None, None),
        "diffusiondb:05": ("accepted", None, None),
        "civitai:06": ("rejected", None, "keyword_mismatch"),
        "diffusiondb:07": ("edited", "a small violet square", None),
    }
    six = next(r for r in table.to_pylist() if r["id"] == "civitai:06")
    assert six["annotators"] == 3 and six["agreement"] == pytest.approx(2 / 3)
    assert six["annotator"] == "bob@surd.test,cy@surd.test,reviewer@surd.test"

    status = run_surd("review", "status", "--url", labelstudio.url, "--project", "SURD round trip", "--json",
                  key=labelstudio.token)  # fmt: skip
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert (s["tasks"], s["annotated"], s["accepted"], s["rejected"], s["edited"]) == (24, 8, 3, 2, 3)
    assert s["agreement"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-3)

    # `surd export` applies reviews.parquet: exactly the expected rows and narratives survive.
    exported = runner.invoke(app, ["export", str(run)])
    assert exported.exit_code == 0, exported.output
    final = selection.read_parquet_folder(run / "surd" / "data").to_pylist()
    expected = {i: (r["narrative_prompt"], "llm:test@v1", None) for i, r in rows.items()}
    for i in ("diffusiondb:03", "civitai:06"):
        del expected[i]
    for i in ("civitai:00", "civitai:04", "diffusiondb:05"):
        expected[i] = (shown[i], "llm:test@v1", "accepted")
    for i in ("diffusiondb:01", "civitai:02", "diffusiondb:07"):
        expected[i] = (got[i][1], "human", "edited")
    assert {r["id"]: (r["narrative_prompt"], r["narrative_origin"], r["review"]) for r in final} == expected
    # The export stage keeps what reviewers rejected, like any stage: under export/dropped/, with the reason.
    drops = [r for b in shards.read_dropped(run / "export", columns=["id", "drop_reason"]) for r in b.to_pylist()]
    assert sorted((d["id"], d["drop_reason"]) for d in drops) == [
        ("civitai:06", "review_rejected"), ("diffusiondb:03", "review_rejected")
    ]  # fmt: skip


@pytest.mark.labelstudio
def test_inline_images_and_unknown_project(labelstudio, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"  # outside the server's files root: inline is the only way
    make_review_run(run, 3)
    session = ls.Session(labelstudio.url, labelstudio.token)
    with pytest.raises(SurdError, match="--images local"):
        ls.push(session, run, "SURD inline", images="local")
    result = ls.push(session, run, "SURD inline", images="auto")
    assert (result.images, result.imported) == ("inline", 3)
    # Not silent: the reason is the server's own (the folder is outside its LOCAL_FILES_DOCUMENT_ROOT).
    assert "LOCAL_FILES_DOCUMENT_ROOT" in result.images_reason
    task = session.tasks(result.project_id, with_annotations=False)[0]
    assert task.data["image"].startswith("data:image/jpeg;base64,")
    with pytest.raises(SurdError, match="no project titled 'nope'"):
        ls.pull(session, run, "nope")


@pytest.mark.labelstudio
def test_a_selection_of_nothing_creates_no_project(labelstudio, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    make_review_run(run, 3)
    session = ls.Session(labelstudio.url, labelstudio.token)
    with pytest.raises(SurdError, match="matched no rows of 3") as error:
        ls.push(session, run, "SURD nothing", where="clip_narrative > 99")
    assert "no project was created" in str(error.value)
    assert session.find_project("SURD nothing") is None


def _pushed(labelstudio, folder: str, n: int, project: str) -> tuple[Path, dict, ls.Session, ls.PushResult]:
    """A run of `n` rows under the server's files root, pushed with a personal access token."""
    run = labelstudio.files_root / folder
    rows = {r["id"]: r for r in make_review_run(run, n)}
    session = ls.Session(labelstudio.url, labelstudio.token)
    return run, rows, session, ls.push(session, run, project)


@pytest.mark.labelstudio
def test_task_data_lets_a_lead_sort_and_filter(labelstudio) -> None:  # noqa: F811
    _, rows, session, pushed = _pushed(labelstudio, "data-manager", 10, "SURD data manager")
    tasks = session.tasks(pushed.project_id, with_annotations=False)
    assert len(tasks) == 10
    for task in tasks:
        row = rows[task.data["sample_id"]]
        assert task.data["source"] == row["source"]
        for column in ("clip_narrative", "clip_keyword", "nsfw_score"):
            assert task.data[column] == (None if row[column] is None else pytest.approx(row[column], abs=1e-4))

    # What the data manager sends for "clip_narrative < 0.05 and source is civitai", sorted by clip_keyword.
    query = {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.clip_narrative", "operator": "less", "type": "Number", "value": 0.05},
            {"filter": "filter:tasks:data.source", "operator": "equal", "type": "String", "value": "civitai"},
        ]},
        "ordering": ["-tasks:data.clip_keyword"],
    }  # fmt: skip
    found = session.client.tasks.list(project=pushed.project_id, query=json.dumps(query))
    assert [t.data["sample_id"] for t in found] == ["civitai:04", "civitai:02", "civitai:00"]


@pytest.mark.labelstudio
def test_typing_a_correction_is_a_vote_and_undecided_submissions_are_counted(labelstudio) -> None:  # noqa: F811
    run, rows, session, pushed = _pushed(labelstudio, "one-step", 3, "SURD one step")
    task_ids = {t.data["sample_id"]: t.id for t in session.tasks(pushed.project_id, with_annotations=False)}
    # What the page sends when a reviewer only types in the box and submits, or only submits.
    session.client.annotations.create(id=task_ids["civitai:00"], result=_result(text="a corrected sentence"))
    untouched = _result(text=rows["diffusiondb:01"]["narrative_prompt"])
    session.client.annotations.create(id=task_ids["diffusiondb:01"], result=untouched)

    s = ls.status(session, "SURD one step")
    assert (s["annotated"], s["edited"], s["accepted"], s["undecided"]) == (2, 1, 0, 1)
    _, table = ls.pull(session, run, "SURD one step")
    assert [(r["id"], r["decision"], r["corrected_narrative"]) for r in table.to_pylist()] == [
        ("civitai:00", "edited", "a corrected sentence")
    ]
