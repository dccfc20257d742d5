"""`surd eval`: probe sets with correct answers, paired summaries, and the whole flow on the tiny stack."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from adapter.eval_report import GridRow, grid_html, summarise, wins_and_losses
from adapter.eval_scores import Metric
from adapter.model import SURAdapter
from adapter.probes import PROBE_SETS, load_probe_set
from surd.cli.evaluation import register
from surd.errors import SurdError
from surd.schema import from_rows

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")
INVERSE = {"on top of": "under", "under": "on top of", "to the left of": "to the right of",
           "to the right of": "to the left of", "in front of": "behind", "behind": "in front of"}
COLOUR_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (\w+)")
ROLES = re.compile(r"^an? (\w+) (.+) an? (\w+)$")


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(^|\s)" + re.escape(phrase) + r"(\s|$)", text) is not None


# ---------------------------------------------------------------- the shipped probe sets


@pytest.mark.parametrize("name", PROBE_SETS)
def test_probe_set_answers_describe_their_prompts(name: str) -> None:
    probes = load_probe_set(name)
    assert len(probes) >= 12 and {p.category for p in probes} == {name}
    assert len({p.prompt for p in probes}) == len(probes)
    # the right answer sits at every position somewhere, so position bias cannot look like accuracy
    assert {p.answer for p in probes} == set(range(len(probes[0].alternatives)))
    for p in probes:
        correct = p.alternatives[p.answer]
        assert len(set(p.alternatives)) == len(p.alternatives) >= 3, p.id
        assert _contains(p.prompt, correct), f"{p.id}: answer {correct!r} is not what {p.prompt!r} says"
        wrong = [a for a in p.alternatives if a != correct and _contains(p.prompt, a)]
        assert not wrong, f"{p.id}: the prompt also says {wrong}"


def test_counting_probes_differ_only_in_the_count() -> None:
    for p in load_probe_set("counting"):
        parsed = [a.split(" ", 1) for a in p.alternatives]
        counts = [NUMBERS[word] for word, _ in parsed]
        assert len(set(counts)) == len(counts), p.id
        singular = {noun for word, noun in parsed if word == "one"}
        plural = {noun for word, noun in parsed if word != "one"}
        assert len(singular) == 1 and plural == {singular.pop() + "s"}, p.id  # one apple / two apples
        assert NUMBERS[p.prompt.split(" ", 1)[0]] == counts[p.answer], p.id


def test_colour_probes_bind_the_prompts_colours_to_the_right_objects() -> None:
    for p in load_probe_set("colour"):
        pairs = [COLOUR_PAIR.findall(a) for a in p.alternatives]
        nouns = [tuple(n for _, n in pair) for pair in pairs]
        assert all(pair and n == nouns[0] for pair, n in zip(pairs, nouns, strict=True)), p.id
        colourings = [tuple(c for c, _ in pair) for pair in pairs]
        assert len(set(colourings)) == len(colourings), p.id
        in_prompt = [(c, n) for c, n in COLOUR_PAIR.findall(p.prompt) if n in nouns[0]]
        assert in_prompt == pairs[p.answer], p.id


def test_action_probes_keep_the_roles_and_never_say_the_same_thing_twice() -> None:
    for p in load_probe_set("action"):
        parsed = [ROLES.match(a).groups() for a in p.alternatives]  # type: ignore[union-attr]
        assert len({frozenset((s, o)) for s, _, o in parsed}) == 1, p.id
        for i, (s, rel, o) in enumerate(parsed):
            for s2, rel2, o2 in parsed[i + 1 :]:
                # "a cat on top of a box" and "a box under a cat" would both be right
                assert not (s == o2 and o == s2 and INVERSE.get(rel) == rel2), f"{p.id}: {rel} / {rel2}"
        assert p.prompt.startswith(p.alternatives[p.answer] + " "), p.id


def test_probe_file_with_a_bad_answer_names_the_file_and_probe(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("category: mine\nprobes:\n  - {id: m-1, prompt: two cats, alternatives: [one cat, two cats], "
                    "answer: 2}\n")
    with pytest.raises(SurdError, match=r"mine\.yaml.*m-1.*answer 2"):
        load_probe_set(str(path))


# ---------------------------------------------------------------- summaries


def test_summary_pairs_each_arm_with_the_base_image_of_the_same_prompt_and_seed() -> None:
    def record(arm: str, item: str, seed: int, clip: float, correct: bool) -> dict:
        return {"arm": arm, "category": "counting", "item_id": item, "seed": seed, "clip_narrative": clip,
                "clip_keyword": None, "probe_correct": correct, "p_correct": 0.5}

    records = [record("base", "a", 0, 0.20, False), record("base", "a", 1, 0.30, True),
               record("adapter", "a", 0, 0.25, True), record("adapter", "a", 1, 0.28, True),
               record("adapter", "b", 0, 0.90, True)]  # no base image for b: left out of the paired numbers
    summary = summarise(records, ["base", "adapter"])["counting"]
    assert summary["arms"]["base"]["images"] == 2 and summary["arms"]["adapter"]["images"] == 3
    versus = summary["vs_base"]["adapter"]
    assert versus["pairs"] == 2
    assert versus["clip_narrative_delta"] == pytest.approx((0.05 - 0.02) / 2, abs=1e-4)
    assert versus["win_rate"] == 0.5 and versus["probe_accuracy_delta"] == 0.5
    assert summary["arms"]["base"]["clip_keyword"] is None


# ---------------------------------------------------------------- end to end on the tiny stack

ARGS = ["--limit", "1", "--seeds", "0,1", "--steps", "2", "--size", "32", "--device", "cpu", "--quiet"]


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, so `eval` stays a subcommand as in `surd`
        pass

    register(app)
    return app


def _adapter_run(folder: Path, base: Path, perturb: bool) -> Path:
    torch.manual_seed(1)
    adapter = SURAdapter(768, depth=1, heads=4, ff_dim=64, eta=0.5)
    if perturb:  # a trained adapter is not the identity; a fresh one is
        torch.nn.init.normal_(adapter.out.weight, std=0.5)
    adapter.save(folder, extra={"base_model": str(base)})
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from surd.demo.tiny import write_tiny_clip, write_tiny_sd

    root = tmp_path_factory.mktemp("eval")
    sd = write_tiny_sd(root / "sd")
    rows = [{"id": "t:1", "narrative_prompt": "a <script>x</script> cat & two dogs", "keyword_prompt": "cat, 8k",
             "split": "test"},
            {"id": "t:2", "narrative_prompt": "a red bicycle", "keyword_prompt": None, "split": "test"},
            {"id": "t:3", "narrative_prompt": None, "keyword_prompt": "no narrative", "split": "test"},
            {"id": "t:4", "narrative_prompt": "a training row", "keyword_prompt": "x", "split": "train"}]
    (root / "data" / "surd" / "data").mkdir(parents=True)
    pq.write_table(from_rows(rows), root / "data" / "surd" / "data" / "test-00000-of-00001.parquet")
    return {"root": root, "sd": sd, "clip": write_tiny_clip(root / "clip"), "data": root / "data",
            "adapter": _adapter_run(root / "run", sd, perturb=True)}


def _eval(stack: dict[str, Path], out: Path, *extra: str, adapter: Path | None = None) -> dict:
    args = ["eval", "--base", str(stack["sd"]), "--adapter", str(adapter or stack["adapter"]), "--clip",
            str(stack["clip"]), "--out", str(out), *ARGS, *extra]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads((out / "results.json").read_text())


def test_eval_end_to_end_then_resume_reuses_every_image(stack: dict[str, Path]) -> None:
    out = stack["root"] / "out"
    results = _eval(stack, out, "--data", str(stack["data"]))
    for name in ("results.json", "results.md", "report.html", "scores.parquet"):
        assert (out / name).is_file(), name
    assert set(results["categories"]) == {"surd", "counting", "colour", "action", "all probes"}
    assert results["prompts"] == {"surd": 1, "probes": 3, "surd_test_rows_without_narrative": 1,
                                  "llm_expansion_failures": 0}
    # 4 prompts x 2 seeds x 2 arms, plus the keyword arm on the one prompt with a keyword prompt (the surd row)
    assert results["images"] == {"total": 18, "generated": 18, "reused": 0}
    for category, summary in results["categories"].items():
        expected = 6 if category == "all probes" else 2
        arms = {"base": expected, "adapter": expected} | ({"keyword": 2} if category == "surd" else {})
        assert {arm: s["images"] for arm, s in summary["arms"].items()} == arms
        assert summary["vs_base"]["adapter"]["pairs"] == expected
    assert results["categories"]["surd"]["vs_base"]["keyword"]["pairs"] == 2
    assert results["categories"]["surd"]["arms"]["base"]["clip_keyword"] is not None
    assert results["categories"]["counting"]["arms"]["adapter"]["probe_accuracy"] in (0.0, 0.5, 1.0)

    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(scores) == 18 and all((out / s["image"]).is_file() for s in scores)
    by_key = {(s["arm"], s["item_id"], s["seed"]): (out / s["image"]).read_bytes() for s in scores}
    assert any(by_key[("adapter", i, seed)] != by_key[("base", i, seed)] for _, i, seed in by_key)
    keyword = [s for s in scores if s["arm"] == "keyword"]
    assert {s["generation_prompt"] for s in keyword} == {"cat, 8k"}  # the row's keyword prompt, not its narrative
    assert {s["prompt"] for s in keyword} == {"a <script>x</script> cat & two dogs"}  # scored against the narrative
    assert by_key[("keyword", "t:1", 0)] != by_key[("base", "t:1", 0)]

    page = (out / "report.html").read_text()
    items = page[page.index("<h2>surd: images</h2>"):]
    assert items.count('<img src="data:image/jpeg;base64,') == 18
    assert items.count('<tr class="row">') == 8  # one row per prompt and seed: the arms side by side
    assert "Largest wins and losses" in page[: page.index("<h2>surd: images</h2>")]
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt; cat &amp; two dogs" in page
    assert "| adapter | 2 |" in (out / "results.md").read_text()

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    again = _eval(stack, out, "--data", str(stack["data"]))
    assert again["images"] == {"total": 18, "generated": 0, "reused": 18}
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    assert again["categories"] == results["categories"]


def test_new_adapter_weights_regenerate_only_adapter_images_from_the_same_seeds(stack: dict[str, Path]) -> None:
    out = stack["root"] / "out-identity"
    first = _eval(stack, out, "--probes", "counting")
    identity = _adapter_run(stack["root"] / "run-identity", stack["sd"], perturb=False)
    second = _eval(stack, out, "--probes", "counting", adapter=identity)
    assert first["images"]["generated"] == 4 and second["images"] == {"total": 4, "generated": 2, "reused": 2}
    tags = [{arm["name"]: arm["tag"] for arm in run["arms"]} for run in (first, second)]
    assert tags[0]["base"] == tags[1]["base"] and tags[0]["adapter"] != tags[1]["adapter"]
    # the residual adapter is the identity at init: same seed, same noise, so the very same pixels
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    images = {(s["arm"], s["seed"]): (out / s["image"]).read_bytes() for s in scores}
    assert images[("adapter", 0)] == images[("base", 0)] and images[("adapter", 1)] == images[("base", 1)]
    assert images[("base", 0)] != images[("base", 1)]


def test_controls_llm_expanded_from_cached_expansions_and_a_finetune(stack: dict[str, Path]) -> None:
    from openai_server import FakeOpenAI

    def expand(messages: list[dict[str, str]], body: dict) -> str:
        return messages[-1]["content"].removeprefix("Description: ") + ", golden hour, highly detailed\n"

    out = stack["root"] / "out-llm"
    with FakeOpenAI(expand) as server:
        extra = ("--probes", "colour", "--seeds", "0", "--guidance", "1", "--llm", "tiny-expander",
                 "--llm-url", server.base_url, "--finetune", str(stack["sd"]))  # guidance 1: no negative prompt
        results = _eval(stack, out, *extra)
        assert len(server.requests) == 1
        again = _eval(stack, out, *extra)
        assert len(server.requests) == 1  # the second run took the expansion from OUT/llm-cache.sqlite
    assert [arm["name"] for arm in results["arms"]] == ["base", "adapter", "llm-expanded", "finetune"]
    assert again["images"]["generated"] == 0 and results["images"]["total"] == 4
    scores = {s["arm"]: s for s in pq.read_table(out / "scores.parquet").to_pylist()}
    assert scores["llm-expanded"]["generation_prompt"] == (
        "a red car parked on a quiet street, golden hour, highly detailed")
    assert scores["llm-expanded"]["prompt"] == scores["base"]["prompt"] == "a red car parked on a quiet street"
    assert results["categories"]["colour"]["vs_base"]["llm-expanded"]["pairs"] == 1
    # the "fine-tune" here is the base model itself: same weights, same seed, same pixels
    image = {arm: (out / s["image"]).read_bytes() for arm, s in scores.items()}
    assert image["finetune"] == image["base"] != image["llm-expanded"]


def test_user_errors_name_the_flag(stack: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "--base", str(stack["sd"]), "--clip", str(stack["clip"]), "--out", str(tmp_path / "o"), *ARGS]
    cases = [
        (["--adapter", str(tmp_path)], "--adapter"),
        (["--adapter", str(stack["adapter"]), "--data", str(tmp_path)], "--data"),
        (["--adapter", str(stack["adapter"]), "--probes", "shapes"], "--probes 'shapes'"),
        (["--adapter", str(stack["adapter"]), "--seeds", "a,b"], "--seeds"),
        (["--adapter", str(stack["adapter"]), "--probes", "none"], "nothing to evaluate"),
    ]
    for extra, needle in cases:
        result = CliRunner().invoke(_cli(), base + extra)
        assert isinstance(result.exception, SurdError) and needle in str(result.exception), (extra, result.exception)
    assert not (tmp_path / "o" / "images").exists()


# ---------------------------------------------------------------- guidance sweeps, named adapters, scorers


def test_guidance_sweep_generates_every_arm_at_each_scale(stack: dict[str, Path]) -> None:
    out = stack["root"] / "out-sweep"
    results = _eval(stack, out, "--probes", "counting", "--guidance", "1,3")
    assert results["config"]["guidance_scale"] == [1.0, 3.0]
    assert results["images"]["total"] == 8  # 1 prompt x 2 seeds x 2 arms x 2 scales
    assert set(results["categories"]) == {"counting · guidance 1", "counting · guidance 3"}
    for summary in results["categories"].values():
        assert summary["arms"]["base"]["images"] == 2 and summary["vs_base"]["adapter"]["pairs"] == 2
    tags = {(a["name"], a["guidance"]): a["tag"] for a in results["arms"]}
    assert len(set(tags.values())) == 4  # each arm at each scale has its own image folder
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    image = {(s["arm"], s["guidance"], s["seed"]): (out / s["image"]).read_bytes() for s in scores}
    assert image[("base", 1.0, 0)] != image[("base", 3.0, 0)]  # guidance changes the picture from the same noise
    markdown = (out / "results.md").read_text()
    assert "## guidance sweep (clip_narrative)" in markdown and "| counting | adapter |" in markdown


def test_named_adapters_are_arms_of_their_own(stack: dict[str, Path]) -> None:
    out = stack["root"] / "out-named"
    identity = _adapter_run(stack["root"] / "run-identity-named", stack["sd"], perturb=False)
    args = ["eval", "--base", str(stack["sd"]), "--clip", str(stack["clip"]), "--out", str(out), *ARGS,
            "--probes", "colour", "--adapter", f"trained={stack['adapter']}", "--adapter", f"fresh={identity}"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, (result.output, result.exception)
    results = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["base", "trained", "fresh"]  # no keyword prompt: no keyword arm
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    image = {(s["arm"], s["seed"]): (out / s["image"]).read_bytes() for s in scores}
    assert image[("fresh", 0)] == image[("base", 0)] != image[("trained", 0)]  # each arm used its own adapter


def test_arm_names_and_scorer_options_are_checked(stack: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "--base", str(stack["sd"]), "--out", str(tmp_path / "o"), *ARGS, "--probes", "colour"]
    cases = [
        (["--clip", str(stack["clip"]), "--adapter", f"base={stack['adapter']}"], "'base' is the name of another arm"),
        (["--clip", str(stack["clip"]), "--adapter", str(stack["adapter"]), "--adapter", str(stack["adapter"])],
         "a second unnamed adapter"),
        ([], "needs a CLIP model (--clip)"),
        (["--scorer", "attributes"], "needs a model folder (--judge)"),
        (["--scorer", "attributes", "--judge", str(tmp_path)], "--judge"),
        (["--scorer", "nope", "--judge", str(tmp_path)], "--scorer 'nope'"),
        (["--clip", str(stack["clip"]), "--guidance", "3,x"], "--guidance"),
    ]
    for extra, needle in cases:
        result = CliRunner().invoke(_cli(), base + extra)
        assert isinstance(result.exception, SurdError) and needle in str(result.exception), (extra, result.exception)
    assert not (tmp_path / "o" / "images").exists()


class RednessScorer:
    """A plug-in scorer for the tests: the share of pixels that are clearly red (a measurement of the image)."""

    label = "redness"
    metrics = (Metric("redness", "redness"),)
    primary = "redness"

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.model = model

    def score(self, records: list[dict], bar: object = None) -> list[dict]:
        return [{**r, "redness": _redness(Path(r["path"]))} for r in records]


def _redness(path: Path) -> float:
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return float(((rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)).mean())


def test_a_plugin_scorer_and_a_prompt_set_with_keyword_prompts(stack: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "mine.yaml"
    prompts.write_text("category: mine\nprobes:\n"
                       "  - {id: m-1, prompt: a crimson ball, keyword_prompt: 'red circle, 8k', "
                       "attributes: {colour: red, shape: circle}}\n"
                       "  - {id: m-2, prompt: a plain sentence}\n")
    out = tmp_path / "out"
    args = ["eval", "--base", str(stack["sd"]), "--out", str(out), *ARGS, "--limit", "2", "--probes", str(prompts),
            "--adapter", str(stack["adapter"]), "--scorer", "test_evaluate:RednessScorer", "--judge", "unused"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, (result.output, result.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["scorer"]["label"] == "redness" and results["scorer"]["primary"] == "redness"
    summary = results["categories"]["mine"]
    assert summary["arms"]["keyword"]["images"] == 2 and summary["arms"]["base"]["images"] == 4
    assert "clip_narrative" not in summary["arms"]["base"]
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    for arm in ("base", "adapter", "keyword"):
        mine = [_redness(out / s["image"]) for s in scores if s["arm"] == arm]
        assert summary["arms"][arm]["redness"] == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    keyword = [s for s in scores if s["arm"] == "keyword"]
    assert {s["generation_prompt"] for s in keyword} == {"red circle, 8k"}
    assert {json.loads(s["attributes"])["colour"] for s in keyword} == {"red"}
    pairs = [(s["redness"], b["redness"]) for s in scores if s["arm"] == "adapter"
             for b in scores if b["arm"] == "base" and (b["item_id"], b["seed"]) == (s["item_id"], s["seed"])]
    assert summary["vs_base"]["adapter"]["win_rate"] == pytest.approx(sum(a > b for a, b in pairs) / len(pairs))
    assert "| arm | images | redness |" in (out / "results.md").read_text()


# ---------------------------------------------------------------- wins and losses, the image grid


def test_wins_and_losses_rank_paired_deltas_and_leave_out_ties() -> None:
    def record(arm: str, item: str, seed: int, value: float, guidance: float = 7.5) -> dict:
        return {"arm": arm, "category": "c", "item_id": item, "seed": seed, "guidance": guidance, "score": value}

    deltas = {"a": 0.3, "b": 0.1, "c": 0.0, "d": -0.2, "e": -0.05, "f": 0.2, "g": -0.4}
    records = [record("base", item, 0, 0.5) for item in deltas]
    records += [record("x", item, 0, 0.5 + d) for item, d in deltas.items()]
    records += [record("x", "h", 0, 0.99), record("x", "a", 0, 0.99, guidance=3.0)]  # no base of the same key
    wins, losses = wins_and_losses(records, "x", Metric("score", "score"), k=3)
    assert [r["item_id"] for _, r, _ in wins] == ["a", "f", "b"]
    assert [r["item_id"] for _, r, _ in losses] == ["g", "d", "e"]
    assert all(s["arm"] == "base" and s["item_id"] == r["item_id"] for _, r, s in wins + losses)
    assert [round(d, 4) for d, _, _ in wins] == [0.3, 0.2, 0.1]
    few_wins, _ = wins_and_losses(records, "x", Metric("score", "score"), k=10)
    assert "c" not in [r["item_id"] for _, r, _ in few_wins]  # a tie is neither a win nor a loss


def test_grid_html_labels_rows_and_columns_and_escapes_text() -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    rows = [GridRow("a <b> prompt", [buffer.getvalue(), None], ["one", "two"]), GridRow("second", [None, None])]
    page = grid_html(["base", "<arm>"], rows)
    assert page.count('<tr class="row">') == 2 and page.count("<img ") == 1
    assert "<th>&lt;arm&gt;</th>" in page and "a &lt;b&gt; prompt" in page and "<b>" not in page
    assert page.index("<th>base</th>") < page.index("<th>&lt;arm&gt;</th>")


def test_stock_unconditional_is_an_eval_option_and_part_of_the_images_fingerprint() -> None:
    from adapter.config import EvalConfig
    from adapter.evaluate import build_arms

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    assert "--stock-unconditional" in CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    adapted = build_arms(EvalConfig(base="b", scorer="attributes", judge="j", probes=[]))
    stock = build_arms(EvalConfig(base="b", scorer="attributes", judge="j", probes=[], adapt_unconditional=False))
    assert [a.name for a in adapted] == [a.name for a in stock] and adapted[0].tag != stock[0].tag
