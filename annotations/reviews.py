"""Review decisions: from Label Studio annotations to `reviews.parquet`, and from there onto SURD rows.

`reviews.parquet` has one row per reviewed sample:

    id, decision (accepted | rejected | edited), corrected_narrative, reject_reason,
    annotator (comma-separated, sorted), updated_at, annotators (count), agreement

Each annotator's latest annotation of a sample is their vote. With several annotators the majority
decision wins (ties go to the more conservative one: rejected, then edited, then accepted), and
`agreement` is the share of annotators who voted for it.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from surd.errors import SurdError
from surd.rows import Drop, RowProcessor
from surd.shards import write_table

DECISIONS = ("accepted", "rejected", "edited")
_TIE_ORDER = {"rejected": 0, "edited": 1, "accepted": 2}
# Values the interface stores (Choice aliases), plus its visible labels in case a config drops the aliases.
_DECISION_CHOICES = {
    "accept": "accepted", "Accept": "accepted",
    "reject": "rejected", "Reject": "rejected",
    "edit": "edited", "Edit narrative": "edited",
}  # fmt: skip
_REASON_CHOICES = {
    "Narrative does not match the image": "narrative_mismatch",
    "Keyword prompt is not about the image": "keyword_mismatch",
    "Bad or NSFW image": "bad_image",
    "Other": "other",
}

REVIEWS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("corrected_narrative", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("annotator", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        pa.field("annotators", pa.int32()),
        pa.field("agreement", pa.float32()),
    ]
)


@dataclass(frozen=True)
class Vote:
    """One annotator's (latest) decision on one sample."""

    sample_id: str
    annotator: str
    decision: str
    corrected_narrative: str | None
    reject_reason: str | None
    updated_at: dt.datetime


def _normalise(text: str | None) -> str:
    return " ".join((text or "").split())


def _choice(result: list[dict[str, Any]], name: str) -> str | None:
    for item in result:
        if item.get("from_name") == name:
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _text(result: list[dict[str, Any]], name: str) -> str | None:
    for item in result:
        if item.get("from_name") == name:
            text = (item.get("value") or {}).get("text") or []
            return "\n".join(str(t) for t in text) if isinstance(text, list) else str(text)
    return None


def vote_from_result(
    sample_id: str, annotator: str, updated_at: dt.datetime, result: list[dict[str, Any]], shown_narrative: str | None
) -> Vote | None:
    """Read one annotation's result; None when it says nothing (no decision and no edit).

    The corrected-narrative box is pre-filled with the shown narrative, so text that is missing, empty
    or equal to it (ignoring whitespace) means "unchanged". Changed text makes the vote `edited` unless
    the decision is reject; `edit` with unchanged text is an accept.
    """
    raw = _choice(result, "decision")
    decision = _DECISION_CHOICES.get(raw) if raw is not None else None
    text = _text(result, "corrected_narrative")
    changed = bool(_normalise(text)) and _normalise(text) != _normalise(shown_narrative)
    if decision == "rejected":
        reason = _choice(result, "reject_reason")
        return Vote(sample_id, annotator, "rejected", None, _REASON_CHOICES.get(reason, reason), updated_at)
    if changed:
        return Vote(sample_id, annotator, "edited", (text or "").strip(), None, updated_at)
    if decision is None:
        return None
    return Vote(sample_id, annotator, "accepted", None, None, updated_at)


def latest_votes(votes: list[tuple[int, Vote]]) -> list[Vote]:
    """Keep each annotator's latest vote per sample; `votes` are (annotation id, vote) for tie-breaks."""
    best: dict[tuple[str, str], tuple[dt.datetime, int, Vote]] = {}
    for annotation_id, vote in votes:
        key = (vote.sample_id, vote.annotator)
        candidate = (vote.updated_at, annotation_id, vote)
        if key not in best or candidate[:2] > best[key][:2]:
            best[key] = candidate
    return [v for _, _, v in best.values()]


def _most_common(values: list[tuple[str, dt.datetime]]) -> str | None:
    """The most frequent value; ties go to the most recently given one."""
    if not values:
        return None
    counts = Counter(v for v, _ in values)
    latest = {v: max(t for w, t in values if w == v) for v in counts}
    return max(counts, key=lambda v: (counts[v], latest[v], v))


def resolve(votes: list[Vote]) -> pa.Table:
    """One row per sample: the majority decision, its details and the agreement figure (REVIEWS_SCHEMA)."""
    by_sample: dict[str, list[Vote]] = {}
    for vote in votes:
        by_sample.setdefault(vote.sample_id, []).append(vote)
    rows = []
    for sample_id in sorted(by_sample):
        group = by_sample[sample_id]
        counts = Counter(v.decision for v in group)
        decision = min(counts, key=lambda d: (-counts[d], _TIE_ORDER[d]))
        winners = [v for v in group if v.decision == decision]
        rows.append(
            {
                "id": sample_id,
                "decision": decision,
                "corrected_narrative": _most_common(
                    [(v.corrected_narrative, v.updated_at) for v in winners if v.corrected_narrative]
                ),
                "reject_reason": _most_common([(v.reject_reason, v.updated_at) for v in winners if v.reject_reason]),
                "annotator": ",".join(sorted({v.annotator for v in group})),
                "updated_at": max(v.updated_at for v in group),
                "annotators": len(group),
                "agreement": counts[decision] / len(group),
            }
        )
    return pa.Table.from_pylist(rows, schema=REVIEWS_SCHEMA)


def write_reviews(path: Path, table: pa.Table) -> None:
    """Write `reviews.parquet` atomically; the same reviews always give the same bytes."""
    write_table(Path(path), table.cast(REVIEWS_SCHEMA))


def read_reviews(path: Path) -> pa.Table:
    """Read and check a `reviews.parquet`."""
    path = Path(path)
    if not path.exists():
        raise SurdError(f"reviews file not found: {path} (run `surd review pull` first)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise SurdError(f"cannot read reviews file {path}: {e}") from None
    missing = [name for name in ("id", "decision") if name not in table.column_names]
    if missing:
        raise SurdError(f"{path}: missing column(s) {', '.join(missing)}")
    for field in REVIEWS_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    table = table.select(REVIEWS_SCHEMA.names).cast(REVIEWS_SCHEMA)
    bad = sorted(set(table.column("decision").to_pylist()) - set(DECISIONS))
    if bad:
        raise SurdError(f"{path}: unknown decision(s) {bad}; expected one of {', '.join(DECISIONS)}")
    return table


def summary(table: pa.Table) -> dict[str, Any]:
    """Counts per decision and the mean agreement over samples with more than one annotator."""
    counts = Counter(table.column("decision").to_pylist())
    multi = [a for a, n in zip(table.column("agreement").to_pylist(), table.column("annotators").to_pylist(),
                               strict=True) if n and n > 1]  # fmt: skip
    return {
        "reviewed": table.num_rows,
        **{d: counts.get(d, 0) for d in DECISIONS},
        "multi_annotated": len(multi),
        "agreement": round(sum(multi) / len(multi), 4) if multi else None,
    }


class ReviewApplier(RowProcessor):
    """Applies `reviews.parquet` to SURD rows: rejected rows are dropped, edits replace the narrative."""

    def __init__(self, reviews_path: Path) -> None:
        self.reviews_path = Path(reviews_path)
        if not self.reviews_path.exists():
            raise SurdError(f"reviews file not found: {self.reviews_path}")
        self._reviews: dict[str, dict[str, Any]] | None = None
        self.counters: dict[str, int] = {}

    def setup(self) -> None:
        table = read_reviews(self.reviews_path)
        self._reviews = {row["id"]: row for row in table.to_pylist()}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def process_row(self, row: dict[str, Any]) -> dict[str, Any] | Drop:
        if self._reviews is None:
            self.setup()
        assert self._reviews is not None
        review = self._reviews.get(row["id"])
        if review is None:
            return row
        decision = review["decision"]
        if decision == "rejected":
            self._count("review_rejected")
            return Drop("review_rejected", detail=review["reject_reason"] or "")
        if decision == "edited" and review["corrected_narrative"]:
            self._count("review_edited")
            return {**row, "narrative_prompt": review["corrected_narrative"], "narrative_origin": "human",
                    "review": "edited"}  # fmt: skip
        self._count("review_accepted")
        return {**row, "review": "accepted"}
