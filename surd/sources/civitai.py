"""Civitai source: `GET <api_base>/images` with cursor paging, as documented at developer.civitai.com.

Each response page becomes one `Page`; the executor writes its rows as a shard, keeps the raw body
gzipped and persists `metadata.nextCursor` (an opaque token; absent or null at the end). `meta` comes
in three shapes (null, flat, or `{"id": ..., "meta": {...}}`) with free-form, mixed-type keys;
`parse_meta` reads any of them without raising. Items without a prompt are dropped with a reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources.base import Page, Row
from surd.sources.genmeta import as_float, as_int, clean_text, fallback_id, first, gen_meta_json, json_safe
from surd.sources.http import ApiSourceConfig

SOURCE = "civitai"
SITE = "https://civitai.com"


class CivitaiConfig(ApiSourceConfig):
    """A `collect:` entry for the Civitai images API."""

    type: Literal["civitai"] = "civitai"
    api_base: str = Field("https://civitai.com/api/v1", description="API root; mirrors, proxies and tests")
    limit: int = Field(200, ge=1, le=200, description="items per page")
    max_items: int | None = Field(None, ge=1, description="stop after this many usable rows")
    sort: str | None = Field("Newest", description="Most Reactions, Most Comments, Newest, Oldest, ...")
    period: Literal["AllTime", "Year", "Month", "Week", "Day"] | None = None
    nsfw: bool | Literal["None", "Soft", "Mature", "X"] | None = Field(None, description="legacy NSFW filter")
    browsing_level: int | None = Field(None, ge=0, description="browsing-level bitmask; overrides nsfw")
    base_models: list[str] = Field(default_factory=list, description="e.g. ['SD 1.5', 'SDXL 1.0']")
    model_id: int | None = None
    model_version_id: int | None = None
    post_id: int | None = None
    username: str | None = None
    api_key_env: str = Field("CIVITAI_API_KEY", description="env var holding an API key, sent as Bearer to "
                             "civitai.com or to the host in $<NAME>_HOST")

    def params(self) -> dict[str, str]:
        """Query parameters for every page (the cursor is added per page)."""
        params: dict[str, Any] = {
            "limit": self.limit,
            "withMeta": "true",
            "type": "image",
            "sort": self.sort,
            "period": self.period,
            "nsfw": str(self.nsfw).lower() if isinstance(self.nsfw, bool) else self.nsfw,
            "browsingLevel": self.browsing_level,
            "baseModels": ",".join(self.base_models) or None,
            "modelId": self.model_id,
            "modelVersionId": self.model_version_id,
            "postId": self.post_id,
            "username": self.username,
        }
        return {key: str(value) for key, value in params.items() if value is not None}

    def build(self) -> CivitaiSource:
        return CivitaiSource(self)


class CivitaiSource:
    """A `CursorSource` over `/images`."""

    def __init__(self, config: CivitaiConfig) -> None:
        self.config = config
        self.name = config.folder

    def pages(self, cursor: str | None) -> Iterator[Page]:
        config = self.config
        url = config.endpoint("images")
        with config.client(url) as client:  # the key goes to its own host only (surd.secrets)
            while True:
                params = config.params()
                if cursor is not None:
                    params["cursor"] = cursor
                data, raw, final_url = client.get_json(url, params, validate=validate_page)
                rows, next_cursor = parse_page(data)
                info = {"cursor": cursor, "items": len(rows), "next_cursor": next_cursor}
                yield Page(rows=rows, next_cursor=next_cursor, raw=raw, info=info)
                if next_cursor is None:
                    return
                if next_cursor == cursor:
                    raise SourceError(f"{url}: the API returned the same cursor {cursor!r} again; stopping")
                cursor = next_cursor


def validate_page(data: Any) -> None:
    """Raise ValueError unless `data` has the documented page shape (so the request is retried)."""
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise ValueError("expected an object with an 'items' list")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError("'metadata' is not an object")
    next_cursor = (metadata or {}).get("nextCursor")
    if next_cursor is not None and (isinstance(next_cursor, bool) or not isinstance(next_cursor, str | int)):
        raise ValueError(f"'metadata.nextCursor' is neither a string nor a number: {next_cursor!r}")


def parse_page(data: dict[str, Any]) -> tuple[list[Row | Drop], str | None]:
    """Rows (or Drops) of a validated page and the next cursor (None: the last page)."""
    rows = [item_to_row(item) for item in data["items"]]
    next_cursor = (data.get("metadata") or {}).get("nextCursor")
    if next_cursor is None or next_cursor == "":
        return rows, None
    return rows, str(next_cursor)


@dataclass
class CivitaiMeta:
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    model: str | None = None
    base_model: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def unwrap_meta(meta: Any) -> dict[str, Any]:
    """The generation-parameter dict of any of the three documented `meta` shapes ({} if none)."""
    for _ in range(4):  # `{"id": ..., "meta": {...}}`, possibly wrapped more than once
        if not isinstance(meta, dict):
            return {}
        inner = meta.get("meta")
        if "prompt" in meta or not (isinstance(inner, dict) or (inner is None and "meta" in meta)):
            return meta
        meta = inner
    return meta if isinstance(meta, dict) else {}


def _model_name(value: Any) -> str | None:
    if isinstance(value, dict):  # some clients write the checkpoint as an object
        value = first(value, "name", "title", "modelName", "hash")
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return clean_text(value)


def parse_meta(meta: Any) -> CivitaiMeta:
    """Read prompt and generation parameters from any `meta` value; never raises."""
    params = unwrap_meta(meta)
    return CivitaiMeta(
        prompt=clean_text(params.get("prompt")),
        negative_prompt=clean_text(first(params, "negativePrompt", "negative_prompt", "Negative prompt")),
        seed=as_int(first(params, "seed", "Seed")),
        steps=as_int(first(params, "steps", "Steps")),
        cfg=as_float(first(params, "cfgScale", "cfg_scale", "CFG scale", "cfg")),
        sampler=clean_text(first(params, "sampler", "Sampler", "sampler_name")),
        model=_model_name(first(params, "Model", "model", "modelName")),
        base_model=clean_text(first(params, "baseModel", "base_model")),
        raw=json_safe(params),
    )


def item_to_row(item: Any) -> Row | Drop:
    """One `/images` item as a SURD row, or a Drop saying why it cannot be used; never raises."""
    if not isinstance(item, dict):
        detail = f"item is {type(item).__name__}"
        return Drop("malformed_item", detail, row={"id": fallback_id(SOURCE, item), "source": SOURCE})
    image_id = item.get("id")
    if isinstance(image_id, bool) or not isinstance(image_id, int | str) or str(image_id).strip() == "":
        return Drop("malformed_item", "item has no id", row={"id": fallback_id(SOURCE, item), "source": SOURCE})
    source_id = clean_text(str(image_id)) or "?"
    meta = parse_meta(item.get("meta"))
    url = clean_text(item.get("url"))
    row: Row = {
        "id": f"{SOURCE}:{source_id}",
        "source": SOURCE,
        "source_id": source_id,
        "source_url": f"{SITE}/images/{source_id}",
        "image_url": url,
        "keyword_prompt_raw": meta.prompt,
        "keyword_prompt": meta.prompt,
        "negative_prompt": meta.negative_prompt,
        "gen_meta": gen_meta_json(
            meta.raw,
            model=meta.model,
            base_model=meta.base_model or clean_text(item.get("baseModel")),
            sampler=meta.sampler,
            steps=meta.steps,
            cfg=meta.cfg,
            seed=meta.seed,
            width=as_int(item.get("width")),
            height=as_int(item.get("height")),
            nsfw_level=json_safe(item.get("nsfwLevel")),
            browsing_level=as_int(item.get("browsingLevel")),
            username=clean_text(item.get("username")),
            created_at=clean_text(item.get("createdAt")),
            post_id=as_int(item.get("postId")),
        ),
    }
    media_type = item.get("type")
    if media_type is not None and media_type != "image":
        return Drop("not_an_image", f"media type {json_safe(media_type)!r}", row=row)
    if url is None or not url.lower().startswith(("http://", "https://")):
        return Drop("no_image_url", f"url {json_safe(item.get('url'))!r}", row=row)
    if meta.prompt is None:
        return Drop("no_prompt", "meta has no prompt" if meta.raw else "no meta", row=row)
    return row
