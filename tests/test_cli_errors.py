"""Errors a user can cause print a line or a short usage, never a traceback: through the real `surd` command.

Each case runs the command in a subprocess (`python -m surd` and, where installed, the `surd` console script)
and counts the lines it prints.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("surd")
ENTRY_POINTS = [pytest.param([sys.executable, "-m", "surd"], id="python-m-surd")] + (
    [pytest.param([str(SCRIPT)], id="console-script")] if SCRIPT.exists() else []
)


def surd(*args: str, entry: list[str] | None = None, prefix: list[str] | None = None, cwd: Path | None = None,
         preexec_fn: object = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "80"}
    cmd = [*(prefix or []), *(entry or [sys.executable, "-m", "surd"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
                          preexec_fn=preexec_fn)  # type: ignore[arg-type]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, nothing on stdout, one `error:` line on stderr that holds every needle."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines(result.stderr) == [result.stderr.strip()], result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ---- usage errors: as click prints them, exit 2 ----


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run"], "Missing argument"),
        (["run", "x.yaml", "--bogus"], "No such option: --bogus"),
        (["trian"], "No such command 'trian'"),
        (["stats", "a", "b"], "unexpected extra argument"),
        (["collect"], "Missing argument"),
        (["fetch", "RUN", "--concurrency", "zero"], "--concurrency"),
        (["review", "pull"], "Missing"),
    ],
)
def test_usage_errors_print_usage_and_one_error_line(entry: list[str], args: list[str], needle: str) -> None:
    result = surd(*args, entry=entry)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 2, result.stderr
    printed = lines(result.stderr)
    assert len(printed) <= 4, result.stderr  # usage, a hint to --help, the error
    assert printed[0].startswith("Usage:") and printed[-1].startswith("Error:") and needle in printed[-1], printed
    assert result.stdout == ""


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("args", [[], ["review"], ["models"], ["--help"]])
def test_bare_commands_print_help_and_succeed(entry: list[str], args: list[str]) -> None:
    result = surd(*args, entry=entry)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Usage" in result.stdout and "--help" in result.stdout
    if not args:
        assert all(command in result.stdout for command in ("run", "collect", "stats", "doctor"))


def test_long_errors_stay_on_one_line_with_brackets_intact(tmp_path: Path) -> None:
    # Rich markup ate `[jsonl]` and the console wrapped at 80 columns: the line must come out as written.
    (tmp_path / "d.jsonl").write_text('{"prompt": "a cat", "file": "a.png"}\n')
    result = surd("collect", "jsonl", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
                  "--option", "a_very_long_option_name_that_would_wrap_on_a_narrow_terminal=1",
                  "--option", "another_long_option_name_to_push_past_eighty_columns=2")
    line = assert_one_line_error(result, "collect[jsonl]", "a_very_long_option_name", "another_long_option_name")
    assert len(line) > 80


# ---- OSError: one line naming what and where ----


def test_folder_or_binary_file_as_the_recipe(tmp_path: Path) -> None:
    assert_one_line_error(surd("run", str(tmp_path), "--out", str(tmp_path / "o")), str(tmp_path), "folder")
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)) * 64)
    assert_one_line_error(surd("run", str(binary), "--out", str(tmp_path / "o")), str(binary))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ncollect:\n  - {type: folder\n  path: [\n")
    assert_one_line_error(surd("run", str(broken), "--out", str(tmp_path / "o")), str(broken), "YAML")


def test_out_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a lighthouse at dusk", "url": "http://x/a.png"}\n')
    (tmp_path / "file").write_text("not a folder")
    result = surd("collect", "jsonl", str(tmp_path / "d.jsonl"), "--option", "image_url_column=url",
                  "--out", str(tmp_path / "file" / "run"))
    assert_one_line_error(result, "not a directory", str(tmp_path / "file"))


def _table(tmp_path: Path, rows: int = 12, chars: int = 60_000) -> Path:
    """A JSON-lines table whose rows hold long, barely compressible prompts: a collect shard of ~0.5 MB."""
    rng = random.Random(0)
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,") for _ in range(chars))
            f.write(json.dumps({"prompt": prompt, "url": f"http://example.com/{i}.png"}) + "\n")
    return path


def _collect_into(table: Path, out: Path, **kwargs: object) -> subprocess.CompletedProcess:
    return surd("collect", "jsonl", str(table), "--option", "image_url_column=url", "--out", str(out), "-q",
                **kwargs)  # type: ignore[arg-type]


def _user_namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    return probe.returncode == 0


def test_file_size_limit_is_one_line_naming_the_shard(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes every write past 128 KiB fail with EFBIG, the closest an unprivileged test gets to a
    # full disk on every machine (Python ignores SIGXFSZ, so the write returns the error).
    table = _table(tmp_path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 << 10, 128 << 10))

    result = _collect_into(table, tmp_path / "run", preexec_fn=limit)
    assert_one_line_error(result, "file too large writing", str(tmp_path / "run" / "collect"))


@pytest.mark.skipif(not _user_namespace_works(), reason="needs `unshare -Urm` (unprivileged user namespaces)")
def test_full_disk_is_one_line_naming_the_shard(tmp_path: Path) -> None:
    table = _table(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"', str(disk)]
    result = _collect_into(table, disk / "run", prefix=mount)
    assert_one_line_error(result, "no space left on device writing", str(disk / "run" / "collect" / "jsonl"))


def _read_only(folder: Path) -> list[str] | None:
    """A command prefix under which `folder` cannot be written, or None when this machine offers none."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if _user_namespace_works():  # root writes through permissions: mount the folder read-only instead
        return ["unshare", "-Urm", "sh", "-c",
                'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(folder)]
    return None


def test_read_only_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a lighthouse at dusk", "url": "http://x/a.png"}\n')
    folder = tmp_path / "ro"
    folder.mkdir()
    prefix = _read_only(folder)
    if prefix is None:
        pytest.skip("no way to make a read-only folder here")
    try:
        result = _collect_into(tmp_path / "d.jsonl", folder / "run", prefix=prefix)
    finally:
        folder.chmod(0o755)
    line = assert_one_line_error(result, str(folder / "run"))
    assert "read-only file system" in line or "permission denied" in line


# ---- stats and report on a folder that is not a run ----


@pytest.mark.parametrize("command", [["stats"], ["stats", "--json"], ["report", "-o", "r.html"]])
def test_stats_and_report_on_a_folder_that_is_not_a_run(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes.txt").write_text("hello")
    for target, needle in ((tmp_path / "photos", "not a surd run"), (tmp_path / "notes.txt", "not a folder"),
                           (tmp_path / "absent", "not found")):
        result = surd(command[0], str(target), *command[1:], cwd=tmp_path)
        assert_one_line_error(result, str(target), needle)
    assert not (tmp_path / "r.html").exists()


def test_surd_traceback_shows_where_an_os_error_came_from(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    env = {**os.environ, "SURD_TRACEBACK": "1"}
    result = subprocess.run([sys.executable, "-m", "surd", "stats", str(tmp_path / "file" / "run"), "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "error: run folder not found" in result.stderr  # a SurdError stays one line
    out = tmp_path / "file" / "run"
    (tmp_path / "d.jsonl").write_text('{"prompt": "a lighthouse at dusk", "url": "http://x/a.png"}\n')
    result = subprocess.run([sys.executable, "-m", "surd", "collect", "jsonl", str(tmp_path / "d.jsonl"), "--option",
                             "image_url_column=url", "--out", str(out)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "NotADirectoryError" in result.stderr
