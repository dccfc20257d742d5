"""Export: the final SURD dataset in the HF hub layout, plus the original SURD imagefolder layout.

`<run>/surd/data/{train,test}-NNNNN-of-NNNNN.parquet` and a dataset card `README.md`, built in a temp
folder inside the run and swapped in whole, so a killed export leaves either the old dataset or the new
one. Review decisions (`<run>/reviews.parquet`) are applied by a processor passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipelines.card import dataset_card
from pipelines.local import input_stage
from pipelines.stage import Stage
from surd import shards
from surd.schema import DROPPED_SCHEMA, SCHEMA, split_for

STAGE = "export"
DATASET = "surd"
IMAGEFOLDER = "surd-imagefolder"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of ids hashed into the test split")
    shard_size_mb: float = Field(256.0, gt=0, description="target size of one Parquet shard")
    format: Literal["parquet", "imagefolder"] = "parquet"


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


def export(
    run_dir: Path, config: ExportConfig, *, reviews: Any = None, recipe_name: str = "surd"
) -> dict[str, Any]:
    """Write `<run>/surd/`; returns the export stats. `reviews`: an optional processor applied first."""
    run_dir = Path(run_dir)
    source = input_stage(run_dir, STAGE)
    stage_dir = run_dir / STAGE
    start = time.perf_counter()
    _remove_leftovers(run_dir)
    work = Path(tempfile.mkdtemp(prefix=".surd.", dir=run_dir))
    try:
        (work / "data").mkdir()
        writers = {s: _SplitWriter(work / "data", s, int(config.shard_size_mb * 2**20)) for s in ("train", "test")}
        review_stage = Stage("review", reviews) if reviews is not None else None
        dropped_parts = []
        n_in = 0
        for batch in shards.read_stage(run_dir / source, batch_size=512):
            table = pa.Table.from_batches([batch]).cast(SCHEMA)
            n_in += table.num_rows
            if review_stage is not None:
                table, dropped = review_stage(table)
                dropped_parts.append(dropped)
            splits = [split_for(i, config.test_fraction) for i in table.column("id").to_pylist()]
            table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
            for split, writer in writers.items():
                writer.add(table.filter(pc.equal(table.column("split"), split)))
        files = {split: writer.finalise() for split, writer in writers.items()}
        counts = {split: writer.rows for split, writer in writers.items()}
        dropped = pa.concat_tables(dropped_parts) if dropped_parts else DROPPED_SCHEMA.empty_table()
        stats = shards.shard_stats(n_in, sum(counts.values()), dropped, time.perf_counter() - start,
                                   {f"rows_{split}": n for split, n in counts.items()})
        # Stats first: the card reports this stage's drops too.
        shards.commit_shard(stage_dir, "export", SCHEMA.empty_table(), dropped, stats)
        card = dataset_card(run_dir, files, counts, recipe_name=recipe_name, input_stage=source)
        (work / "README.md").write_text(card)
        _swap_in(work, run_dir / DATASET)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shards.write_manifest(stage_dir, STAGE, extra={"input_stage": source, "files": files, "splits": counts})
    if config.format == "imagefolder":
        export_imagefolder(run_dir)
    return shards.stage_stats(stage_dir)


def _remove_leftovers(run_dir: Path) -> None:
    """Temp folders of an export that was killed (a normal run removes its own)."""
    for path in run_dir.glob(".surd*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` with renames only (the old copy is removed after the swap)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_imagefolder(run_dir: Path) -> Path:
    """Write the original SURD layout (`<split>/metadata.jsonl` with file_name, text, prompt + images)."""
    run_dir = Path(run_dir)
    data = run_dir / DATASET / "data"
    _remove_leftovers(run_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{IMAGEFOLDER}.", dir=run_dir))
    try:
        handles: dict[str, Any] = {}
        columns = ["id", "image", "image_format", "keyword_prompt", "narrative_prompt", "split"]
        for path in sorted(data.glob("*.parquet")):
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
        _swap_in(work, run_dir / IMAGEFOLDER)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return run_dir / IMAGEFOLDER


def _safe_name(sample_id: str) -> str:
    # Readable, and unique: two ids that map to the same characters differ in the hash suffix.
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)[:80]
    return f"{readable}-{hashlib.sha256(sample_id.encode()).hexdigest()[:10]}"
