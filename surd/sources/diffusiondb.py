"""DiffusionDB source: its metadata Parquet plus the image part zips, from a local folder or any fsspec URL.

Layout (poloclub/diffusiondb): `metadata.parquet` (2M) or `metadata-large.parquet` (14M) with columns
`image_name, prompt, part_id, seed, step, cfg, sampler, width, height, user_name, timestamp,
image_nsfw, prompt_nsfw`, and `images/part-000001.zip` ... holding the PNGs and `part-000001.json`
(`{image_name: {"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}}`). One partition per
chosen part. Rows carry the image bytes, so the fetch stage passes them through.

Zip members are size-checked from the zip's directory before reading and then read streamed, never past
`max_member_bytes`: a member over it (a zip bomb: 1.5 GiB in 1.5 MB) is dropped as `member_too_large`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, Literal

from PIL import Image
from pydantic import Field

from surd.errors import SourceError
from surd.rows import Drop
from surd.sources.base import Row, SourceConfig
from surd.sources.bounds import MAX_TEXT_BYTES, NotJson, OverBound, load_json
from surd.sources.genmeta import as_float, as_int, clean_text, gen_meta_json, json_safe

SOURCE = "diffusiondb"
# DiffusionDB stores samplers as integers (see its loading script).
SAMPLERS = {1: "ddim", 2: "plms", 3: "k_euler", 4: "k_euler_ancestral", 5: "k_heun", 6: "k_dpm_2",
            7: "k_dpm_2_ancestral", 8: "k_lms", 9: "others"}
META_COLUMNS = ["image_name", "prompt", "part_id", "seed", "step", "cfg", "sampler", "width", "height",
                "user_name", "timestamp", "image_nsfw", "prompt_nsfw"]


class DiffusionDBConfig(SourceConfig):
    """A `collect:` entry for DiffusionDB parts."""

    type: Literal["diffusiondb"] = "diffusiondb"
    root: str = Field("hf://datasets/poloclub/diffusiondb", description="local folder or fsspec URL")
    parts: list[int] = Field(default_factory=lambda: [1], min_length=1, description="part numbers to read")
    metadata: str | None = Field(
        "metadata.parquet", description="metadata table under root (or a full path/URL); null: the parts' JSON"
    )
    part_path: str = Field("images/part-{part:06d}.zip", description="zip path under root, `{part}` filled in")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec")
    max_member_bytes: int = Field(64 << 20, ge=1, description="larger zip members are dropped (member_too_large)")

    def build(self) -> DiffusionDBSource:
        return DiffusionDBSource(self)


def _join(root: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return root.rstrip("/") + "/" + path


class DiffusionDBSource:
    """A `PartitionedSource`: one partition per part number."""

    def __init__(self, config: DiffusionDBConfig) -> None:
        self.config = config
        self.name = config.folder

    def list_partitions(self) -> list[int]:
        return sorted(set(self.config.parts))

    def read_partition(self, part: int) -> Iterator[Row | Drop]:
        zip_url = _join(self.config.root, self.config.part_path.format(part=part))
        with self._open(zip_url) as f:
            try:
                archive = zipfile.ZipFile(f)
            except zipfile.BadZipFile as e:
                raise SourceError(f"diffusiondb part {part}: {zip_url} is not a zip file ({e})") from None
            members = {posixpath.basename(n): n for n in archive.namelist() if not n.endswith("/")}
            for record in self._records(part, archive, members):
                yield self._row(record, archive, members, zip_url)

    @staticmethod
    def _member(archive: zipfile.ZipFile, member: str, limit: int) -> bytes:
        """A member's bytes, checked against `limit` by the zip's directory first and then while reading."""
        size = archive.getinfo(member).file_size
        if size > limit:
            raise OverBound("member_too_large", f"{size} bytes uncompressed (limit {limit})")
        with archive.open(member) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OverBound("member_too_large", f"inflates past {limit} bytes")
        return data

    def _open(self, url: str) -> Any:
        import fsspec

        try:
            return fsspec.open(url, "rb", **self.config.storage_options).open()
        except (OSError, ValueError) as e:
            raise SourceError(f"diffusiondb: cannot open {url}: {e}") from None

    def _records(self, part: int, archive: zipfile.ZipFile, members: dict[str, str]) -> list[dict[str, Any]]:
        if self.config.metadata is None:
            name = f"part-{part:06d}.json"
            if name not in members:
                raise SourceError(f"diffusiondb part {part}: no {name} in the zip and `metadata` is null")
            try:
                text = self._member(archive, members[name], MAX_TEXT_BYTES)
                table = load_json(text, f"{name} in part {part}")
            except (OverBound, NotJson, zipfile.BadZipFile) as e:
                raise SourceError(f"diffusiondb part {part}: cannot read {name}: {e}") from None
            if not isinstance(table, dict):
                raise SourceError(f"diffusiondb part {part}: {name} is not a JSON object")
            return [{"image_name": k, "prompt": v.get("p"), "seed": v.get("se"), "step": v.get("st"),
                     "cfg": v.get("c"), "sampler": v.get("sa"), "part_id": part}
                    for k, v in sorted(table.items()) if isinstance(v, dict)]
        return self._metadata_rows(part)

    def _metadata_rows(self, part: int) -> list[dict[str, Any]]:
        import fsspec
        import pyarrow.parquet as pq

        url = _join(self.config.root, self.config.metadata or "")
        try:
            fs, path = fsspec.core.url_to_fs(url, **self.config.storage_options)
            schema = pq.read_schema(path, filesystem=fs)
            columns = [c for c in META_COLUMNS if c in schema.names]
            table = pq.read_table(path, filesystem=fs, columns=columns, filters=[("part_id", "=", part)])
        except (OSError, ValueError) as e:
            raise SourceError(f"diffusiondb: cannot read metadata {url}: {e}") from None
        return sorted(table.to_pylist(), key=lambda r: str(r.get("image_name")))

    def _row(self, record: dict[str, Any], archive: zipfile.ZipFile, members: dict[str, str], zip_url: str) -> Any:
        name = clean_text(record.get("image_name")) or "?"
        prompt = clean_text(record.get("prompt"))
        sampler = record.get("sampler")
        row: Row = {
            "id": f"{SOURCE}:{name}",
            "source": SOURCE,
            "source_id": name,
            "source_url": f"{zip_url}#{name}",
            "keyword_prompt_raw": prompt,
            "keyword_prompt": prompt,
            "gen_meta": gen_meta_json(
                record,
                model=None,  # DiffusionDB does not record the checkpoint (Stable Diffusion 1.x)
                base_model=None,
                sampler=SAMPLERS.get(sampler) if isinstance(sampler, int) else clean_text(sampler),
                steps=as_int(record.get("step")),
                cfg=as_float(record.get("cfg")),
                seed=as_int(record.get("seed")),
                image_nsfw=as_float(record.get("image_nsfw")),
                prompt_nsfw=as_float(record.get("prompt_nsfw")),
                user_name=clean_text(record.get("user_name")),
                timestamp=json_safe(record.get("timestamp")),
            ),
        }
        if prompt is None:
            return Drop("no_prompt", "metadata has no prompt", row=row)
        if name not in members:
            return Drop("image_missing", f"{name} is not in {zip_url}", row=row)
        try:
            data = self._member(archive, members[name], self.config.max_member_bytes)
        except OverBound as e:
            return Drop(e.reason, f"{name}: {e.detail}", row=row)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            return Drop("bad_member", f"{name}: {e}", row=row)
        try:
            with Image.open(io.BytesIO(data)) as img:  # header only: size and format, no decoding
                width, height, image_format = img.width, img.height, img.format
        except (OSError, SyntaxError, ValueError) as e:
            return Drop("not_an_image", f"{name}: {e}", row=row)
        return {**row, "image": {"bytes": data, "path": name}, "image_format": image_format, "width": width,
                "height": height, "sha256": hashlib.sha256(data).hexdigest()}
