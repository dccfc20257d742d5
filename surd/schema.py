"""The SURD Arrow schema (versioned), its column docs and the matching HF `datasets` features."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# (name, arrow type, doc). Every column is nullable except `id`.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", pa.string(), "stable id: `<source>:<source_id>`, or `<source>:<content hash>` for files"),
    ("source", pa.string(), "where the row came from: folder, imagefolder, civitai, diffusiondb, ..."),
    ("source_id", pa.string(), "the id (or relative path) inside that source"),
    ("source_url", pa.string(), "a page or API URL for the sample"),
    ("image", IMAGE_TYPE, "the image: encoded bytes and an optional path (HF `datasets` Image layout)"),
    ("image_url", pa.string(), "where the image was (or is to be) fetched from"),
    ("image_format", pa.string(), "decoded format: PNG, JPEG, WEBP, ..."),
    ("width", pa.int32(), "decoded width in pixels"),
    ("height", pa.int32(), "decoded height in pixels"),
    ("sha256", pa.string(), "sha256 of the image bytes"),
    ("phash", pa.uint64(), "64-bit perceptual (DCT) hash of the image"),
    ("keyword_prompt", pa.string(), "the complex keyword-style prompt, cleaned"),
    ("keyword_prompt_raw", pa.string(), "the prompt exactly as the source gave it"),
    ("negative_prompt", pa.string(), "the negative prompt, if any"),
    ("narrative_prompt", pa.string(), "the simple narrative prompt"),
    ("narrative_candidates", pa.list_(pa.string()), "narrative candidates the score stage chose from"),
    ("narrative_origin", pa.string(), "`llm:<model>@<template-version>`, `caption:<model>`, `human`, `source`"),
    ("gen_meta", pa.string(), "generation metadata as JSON: model, sampler, steps, cfg, seed, ..."),
    ("nsfw_score", pa.float32(), "NSFW probability of the image"),
    ("clip_model", pa.string(), "CLIP model used for the scores, e.g. `ViT-L-14/openai`"),
    ("clip_keyword", pa.float32(), "image / keyword prompt cosine similarity"),
    ("clip_narrative", pa.float32(), "image / chosen narrative prompt cosine similarity"),
    ("review", pa.string(), "`accepted`, `rejected`, `edited`, or null"),
    ("split", pa.string(), "`train` or `test`, from a hash of `id`"),
]

DROP_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("drop_stage", pa.string(), "the stage that dropped the row"),
    ("drop_reason", pa.string(), "a short machine-readable reason, e.g. `image_too_small`"),
    ("drop_detail", pa.string(), "a human-readable detail (the value that failed, an error message)"),
]

COLUMN_DOCS: dict[str, str] = {name: doc for name, _, doc in COLUMNS + DROP_COLUMNS}
COLUMN_NAMES: list[str] = [name for name, _, _ in COLUMNS]


def hf_features() -> dict[str, Any]:
    """The HF `datasets` features of the SURD schema, as `Features.to_dict()` would write them."""
    value = {
        pa.string(): "string",
        pa.int32(): "int32",
        pa.uint64(): "uint64",
        pa.float32(): "float32",
    }
    features: dict[str, Any] = {}
    for name, typ, _ in COLUMNS:
        if name == "image":
            features[name] = {"_type": "Image"}
        elif pa.types.is_list(typ):
            features[name] = {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}
        else:
            features[name] = {"dtype": value[typ], "_type": "Value"}
    return features


def _metadata() -> dict[bytes, bytes]:
    return {
        b"surd_schema_version": str(SCHEMA_VERSION).encode(),
        b"huggingface": json.dumps({"info": {"features": hf_features()}}).encode(),
    }


def _fields(columns: list[tuple[str, pa.DataType, str]]) -> list[pa.Field]:
    return [pa.field(name, typ, nullable=(name != "id")) for name, typ, _ in columns]


SCHEMA: pa.Schema = pa.schema(_fields(COLUMNS), metadata=_metadata())
DROPPED_SCHEMA: pa.Schema = pa.schema(
    _fields(COLUMNS + DROP_COLUMNS), metadata={b"surd_schema_version": str(SCHEMA_VERSION).encode()}
)


def conform(table: pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """Return `table` with exactly `schema`'s columns: missing ones as nulls, extra ones removed."""
    n = table.num_rows
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def from_rows(rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Build a conforming table from row dicts (missing keys become nulls)."""
    names = schema.names
    columns = {name: [row.get(name) for row in rows] for name in names}
    return pa.Table.from_pydict(columns, schema=schema)


def empty(schema: pa.Schema = SCHEMA) -> pa.Table:
    return schema.empty_table()


def split_for(sample_id: str, test_fraction: float) -> str:
    """Stable train/test assignment from a hash of the id."""
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"
