"""Review rules, every side of each: majority and its tie order, vote reading, latest votes, applying reviews."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotations import reviews
from annotations.reviews import ReviewApplier, Vote
from surd.errors import SurdError
from surd.rows import Drop

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
LATER = T0 + dt.timedelta(minutes=1)
# The documented tie order: the more conservative decision wins.
CONSERVATIVE = {("rejected", "edited"): "rejected", ("rejected", "accepted"): "rejected",
                ("edited", "accepted"): "edited"}


def _vote(annotator: str, decision: str, at: dt.datetime = T0) -> Vote:
    narrative = f"{annotator} wrote this" if decision == "edited" else None
    reason = f"{annotator}_reason" if decision == "rejected" else None
    return Vote("s", annotator, decision, narrative, reason, at)


@pytest.mark.parametrize(("first", "second"), [*CONSERVATIVE, *((b, a) for a, b in CONSERVATIVE)])
@pytest.mark.parametrize("later_vote", ["first", "second"])
def test_every_one_one_tie_goes_to_the_more_conservative_decision(first: str, second: str, later_vote: str) -> None:
    # Both orders of the pair, and either vote the more recent: neither order nor time may decide a tie.
    a = _vote("ann", first, LATER if later_vote == "first" else T0)
    b = _vote("bob", second, LATER if later_vote == "second" else T0)
    expected = CONSERVATIVE.get((first, second)) or CONSERVATIVE[(second, first)]
    row = reviews.resolve([a, b]).to_pylist()[0]
    assert (row["decision"], row["agreement"], row["annotators"]) == (expected, 0.5, 2)
    winner = a if a.decision == expected else b
    assert row["corrected_narrative"] == winner.corrected_narrative  # details come from the winning side only
    assert row["reject_reason"] == winner.reject_reason
    assert row["updated_at"] == LATER and row["annotator"] == "ann,bob"


@pytest.mark.parametrize(("many", "one"), list(itertools.permutations(reviews.DECISIONS, 2)))
def test_two_votes_beat_one_whatever_the_tie_order(many: str, one: str) -> None:
    votes = [_vote("ann", many), _vote("bob", one, LATER), _vote("cy", many)]
    row = reviews.resolve(votes).to_pylist()[0]
    assert row["decision"] == many
    assert row["agreement"] == pytest.approx(2 / 3) and row["annotators"] == 3


def test_a_three_way_tie_is_rejected_and_unanimity_agrees_fully() -> None:
    three = reviews.resolve([_vote("a", "accepted"), _vote("b", "edited"), _vote("c", "rejected")]).to_pylist()[0]
    assert three["decision"] == "rejected" and three["agreement"] == pytest.approx(1 / 3)
    solo = reviews.resolve([_vote("a", "edited")]).to_pylist()[0]
    assert (solo["decision"], solo["agreement"], solo["annotators"], solo["corrected_narrative"]) == (
        "edited", 1.0, 1, "a wrote this")


def test_winning_details_are_the_most_common_then_the_latest() -> None:
    edits = [Vote("s", "a", "edited", "one", None, T0), Vote("s", "b", "edited", "two", None, LATER),
             Vote("s", "c", "edited", "one", None, T0)]
    assert reviews.resolve(edits).to_pylist()[0]["corrected_narrative"] == "one"  # 2 against 1, though older
    tie = [Vote("s", "a", "edited", "old", None, T0), Vote("s", "b", "edited", "new", None, LATER)]
    assert reviews.resolve(tie).to_pylist()[0]["corrected_narrative"] == "new"  # a tie: the latest
    tie_reversed = [Vote("s", "a", "edited", "new", None, LATER), Vote("s", "b", "edited", "old", None, T0)]
    assert reviews.resolve(tie_reversed).to_pylist()[0]["corrected_narrative"] == "new"
    same_time = [Vote("s", "a", "rejected", None, "bad_image", T0), Vote("s", "b", "rejected", None, "other", T0)]
    assert reviews.resolve(same_time).to_pylist()[0]["reject_reason"] == "other"  # then the larger value
    no_reason = [Vote("s", "a", "rejected", None, None, T0)]
    assert reviews.resolve(no_reason).to_pylist()[0]["reject_reason"] is None


def test_samples_come_out_sorted_by_id() -> None:
    votes = [Vote(i, "a", "accepted", None, None, T0) for i in ("b", "c", "a")]
    assert [r["id"] for r in reviews.resolve(votes).to_pylist()] == ["a", "b", "c"]


def test_latest_vote_per_annotator_breaks_time_ties_by_annotation_id() -> None:
    first, second = Vote("s", "a", "accepted", None, None, T0), Vote("s", "a", "rejected", None, "other", T0)
    assert reviews.latest_votes([(1, first), (2, second)]) == [second]
    assert reviews.latest_votes([(2, second), (1, first)]) == [second]
    newer = Vote("s", "a", "edited", "x", None, LATER)
    assert reviews.latest_votes([(9, first), (1, newer)]) == [newer]  # time first, then the id
    other = Vote("t", "a", "accepted", None, None, T0)
    assert sorted(reviews.latest_votes([(1, first), (2, other)]), key=lambda v: v.sample_id) == [first, other]


def _result(decision: str | None = None, text: str | list[str] | None = None, reason: str | None = None) -> list:
    items = []
    if decision is not None:
        items.append({"from_name": "decision", "value": {"choices": [decision]}})
    if text is not None:
        items.append({"from_name": "corrected_narrative", "value": {"text": text}})
    if reason is not None:
        items.append({"from_name": "reject_reason", "value": {"choices": [reason]}})
    return items


@pytest.mark.parametrize(("result", "expected"), [
    (_result("accept"), ("accepted", None, None)),
    (_result("Accept"), ("accepted", None, None)),
    (_result("reject", reason="Bad or NSFW image"), ("rejected", None, "bad_image")),
    (_result("Reject", reason="Narrative does not match the image"), ("rejected", None, "narrative_mismatch")),
    (_result("reject", reason="Keyword prompt is not about the image"), ("rejected", None, "keyword_mismatch")),
    (_result("reject", reason="Other"), ("rejected", None, "other")),
    (_result("reject", reason="typed by hand"), ("rejected", None, "typed by hand")),  # unknown: kept as given
    (_result("reject"), ("rejected", None, None)),
    (_result("reject", text="a changed sentence"), ("rejected", None, None)),  # reject wins over an edit
    (_result("edit"), ("accepted", None, None)),  # edit with the pre-filled text unchanged
    (_result("Edit narrative", text="  a cat   on a mat "), ("accepted", None, None)),  # whitespace only
    (_result("edit", text=" a dog on a mat \n"), ("edited", "a dog on a mat", None)),
    (_result("accept", text="a dog on a mat"), ("edited", "a dog on a mat", None)),  # changed text is a vote
    (_result(None, text=["a dog", "on a mat"]), ("edited", "a dog\non a mat", None)),
    (_result(None, text=""), None),
    (_result(None, text="a cat on a mat"), None),
    (_result(None), None),
    ([{"from_name": "decision", "value": {"choices": []}}], None),
    ([{"from_name": "decision"}], None),
    (_result("something else"), None),
])
def test_vote_from_result_reads_every_kind_of_annotation(result: list, expected: tuple | None) -> None:
    vote = reviews.vote_from_result("s", "ann", T0, result, "a cat on a mat")
    if expected is None:
        assert vote is None
    else:
        assert vote is not None
        assert (vote.decision, vote.corrected_narrative, vote.reject_reason) == expected
        assert (vote.sample_id, vote.annotator, vote.updated_at) == ("s", "ann", T0)


def test_summary_counts_and_averages_only_multi_annotated_samples() -> None:
    votes = [_vote("a", "accepted"), Vote("t", "a", "rejected", None, None, T0), Vote("t", "b", "rejected", None,
             None, T0), Vote("u", "a", "edited", "x", None, T0), Vote("u", "b", "accepted", None, None, T0)]
    s = reviews.summary(reviews.resolve(votes))
    assert s == {"reviewed": 3, "accepted": 1, "rejected": 1, "edited": 1, "multi_annotated": 2, "agreement": 0.75}
    thirds = [Vote("t", n, d, None, None, T0) for n, d in (("a", "accepted"), ("b", "accepted"), ("c", "rejected"))]
    halves = [Vote("u", "a", "accepted", None, None, T0), Vote("u", "b", "rejected", None, None, T0)]
    assert reviews.summary(reviews.resolve(thirds + halves))["agreement"] == 0.5833  # (2/3 + 1/2) / 2, 4 places
    single = reviews.summary(reviews.resolve([_vote("a", "accepted")]))
    assert single["multi_annotated"] == 0 and single["agreement"] is None


def _applier(tmp_path: Path, votes: list[Vote]) -> ReviewApplier:
    path = tmp_path / "reviews.parquet"
    reviews.write_reviews(path, reviews.resolve(votes))
    return ReviewApplier(path)


def test_applier_counts_and_treats_an_empty_edit_as_an_accept(tmp_path: Path) -> None:
    applier = _applier(tmp_path, [Vote("e", "a", "edited", "", None, T0), Vote("r", "a", "rejected", None, None, T0),
                                  Vote("k", "a", "accepted", None, None, T0),
                                  Vote("w", "a", "edited", "A human sentence.", None, T0)])
    row = {"id": "e", "narrative_prompt": "generated", "narrative_origin": "llm:m@1"}
    assert applier.process_row(row) == {**row, "review": "accepted"}  # set up on first use
    dropped = applier.process_row({"id": "r"})
    assert isinstance(dropped, Drop) and (dropped.reason, dropped.detail) == ("review_rejected", "")
    assert applier.process_row({"id": "k"}) == {"id": "k", "review": "accepted"}
    assert applier.process_row({"id": "unreviewed", "review": None}) == {"id": "unreviewed", "review": None}
    assert applier.process_row({**row, "id": "w"}) == {"id": "w", "narrative_prompt": "A human sentence.",
                                                      "narrative_origin": "human", "review": "edited"}
    assert applier.counters == {"review_accepted": 2, "review_rejected": 1, "review_edited": 1}


def test_write_reviews_is_deterministic_and_read_reviews_fills_optional_columns(tmp_path: Path) -> None:
    table = reviews.resolve([_vote("a", "edited"), _vote("b", "edited")])
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    reviews.write_reviews(one, table)
    reviews.write_reviews(two, table)
    assert one.read_bytes() == two.read_bytes()
    assert reviews.read_reviews(one).equals(table)
    minimal = tmp_path / "minimal.parquet"
    pq.write_table(pa.table({"decision": ["accepted"], "id": ["x"]}), minimal)
    read = reviews.read_reviews(minimal)
    assert read.schema.names == reviews.REVIEWS_SCHEMA.names and read.to_pylist()[0]["agreement"] is None


def test_read_reviews_names_unknown_decisions_and_unreadable_files(tmp_path: Path) -> None:
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "decision": ["maybe", "accepted"]}), odd)
    expected = r"unknown decision\(s\) \['maybe'\]; expected one of accepted, rejected, edited$"
    with pytest.raises(SurdError, match=expected):
        reviews.read_reviews(odd)
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"annotator": ["a"]}), bare)
    with pytest.raises(SurdError, match=r"missing column\(s\) id, decision$"):
        reviews.read_reviews(bare)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(SurdError, match="cannot read reviews file"):
        reviews.read_reviews(garbage)
    with pytest.raises(SurdError, match="surd review pull"):
        reviews.read_reviews(tmp_path / "missing.parquet")
