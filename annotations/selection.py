"""What to review: read a run's final dataset, filter it (`--where`), sample it reproducibly, make thumbnails."""

from __future__ import annotations

import hashlib
import io
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from surd import layout, shards
from surd.errors import SurdError
from surd.layout import STAGES
from surd.schema import SCHEMA, conform

THUMB_SIZE = 512


def dataset_folder(run_dir: Path) -> Path:
    """The run's final dataset: `surd/data/` (export output) if present, else the last finished stage folder."""
    run_dir = Path(run_dir)
    exported = layout.dataset_data_dir(run_dir)
    if exported.is_dir() and _parquet_files(exported):
        return exported
    for stage in reversed(STAGES):
        folder = layout.stage_dir(run_dir, stage)
        if folder.is_dir() and shards.shard_names(folder):
            return folder
    raise SurdError(f"{run_dir}: no dataset to review (neither surd/data/*.parquet nor a stage folder with shards)")


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def read_parquet_folder(folder: Path, columns: list[str] | None = None, ids: set[str] | None = None) -> pa.Table:
    """Rows of every Parquet file in `folder` (a stage folder's kept shards, or HF `data/`), SURD schema."""
    folder = Path(folder)
    files = _parquet_files(folder) or [shards.shard_path(folder, rel) for rel in shards.shard_names(folder)]
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    parts = []
    for path in files:
        try:
            available = pq.read_schema(path).names
            table = pq.read_table(path, columns=[c for c in schema.names if c in available])
        except (OSError, pa.ArrowInvalid) as e:
            raise SurdError(f"cannot read {path}: {e}") from None
        if ids is not None:
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(ids), pa.string())))
        parts.append(conform(table, schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


# --- --where: `COL OP VALUE [and COL OP VALUE ...]`, OP in < <= > >= == != ; `COL is [not] null` ---

_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<str>'[^']*'|"[^"]*")|"""
                    r"""(?P<op><=|>=|==|!=|<|>|=)|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""")  # fmt: skip
_OPS = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal, "==": pc.equal,
        "=": pc.equal, "!=": pc.not_equal}  # fmt: skip


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise SurdError(f"--where {expr!r}: cannot parse at {expr[pos:].strip()!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_where(expr: str) -> list[tuple[str, str, Any]]:
    """Parse a filter into (column, op, value) clauses joined by `and`; names the flag on errors."""
    toks = _tokens(expr)
    clauses: list[tuple[str, str, Any]] = []
    i = 0
    while i < len(toks):
        if len(toks) - i < 3 or toks[i][0] != "word":
            raise SurdError(f"--where {expr!r}: expected `COLUMN OP VALUE` (e.g. clip_narrative < 0.25)")
        column = toks[i][1]
        if column not in SCHEMA.names:
            raise SurdError(f"--where {expr!r}: unknown column {column!r}")
        kind, text = toks[i + 1]
        if kind == "word" and text.lower() == "is":
            negate = toks[i + 2][1].lower() == "not"
            j = i + 3 if negate else i + 2
            if j >= len(toks) or toks[j][1].lower() != "null":
                raise SurdError(f"--where {expr!r}: expected `{column} is [not] null`")
            clauses.append((column, "is not null" if negate else "is null", None))
            i = j + 1
        elif kind == "op":
            vkind, vtext = toks[i + 2]
            value: Any = float(vtext) if vkind == "num" else vtext[1:-1] if vkind == "str" else vtext
            clauses.append((column, text, value))
            i += 3
        else:
            raise SurdError(f"--where {expr!r}: expected an operator after {column!r}")
        if i < len(toks):
            if toks[i][1].lower() != "and":
                raise SurdError(f"--where {expr!r}: clauses are joined with `and`, got {toks[i][1]!r}")
            i += 1
            if i == len(toks):
                raise SurdError(f"--where {expr!r}: nothing after `and`")
    return clauses


def where_mask(table: pa.Table, clauses: list[tuple[str, str, Any]], expr: str) -> pa.Array:
    """Boolean mask of rows matching every clause (a null comparison counts as no match)."""
    mask = pa.array([True] * table.num_rows, pa.bool_())
    for column, op, value in clauses:
        col = table.column(column)
        if op == "is null":
            part = pc.is_null(col)
        elif op == "is not null":
            part = pc.is_valid(col)
        else:
            numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
            if numeric != isinstance(value, float):
                want = "a number" if numeric else "a quoted string"
                raise SurdError(f"--where {expr!r}: {column} compares with {want}, got {value!r}")
            try:
                part = _OPS[op](col, pa.scalar(value, col.type if not numeric else pa.float64()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SurdError(f"--where {expr!r}: cannot compare {column} with {value!r}: {e}") from None
        mask = pc.and_(mask, pc.fill_null(part, False))
    return mask


def select_ids(
    run_dir: Path,
    *,
    limit: int | None = None,
    where: str | None = None,
    stratify_by: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Reproducible choice of sample ids to review: filter, then seeded (optionally stratified) sampling."""
    if stratify_by is not None and stratify_by not in SCHEMA.names:
        raise SurdError(f"--stratify-by {stratify_by!r}: unknown column")
    clauses = parse_where(where) if where else []
    columns = sorted({"id", *(c for c, _, _ in clauses), *([stratify_by] if stratify_by else [])})
    index = read_parquet_folder(dataset_folder(run_dir), columns)
    if clauses:
        index = index.filter(where_mask(index, clauses, where or ""))
    # Sort first so the result depends on the data and the seed, not on shard order.
    index = index.sort_by("id")
    ids = index.column("id").to_pylist()
    rng = random.Random(seed)
    if limit is None or limit >= len(ids):
        rng.shuffle(ids)
        return ids
    if stratify_by is None:
        return rng.sample(ids, limit)
    groups: dict[str, list[str]] = defaultdict(list)
    for sample_id, key in zip(ids, index.column(stratify_by).to_pylist(), strict=True):
        groups["<null>" if key is None else str(key)].append(sample_id)
    quota = _proportional(limit, {k: len(v) for k, v in groups.items()})
    chosen: list[str] = []
    for key in sorted(groups):
        chosen.extend(rng.sample(groups[key], quota[key]))
    rng.shuffle(chosen)
    return chosen


def _proportional(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Largest-remainder allocation of `total` over groups, proportional to their sizes."""
    n = sum(sizes.values())
    exact = {k: total * s / n for k, s in sizes.items()}
    quota = {k: int(v) for k, v in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def thumbnail_name(sample_id: str) -> str:
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in sample_id)[:60]
    return f"{readable}-{hashlib.sha256(sample_id.encode()).hexdigest()[:12]}.jpg"


def make_thumbnail(image_bytes: bytes, sample_id: str) -> bytes:
    """A JPEG no larger than THUMB_SIZE on its long side (reviewers need to see it, not print it)."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError) as e:
        raise SurdError(f"row {sample_id!r}: cannot decode its image: {e}") from None
    return buf.getvalue()


def write_thumbnails(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write `<run>/review/thumbs/<name>.jpg` for each row (skipping ones already written); id -> path."""
    folder = layout.thumbs_dir(Path(run_dir).resolve())
    paths = {}
    for row in rows:
        path = folder / thumbnail_name(row["id"])
        if not path.exists():
            image = row.get("image") or {}
            if not image.get("bytes"):
                raise SurdError(f"row {row['id']!r}: no image bytes to review (run the fetch stage first)")
            shards.atomic_write_bytes(path, make_thumbnail(image["bytes"], row["id"]))
        paths[row["id"]] = path
    return paths
