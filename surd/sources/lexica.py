"""Lexica source: the documented search API (`GET <api_base>/search?q=...` -> `{"images": [...]}`) for
a list of queries, and/or saved responses (JSON files, local or any fsspec URL).

The API has no cursor, so everything is read once in `list_partitions`: queries first, then files, in
the order given, de-duplicated by image `id` (first occurrence wins). The partitions carry the items
themselves, so the executor's persisted listing is both the raw record and what a rerun reads:
results cannot drift between a first run and a resumed one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources.base import Row
from surd.sources.genmeta import as_float, as_int, clean_text, fallback_id, gen_meta_json, json_safe
from surd.sources.http import ApiSourceConfig

SOURCE = "lexica"


class LexicaConfig(ApiSourceConfig):
    """A `collect:` entry for Lexica search results."""

    ONE_OF: ClassVar[tuple[str, ...]] = ("queries", "files")

    type: Literal["lexica"] = "lexica"
    queries: list[str] = Field(default_factory=list, description="search queries for the live API")
    files: list[str] = Field(default_factory=list, description="saved search responses (paths or fsspec URLs)")
    api_base: str = Field("https://lexica.art/api/v1", description="API root; mirrors, proxies and tests")
    requests_per_second: float = Field(0.5, gt=0, description="per-host rate limit")

    def build(self) -> LexicaSource:
        return LexicaSource(self)


class LexicaSource:
    """A `PartitionedSource`; each partition is `{"origin", "items", "duplicates"}`."""

    def __init__(self, config: LexicaConfig) -> None:
        self.config = config
        self.name = config.folder

    def list_partitions(self) -> list[dict[str, Any]]:
        seen: set[str] = set()
        partitions: list[dict[str, Any]] = []
        for origin, items in self._results():
            unique, duplicates = [], []
            for item in items:
                key = _item_id(item)
                if key is not None and key in seen:
                    duplicates.append(key)
                    continue
                if key is not None:
                    seen.add(key)
                unique.append(json_safe(item))
            size = self.config.rows_per_shard
            for start in range(0, max(len(unique), 1), size):
                chunk = unique[start : start + size]
                partitions.append({"origin": origin, "items": chunk, "duplicates": duplicates if start == 0 else []})
        return partitions

    def read_partition(self, partition: dict[str, Any]) -> Iterator[Row | Drop]:
        for item in partition["items"]:
            yield item_to_row(item)
        for key in partition["duplicates"]:
            row = {"id": f"{SOURCE}:{key}", "source": SOURCE, "source_id": key}
            yield Drop("duplicate_id", f"already collected from an earlier query or file ({partition['origin']})", row)

    def _results(self) -> Iterator[tuple[str, list[Any]]]:
        config = self.config
        if config.queries:
            url = config.endpoint("search")
            with config.client() as client:
                for query in config.queries:
                    data, _, _ = client.get_json(url, {"q": query}, validate=_validate)
                    yield f"query:{query}", data["images"]
        for path in config.files:
            yield f"file:{path}", _read_file(path)


def _validate(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError("expected an object with an 'images' list")


def _read_file(path: str) -> list[Any]:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise SourceError(f"lexica file {path}: {e}") from None
    if isinstance(data, list):  # a bare list of items is accepted too
        return data
    try:
        _validate(data)
    except ValueError as e:
        raise SourceError(f"lexica file {path}: {e}") from None
    return data["images"]


def _item_id(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    value = item.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return clean_text(str(value))


def item_to_row(item: Any) -> Row | Drop:
    """One search result as a SURD row, or a Drop saying why not; never raises."""
    key = _item_id(item)
    if key is None:
        row = {"id": fallback_id(SOURCE, item), "source": SOURCE}
        return Drop("malformed_item", "item is not an object with an id", row)
    assert isinstance(item, dict)
    prompt = clean_text(item.get("prompt"))
    src = clean_text(item.get("src"))
    row: Row = {
        "id": f"{SOURCE}:{key}",
        "source": SOURCE,
        "source_id": key,
        "source_url": clean_text(item.get("gallery")) or f"https://lexica.art/prompt/{key}",
        "image_url": src,
        "keyword_prompt_raw": prompt,
        "keyword_prompt": prompt,
        "negative_prompt": clean_text(item.get("negativePrompt")),
        "gen_meta": gen_meta_json(
            item,
            model=clean_text(item.get("model")),
            base_model=None,
            sampler=None,
            steps=None,
            cfg=as_float(item.get("guidance")),
            seed=as_int(item.get("seed")),
            width=as_int(item.get("width")),
            height=as_int(item.get("height")),
            grid=item.get("grid") if isinstance(item.get("grid"), bool) else None,
            nsfw=item.get("nsfw") if isinstance(item.get("nsfw"), bool) else None,
            prompt_id=clean_text(item.get("promptid")),
        ),
    }
    if src is None or not src.lower().startswith(("http://", "https://")):
        return Drop("no_image_url", f"src {json_safe(item.get('src'))!r}", row=row)
    if prompt is None:
        return Drop("no_prompt", "item has no prompt", row=row)
    return row
