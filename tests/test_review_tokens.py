"""Both kinds of Label Studio API token, against a server with legacy tokens off (as 1.23 starts by default).

A personal access token (PAT) is a JWT refresh token: every request we make, the SDK's and our own
local-files probe, must work with it. A legacy token works only where the organization enables them.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from labelstudio_server import labelstudio as labelstudio  # noqa: F401  (the session fixture)
from labelstudio_server import make_review_run, run_surd, set_legacy_tokens

from annotations import labelstudio as ls
from surd.errors import SurdError


def _jwt(claims: dict) -> str:
    """A JWT-shaped token with these claims (the signature does not matter: it is refused before any request)."""

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{'x' * 43}"


def test_expired_personal_token_and_access_token_are_clear_errors() -> None:
    expired = _jwt({"token_type": "refresh", "exp": int(time.time()) - 3600, "user_id": 1})
    with pytest.raises(SurdError, match="personal access token expired on") as err:
        ls.Session("http://127.0.0.1:9", expired)
    assert expired not in str(err.value)
    access = _jwt({"token_type": "access", "exp": int(time.time()) + 300, "user_id": 1})
    with pytest.raises(SurdError, match="short-lived access token"):
        ls.Session("http://127.0.0.1:9", access)


@pytest.mark.labelstudio
def test_personal_access_token_serves_local_images(labelstudio) -> None:  # noqa: F811
    run = labelstudio.files_root / "pat-local"
    make_review_run(run, 3)
    out = run_surd("review", "push", str(run), "--url", labelstudio.url, "--project", "SURD PAT local",
                   "--images", "local", key=labelstudio.token)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "3 imported" in out.stdout and "images: local" in out.stdout
    assert labelstudio.token not in out.stdout + out.stderr

    session = ls.Session(labelstudio.url, labelstudio.token)
    assert session.token_kind == "personal access token"
    task = session.tasks(session.project_id("SURD PAT local"), with_annotations=False)[0]
    image = session.get(task.data["image"])
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
    # Access tokens live about five minutes; the server then answers 401 and a fresh one must be fetched.
    stale = session.auth.access_token
    session.auth.access_token = _jwt({"token_type": "access", "exp": int(time.time()) + 300, "user_id": 1})
    assert session.get(task.data["image"]).status_code == 200
    assert session.auth.access_token not in (None, stale)


@pytest.mark.labelstudio
def test_legacy_token_refused_while_off_and_served_when_on(labelstudio) -> None:  # noqa: F811
    out = run_surd("review", "status", "--url", labelstudio.url, "--project", "x", key=labelstudio.legacy_token)
    assert out.returncode == 1
    said = " ".join(out.stderr.split())  # the error console wraps long lines
    assert "legacy token authentication has been disabled" in said, said
    assert "personal access token" in said and "Traceback" not in out.stderr + out.stdout
    assert labelstudio.legacy_token not in out.stderr + out.stdout

    run = labelstudio.files_root / "legacy-local"
    make_review_run(run, 2)
    set_legacy_tokens(labelstudio, True)
    try:
        session = ls.Session(labelstudio.url, labelstudio.legacy_token)
        assert session.token_kind == "legacy token"
        result = ls.push(session, run, "SURD legacy local", images="local")
        assert (result.imported, result.images) == (2, "local")
        task = session.tasks(result.project_id, with_annotations=False)[0]
        assert session.get(task.data["image"]).status_code == 200
    finally:
        set_legacy_tokens(labelstudio, False)


@pytest.mark.labelstudio
def test_failed_push_removes_only_the_project_it_created(labelstudio, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"  # outside the server's files root: it cannot serve these thumbnails
    make_review_run(run, 3)
    session = ls.Session(labelstudio.url, labelstudio.token)
    with pytest.raises(SurdError, match="--images local") as err:
        ls.push(session, run, "SURD failed push", images="local")
    assert "LOCAL_FILES_DOCUMENT_ROOT" in str(err.value)  # the server's reason, not a guess
    assert "removed the project" in str(err.value)
    assert session.find_project("SURD failed push") is None

    # A project that was there before the push stays, with its tasks.
    kept = ls.push(session, run, "SURD failed push", images="inline", limit=1)
    with pytest.raises(SurdError, match="--images local") as err:
        ls.push(session, run, "SURD failed push", images="local")
    assert "removed" not in str(err.value)
    assert session.project_id("SURD failed push") == kept.project_id
    assert len(session.tasks(kept.project_id, with_annotations=False)) == 1
