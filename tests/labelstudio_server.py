"""A real Label Studio server for the review tests: started once per test session, on loopback only.

Provides the session fixture `labelstudio` (url, token, legacy_token, username, password, files_root).
The server runs from its own virtualenv (`scripts/install_labelstudio.sh`; it pins pyarrow<25), with its
data dir, HOME and XDG dirs in a temp folder, analytics, Sentry and version checks off, and a known admin.
Like a fresh Label Studio 1.23, legacy API tokens are off: `token` is a personal access token the admin
creates after logging in, as the account page does; `legacy_token` is the admin's legacy token, which this
server refuses until legacy tokens are enabled for the organization. When the server is not installed the
tests that use it skip and say why. Import the fixture or list this module in `pytest_plugins`; either
way one server serves the whole session.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".cache" / "labelstudio-venv"
START_TIMEOUT_S = float(os.environ.get("SURD_LABELSTUDIO_START_TIMEOUT", "180"))

# Variables Label Studio reads with or without its prefix (it falls back to the bare name), so an
# unrelated HOST, PORT or USERNAME in the environment would leak into the server.
_LEAKY = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DEBUG", "LOG_LEVEL", "DATABASE_NAME"}


@dataclass
class LabelStudioServer:
    url: str
    token: str  # a personal access token (JWT refresh token)
    legacy_token: str  # refused while legacy tokens are off (the default)
    username: str
    password: str
    files_root: Path  # LOCAL_FILES_DOCUMENT_ROOT: put run folders here to use --images local
    process: subprocess.Popen | None = None
    home: Path | None = None
    log: Path | None = None
    _log_handle: object | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Own process group (start_new_session): stops the server and nothing else.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)


def labelstudio_bin() -> Path | None:
    venv = Path(os.environ.get("SURD_LABELSTUDIO_VENV", DEFAULT_VENV))
    exe = venv / "bin" / "label-studio"
    return exe if exe.exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(home: Path, files_root: Path, username: str, password: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "HEARTEX_")) and k not in _LEAKY}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        LABEL_STUDIO_BASE_DATA_DIR=str(home / "data"),
        LABEL_STUDIO_USERNAME=username,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files_root),
        # Nothing leaves the machine: no telemetry, no error reporting, no PyPI version check.
        LABEL_STUDIO_COLLECT_ANALYTICS="false",
        LABEL_STUDIO_LATEST_VERSION_CHECK="false",
        LABEL_STUDIO_SENTRY_DSN="",
        LABEL_STUDIO_FRONTEND_SENTRY_DSN="",
        LABEL_STUDIO_CONVERTER_DOWNLOAD_RESOURCES="false",
        LABEL_STUDIO_FEATURE_FLAGS_OFFLINE="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait_ready(server: LabelStudioServer, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {server.process.returncode}; log: {server.log}")
        try:
            r = httpx.get(f"{server.url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise RuntimeError(f"label-studio did not answer within {START_TIMEOUT_S:.0f}s ({last}); log: {server.log}")


def logged_in(url: str, email: str, password: str) -> httpx.Client:
    """An HTTP client logged in through the login form, like a browser (session cookie + CSRF token)."""
    client = httpx.Client(base_url=url, timeout=30)
    client.get("/user/login/")
    form = {"email": email, "password": password, "csrfmiddlewaretoken": client.cookies.get("csrftoken", "")}
    r = client.post("/user/login/", data=form)
    if r.status_code != 302 or "sessionid" not in client.cookies:
        client.close()
        raise RuntimeError(f"cannot log in to {url} as {email}: HTTP {r.status_code}")
    client.headers.update({"X-CSRFToken": client.cookies.get("csrftoken", ""), "Referer": f"{url}/user/account"})
    return client


def create_personal_access_token(url: str, email: str, password: str) -> str:
    """What *Account & Settings > Personal Access Token > Create* does: POST /api/token/ as the logged-in user."""
    with contextlib.closing(logged_in(url, email, password)) as client:
        r = client.post("/api/token/")
        if r.status_code != 201:
            raise RuntimeError(f"cannot create a personal access token on {url}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()["token"]


def set_legacy_tokens(server: LabelStudioServer, enabled: bool) -> None:
    """Turn legacy API tokens on or off for the organization (*Organization > Settings > Access Token Settings*)."""
    with contextlib.closing(logged_in(server.url, server.username, server.password)) as client:
        r = client.post("/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": enabled})
        r.raise_for_status()


def start_server(exe: Path, files_root: Path) -> LabelStudioServer:
    """Start Label Studio on a free loopback port (legacy tokens off); returns once it made a personal token."""
    home = Path(tempfile.mkdtemp(prefix="surd-labelstudio-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = LabelStudioServer(
        url=url,
        token="",
        legacy_token=secrets.token_hex(20),
        username="reviewer@surd.test",
        password=secrets.token_urlsafe(16),
        files_root=files_root,
        home=home,
        log=home / "label-studio.log",
    )
    env = _server_env(home, files_root, server.username, server.password, server.legacy_token)
    cmd = [
        str(exe), "start",
        "--internal-host", "127.0.0.1", "--port", str(port), "--host", url,
        "--data-dir", str(home / "data"), "--no-browser",
    ]  # fmt: skip
    server._log_handle = open(server.log, "wb")  # noqa: SIM115 - closed in stop()
    server.process = subprocess.Popen(
        cmd, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=server._log_handle,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_ready(server, time.monotonic() + START_TIMEOUT_S)
        server.token = create_personal_access_token(url, server.username, server.password)
    except BaseException as e:
        tail = server.log.read_text(errors="replace")[-3000:] if server.log.exists() else ""
        server.stop()
        raise RuntimeError(f"Label Studio failed to start ({type(e).__name__}: {e}):\n{tail}") from None
    return server


_SERVER: LabelStudioServer | None = None
_FAILED: str | None = None


@pytest.fixture(scope="session")
def labelstudio(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LabelStudioServer:
    """A running Label Studio (one per test session). Skips, saying why, when it is not installed."""
    global _SERVER, _FAILED
    if _SERVER is not None:
        return _SERVER
    if _FAILED is not None:
        pytest.fail(_FAILED)
    exe = labelstudio_bin()
    if exe is None:
        pytest.skip(
            "Label Studio server not installed: run `bash scripts/install_labelstudio.sh` "
            f"(expected {DEFAULT_VENV}/bin/label-studio or $SURD_LABELSTUDIO_VENV)"
        )
    files_root = tmp_path_factory.mktemp("labelstudio-files")
    try:
        _SERVER = start_server(exe, files_root)
    except RuntimeError as e:
        # Installed but broken is a failure, not a skip: CI must not go green without the server.
        _FAILED = str(e)
        pytest.fail(_FAILED)
    request.config.add_cleanup(_stop_shared)
    return _SERVER


def _stop_shared() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        _SERVER = None


def make_review_run(
    run_dir: Path, n: int = 20, sources: tuple[str, ...] = ("civitai", "diffusiondb"), size: tuple[int, int] = (96, 64)
) -> list[dict]:
    """A run folder with `n` SURD rows (real JPEGs), as both the `score` stage and the exported `surd/data/`.

    Row i: id `<source>:<i:02d>`, a coloured picture with a disc, narrative `a plain colour square number i`,
    `clip_narrative` = i / 100, `clip_keyword` = 0.3 + i / 100, `nsfw_score` = i / 200 (null when i % 5 == 4).
    Returns the rows.
    """
    import io

    from PIL import Image, ImageDraw

    from surd import shards
    from surd.schema import DROPPED_SCHEMA, from_rows

    rows = []
    for i in range(n):
        colour = (37 * i % 256, 91 * i % 256, 53 * i % 256)
        w, h = size[0] + i, size[1]
        im = Image.new("RGB", (w, h), colour)
        disc = (w // 8, h // 8, w // 8 + h * 5 // 8, h * 6 // 8)
        ImageDraw.Draw(im).ellipse(disc, fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        source = sources[i % len(sources)]
        narrative = f"a plain colour square number {i}"
        rows.append(
            {
                "id": f"{source}:{i:02d}",
                "source": source,
                "source_id": f"{i:02d}",
                "image": {"bytes": buf.getvalue(), "path": None},
                "image_format": "JPEG",
                "width": w,
                "height": h,
                "keyword_prompt": f"square, colour {i}, masterpiece, 8k",
                "narrative_prompt": narrative,
                "narrative_candidates": [narrative, f"an abstract picture {i}"] if i % 3 == 0 else None,
                "narrative_origin": "llm:test@v1",
                "clip_narrative": i / 100,
                "clip_keyword": 0.3 + i / 100,
                "nsfw_score": None if i % 5 == 4 else i / 200,
                "split": "train",
            }
        )
    table = from_rows(rows)
    stage = Path(run_dir) / "score"
    stats = {"in": n, "kept": n, "dropped": {}, "seconds": 0.0}
    shards.commit_shard(stage, "part-00000", table, from_rows([], DROPPED_SCHEMA), stats)
    shards.write_manifest(stage, "score")
    shards.write_table(Path(run_dir) / "surd" / "data" / "train-00000-of-00001.parquet", table)
    return rows


def run_surd(*args: str, key: str) -> subprocess.CompletedProcess:
    """The real `surd` entry point in a child process (so error output is exactly what a user sees)."""
    import sys

    code = "import sys; from surd.cli import main; sys.argv = ['surd', *sys.argv[1:]]; main()"
    env = {"LABEL_STUDIO_API_KEY": key, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
