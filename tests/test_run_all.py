"""`benchmarks/run_all.py`: runs each script, reads its JSON, renders one table, never hides a failed script."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module
    spec.loader.exec_module(module)
    return module


def _script(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


WRITES_JSON = """
    import argparse, json, pathlib
    p = argparse.ArgumentParser()
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    rows = [
        {{"metric": "images/s", "ours": {ours}, "baseline": {base}, "baseline_name": "naive loop", "target": 1.5}},
        {{"metric": "peak memory", "ours": 2.0, "baseline": 3.0, "baseline_name": "recompute",
          "higher_is_better": False, "unit": "GiB"}},
        {{"metric": "quick flag seen", "ratio": 1.0 if a.quick else 0.0, "baseline_name": "-"}},
    ]
    a.json.write_text(json.dumps({{"title": "toy benchmark", "rows": rows}}))
"""


def test_table_has_one_row_per_measurement_and_marks_failures(run_all, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    _script(bench, "toy", WRITES_JSON.format(ours=300.0, base=100.0))
    _script(bench, "crashes", "raise SystemExit('no GPU here')\n")
    _script(
        bench,
        "legacy",
        """
        import json, sys
        path = sys.argv[sys.argv.index("--json") + 1]
        open(path, "w").write(json.dumps({"speedup": {"clean_rows_per_s": 1.8}}))
    """,
    )
    _script(bench, "_helper", "raise SystemExit(3)\n")  # not a benchmark: never run
    out = tmp_path / "docs" / "benchmarks.md"
    code = run_all.main(["--quick", "--bench-dir", str(bench), "--out", str(out), "--json-dir", str(tmp_path / "j")])
    page = out.read_text()
    assert code == 1  # one script failed
    rows = {
        line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line
        for line in page.splitlines()
        if line.startswith("| ") and not line.startswith("| benchmark")
    }
    assert set(rows) == {
        "toy/images/s",
        "toy/peak memory",
        "toy/quick flag seen",
        "crashes/-",
        "legacy/clean_rows_per_s",
    }
    assert "3.00x" in rows["toy/images/s"] and "| met |" in rows["toy/images/s"]
    assert "1.50x" in rows["toy/peak memory"] and "GiB" in rows["toy/peak memory"]  # lower is better: 3/2
    assert "1.00x" in rows["toy/quick flag seen"]  # --quick was passed through
    assert "not run" in rows["crashes/-"] and "no GPU here" in rows["crashes/-"]
    assert "1.80x" in rows["legacy/clean_rows_per_s"]
    assert "**cores**" in page and "**python**" in page
    assert json.loads((tmp_path / "j" / "toy.json").read_text())["title"] == "toy benchmark"


def test_missed_target_and_missing_numbers(run_all, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bench = tmp_path / "b"
    bench.mkdir()
    _script(bench, "slow", WRITES_JSON.format(ours=100.0, base=100.0))
    out = tmp_path / "benchmarks.md"
    assert run_all.main(["--bench-dir", str(bench), "--out", str(out), "--only", "slow"]) == 0
    line = next(x for x in out.read_text().splitlines() if "images/s" in x)
    assert "1.00x" in line and "| missed |" in line
    rows = run_all.normalise_rows("x", {"rows": [{"metric": "m", "ours": 1.0}]})
    assert rows[0]["ratio"] is None and "no ratio" in rows[0]["error"]
    assert "error" in run_all.normalise_rows("x", {"title": "no rows"})[0]
    legacy = run_all.normalise_rows("x", {"rows": 64, "speedup": 2.5})  # `rows` as a count, one speedup
    assert [(r["metric"], r["ratio"]) for r in legacy] == [("speedup", 2.5)]
