"""Training data from exported SURD shards: samples, image transforms, cached latents and text embeddings.

Input: an exported dataset folder (`<dir>/data/*.parquet`, HF layout) or a run folder holding `surd/`.
Caches (built once, reused across epochs and runs; see adapter/cache.py for the keying):
  latents/<hash>/   VAE latent distribution parameters (mean, logvar) per image and flip, so every
                    step still samples its own latent; needs a centre crop (a random crop is per step)
  text/<hash>/      the frozen text encoder's last hidden state per prompt, plus its token count (SDXL: both
                    encoders' penultimate states side by side, plus the pooled embedding)
Batches come from `EpochBatches`: a seeded permutation per epoch, sliceable at any batch, so a resumed
run continues at the exact sample the killed one would have trained on next.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from adapter.cache import TensorCache, cache_key, fingerprint, model_fingerprint, sha256_bytes, sha256_text
from adapter.text import PromptEncoder, crop_time_ids, text_embeds, tokenize
from surd import layout
from surd.errors import SurdError

COLUMNS = ["id", "image", "keyword_prompt", "narrative_prompt", "split", "width", "height"]
__all__ = ["text_embeds", "tokenize"]  # re-exported: the SD 1.x/2.x encoding helpers live in adapter/text.py


@dataclass
class Sample:
    id: str
    narrative: str
    keyword: str
    image: bytes | None
    image_hash: str
    width: int | None = None
    height: int | None = None


def resolve_dataset(path: Path) -> Path:
    """The dataset folder (the one holding data/*.parquet) for a dataset folder or a run folder."""
    path = Path(path)
    found = layout.find_dataset(path)
    if found is not None:
        return found
    raise SurdError(f"--data {path}: no SURD dataset found (expected {path}/surd/data/*.parquet "
                    f"from `surd export`, or {path}/data/*.parquet)")


def dataset_files(dataset_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(dataset_dir) / "data").glob("*.parquet") if not p.name.startswith("."))


def dataset_revision(dataset_dir: Path) -> dict[str, Any]:
    """Identify the exact dataset a run trained on: schema version, file names + sizes, row count."""
    files = dataset_files(dataset_dir)
    rows, version = 0, None
    for f in files:
        meta = pq.read_metadata(f)
        rows += meta.num_rows
        kv = meta.metadata or {}
        version = version or (kv.get(b"surd_schema_version") or b"").decode() or None
    listing = [[f.name, f.stat().st_size] for f in files]
    return {"path": str(dataset_dir), "schema_version": version, "rows": rows, "files": fingerprint(listing)}


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        file = pq.ParquetFile(path)
        columns = [c for c in COLUMNS if c in file.schema_arrow.names]  # width/height are optional
        for batch in file.iter_batches(batch_size=256, columns=columns):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise SurdError(f"cannot read SURD shard {path}: {e}") from None


def read_samples(dataset_dir: Path, split: str | None = "train", max_samples: int | None = None,
                 keep_image: Callable[[Sample], bool] | None = None) -> list[Sample]:
    """Rows of `split` (None: all) that have an image, a narrative and a keyword prompt; first id wins.

    Shards are streamed; `keep_image(sample)` False drops the image bytes once hashed (e.g. when its
    latents are cached already), so a large dataset is not held in memory.
    """
    samples: dict[str, Sample] = {}
    for path in dataset_files(dataset_dir):
        for row in _rows(path):
            image = (row["image"] or {}).get("bytes")
            if split is not None and row["split"] != split:
                continue
            if not image or not row["narrative_prompt"] or not row["keyword_prompt"] or row["id"] in samples:
                continue
            sample = Sample(row["id"], row["narrative_prompt"], row["keyword_prompt"], image, sha256_bytes(image),
                            row.get("width"), row.get("height"))
            if keep_image is not None and not keep_image(sample):
                sample.image = None
            samples[sample.id] = sample
            if max_samples is not None and len(samples) >= max_samples:
                return list(samples.values())
    return list(samples.values())


def _variant(seed: int, epoch: int, sample_id: str) -> tuple[bool, float, float]:
    """Deterministic per-(seed, epoch, sample) augmentation: (flip, crop x fraction, crop y fraction)."""
    h = hashlib.sha256(f"{seed}\0{epoch}\0{sample_id}".encode()).digest()
    return bool(h[0] & 1), int.from_bytes(h[1:5], "big") / 2**32, int.from_bytes(h[5:9], "big") / 2**32


def load_image(data: bytes, resolution: int, flip: bool = False,
               crop: tuple[float, float] | None = None) -> torch.Tensor:
    """Decode, resize the short side to `resolution`, crop (centre if `crop` is None), flip; [3, R, R] in [-1, 1]."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    fx, fy = crop if crop is not None else (0.5, 0.5)
    left, top = round((nw - resolution) * fx), round((nh - resolution) * fy)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def latent_params(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latent distribution parameters [B, 2C, h, w] (mean, logvar)."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(params: torch.Tensor, vae_config: Any, generator: torch.Generator | None) -> torch.Tensor:
    """Draw scaled latents from (mean, logvar), as DiagonalGaussianDistribution.sample does."""
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def latent_key(sample: Sample, flip: bool) -> str:
    return cache_key(sample.id, sample.image_hash, f"flip={int(flip)}")


def text_key(sample_id: str, text: str) -> str:
    return cache_key(sample_id, sha256_text(text), "text")


def latent_cache(cache_dir: Path, vae: Any, base: str, resolution: int) -> TensorCache:
    info = {"kind": "latents", "vae": model_fingerprint(base, vae.config), "resolution": resolution, "crop": "center"}
    return TensorCache(Path(cache_dir) / "latents" / fingerprint(info), info)


def text_cache(cache_dir: Path, text_encoder: Any, base: str) -> TensorCache:
    """The text cache of one base model: `text_encoder` is its text encoder, or a PromptEncoder (SDXL: both)."""
    if isinstance(text_encoder, PromptEncoder):
        if not text_encoder.sdxl:
            return text_cache(cache_dir, text_encoder.text_encoder, base)
        info = {"kind": "text-sdxl", "text_encoders": [model_fingerprint(base, c) for c in text_encoder.config_dicts()]}
    else:
        info = {"kind": "text", "text_encoder": model_fingerprint(base, text_encoder.config.to_dict())}
    return TensorCache(Path(cache_dir) / "text" / fingerprint(info), info)


@torch.no_grad()
def build_latent_cache(cache: TensorCache, vae: Any, samples: Sequence[Sample], resolution: int,
                       flips: Sequence[bool], batch_size: int = 8) -> int:
    """Encode the (sample, flip) pairs missing from `cache`; return how many were computed."""
    todo = [(s, f) for s in samples for f in flips if latent_key(s, f) not in cache]
    for start in range(0, len(todo), batch_size * 8):
        entries = {}
        for b in range(start, min(start + batch_size * 8, len(todo)), batch_size):
            part = todo[b : b + batch_size]
            pixels = torch.stack([load_image(s.image, resolution, flip=f) for s, f in part])
            for (s, f), p in zip(part, latent_params(vae, pixels), strict=True):
                entries[latent_key(s, f)] = p.half()
        cache.add(entries)
    return len(todo)


def _encoder(tokenizer: Any, text_encoder: Any) -> PromptEncoder:
    return tokenizer if isinstance(tokenizer, PromptEncoder) else PromptEncoder(tokenizer, text_encoder)


@torch.no_grad()
def build_text_cache(cache: TensorCache, tokenizer: Any, text_encoder: Any, items: Sequence[tuple[str, str]],
                     batch_size: int = 32) -> int:
    """Encode the (id, text) pairs missing from `cache`; return how many were computed. `tokenizer` may be a
    PromptEncoder (SDXL), then `text_encoder` is ignored."""
    encoder = _encoder(tokenizer, text_encoder)
    todo = [(i, t) for i, t in dict.fromkeys(items) if text_key(i, t) not in cache]
    for start in range(0, len(todo), batch_size * 8):
        entries = {}
        for b in range(start, min(start + batch_size * 8, len(todo)), batch_size):
            part = todo[b : b + batch_size]
            text = encoder([t for _, t in part])
            for k, (i, t) in enumerate(part):
                key = text_key(i, t)
                entries[key] = text.hidden[k].half()
                entries[key + ".n"] = text.mask[k].sum().reshape(1).to(torch.int32)
                if text.pooled is not None:
                    entries[key + ".pooled"] = text.pooled[k].half()
        cache.add(entries)
    return len(todo)


def _mask(n: int, length: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.long)
    mask[:n] = 1
    return mask


class AdapterDataset(torch.utils.data.Dataset):
    """Items for index `epoch * len + i`: sample i with that epoch's augmentation, from caches or raw.

    `tokenizer` may be a PromptEncoder (SDXL: both tokenizers; items then carry `time_ids`).
    `teacher_tokens` adds the per-token teacher states [L, H] (the connector's input; collate pads them)."""

    def __init__(self, samples: Sequence[Sample], *, seed: int, resolution: int, center_crop: bool,
                 random_flip: bool, tokenizer: Any, latents: TensorCache | None = None,
                 texts: TensorCache | None = None, teacher: TensorCache | None = None,
                 need_keyword: bool = True, teacher_vectors: bool = True, teacher_tokens: bool = False) -> None:
        if latents is not None and not center_crop:
            raise SurdError("train.cache_latents needs train.center_crop: a random crop differs every epoch")
        self.samples, self.seed, self.resolution = list(samples), seed, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.tokenizer, self.latents, self.texts, self.teacher = tokenizer, latents, texts, teacher
        self.need_keyword = need_keyword
        self.teacher_vectors, self.teacher_tokens = teacher_vectors, teacher_tokens
        self.sdxl = isinstance(tokenizer, PromptEncoder) and tokenizer.sdxl

    def __len__(self) -> int:
        return len(self.samples)

    def _text(self, prefix: str, sample_id: str, text: str) -> dict[str, torch.Tensor]:
        if self.texts is not None:
            key = text_key(sample_id, text)
            embeds = self.texts.get(key)
            item = {f"{prefix}_embeds": embeds, f"{prefix}_mask": _mask(int(self.texts.get(key + ".n")), len(embeds))}
            if self.sdxl:
                item[f"{prefix}_pooled"] = self.texts.get(key + ".pooled")
            return item
        tokens = _encoder(self.tokenizer, None).tokenize([text])
        return {f"{prefix}_{name}": value[0] for name, value in tokens.items()}

    def __getitem__(self, k: int) -> dict[str, Any]:
        from adapter.teacher import tokens_key, vector_key

        epoch, i = divmod(int(k), len(self.samples))
        sample = self.samples[i]
        flip, fx, fy = _variant(self.seed, epoch, sample.id)
        flip = flip and self.random_flip
        item: dict[str, Any] = {"id": sample.id}
        if self.latents is not None:
            item["latent_params"] = self.latents.get(latent_key(sample, flip))
        else:
            crop = None if self.center_crop else (fx, fy)
            item["pixel_values"] = load_image(sample.image, self.resolution, flip=flip, crop=crop)
        item.update(self._text("narrative", sample.id, sample.narrative))
        if self.need_keyword:
            item.update(self._text("keyword", sample.id, sample.keyword))
        if self.teacher is not None and self.teacher_vectors:
            item["teacher"] = self.teacher.get(vector_key(sample.id, sample.narrative))
        if self.teacher is not None and self.teacher_tokens:
            item["teacher_tokens"] = self.teacher.get(tokens_key(sample.id, sample.narrative))
        if self.sdxl:
            item["time_ids"] = crop_time_ids(sample.width, sample.height, self.resolution)
        return item


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length token states [L_i, H] -> padded [B, max(L, 1), H] and mask [B, max(L, 1)]."""
    length = max(1, *(len(s) for s in states))
    padded = torch.zeros(len(states), length, states[0].shape[-1], dtype=states[0].dtype)
    mask = torch.zeros(len(states), length, dtype=torch.long)
    for i, s in enumerate(states):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return padded, mask


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"id": [it["id"] for it in items]}
    for key in items[0]:
        if key == "teacher_tokens":
            batch["teacher_tokens"], batch["teacher_tokens_mask"] = pad_states([it[key] for it in items])
        elif key != "id":
            batch[key] = torch.stack([it[key] for it in items])
    return batch


class EpochBatches(torch.utils.data.Sampler):
    """An endless batch sampler: epoch e is a permutation seeded by (seed, e), padded by wrapping to whole
    global batches; rank r takes its slice of each. Start anywhere with `start_at(micro_batch)`."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise SurdError("no training samples (rows need an image, a narrative_prompt and a keyword_prompt)")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / (self.batch_size * self.world))

    def start_at(self, micro_batch: int) -> None:
        self.start = micro_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        per_global = self.batch_size * self.world
        total = self.batches_per_epoch * per_global
        order = (order * math.ceil(total / self.n))[:total]
        mine = []
        for b in range(self.batches_per_epoch):
            chunk = order[b * per_global : (b + 1) * per_global][self.rank * self.batch_size :][: self.batch_size]
            mine.append([epoch * self.n + i for i in chunk])
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0
