"""Tolerant readers for generation metadata as sources give it, and the shared `gen_meta` JSON layout.

Source metadata is user-written and free-form: numbers arrive as strings, strings as objects, floats
as NaN, text with lone surrogates. These helpers turn anything into a value or None and never raise.

`gen_meta` layout (every source): `model`, `base_model`, `sampler`, `steps`, `cfg`, `seed`, plus
source-specific keys, and `source_meta`: what the source gave, made JSON-safe.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

MAX_DEPTH = 32  # deeper source JSON is cut off; nothing useful lives that deep


def clean_text(value: Any) -> str | None:
    """A non-blank string made valid UTF-8 (lone surrogates replaced), else None."""
    if not isinstance(value, str):
        return None
    text = safe_str(value)
    return text if text.strip() else None


def safe_str(value: str) -> str:
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int | None:
    """An integer of at most 128 bits (seeds, steps), from an int, an integral float or a digit string."""
    if isinstance(value, bool):
        return None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        try:
            number = int(value.strip())
        except ValueError:  # more digits than Python's int-from-str limit allows
            return None
    else:
        real = as_float(value)
        if real is not None and real.is_integer():
            number = int(real)
    return number if number is not None and number.bit_length() <= 128 else None


def first(mapping: dict[str, Any], *keys: str) -> Any:
    """The first present, non-null value among `keys`."""
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


def json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of `value` that `json.dumps(allow_nan=False)` accepts and Arrow can store as UTF-8."""
    if depth > MAX_DEPTH:
        return None
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 128 else None  # json.dumps refuses ints of >4300 digits
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return safe_str(value)
    if isinstance(value, dict):
        return {safe_str(str(k)): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return safe_str(str(value))


def gen_meta_json(source_meta: Any = None, **fields: Any) -> str:
    """The `gen_meta` column: normalised `fields` plus the source's own metadata under `source_meta`."""
    record = {key: json_safe(value) for key, value in fields.items()}
    record["source_meta"] = json_safe(source_meta)
    return json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False)


def fallback_id(source: str, item: Any) -> str:
    """A stable id for an item that has none (so its Drop can still be recorded)."""
    blob = json.dumps(json_safe(item), sort_keys=True).encode()
    return f"{source}:malformed-{hashlib.sha256(blob).hexdigest()[:16]}"
