"""The one output format every benchmark writes for `run_all.py` (see its docstring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_rows(path: Path, *, title: str, workload: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Write `{"title", "workload", "rows", **extra}` as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "workload": workload, "rows": rows, **extra}, indent=2))
