"""Run every benchmark in `benchmarks/` in quick mode and write ONE table to `docs/benchmarks.md`.

    python benchmarks/run_all.py [--quick] [--only fetch,pair] [--out docs/benchmarks.md]

The convention a benchmark script follows (any `benchmarks/*.py` except this one and `_*.py`):

- it accepts `--quick` (a small workload that finishes in a few minutes on a laptop) and `--json PATH`;
- it measures our code AND its peer or naive baseline in the same run, on the same machine and data;
- it writes to PATH a JSON object:

      {
        "title": "CLIP scoring, batched vs a per-image loop",    # optional, one line
        "workload": "2,000 images 64-128 px, ViT-B-32 tiny",      # optional: what was measured
        "notes": "img2dataset 1.4.2, same URL list",              # optional: shown under the table
        "rows": [
          {"metric": "images/s", "ours": 812.0, "baseline": 640.0,
           "baseline_name": "img2dataset", "ratio": 1.27, "target": 1.0,
           "higher_is_better": true}
        ]
      }

  `ratio` is how many times better ours is (> 1: ours wins). If it is missing it is computed from `ours`
  and `baseline`: ours/baseline, or baseline/ours when `"higher_is_better": false` (seconds, bytes).
  `target` is the minimum ratio we promise (a number), or a string shown as is; rows with a numeric
  target get a pass/fail mark. `unit` (optional) is shown after the values.

A script holding the line `# run_all: skip (why)` is a measurement, not a comparison (e.g. what each adapter
kind costs, a preset's time budget): it runs on its own and is left out of the table.

A script that exits non-zero, times out or writes no usable JSON still gets a row saying so, and this
script then exits 1: the table never hides a benchmark that did not run. A JSON without a `rows` list but
with `speedup` (a number, or a {metric: ratio} mapping: an older format) is shown with the ratio only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "pyarrow", "ray", "open_clip_torch", "transformers", "diffusers", "img2dataset")


SKIP_MARK = "# run_all: skip"  # a measurement without a baseline to compare with (it says why on that line)


def discover(folder: Path, only: set[str] | None = None) -> list[Path]:
    scripts = [p for p in sorted(folder.glob("*.py")) if p.name != Path(__file__).name and not p.name.startswith("_")]
    if only is None:
        scripts = [p for p in scripts if SKIP_MARK not in p.read_text(encoding="utf-8")]
    return [p for p in scripts if only is None or p.stem in only]


def run_one(script: Path, json_path: Path, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one benchmark script; returns its JSON, or {"error": ...} saying why there is none."""
    cmd = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit code {proc.returncode}: {last[:200]}", "seconds": seconds}
    try:
        result = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"no readable JSON at --json path: {e}", "seconds": seconds}
    if not isinstance(result, dict):
        return {"error": "JSON is not an object", "seconds": seconds}
    return {**result, "seconds": seconds}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def normalise_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows for one benchmark's result, filling `ratio` and `passed`; an error becomes one row."""
    if "error" in result:
        return [{"benchmark": name, "metric": "-", "error": result["error"]}]
    raw = result.get("rows")
    speedup = result.get("speedup")
    if not isinstance(raw, list) and isinstance(speedup, dict):
        raw = [{"metric": k, "ratio": v, "baseline_name": "(see script)"} for k, v in speedup.items()]
    elif not isinstance(raw, list) and _number(speedup) is not None:
        raw = [{"metric": "speedup", "ratio": speedup, "baseline_name": "(see script)"}]
    if not isinstance(raw, list) or not raw:
        return [{"benchmark": name, "metric": "-", "error": "JSON has no `rows` list (see benchmarks/run_all.py)"}]
    rows = []
    for item in raw:
        if not isinstance(item, dict):
            rows.append({"benchmark": name, "metric": "-", "error": f"row is not an object: {item!r}"[:200]})
            continue
        row = {"benchmark": name, **item}
        ours, base = _number(item.get("ours")), _number(item.get("baseline"))
        ratio = _number(item.get("ratio"))
        if ratio is None and ours is not None and base:
            ratio = ours / base if item.get("higher_is_better", True) else (base / ours if ours else None)
        row["ratio"] = ratio
        target = _number(item.get("target"))
        row["passed"] = None if target is None or ratio is None else ratio >= target
        if ratio is None:
            row["error"] = "no ratio: give `ratio`, or numeric `ours` and `baseline`"
        rows.append(row)
    return rows


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip().replace("|", "\\|")


def machine_info() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": _cpu_model(),
        "cores": f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable",
        "memory": _memory(),
        "gpu": _gpus(),
    }
    commit = _git_commit()
    if commit:
        info["commit"] = commit
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    info["packages"] = ", ".join(versions)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        return "unknown"


def _gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    names = [line.split(":", 1)[1].split("(")[0].strip() for line in out.splitlines() if ":" in line]
    return ", ".join(names) or "none"


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() or None


def render(results: dict[str, dict[str, Any]], info: dict[str, str], quick: bool) -> str:
    """The Markdown page: machine info, one table, notes per benchmark."""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python benchmarks/run_all.py{' --quick' if quick else ''}`); "
        "every row compares our code with its peer or a naive baseline, measured in the same run on this machine. "
        "Ratio > 1 means ours is better (faster, or smaller where lower is better).",
        "",
        *[f"- **{key}**: {value}" for key, value in info.items()],
        "",
        "| benchmark | metric | ours | baseline | baseline value | ratio | target | |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for name, result in results.items():
        for row in normalise_rows(name, result):
            if row.get("error") and row.get("ratio") is None:
                why = _fmt(row["error"])
                lines.append(f"| {name} | {_fmt(row.get('metric'))} | - | - | - | - | - | not run: {why} |")
                continue
            unit = str(row.get("unit", ""))
            mark = {True: "met", False: "missed", None: ""}[row["passed"]]
            lines.append(
                f"| {name} | {_fmt(row.get('metric'))} | {_fmt(_number(row.get('ours')), unit)} | "
                f"{_fmt(row.get('baseline_name'))} | {_fmt(_number(row.get('baseline')), unit)} | "
                f"{row['ratio']:.2f}x | {_fmt(row.get('target'))} | {mark} |"
            )
    lines.append("")
    for name, result in results.items():
        about = [str(result[k]) for k in ("title", "workload", "notes") if result.get(k)]
        seconds = f" ({result['seconds']:.0f} s)" if isinstance(result.get("seconds"), float) else ""
        lines.append(f"- `benchmarks/{name}.py`{seconds}: {'; '.join(about) or 'no description'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", default=None, help="comma-separated script names (without .py)")
    parser.add_argument("--bench-dir", type=Path, default=ROOT / "benchmarks", help="where the scripts are")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json-dir", type=Path, default=None, help="keep each script's JSON here")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    scripts = discover(args.bench_dir, only)
    if not scripts:
        parser.error(f"no benchmark scripts found in {args.bench_dir}" + (f" named {args.only}" if only else ""))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="surd-bench-") as tmp:
        json_dir = args.json_dir or Path(tmp)
        json_dir.mkdir(parents=True, exist_ok=True)
        for script in scripts:
            print(f"running {script.name} ...", file=sys.stderr, flush=True)
            results[script.stem] = run_one(script, json_dir / f"{script.stem}.json", args.quick, args.timeout)
            if "error" in results[script.stem]:
                print(f"  {script.name}: {results[script.stem]['error']}", file=sys.stderr)
    page = render(results, machine_info(), args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(page)
    failed = [name for name, result in results.items() if any(r.get("error") for r in normalise_rows(name, result))]
    if failed:
        print(f"benchmarks without results: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
