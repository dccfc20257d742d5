"""Export: the final SURD dataset in the HF hub layout, plus the original SURD imagefolder layout.

The export stage runs through the executor like any other: its row logic (`ExportRows`) applies review decisions
(`<run>/reviews.parquet`, through a processor passed in by the caller) and sets each row's stable split; rows a
reviewer rejected are dropped with their reason. Its finish then writes
`<run>/surd/data/{train,test}-NNNNN-of-NNNNN.parquet` and a dataset card `README.md` in a temp folder inside the
run and swaps it in whole (`swap_in`: one atomic exchange of the two folders on Linux), so a killed export
leaves either the old dataset or the new one, and a reader never finds no dataset at all. The export stage is
fingerprinted like every stage, plus the reviews file's content and the recipe's name (the card's title): it is
rebuilt when one of them, its input, the split or the shard size changes, and left as it is otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipelines import fingerprint
from pipelines.card import dataset_card
from pipelines.executor import discard, open_stage, run_job
from pipelines.progress import notice
from surd import layout, shards
from surd.rows import Drop
from surd.schema import SCHEMA, split_for

STAGE = "export"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of ids hashed into the test split")
    shard_size_mb: float = Field(256.0, gt=0, description="target size of one Parquet shard")
    format: Literal["parquet", "imagefolder"] = "parquet"
    batch_size: int = Field(512, ge=1, description="rows per call of the export's row logic")


class _SplitWriter:
    """Accumulates one split's rows and writes a part whenever the target size is reached."""

    def __init__(self, folder: Path, split: str, target_bytes: int) -> None:
        self.folder, self.split, self.target = folder, split, target_bytes
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.parts: list[Path] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_bytes += table.nbytes
            self.rows += table.num_rows
            if self.pending_bytes >= self.target:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            path = self.folder / f"{self.split}-{len(self.parts):05d}.tmp.parquet"
            pq.write_table(pa.concat_tables(self.pending), path, compression="zstd", row_group_size=256)
            self.parts.append(path)
            self.pending, self.pending_bytes = [], 0

    def finalise(self) -> list[str]:
        self.flush()
        names = []
        for i, path in enumerate(self.parts):
            name = f"{self.split}-{i:05d}-of-{len(self.parts):05d}.parquet"
            path.rename(self.folder / name)
            names.append(name)
        return names


class ExportRows:
    """Export's row logic: reviewers' decisions (an optional processor, `annotations.reviews.ReviewApplier`),
    then the stable split of each id."""

    def __init__(self, test_fraction: float, reviews: Any = None) -> None:
        self.test_fraction, self.reviews = test_fraction, reviews
        self.counters: dict[str, int] = {}

    def setup(self) -> None:
        if self.reviews is not None:
            self.reviews.setup()

    def process_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        results = self.reviews.process_batch(rows) if self.reviews is not None else list(rows)
        for result in results:
            if not isinstance(result, Drop):
                result["split"] = split_for(result["id"], self.test_fraction)
                self.counters[f"rows_{result['split']}"] = self.counters.get(f"rows_{result['split']}", 0) + 1
        for key, value in (getattr(self.reviews, "counters", None) or {}).items():
            self.counters[key] = value
        return results


def export(
    run_dir: Path, config: ExportConfig, *, reviews: Any = None, recipe_name: str = "surd", workers: int = 1,
    progress: bool = False, source: str | None = None,
) -> dict[str, Any]:
    """Write `<run>/surd/`; returns the export stats. `reviews`: an optional processor applied first.

    The export stage runs like any other (the executor writes `export/` shards with the split set, dropped
    rows, stats); its finish then assembles the dataset from them in a temp folder and swaps it in whole, and
    writes the manifest last. A finished export with the same fingerprint is left as it is.
    """
    run_dir = Path(run_dir)
    settings = {**fingerprint.settings_of(STAGE, config, run_dir), "recipe_name": recipe_name,
                "reviews": reviews_digest(reviews)}
    job = open_stage(run_dir, STAGE, config, processor=ExportRows(config.test_fraction, reviews), source=source,
                     settings=settings)
    if not (job.up_to_date and layout.dataset_dir(run_dir).is_dir()):
        run_job(job, workers=workers, progress=progress)
        _finish(run_dir, config, recipe_name, job.source)
        stale = layout.imagefolder_dir(run_dir)
        if stale.exists() and config.format != "imagefolder":
            notice(f"{stale.name}: removed, it held the previous export (`surd export RUN --format imagefolder` "
                   "writes it again)")
            discard(run_dir, stale)
        if config.format == "imagefolder":
            export_imagefolder(run_dir)
    elif config.format == "imagefolder" and not layout.imagefolder_dir(run_dir).exists():
        export_imagefolder(run_dir)
    return shards.stage_stats(job.out)


def last_recipe_name(run_dir: Path) -> str | None:
    """The recipe name the run's last export was made with (so a plain `surd export` does not rebuild it)."""
    record = fingerprint.read(layout.stage_dir(run_dir, STAGE)) or {}
    return (record.get("settings") or {}).get("recipe_name")


def reviews_digest(reviews: Any) -> str | None:
    """What export fingerprints of the reviews it applies: the reviews file's sha256 (None: no reviews)."""
    if reviews is None:
        return None
    path = getattr(reviews, "reviews_path", None)
    if path is None or not Path(path).is_file():
        return type(reviews).__name__
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _finish(run_dir: Path, config: ExportConfig, recipe_name: str, source: str) -> None:
    """RUN/surd: the export stage's rows by split in parts of about `shard_size_mb`, plus the dataset card."""
    stage_dir = layout.stage_dir(run_dir, STAGE)
    with _building(run_dir, layout.DATASET) as work:
        (work / "data").mkdir()
        writers = {s: _SplitWriter(work / "data", s, int(config.shard_size_mb * 2**20)) for s in ("train", "test")}
        for batch in shards.read_stage(stage_dir, batch_size=512):
            table = pa.Table.from_batches([batch]).cast(SCHEMA)
            for split, writer in writers.items():
                writer.add(table.filter(pc.equal(table.column("split"), split)))
        files = {split: writer.finalise() for split, writer in writers.items()}
        counts = {split: writer.rows for split, writer in writers.items()}
        (work / "README.md").write_text(dataset_card(run_dir, files, counts, recipe_name=recipe_name,
                                                     input_stage=source, data_dir=work / "data"))
    # the manifest last: an export killed before it is finished on the next run (its shards are kept)
    shards.write_manifest(stage_dir, STAGE, extra={"input_stage": source, "files": files, "splits": counts})


@contextmanager
def _building(run_dir: Path, name: str) -> Iterator[Path]:
    """A temp folder inside the run, swapped in as RUN/<name> when the block ends without error."""
    _remove_leftovers(run_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
    try:
        yield work
        swap_in(work, run_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_leftovers(run_dir: Path) -> None:
    """Temp folders of an export that was killed (a normal run removes its own)."""
    for path in run_dir.glob(".surd*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` so that `target` exists at every moment (the old copy is removed afterwards)."""
    if not target.exists():
        new.rename(target)
        return
    if exchange(new, target):  # `new` now holds the old copy
        shutil.rmtree(new, ignore_errors=True)
        return
    # Without an atomic exchange (not Linux, or a filesystem without it) two renames leave a moment with no target.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28 has no wrapper
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the filesystem (or kernel) cannot exchange: fall back
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def export_imagefolder(run_dir: Path) -> Path:
    """Write the original SURD layout (`<split>/metadata.jsonl` with file_name, text, prompt + images)."""
    run_dir = Path(run_dir)
    with _building(run_dir, layout.IMAGEFOLDER) as work:
        handles: dict[str, Any] = {}
        columns = ["id", "image", "image_format", "keyword_prompt", "narrative_prompt", "split"]
        for path in sorted(layout.dataset_data_dir(run_dir).glob("*.parquet")):
            for row in pq.read_table(path, columns=columns).to_pylist():
                split = row["split"]
                if split not in handles:
                    (work / split).mkdir()
                    handles[split] = open(work / split / "metadata.jsonl", "w", encoding="utf-8")
                ext = (row["image_format"] or "png").lower().replace("jpeg", "jpg")
                name = f"{_safe_name(row['id'])}.{ext}"
                (work / split / name).write_bytes(row["image"]["bytes"])
                record = {"file_name": name, "text": row["narrative_prompt"], "prompt": row["keyword_prompt"]}
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        for handle in handles.values():
            handle.close()
    return layout.imagefolder_dir(run_dir)


def _safe_name(sample_id: str) -> str:
    # Readable, and unique: two ids that map to the same characters differ in the hash suffix.
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)[:80]
    return f"{readable}-{hashlib.sha256(sample_id.encode()).hexdigest()[:10]}"
