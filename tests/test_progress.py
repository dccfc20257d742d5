"""Live progress: rows as they finish (inside a batch, from worker processes), and plain lines without a terminal."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from openai_server import FakeOpenAI

from pipelines.local import run_stage
from pipelines.progress import progress_bar, progress_line, track
from surd import shards
from surd.pair import PairConfig
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows

LINE = re.compile(r"^\[surd\] (?P<label>.+): (?P<done>\d+)/(?P<total>\d+) rows \(\d+%\), (?P<rate>[\d.e+-]+) rows/s, "
                  r"elapsed \d+:\d\d(?:, ETA (?:\d+:\d\d|\?))?$")


def test_progress_line_says_rate_and_time_left() -> None:
    # 48 of 210 rows in 25 s: 1.92 rows/s, and 162 rows to go at that rate take 84.4 s
    assert progress_line("pair", 48, 210, 25.0) == "pair: 48/210 rows (23%), 1.92 rows/s, elapsed 0:25, ETA 1:24"
    assert progress_line("pair", 210, 210, 3725.0).endswith("elapsed 1:02:05")  # no ETA once done
    assert progress_line("collect", 7, None, 2.0, unit="pages") == "collect: 7 pages, 3.5 pages/s, elapsed 0:02"
    assert progress_line("pair", 0, 21, 10.0).endswith("0/21 rows (0%), 0 rows/s, elapsed 0:10, ETA ?")


def test_without_a_terminal_a_line_every_few_seconds_and_one_at_the_end(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURD_PROGRESS_EVERY", "0.05")
    with progress_bar("generate", 4, unit="steps") as bar:
        for _ in range(4):
            time.sleep(0.12)
            bar.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 5, lines  # at least one tick per step, plus the last line
    assert lines[-1].startswith("[surd] generate: 4/4 steps (100%)")
    assert all(line.startswith("[surd] generate: ") for line in lines)
    with progress_bar("quiet", 4, enabled=False) as bar:
        bar.advance(4)
    assert list(track(range(3), "tracked", unit="prompts")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("[surd] tracked: 3/3 prompts (100%)")


def _collect(run: Path, shard_rows: int, n_shards: int) -> None:
    for s in range(n_shards):
        rows = [{"id": f"t:{s}-{i}", "source": "t", "keyword_prompt": f"masterpiece, {i} red apples, shard {s}, 8k"}
                for i in range(shard_rows)]
        stats = {"in": shard_rows, "kept": shard_rows, "dropped": {}, "seconds": 0.0}
        shards.commit_shard(run / "collect", f"t/part-{s:05d}", from_rows(rows, SCHEMA),
                            DROPPED_SCHEMA.empty_table(), stats)
    shards.write_manifest(run / "collect", "collect")


def _slow_retry(messages: list[dict[str, str]], body: dict[str, Any]) -> str:
    """Row 0 of every shard gives a tag list first; its retry answers after a second."""
    prompt = messages[-1]["content"]
    if " 0 red apples" in prompt and body["seed"] < 1000:
        return "tags, only, here, now, and, more"
    if " 0 red apples" in prompt:
        time.sleep(1.0)
    return f"A picture of apples, version {body['seed']}."


def _counts(err: str) -> list[int]:
    matches = [LINE.match(line) for line in err.splitlines() if line.startswith("[surd] pair")]
    assert matches and all(matches), err
    assert {m["total"] for m in matches} == {"12"}
    return [int(m["done"]) for m in matches]  # type: ignore[index]


@pytest.mark.parametrize("workers", [1, 2])
def test_pair_moves_row_by_row_inside_a_shard(
    workers: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards of 6 rows, each one batch: the bar moves when 5 rows are done and the 6th is retried."""
    run = tmp_path / "run"
    _collect(run, 6, 2)
    monkeypatch.setenv("SURD_PROGRESS_EVERY", "0.1")
    with FakeOpenAI(_slow_retry) as server:
        config = PairConfig(backend="openai", model="served", base_url=server.base_url, api_key_env=None,
                            batch_size=6, max_retries=1, min_words=1)
        stats = run_stage(run, "pair", config, workers=workers, progress=True)
    assert stats["kept"] == 12
    counts = _counts(capsys.readouterr().err)
    assert counts == sorted(counts) and counts[-1] == 12
    assert set(counts) - {0, 6, 12}, counts  # a count inside a shard: rows reported before their shard ended


def test_score_shows_its_whole_run_pass_row_by_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A percentile threshold scores every row before the first batch: that pass has a bar of its own."""
    import io

    from PIL import Image

    from surd.demo.tiny import write_tiny_clip
    from surd.score import ScoreConfig

    run = tmp_path / "run"
    rows = []
    for i in range(10):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (25 * i, 80, 160)).save(buf, "PNG")
        rows.append({"id": f"t:{i}", "image": {"bytes": buf.getvalue(), "path": None},
                     "keyword_prompt": f"{i} red apples", "narrative_prompt": f"Some {i} apples."})
    stats = {"in": 10, "kept": 10, "dropped": {}, "seconds": 0.0}
    shards.commit_shard(run / "collect", "t/part-00000", from_rows(rows, SCHEMA), DROPPED_SCHEMA.empty_table(), stats)
    shards.write_manifest(run / "collect", "collect")
    monkeypatch.setenv("SURD_PROGRESS_EVERY", "30")  # only the last line of each bar
    config = ScoreConfig(model=str(write_tiny_clip(tmp_path / "clip")), num_workers=0, inference_batch_size=3,
                         min_narrative_percentile=50)
    run_stage(run, "score", config, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "[surd] score: plan over collect: 10/10 rows (100%)", "[surd] score (collect -> score): 10/10 rows (100%)"]
