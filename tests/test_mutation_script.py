"""scripts/mutation.py's bookkeeping: an interrupted mutmut run must not record the tests' digest, or the next
run would trust the stopped run's survivor verdicts instead of retesting them."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.WORK = tmp_path / ".mutation"
    module.sync_copy = lambda work: None  # the repository copy is not what this test is about
    return module


@pytest.mark.parametrize(("rc", "recorded"), [(0, True), (1, False), (-2, False)])
def test_the_tests_digest_is_recorded_only_after_a_finished_run(tmp_path: Path, monkeypatch, rc: int,
                                                               recorded: bool) -> None:
    script = _script(tmp_path)
    group = script.load_config()["groups"]["schema"]
    # mutmut is the outside tool here: its exit status is all run_group reads from it
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, rc))
    timing = script.run_group("schema", group, children=1, fresh=False)
    digest = tmp_path / ".mutation" / "schema" / "tests.sha256"
    assert timing["rc"] == rc
    assert digest.exists() is recorded
    if recorded:
        assert digest.read_text() == script.tests_digest(group)
