"""The HTML run report, rendered from real stage folders."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from surd.report import write_report
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.shards import commit_shard, write_table

STAGES = ["collect", "fetch", "clean", "dedup", "nsfw", "pair", "score", "export"]
EVIL = "<script>alert('x')</script> & \"quotes\""


class Page(HTMLParser):
    """Collects table rows (cell texts), tag attributes and <img> sources."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


def jpeg(i: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((40 * i) % 256, 90, 200 - 10 * i)).save(buf, "JPEG")
    return buf.getvalue()


def make_rows(prefix: str, n: int, **extra: object) -> list[dict]:
    return [
        {
            "id": f"{prefix}:{i}",
            "source": "test",
            "source_url": "https://example.invalid/not-shown",
            "image": {"bytes": jpeg(i, (300 + 20 * i, 200 + 10 * i)), "path": None},
            "width": 300 + 20 * i,
            "height": 200 + 10 * i,
            "keyword_prompt": f"masterpiece, castle number {i}, {'detailed, ' * i}sunset",
            "narrative_prompt": f"A castle at sunset, picture {i}.",
            **extra,
        }
        for i in range(n)
    ]


def commit(stage_dir: Path, kept: list[dict], dropped: list[tuple[dict, str]]) -> None:
    drops = [
        dict(r, drop_stage=stage_dir.name, drop_reason=reason, drop_detail=f"why {r['id']}") for r, reason in dropped
    ]
    counts: dict[str, int] = {}
    for _, reason in dropped:
        counts[reason] = counts.get(reason, 0) + 1
    stats = {"in": len(kept) + len(dropped), "kept": len(kept), "dropped": counts, "seconds": 0.5}
    commit_shard(stage_dir, "folder/part-00000", from_rows(kept, SCHEMA), from_rows(drops, DROPPED_SCHEMA), stats)


def build_run(run: Path) -> list[dict]:
    """collect (10 kept, 2 dropped) -> clean (7 kept, 3 dropped) -> dedup (6 kept, 1 dropped); returns dedup rows."""
    rows = make_rows("r", 10)
    rows[3]["keyword_prompt"] = EVIL
    commit(run / "collect", rows, [(make_rows("bad", 2)[0], "no_prompt"), (make_rows("bad", 2)[1], "no_prompt")])
    commit(
        run / "clean", rows[:7], [(rows[7], "image_too_small"), (rows[8], "image_too_small"), (rows[9], "empty_prompt")]
    )
    kept = [dict(r, clip_model="ViT-B-32/test", clip_keyword=0.31, clip_narrative=0.27) for r in rows[1:7]]
    commit(run / "dedup", kept, [(rows[0], "duplicate_image")])
    return kept


def render(run: Path, out: Path, **kwargs: object) -> tuple[str, Page]:
    write_report(run, out, **kwargs)
    text = out.read_text(encoding="utf-8")
    return text, Page(text)


def test_report_counts_reasons_and_samples(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    kept = build_run(run)
    out = tmp_path / "reports" / "report.html"
    text, page = render(run, out, stages=STAGES, samples=4, seed=1)
    assert page.row("collect")[:4] == ["collect", "12", "10", "2"]
    assert page.row("clean")[:4] == ["clean", "10", "7", "3"]
    assert page.row("dedup")[:4] == ["dedup", "7", "6", "1"]
    stage_rows = [r[0] for r in page.rows if r and r[0] in STAGES]
    assert stage_rows == ["collect", "clean", "dedup"]  # data-flow order; missing stages left out
    reasons = {r[0].split("examples")[0]: r[1] for r in page.rows if r and r[0].startswith(("image_", "empty", "dup"))}
    assert reasons == {"image_too_small": "2", "empty_prompt": "1", "duplicate_image": "1"}
    assert "why r:7" in text  # drop details shown as examples
    # samples: 4 thumbnails from the last stage with rows (dedup), decodable JPEGs no larger than 256 px
    assert len(page.images) == 4
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "JPEG" and max(img.size) <= 256
    shown = {v for tag, k, v in page.attrs if tag == "img" and k == "alt"}
    assert shown <= {r["id"] for r in kept} and len(shown) == 4
    assert "ViT-B-32/test" in text and "0.310" in text
    assert 'aria-label="Image size (pixels)"' in text and 'aria-label="Prompt length (words)"' in text
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp files left


def test_report_escapes_text_and_has_no_external_refs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    text, page = render(run, tmp_path / "r.html", stages=STAGES, samples=10)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "http://" not in text and "https://" not in text
    for tag, key, value in page.attrs:
        assert key not in ("href", "xlink:href"), (tag, key, value)
        if key == "src":
            assert (value or "").startswith("data:")
    assert "url(" not in text and "@import" not in text


def test_report_prefers_exported_dataset_and_is_seeded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    exported = make_rows("final", 5)
    write_table(run / "surd" / "data" / "train-00000-of-00001.parquet", from_rows(exported, SCHEMA))
    text, page = render(run, tmp_path / "a.html", stages=STAGES, samples=3, seed=7)
    shown = {v for tag, k, v in page.attrs if tag == "img" and k == "alt"}
    assert len(shown) == 3 and shown <= {r["id"] for r in exported}
    again, _ = render(run, tmp_path / "a.html", stages=STAGES, samples=3, seed=7)
    assert again == text  # same seed, same page (and overwriting works)
    picks = set()
    for seed in range(8):
        _, p = render(run, tmp_path / "b.html", stages=STAGES, samples=3, seed=seed)
        picks.add(frozenset(v for tag, k, v in p.attrs if tag == "img" and k == "alt"))
    assert len(picks) > 1


def test_report_of_an_empty_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    text, page = render(tmp_path / "empty", tmp_path / "e.html")
    assert "No finished stage shards found" in text and page.images == []


def test_histogram_bins_count_every_value() -> None:
    from surd.report import histogram_svg

    svg = histogram_svg("lengths", {"keyword": [3, 3, 5, 11], "narrative": [6]})
    assert "<title>keyword 3: 2</title>" in svg and "<title>keyword 11: 1</title>" in svg
    assert "<title>narrative 6: 1</title>" in svg
    wide = Page(histogram_svg("sizes", {"width": list(range(100, 1000, 7))}))
    assert len([1 for tag, k, _ in wide.attrs if tag == "rect" and k == "x"]) <= 20
