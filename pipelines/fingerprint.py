"""Stage fingerprints: what a stage folder was built from, and whether it still is what a run asks for.

Every stage folder records, in `RUN/<stage>/_fingerprint.json`, the settings that shape its rows and its input:

    {"stage": "dedup", "settings": {"phash_threshold": 6},
     "input": {"stage": "clean", "shards": ["folder/part-00000", ...], "fingerprint": "<sha256>"}}

A stage's *fingerprint* (`digest`) is the hash of that record together with the shard names and row counts of its
finished output, so a stage downstream notices when its input was rebuilt with other settings, grew (a larger
`max_items`) or changed in place (`surd fetch --retry-failed`). Collect records its sources instead of an input
(`{"stage": "collect", "sources": {folder: its source's fingerprint}}`).

The rule for settings: everything in a stage's section shapes its output, except the settings in `PACING`, which
only decide how fast, how many at once, or on what hardware a stage runs, and never which rows it keeps or what
they hold. Strings holding the run folder's path are recorded as `${out}/...`, so a moved run folder still matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surd import layout, shards

# Per stage (and for every stage, "*"): settings that only pace it. Everything else is fingerprinted.
PACING: dict[str, frozenset[str]] = {
    "*": frozenset({"batch_size", "num_cpus", "num_gpus"}),
    # transient failures are not results: timeouts and retries change how often a download is tried, not what a
    # downloaded row holds; concurrency and rate only pace the downloads
    "fetch": frozenset({"concurrency", "per_host", "requests_per_second", "timeout", "total_timeout", "max_retries",
                        "backoff_base", "retry_after_max"}),
    "nsfw": frozenset({"threads"}),
    # the prefix cache gives the same tokens; the request cache is where answers are kept, not what they are
    "pair": frozenset({"prefix_cache", "cache_path", "concurrency", "timeout_s", "http_retries"}),
    # other batches sum floats in another order: scores agree to float32 rounding (tests/test_trust_fingerprints.py)
    "score": frozenset({"inference_batch_size", "num_workers"}),
    "export": frozenset({"format"}),
}
# ... except where they do shape the rows: an LLM samples other words from rows batched otherwise (one seed per
# batch) or computed with another number of threads (other float sums, another token now and then).
NOT_PACING: dict[str, frozenset[str]] = {"pair": frozenset({"batch_size", "num_cpus"})}


def pacing(stage: str) -> frozenset[str]:
    """The settings of `stage` that are not fingerprinted."""
    return (PACING["*"] | PACING.get(stage, frozenset())) - NOT_PACING.get(stage, frozenset())


def settings_of(stage: str, config: Any, run_dir: Path, exclude: frozenset[str] | None = None) -> dict[str, Any]:
    """The settings of a stage's config that shape its output, as JSON, with the run folder written `${out}`."""
    skip = pacing(stage) if exclude is None else exclude
    dumped = config.model_dump(mode="json", exclude=set(skip) & set(type(config).model_fields))
    return layout.portable(dumped, run_dir)


def read(stage_dir: Path) -> dict[str, Any] | None:
    """The fingerprint record of a stage folder, or None (none written, or unreadable)."""
    path = Path(stage_dir) / layout.FINGERPRINT
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(stage_dir: Path, record: dict[str, Any]) -> None:
    shards.atomic_write_json(Path(stage_dir) / layout.FINGERPRINT, record)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digest(stage_dir: Path) -> str | None:
    """A finished stage's fingerprint: its record and its output's shards (names and rows); None if unfinished."""
    record = read(stage_dir)
    try:
        manifest = shards.read_manifest(stage_dir)
    except (OSError, ValueError):
        manifest = None
    if record is None or manifest is None:
        return None
    return _hash({"record": record, "shards": [[s["name"], s["rows"]] for s in manifest.get("shards", [])]})


def input_of(run_dir: Path, source: str) -> dict[str, Any]:
    """What a stage reading the finished stage `source` records about its input."""
    src = layout.stage_dir(run_dir, source)
    return {"stage": source, "shards": shards.shard_names(src), "fingerprint": digest(src)}


def record(stage: str, settings: dict[str, Any], input_: dict[str, Any]) -> dict[str, Any]:
    return {"stage": stage, "settings": settings, "input": input_}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def difference(previous: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a folder built as `previous` is not what `current` asks for, in words; None if it is."""
    if previous == current:
        return None
    if previous is None or "settings" not in previous:
        return "built without a fingerprint (an earlier surd, or an interrupted start)"
    before, after = previous.get("settings") or {}, current.get("settings") or {}
    changed = [f"{key} {_short(before.get(key))} -> {_short(after.get(key))}"
               for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if changed:
        return ", ".join(changed)
    old_in, new_in = previous.get("input") or {}, current.get("input") or {}
    if old_in.get("stage") != new_in.get("stage"):
        return f"input {old_in.get('stage')} -> {new_in.get('stage')}"
    if old_in.get("shards") != new_in.get("shards"):
        return f"input {new_in.get('stage')} has other shards ({len(old_in.get('shards') or [])} -> " \
               f"{len(new_in.get('shards') or [])})"
    if old_in != new_in:
        return f"input {new_in.get('stage')} was rebuilt or changed"
    return "fingerprint differs"


@dataclass
class State:
    """Where a stage folder stands against what a run asks of it."""

    action: str  # "done", "continue", "new" or "rebuild"
    reason: str = ""
    done: int = 0  # shards finished so far (continue)


def state(stage_dir: Path, current: dict[str, Any], todo: int | None = None) -> State:
    """Compare a stage folder with the record a run would write; `todo` is the number of input shards."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists() or not any(stage_dir.iterdir()):
        return State("new")
    why = difference(read(stage_dir), current)
    if why is not None:
        return State("rebuild", why)
    if (stage_dir / shards.MANIFEST).exists():
        return State("done")
    done = sum(1 for p in (stage_dir / "_done").rglob("*") if p.is_file()) if (stage_dir / "_done").is_dir() else 0
    return State("continue", f"{done} of {todo} shards done" if todo is not None else f"{done} shards done", done)


def stale(run_dir: Path, stage: str) -> str | None:
    """Why a stage folder no longer matches its input (gone, rebuilt, changed), or None if it does."""
    folder = layout.stage_dir(run_dir, stage)
    rec = read(folder)
    if stage == layout.STAGES[0]:
        return None
    if rec is None or "input" not in rec:
        return "no fingerprint: built by an earlier surd, rebuilt on the next run"
    source = rec["input"].get("stage")
    src = layout.stage_dir(run_dir, source) if source in layout.STAGES else None
    if src is None or not src.is_dir():
        return f"its input {source}/ is gone"
    if not (src / shards.MANIFEST).exists():
        return f"its input {source}/ is unfinished or being rebuilt"
    if digest(src) != rec["input"].get("fingerprint") or shards.shard_names(src) != rec["input"].get("shards"):
        return f"its input {source}/ changed since it was built"
    if stale(run_dir, source):
        return f"its input {source}/ is stale"
    return None
