"""The one output format every benchmark writes for `run_all.py` (see its docstring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_rows(path: Path, *, title: str, workload: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Write `{"title", "workload", "rows", **extra}` as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "workload": workload, "rows": rows, **extra}, indent=2))


def merge_record(path: Path, key: str, result: dict[str, Any]) -> None:
    """Store `result` under `key` in the JSON object at `path` (several benchmarks share one file)."""
    record = json.loads(path.read_text()) if path.exists() else {}
    record[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
