"""Mutation testing of the core modules with mutmut, group by group; writes the scores to docs/testing.md.

`make mutation` runs every group of `[tool.surd.mutation]` in pyproject.toml; `python scripts/mutation.py clean
dedup` runs some. Each group mutates its modules and runs only its tests (mutmut then picks, per mutated function,
the tests that call it), in its own copy of the repository under `.mutation/<group>/`, so groups can run side by
side and a rerun only retests what changed (mutmut keeps its results there; `--fresh` starts over).

Subprocesses see the mutants too: PYTHONPATH points at the mutated copy and mutmut's MUTANT_UNDER_TEST is in the
environment, so `python -m surd ...` and spawned workers run the mutated code (a function called only there has
no recorded tests, though: mutmut reports it as "no tests", counted here as not killed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (mutmut needs it there too)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
DOC = ROOT / "docs" / "testing.md"
START, END = "<!-- mutation-scores:start -->", "<!-- mutation-scores:end -->"
PACKAGES = ["surd", "pipelines", "annotations", "adapter"]
# mutmut's exit-code verdicts (mutmut.stats.status_by_exit_code), grouped the way the score counts them.
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9, 37}  # a failing test, a timeout or a crash all kill the mutant
NOT_CHECKED = {None, 2, 34}  # interrupted, not run yet, skipped: left out of the score
NO_TESTS = {5, 33}


def load_config() -> dict:
    """The `[tool.surd.mutation]` table of pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["surd"]["mutation"]


def repo_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a fresh clone plus new work holds."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def sync_copy(work: Path) -> None:
    """Copy the repository into `work`, rewriting only files whose bytes changed (mutmut compares mtimes)."""
    for name in repo_files():
        src, dst = ROOT / name, work / name
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def mutmut_config(group: dict) -> str:
    """The `[tool.mutmut]` table for one group, appended to a copy of our pyproject.toml."""
    # Wall-clock tests (a deadline on a crafted input) are left out: mutmut's trampolines slow every call.
    pytest_args = ["-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    for test in group.get("deselect", []):
        pytest_args += ["--deselect", test]
    if "markers" in group:
        pytest_args += ["-m", group["markers"]]
    lines = [
        "\n[tool.mutmut]",
        f"source_paths = {json.dumps(PACKAGES)}",
        f"only_mutate = {json.dumps(group['modules'])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(group['tests'])}",
        f"pytest_add_cli_args = {json.dumps(pytest_args)}",
        f"also_copy = {json.dumps(['benchmarks/', 'scripts/', 'docs/', 'README.md', 'Makefile'])}",
        "use_git_change_detection = false",
        f"timeout_multiplier = {group.get('timeout_multiplier', 5.0)}",
        "",
    ]
    return "\n".join(lines)


def tests_digest(group: dict) -> str:
    """What the group's verdicts depend on besides the mutated code: its test files (and helpers) and settings."""
    digest = hashlib.sha256(mutmut_config(group).encode())
    files = {t.split("::")[0] for t in group["tests"]} | {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob(
        "*.py") if not p.name.startswith("test_")}
    for name in sorted(files):
        digest.update(name.encode() + (ROOT / name).read_bytes())
    return digest.hexdigest()


def retest_survivors(work: Path, group: dict) -> None:
    """Tests changed since the last run: forget which tests cover what, and retest every mutant not yet killed.

    mutmut itself retests the mutants of changed functions, but keeps old verdicts when only tests change;
    killed mutants stay killed (tests only ever get stronger here: no test may be weakened).
    """
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    for module in group["modules"]:
        meta = work / "mutants" / (module + ".meta")
        if meta.exists():
            data = json.loads(meta.read_text())
            data["exit_code_by_key"] = {k: (v if v in KILLED else None) for k, v in data["exit_code_by_key"].items()}
            meta.write_text(json.dumps(data, indent=4))


def run_group(name: str, group: dict, children: int, fresh: bool) -> dict:
    """Run mutmut for one group in `.mutation/<name>/`; returns its log path and wall time."""
    work = WORK / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sync_copy(work)
    # PYTHONPATH names work/mutants: it must exist when Python starts, or the import system caches it as missing
    # for the whole run and the tests import the unmutated package instead (every mutant then shows "no tests").
    (work / "mutants").mkdir(exist_ok=True)
    digest, digest_file = tests_digest(group), work / "tests.sha256"
    if digest_file.exists() and digest_file.read_text() != digest:
        retest_survivors(work, group)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_config(group))
    # One OpenMP thread: mutmut forks a child per mutant from a process whose tests already started torch's thread
    # pool, and a forked child's first parallel op then hangs until mutmut's timeout (counted as a kill).
    env = {**os.environ, "PYTHONPATH": str(work / "mutants"), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = work / "mutmut.log"
    started = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=work,
                            env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc == 0:  # an interrupted run leaves the digest as it was: the next run retests the survivors again
        digest_file.write_text(digest)
    timing = {"rc": rc, "log": str(log), "wall_s": round(time.monotonic() - started),
              "load": round(os.getloadavg()[0], 1), "children": children}
    (work / "timing.json").write_text(json.dumps(timing))
    return timing


def equivalents() -> dict[str, str]:
    """Mutants docs/testing.md names as equivalent (behaviour-preserving): `| `name` | why |` rows."""
    text = DOC.read_text() if DOC.exists() else ""
    return dict(re.findall(r"^\| `([\w.ǁ]+__mutmut_\d+)` \| (.+?) \|$", text, re.MULTILINE))


def verdicts(name: str, group: dict) -> dict[str, dict[str, int | None]]:
    """module path -> mutant name -> mutmut exit code, read from the group's `.meta` files."""
    out = {}
    for module in group["modules"]:
        meta = WORK / name / "mutants" / (module + ".meta")
        out[module] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return out


def score(codes: dict[str, int | None], equivalent: dict[str, str]) -> dict:
    """Counts of one module's mutants; `survivors` are neither killed nor named equivalent."""
    checked = {k: v for k, v in codes.items() if v not in NOT_CHECKED}
    killed = [k for k, v in checked.items() if v in KILLED]
    equiv = [k for k in checked if k not in killed and k in equivalent]
    survivors = sorted(k for k in checked if k not in killed and k not in equivalent)
    total = len(checked)
    return {
        "mutants": total, "killed": len(killed), "equivalent": len(equiv), "survivors": survivors,
        "no_tests": sum(1 for k in survivors if checked[k] in NO_TESTS),
        "not_checked": len(codes) - total,
        "killed_pct": round(100 * len(killed) / total, 1) if total else None,
        "score_pct": round(100 * (len(killed) + len(equiv)) / total, 1) if total else None,
    }


def table(rows: dict[str, dict], timings: dict[str, dict], note: str) -> str:
    lines = [
        f"Last run: {time.strftime('%Y-%m-%d')}, {note}.",
        "",
        "| group | module | mutants | killed | equivalent | survived (no tests) | killed % | killed + equivalent % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, s in rows.items():
        group = s["group"]
        if not s["mutants"]:  # the group has not run yet: say so rather than show a score
            lines.append(f"| {group} | `{module}` | not run yet | | | | | |")
            continue
        unchecked = f" (+{s['not_checked']} not checked)" if s["not_checked"] else ""
        lines.append(f"| {group} | `{module}` | {s['mutants']}{unchecked} | {s['killed']} | {s['equivalent']} | "
                     f"{len(s['survivors'])} ({s['no_tests']}) | {s['killed_pct']} | {s['score_pct']} |")
    lines += ["", "| group | wall time (s) | mutmut workers | load average at its end |", "|---|---:|---:|---:|"]
    lines += [f"| {g} | {t['wall_s']} | {t['children']} | {t['load']} |" for g, t in timings.items()]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main() -> int:
    config = load_config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: all of {', '.join(config['groups'])})")
    parser.add_argument("--jobs", type=int, default=config.get("jobs", 1), help="groups run side by side")
    parser.add_argument("--children", type=int, default=config.get("children", 2), help="mutmut workers per group")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results and copies")
    parser.add_argument("--report-only", action="store_true", help="only read the results of earlier runs")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the score table in docs/testing.md")
    parser.add_argument("--note", default="", help="what else loaded the machine, for the table")
    args = parser.parse_args()
    unknown = set(args.groups) - set(config["groups"])
    if unknown:
        parser.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    names = args.groups or list(config["groups"])

    started = time.monotonic()
    timings: dict[str, dict] = {}
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {n: pool.submit(run_group, n, config["groups"][n], args.children, args.fresh) for n in names}
            for n, future in futures.items():
                timings[n] = future.result()
                print(f"{n}: mutmut exit {timings[n]['rc']} in {timings[n]['wall_s']} s (log {timings[n]['log']})")
    wall = round(time.monotonic() - started)
    for n in names:  # groups not run now: their last run's timing
        path = WORK / n / "timing.json"
        if n not in timings and path.exists():
            timings[n] = json.loads(path.read_text())

    equivalent = equivalents()
    rows: dict[str, dict] = {}
    for n in names:
        for module, codes in verdicts(n, config["groups"][n]).items():
            rows[module] = {"group": n, **score(codes, equivalent)}
    failing = False
    for module, s in rows.items():
        print(f"{module}: {s['killed']}/{s['mutants']} killed, {s['equivalent']} equivalent, "
              f"{len(s['survivors'])} survived ({s['no_tests']} without tests): {s['score_pct']}%")
        for mutant in s["survivors"]:
            print(f"    survived: {mutant}")
        failing |= s["score_pct"] is None or s["score_pct"] < config.get("target_pct", 90)
    (WORK / "scores.json").write_text(json.dumps({"rows": rows, "timings": timings, "wall_s": wall}, indent=1))
    if not args.no_doc and set(names) == set(config["groups"]):
        total = sum(t["wall_s"] for t in timings.values())
        missing = [n for n in names if n not in timings]
        note = f"{total} s of group wall time in all ({args.jobs} group(s) at a time)" \
               f"{'; not run yet: ' + ', '.join(missing) if missing else ''}{'; ' + args.note if args.note else ''}"
        write_doc(table(rows, timings, note))
    return 1 if failing or any(t["rc"] for t in timings.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
