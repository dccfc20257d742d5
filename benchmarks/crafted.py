"""Crafted files against the bounded readers (issues #11 item 4, #12): ours vs the straightforward reader.

    python benchmarks/crafted.py [--quick] [--json PATH]

Each crafted file of issue #11 is built in a temporary folder (with the helpers the tests use, so the files are
the ones the tests check) and given to our public entry point: the folder, imagefolder, JSON-lines and
DiffusionDB sources (`read_partition`, as `surd collect` calls it) and the clean stage's `process_row`. Ours
is timed best of N. The baseline does the same job the straightforward way, as the code did before the fix:

- ComfyUI cycle: a recursive walk of every link without a visited set, stopped at depth 20 (the old walker);
- infotext / sidecar without colons: the old settings regex (`_PARAM.findall` on the last line);
- 10 MB prompt: the recursive parser with string concatenation and the regex tidy-up (the test suite's oracle);
- JSON 100k deep, 3000 `(`: `json.loads` and the recursive parser, which raise RecursionError;
- zip member: `zipfile.ZipFile.read`, peak memory by tracemalloc;
- FIFO: `Path.read_bytes()`, which blocks until a writer comes.

A baseline that could hang runs first on the real crafted file in a subprocess killed at a cap; when it is
killed, its value is extrapolated from runs on smaller inputs of the same shape, measured in the same run
(growth exponent measured too), and the row says so. Scaling rows give time(4n) / time(n): ≈ 4 is linear.
Times are CPU milliseconds of the process (`time.process_time`: the machine these run on is shared, and CPU time
does not count the moments another process had the core), MiB for memory; the targets are the issue's ("a crafted
file costs milliseconds"): 50 ms per file, or 10 ms per MB for a file that must be read whole.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _report import write_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' builders of crafted files, and their oracles

from test_clean_bounds import _reference_parse, _reference_tidy  # noqa: E402

# ---- the naive baselines ----------------------------------------------------------------------------------

# The A1111 settings regex before issue #11: on a line without ':' every start position rescans the rest.
NAIVE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def naive_infotext(text: str) -> list[Any]:
    """The `Key: value` pairs of an infotext's last line, found by the old regex."""
    return NAIVE_PARAM.findall(text.strip().split("\n")[-1])


WALK_CALLS = [0]  # calls of naive_walk, counted to extrapolate from a shallow cap to the real one


def naive_walk(graph: dict[str, Any], ref: Any, depth: int = 0, cap: int = 20) -> str | None:
    """The text behind a ComfyUI link, trying every linked input of every node: a depth cap, no visited set."""
    WALK_CALLS[0] += 1
    if isinstance(ref, str):
        return ref
    if not (isinstance(ref, list) and len(ref) == 2) or depth > cap:
        return None
    for value in (graph.get(str(ref[0])) or {}).get("inputs", {}).values():
        if isinstance(value, str | list) and (found := naive_walk(graph, value, depth + 1, cap)) is not None:
            return found
    return None


def naive_comfy_texts(graph: dict[str, Any], cap: int = 20) -> list[str | None]:
    """Every text encoder's text, walked naively."""
    return [naive_walk(graph, node["inputs"].get("text"), 0, cap) for node in graph.values()
            if node.get("class_type") == "CLIPTextEncode"]


def naive_clean(text: str) -> str:
    """The cleaner before issue #11 (kept by the tests as their oracle): a recursive parser, then regexes."""
    return _reference_tidy(_reference_parse(text, 0, None)[0])


def naive_job(case: str, path: Path) -> None:
    """What the straightforward reader does with the crafted file at `path`."""
    from PIL import Image

    if case == "comfyui":
        naive_comfy_texts(json.loads(Image.open(path).text["prompt"]))
    elif case == "parameters":
        naive_infotext(Image.open(path).text["parameters"])
    elif case == "sidecar":
        naive_infotext(path.read_text())
    elif case == "clean":
        naive_clean(path.read_text())
    else:
        raise ValueError(case)


def naive_capped(case: str, path: Path, cap: float) -> float | None:
    """Milliseconds of `naive_job` on the real file in a subprocess, or None when it was killed at `cap` s."""
    cmd = [sys.executable, __file__, "--naive", case, str(path)]
    try:  # the child stops itself at `cap` (exit 124); the timeout is for a child that cannot
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap + 30,
                              env={**os.environ, "CRAFTED_CAP": str(cap)})
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode == 124:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"naive {case} failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)["ms"]


def child(case: str, path: str) -> None:
    """Run one naive job, killing itself at $CRAFTED_CAP seconds of its own work (not counting imports)."""
    import signal

    from PIL import Image  # noqa: F401  (imported before the clock starts)

    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.setitimer(signal.ITIMER_REAL, float(os.environ["CRAFTED_CAP"]))
    start = time.process_time()
    naive_job(case, Path(path))
    print(json.dumps({"ms": (time.process_time() - start) * 1e3}))


# ---- measuring ------------------------------------------------------------------------------------------------


def best_ms(fn: Callable[[], Any], repeat: int) -> float:
    """Best of `repeat` runs, in CPU milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times) * 1e3


def growth(fn: Callable[[Any], Any], make: Callable[[int], Any], n: int, repeat: int = 1) -> tuple[float, float]:
    """(ms at n, ms at 4n)."""
    small, large = make(n), make(4 * n)
    return best_ms(lambda: fn(small), repeat), best_ms(lambda: fn(large), repeat)


def extrapolate(at_n: tuple[float, float], n: int, size: int) -> tuple[float, float]:
    """(ms at `size`, exponent) from the ms at n and 4n, growing as size**exponent (at least linearly)."""
    exponent = max(1.0, math.log(max(at_n[1], 1e-6) / max(at_n[0], 1e-6), 4))
    return at_n[1] * (size / (4 * n)) ** exponent, exponent


def crash_ms(fn: Callable[[], Any]) -> tuple[float, str]:
    """(ms, how it ended): the name of the exception it raised, or 'finished'."""
    start = time.process_time()
    try:
        fn()
        outcome = "finished"
    except Exception as e:  # the baseline's crash is the measurement
        outcome = type(e).__name__
    return (time.process_time() - start) * 1e3, outcome


def collect(config: Any) -> list[Any]:
    """Every item a source yields, as `surd collect` reads it."""
    source = config.build()
    return [item for part in source.list_partitions() for item in source.read_partition(part)]


def outcome(items: list[Any]) -> str:
    from surd.rows import Drop

    return ", ".join(i.reason if isinstance(i, Drop) else "row" for i in items)


Target = tuple[float, str]  # (the most ours may take, in the row's unit; the text the table shows)


def at_most(limit: float, unit: str = "ms") -> Target:
    return limit, f"≤ {limit:g} {unit}"


def per_mb(size: int) -> Target:
    """A file that must be read whole: 10 ms per MB (linear at 100 MB/s or better)."""
    return 10.0 * size / 2**20, f"≤ 10 ms per MB ({10 * size / 2**20:.0f} ms)"


def row(metric: str, ours: float, baseline_name: str, baseline: float, target: Target, unit: str = "ms"
        ) -> dict[str, Any]:
    """A table row (lower is better); `_limit` keeps the target's number for the summary and is not written."""
    return {"metric": metric, "ours": round(ours, 3), "baseline_name": baseline_name, "baseline": round(baseline, 3),
            "higher_is_better": False, "target": target[1], "unit": unit, "_limit": target[0]}


def hang_row(metric: str, ours: float, name: str, measured: float | None, cap: float, estimate: tuple[float, float],
             sizes: str, target: Target) -> dict[str, Any]:
    """A row whose baseline ran on the real file under a cap; killed, its value is the extrapolation."""
    if measured is not None:
        return row(metric, ours, f"{name}: finished", measured, target)
    ms, exponent = estimate
    return row(metric, ours, f"{name}: killed at {cap:g} s; value extrapolated from {sizes} as n^{exponent:.1f}",
               ms, target)


# ---- the crafted files ----------------------------------------------------------------------------------------


def comfyui_cycle(tmp: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    from test_metadata_bounds import CYCLE, tiny_png

    from surd.sources.folder import FolderConfig

    folder = tmp / "cycle"
    folder.mkdir()
    data = tiny_png({"prompt": json.dumps(CYCLE, separators=(",", ":"))})
    (folder / "cycle.png").write_bytes(data)
    ours = best_ms(lambda: collect(FolderConfig(path=folder)), a.repeat)
    calls = []
    for cap in (7, 8) if a.quick else (8, 9):  # count the calls at two shallow caps, time the deeper one
        WALK_CALLS[0] = 0
        ms = best_ms(lambda cap=cap: naive_comfy_texts(CYCLE, cap), 1)
        calls.append(WALK_CALLS[0])
    per_level = calls[1] / calls[0]
    at_20 = calls[1] * per_level ** (20 - cap)
    measured = naive_capped("comfyui", folder / "cycle.png", a.cap)
    name = (f"walk every link, no visited set, depth cap 20: {at_20:.1e} calls ({per_level:.2f}x per level, "
            f"counted to depth {cap}) at {ms * 1e3 / calls[1]:.2f} µs each")
    result = outcome(collect(FolderConfig(path=folder)))
    if measured is None:
        name = f"{name}; killed at {a.cap:g} s on the file"
    return [row(f"ms per crafted file: {len(data)}-byte PNG, ComfyUI cycle ({result})", ours, name,
                measured if measured is not None else ms * at_20 / calls[1], at_most(50))]


def parameters_chunk(tmp: Path, a: argparse.Namespace) -> tuple[list[dict[str, Any]], tuple[float, float], int]:
    from test_metadata_bounds import png_with_chunk

    from surd.sources.folder import FolderConfig

    size = (16 if a.quick else 50) << 20
    folder = tmp / "params"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png_with_chunk(b"tEXt", b"parameters\0" + b"a" * size))
    ours = best_ms(lambda: collect(FolderConfig(path=folder)), a.repeat)
    result = outcome(collect(FolderConfig(path=folder)))
    measured = naive_capped("parameters", folder / "huge.png", a.cap)
    n = 1000 if a.quick else 2000
    at = growth(naive_infotext, lambda k: "a" * k, n, repeat=2)
    return [hang_row(f"ms per crafted file: {size >> 20} MB `parameters` chunk, no colon ({result})", ours,
                     "PIL text + old settings regex", measured, a.cap, extrapolate(at, n, size),
                     f"{n} and {4 * n} chars", per_mb(size))], at, n


def sidecar_txt(tmp: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    from test_metadata_bounds import tiny_png

    from surd.sources.folder import FolderConfig

    size = 3 << 20
    folder = tmp / "sidecar"
    folder.mkdir()
    (folder / "a.png").write_bytes(tiny_png())
    text = ("masterpiece " * (size // 12)).strip()
    (folder / "a.txt").write_text(text)
    ours = best_ms(lambda: collect(FolderConfig(path=folder)), a.repeat)
    measured = naive_capped("sidecar", folder / "a.txt", a.cap)
    n = 1000 if a.quick else 2000
    at = growth(naive_infotext, lambda k: text[:k], n, repeat=2)
    result = outcome(collect(FolderConfig(path=folder)))
    return [hang_row(f"ms per crafted file: 3 MB sidecar .txt, no colon ({result})", ours,
                     "read_text + old settings regex", measured, a.cap, extrapolate(at, n, len(text)),
                     f"{n} and {4 * n} chars", per_mb(len(text)))]


def clean_rows(tmp: Path, a: argparse.Namespace) -> tuple[list[dict[str, Any]], tuple[float, float], int]:
    from test_metadata_bounds import tiny_png

    from surd.clean import CleanConfig

    cleaner, image = CleanConfig(min_side=1).build(), tiny_png()

    def process(prompt: str) -> Any:
        return cleaner.process_row({"id": "t:1", "source": "t", "image": {"bytes": image, "path": None},
                                    "keyword_prompt_raw": prompt})

    huge = "masterpiece " * (10_000_000 // 12)
    (tmp / "prompt.txt").write_text(huge)
    ours = best_ms(lambda: process(huge), a.repeat)
    measured = naive_capped("clean", tmp / "prompt.txt", a.cap)
    n = 50_000
    at = growth(naive_clean, lambda k: huge[:k], n)
    rows = [hang_row(f"ms per crafted prompt: 10 MB through the cleaner ({process(huge).reason})", ours,
                     "recursive parser + regex tidy (before #11)", measured, a.cap, extrapolate(at, n, len(huge)),
                     f"{n} and {4 * n} chars", at_most(50))]
    openers = "(" * 3000 + "a red fox in the snow"
    ours = best_ms(lambda: process(openers), a.repeat)
    ms, ended = crash_ms(lambda: naive_clean(openers))
    rows.append(row(f"ms per crafted prompt: 3000 '(' in a row (ours: {process(openers)['keyword_prompt']!r})", ours,
                    f"recursive parser (before #11): {ended}", ms, at_most(50)))
    return rows, at, n


def deep_json(tmp: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    from test_metadata_bounds import DEEP, tiny_png

    from surd.sources.folder import FolderConfig
    from surd.sources.tabular import JsonlConfig

    folder = tmp / "deep"
    folder.mkdir()
    (folder / "a.png").write_bytes(tiny_png())
    (folder / "a.json").write_text('{"prompt": "x", "extra": ' + DEEP + "}")
    lines = tmp / "rows.jsonl"
    lines.write_text(json.dumps({"prompt": "a fox", "url": "https://example.org/a.png"}) + "\n"
                     '{"prompt": "deep", "url": "https://example.org/b.png", "x": ' + DEEP + "}\n")
    rows = []
    for label, config, read in [
        ("sidecar .json", FolderConfig(path=folder), lambda: json.loads((folder / "a.json").read_text())),
        ("JSONL line", JsonlConfig(path=lines, image_url_column="url"),
         lambda: [json.loads(line) for line in lines.read_text().splitlines()]),
    ]:
        ours = best_ms(lambda config=config: collect(config), a.repeat)
        ms, ended = crash_ms(read)
        rows.append(row(f"ms per crafted file: JSON 100k deep in a {label} ({outcome(collect(config))})", ours,
                        f"json.loads, no depth bound: {ended}", ms, at_most(50)))
    return rows


def zip_member(tmp: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_metadata_bounds import deflated_zeros, tiny_png, write_zip

    from surd.sources import source_config

    declared = (256 if a.quick else 1536) << 20
    root = tmp / "ddb"
    (root / "images").mkdir(parents=True)
    small = tiny_png()
    bomb, crc = deflated_zeros(declared)
    part = root / "images" / "part-000001.zip"
    write_zip(part, [("big.png", bomb, zipfile.ZIP_DEFLATED, crc, declared),
                     ("small.png", small, zipfile.ZIP_STORED, zlib.crc32(small), len(small))])
    pq.write_table(pa.Table.from_pylist([{"image_name": n, "prompt": f"prompt of {n}", "part_id": 1}
                                         for n in ("big.png", "small.png")]), root / "metadata.parquet")
    source = source_config({"type": "diffusiondb", "root": str(root), "parts": [1]}).build()
    ours = best_ms(lambda: list(source.read_partition(1)), a.repeat)
    result = outcome(list(source.read_partition(1)))

    def naive() -> None:
        with zipfile.ZipFile(part) as z:
            [z.read(name) for name in ("big.png", "small.png")]

    base = best_ms(naive, 1)
    ours_mib, base_mib = peak_mib(lambda: list(source.read_partition(1))), peak_mib(naive)
    on_disk = f"{part.stat().st_size / 2**20:.1f} MB zip, a member declaring {declared >> 20} MiB ({result})"
    return [row(f"ms per crafted file: {on_disk}", ours, "zipfile.ZipFile.read", base, at_most(50)),
            row("peak MiB reading that zip (tracemalloc)", ours_mib, "zipfile.ZipFile.read", base_mib,
                at_most(70, "MiB"), unit="MiB")]


def peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def fifo(tmp: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    from test_metadata_bounds import tiny_png

    from surd.sources.imagefolder import ImageFolderConfig

    folder = tmp / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "ok.png").write_bytes(tiny_png())
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "pipe.png", "prompt": "a fox"}) + "\n"
                                           + json.dumps({"file_name": "ok.png", "prompt": "a hare"}) + "\n")
    ours = best_ms(lambda: collect(ImageFolderConfig(path=folder)), a.repeat)
    reader = threading.Thread(target=(folder / "pipe.png").read_bytes, daemon=True)
    reader.start()
    reader.join(a.fifo_cap)
    blocked = reader.is_alive()
    if blocked:  # a writer that opens and closes the FIFO lets the blocked reader see end-of-file
        os.close(os.open(folder / "pipe.png", os.O_WRONLY))
        reader.join()
    return [row(f"ms per crafted file: file_name naming a FIFO ({outcome(collect(ImageFolderConfig(path=folder)))})",
                ours, f"Path.read_bytes: {'blocks for ever; stopped at' if blocked else 'returned within'} "
                f"{a.fifo_cap:g} s (value a lower bound)", a.fifo_cap * 1e3, at_most(50))]


def scaling(name: str, ours_fn: Callable[[Any], Any], make: Callable[[int], Any], ours_n: int,
            naive: tuple[float, float], naive_n: int, repeat: int) -> dict[str, Any]:
    """time(4n) / time(n) for ours (at `ours_n`) and the naive baseline (at `naive_n`)."""
    ours = growth(ours_fn, make, ours_n, max(repeat, 5))
    return row(f"time(4n) / time(n): {name} (ours n = {ours_n:,}, baseline n = {naive_n:,})", ours[1] / ours[0],
               f"naive, {naive[0]:.1f} -> {naive[1]:.0f} ms", naive[1] / naive[0],
               (6.0, "≈ 4 (linear; quadratic: 16)"), unit="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller crafted files, shorter caps")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--naive", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.naive:
        return child(*a.naive)
    a.repeat, a.cap, a.fifo_cap = (3, 2.0, 0.5) if a.quick else (5, 10.0, 2.0)
    from test_metadata_bounds import png_with_chunk

    from surd.clean import clean_prompt
    from surd.sources.metadata import read_embedded

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="surd-crafted-") as folder:
        tmp = Path(folder)
        rows = comfyui_cycle(tmp, a)
        params, params_at, params_n = parameters_chunk(tmp, a)
        rows += params + sidecar_txt(tmp, a)
        cleaned, clean_at, clean_n = clean_rows(tmp, a)
        rows += cleaned + deep_json(tmp, a) + zip_member(tmp, a) + fifo(tmp, a)
    rows.append(scaling("infotext without colons", read_embedded,
                        lambda k: png_with_chunk(b"tEXt", b"parameters\0" + b"a" * k), 1 << 20, params_at, params_n,
                        a.repeat))
    rows.append(scaling("prompt cleaner", clean_prompt, lambda k: ("masterpiece " * (k // 12 + 1))[:k], 250_000,
                        clean_at, clean_n, a.repeat))
    missed = []
    for r in rows:
        met = r["ours"] <= r.pop("_limit")
        missed += [] if met else [r["metric"]]
        print(f"{'met   ' if met else 'MISSED'} {r['metric']}: ours {r['ours']:g} {r['unit']} (target {r['target']}); "
              f"{r['baseline_name']}: {r['baseline']:g} {r['unit']}", file=sys.stderr)
    if a.json:
        write_rows(a.json, title="Crafted files: bounded readers vs the straightforward ones (issues #11, #12)",
                   workload=f"{'quick' if a.quick else 'full'}: the crafted files of issue #11 item 4; ours best of "
                   f"{a.repeat}; a hanging baseline killed at {a.cap:g} s and extrapolated; "
                   f"{time.perf_counter() - start:.0f} s in all", rows=rows,
                   notes="targets met: " + ("all" if not missed else f"all but {'; '.join(missed)}"))


if __name__ == "__main__":
    main()
