"""What mutation testing found untested in the schema: what it builds at import (fields, metadata, HF features),
called again so that each mutant is seen, and conform / from_rows / empty on their own."""

from __future__ import annotations

import json

import pyarrow as pa

from surd import schema
from surd.schema import COLUMN_NAMES, COLUMNS, DROP_COLUMNS, DROPPED_SCHEMA, SCHEMA, conform, empty, from_rows


def test_fields_are_nullable_except_id() -> None:
    fields = schema._fields(COLUMNS + DROP_COLUMNS)
    assert [f.name for f in fields] == COLUMN_NAMES + ["drop_stage", "drop_reason", "drop_detail"]
    assert [f.name for f in fields if not f.nullable] == ["id"]
    assert fields[COLUMN_NAMES.index("width")].type == pa.int32()
    assert list(SCHEMA) == schema._fields(COLUMNS)


def test_hf_features_by_column_type() -> None:
    features = schema.hf_features()
    assert list(features) == COLUMN_NAMES
    assert features["id"] == {"dtype": "string", "_type": "Value"}
    assert features["width"] == features["height"] == {"dtype": "int32", "_type": "Value"}
    assert features["phash"] == {"dtype": "uint64", "_type": "Value"}
    assert features["nsfw_score"] == features["clip_keyword"] == {"dtype": "float32", "_type": "Value"}
    assert features["image"] == {"_type": "Image"}
    assert features["narrative_candidates"] == {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}


def test_schema_metadata_holds_the_version_and_the_features() -> None:
    meta = schema._metadata()
    assert set(meta) == {b"surd_schema_version", b"huggingface"}
    assert meta[b"surd_schema_version"] == b"1"
    assert json.loads(meta[b"huggingface"]) == {"info": {"features": schema.hf_features()}}
    assert SCHEMA.metadata == meta
    assert DROPPED_SCHEMA.metadata == {b"surd_schema_version": b"1"}


def test_conform_fills_drops_orders_and_casts() -> None:
    table = pa.table({"extra": [1, 2], "width": pa.array([5, 6], pa.int64()), "id": ["a", "b"]})
    out = conform(table)
    assert out.schema == SCHEMA and out.num_rows == 2
    assert out.column("id").to_pylist() == ["a", "b"] and out.column("width").to_pylist() == [5, 6]
    assert out.column("sha256").null_count == 2 and "extra" not in out.column_names
    dropped = conform(pa.table({"id": ["a"], "drop_reason": ["r"]}), DROPPED_SCHEMA)
    assert dropped.schema == DROPPED_SCHEMA and dropped.column("drop_reason").to_pylist() == ["r"]


def test_from_rows_and_empty() -> None:
    table = from_rows([{"id": "a", "width": 3}, {"id": "b", "unknown": 1}])
    assert table.schema == SCHEMA
    assert table.column("width").to_pylist() == [3, None] and table.column("id").to_pylist() == ["a", "b"]
    assert from_rows([{"id": "a", "drop_stage": "clean"}], DROPPED_SCHEMA).column("drop_stage").to_pylist() == [
        "clean"]
    assert empty().num_rows == 0 and empty().schema == SCHEMA
    assert empty(DROPPED_SCHEMA).schema == DROPPED_SCHEMA and empty(DROPPED_SCHEMA).num_rows == 0
