"""Shard I/O: atomic Parquet writes, reading stage folders, per-shard stats and markers, manifests.

Layout of one stage folder `<run>/<stage>/` (relative shard names mirror the collect stage's,
e.g. `folder/part-00000`):

    <rel>.parquet            kept rows (SURD schema)
    dropped/<rel>.parquet    dropped rows with drop_stage / drop_reason / drop_detail
    _stats/<rel>.json        {"in", "kept", "dropped": {reason: n}, "seconds", "counters"}
    _side/<name>/<rel>.parquet  side outputs of a processor (e.g. saved embeddings), optional
    _done/<rel>              completion marker, written last
    manifest.json            written when every shard is done: shards, rows, schema version
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from surd.errors import ShardError
from surd.schema import DROPPED_SCHEMA, SCHEMA, SCHEMA_VERSION

MANIFEST = "manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp creates 0600; published files get the usual mode


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """Yield a temp path in `path`'s folder; on success fsync it, give it the usual mode and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write (a full disk) names no file: name the one being written
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync and rename."""
    with _atomic(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def write_table(path: Path, table: pa.Table, *, row_group_size: int = 1024) -> None:
    """Write a Parquet file atomically (temp file in the same folder, fsync, rename)."""
    with _atomic(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise ShardError(f"cannot read shard {path}: {e}") from None


def shard_names(stage_dir: Path) -> list[str]:
    """Relative names (without .parquet) of the kept-row shards of a stage folder, sorted."""
    stage_dir = Path(stage_dir)
    names = []
    for p in stage_dir.rglob("*.parquet"):
        rel = p.relative_to(stage_dir)
        if rel.parts[0] in ("dropped", "_stats", "_done", "_raw", "_side") or p.name.startswith("."):
            continue
        names.append(str(rel.with_suffix("")))
    return sorted(names)


def shard_path(stage_dir: Path, rel: str) -> Path:
    return Path(stage_dir) / f"{rel}.parquet"


def dropped_path(stage_dir: Path, rel: str) -> Path:
    return Path(stage_dir) / "dropped" / f"{rel}.parquet"


def side_path(stage_dir: Path, name: str, rel: str) -> Path:
    """A processor's side output for one shard, e.g. `score/_side/embeddings/<rel>.parquet`."""
    return Path(stage_dir) / "_side" / name / f"{rel}.parquet"


def stats_path(stage_dir: Path, rel: str) -> Path:
    return Path(stage_dir) / "_stats" / f"{rel}.json"


def marker_path(stage_dir: Path, rel: str) -> Path:
    return Path(stage_dir) / "_done" / rel


def is_done(stage_dir: Path, rel: str) -> bool:
    return marker_path(stage_dir, rel).exists()


def shard_stats(
    rows_in: int, kept: int, dropped: pa.Table, seconds: float, counters: dict[str, int] | None = None
) -> dict[str, Any]:
    """One shard's stats record, as `stage_stats` sums them; drop reasons are counted from `dropped`."""
    reasons: dict[str, int] = {}
    for reason in dropped.column("drop_reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    stats: dict[str, Any] = {"in": rows_in, "kept": kept, "dropped": reasons, "seconds": round(seconds, 4)}
    if counters:
        stats["counters"] = counters
    return stats


def commit_shard(stage_dir: Path, rel: str, kept: pa.Table, dropped: pa.Table, stats: dict[str, Any]) -> None:
    """Write one output shard, its dropped rows and stats, then its marker (last)."""
    write_table(shard_path(stage_dir, rel), kept.cast(SCHEMA) if kept.schema != SCHEMA else kept)
    write_table(dropped_path(stage_dir, rel), dropped)
    atomic_write_json(stats_path(stage_dir, rel), stats)
    atomic_write_bytes(marker_path(stage_dir, rel), b"")


def read_stage(stage_dir: Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream the kept rows of a stage folder, shard by shard in name order."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise ShardError(f"stage folder not found: {stage_dir}")
    for rel in shard_names(stage_dir):
        path = shard_path(stage_dir, rel)
        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise ShardError(f"cannot read shard {path}: {e}") from None


def read_dropped(stage_dir: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the dropped rows of a stage folder."""
    root = Path(stage_dir) / "dropped"
    for path in sorted(root.rglob("*.parquet")) if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        yield from pq.ParquetFile(path).iter_batches(columns=columns)


def read_stage_table(stage_dir: Path, columns: list[str] | None = None) -> pa.Table:
    batches = list(read_stage(stage_dir, columns=columns))
    if not batches:
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.Table.from_batches(batches)


def stage_stats(stage_dir: Path) -> dict[str, Any]:
    """Sum of the per-shard stats written so far: {"in", "kept", "dropped": {reason: n}, "seconds", "shards"}."""
    total: dict[str, Any] = {"in": 0, "kept": 0, "dropped": {}, "seconds": 0.0, "shards": 0}
    root = Path(stage_dir) / "_stats"
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        s = json.loads(path.read_text())
        total["in"] += s.get("in", 0)
        total["kept"] += s.get("kept", 0)
        total["seconds"] += s.get("seconds", 0.0)
        total["shards"] += 1
        for reason, n in s.get("dropped", {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + n
        for key, value in s.get("counters", {}).items():
            total.setdefault("counters", {})
            total["counters"][key] = total["counters"].get(key, 0) + value
    return total


def write_manifest(stage_dir: Path, stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `manifest.json` for a finished stage folder."""
    stage_dir = Path(stage_dir)
    shards = []
    for rel in shard_names(stage_dir):
        meta = pq.read_metadata(shard_path(stage_dir, rel))
        shards.append({"name": rel, "rows": meta.num_rows})
    manifest = {
        "stage": stage,
        "schema_version": SCHEMA_VERSION,
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "stats": stage_stats(stage_dir),
        **(extra or {}),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {manifest.get('schema_version')} but this surd writes {SCHEMA_VERSION}"
        )
    return manifest


def empty_dropped() -> pa.Table:
    return DROPPED_SCHEMA.empty_table()
