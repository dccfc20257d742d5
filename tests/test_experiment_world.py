"""`surd experiment`'s world and report logic: prompts that say the truth in two vocabularies, a held-out set that
never reaches training, renders that show their attributes, and the arithmetic of the report."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from adapter.experiment import report
from adapter.experiment.dataset import prompt_set, write_images, write_prompt_sets
from adapter.experiment.prompts import NARRATIVE_WORDS, keyword_prompt, narrative_prompt
from adapter.experiment.settings import adapter_kinds
from adapter.experiment.world import (
    ATTRIBUTES,
    CENTRE,
    COLOURS,
    SIDE,
    combinations,
    is_held_out,
    render,
    split_combinations,
)
from surd.clean import clean_prompt

KEYWORD_VOCABULARY = {value for values in ATTRIBUTES.values() for value in values}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_the_held_out_set_asks_for_new_combinations_of_pairs_all_seen_in_training() -> None:
    seen, held_out = split_combinations()
    assert len(seen) + len(held_out) == len(combinations()) == 48 and len(held_out) == 12
    assert all(is_held_out(a) for a in held_out) and not any(is_held_out(a) for a in seen)
    names = list(ATTRIBUTES)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for a in ATTRIBUTES[first]:
                for b in ATTRIBUTES[second]:
                    together = sum(c[first] == a and c[second] == b for c in seen)
                    assert together >= 2, (first, a, second, b)  # every pair is seen, more than once
    assert {frozenset(a.items()) for a in held_out}.isdisjoint({frozenset(a.items()) for a in seen})


def test_keyword_prompts_name_every_attribute_and_narratives_none_of_the_keyword_words() -> None:
    rng = random.Random(3)
    for attributes in combinations() * 5:
        raw = keyword_prompt(attributes, rng)
        cleaned = clean_prompt(raw)
        assert "(" not in cleaned and ":1." not in cleaned, raw  # the clean stage turned weights into words
        assert set(attributes.values()) <= _words(cleaned), (attributes, cleaned)
        narrative = narrative_prompt(attributes, rng)
        assert not _words(narrative) & KEYWORD_VOCABULARY, narrative
        for name, value in attributes.items():  # the narrative says each attribute with one of its own words
            assert any(word in narrative.lower() for word in NARRATIVE_WORDS[name][value]), (name, value, narrative)


def test_every_narrative_phrase_says_one_value() -> None:
    for name, by_value in NARRATIVE_WORDS.items():
        every = [phrase for phrases in by_value.values() for phrase in phrases]
        assert len(every) == len(set(every)), name
        if name == "position":
            continue  # relative phrasing shares words on purpose: "with open space to its west" is on the east
        for value, phrases in by_value.items():
            others = set().union(*(_words(" ".join(p)) for v, p in by_value.items() if v != value))
            for phrase in phrases:
                assert _words(phrase) - others, (name, value, phrase)  # a word in it says which value


def test_renders_show_their_colour_and_position() -> None:
    rng = random.Random(0)
    for attributes in combinations():
        pixels = np.asarray(render(attributes, rng)).astype(float)
        saturation = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2)
        ys, xs = np.nonzero(saturation > 40)
        centre = (xs.mean() / SIDE, ys.mean() / SIDE)
        nearest = min(CENTRE, key=lambda p: (CENTRE[p][0] - centre[0]) ** 2 + (CENTRE[p][1] - centre[1]) ** 2)
        assert nearest == attributes["position"], attributes
        mean = pixels[saturation > 40].mean(axis=0)
        colour = min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))
        assert colour == attributes["colour"], attributes


def test_the_dataset_holds_seen_combinations_only_and_the_prompt_sets_their_own(tmp_path: Path) -> None:
    assert write_images(tmp_path / "images", 200, seed=1) == 200
    lines = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 200 and all((tmp_path / "images" / line["file_name"]).is_file() for line in lines)
    assert not any(is_held_out(line["attributes"]) for line in lines)
    counts = {}
    for line in lines:
        key = tuple(sorted(line["attributes"].items()))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 36 and max(counts.values()) - min(counts.values()) <= 1  # every seen combination, evenly
    by_combination: dict[tuple, set[str]] = {}
    for line in lines:
        by_combination.setdefault(tuple(sorted(line["attributes"].items())), set()).add(line["text"])
    assert max(len(texts) for texts in by_combination.values()) <= 4  # each from its pool of 4 narratives
    assert len({line["text"] for line in lines}) > 36 and len({line["prompt"] for line in lines}) > 150
    paths = write_prompt_sets(tmp_path / "prompts", 30, seed=2)
    seen = yaml.safe_load(paths["seen"].read_text())["probes"]
    held = yaml.safe_load(paths["held-out"].read_text())["probes"]
    assert len(seen) == len(held) == 30
    assert not any(is_held_out(p["attributes"]) for p in seen) and all(is_held_out(p["attributes"]) for p in held)
    assert len({tuple(sorted(p["attributes"].items())) for p in held}) == 12  # 30 prompts cover all 12 combinations
    assert prompt_set("x", split_combinations()[0], 5, seed=9) == prompt_set("x", split_combinations()[0], 5, seed=9)


def test_adapter_kinds_come_from_the_kind_setting_when_there_is_one() -> None:
    class WithKinds(BaseModel):
        kind: Literal["reference", "paper", "sur", "connector"] = "sur"

    class WithoutKinds(BaseModel):
        depth: int = 2

    assert adapter_kinds(WithKinds) == ["reference", "paper", "sur", "connector"]
    assert adapter_kinds(WithoutKinds) == ["sur"]


# ---------------------------------------------------------------- the report's arithmetic


def _records(accuracy: dict[str, list[float]], category: str = "seen", prompts: int = 4) -> list[dict]:
    """One record per arm, seed and prompt; `accuracy[arm][seed]` of its prompts get every attribute right."""
    out = []
    for arm, per_seed in accuracy.items():
        for seed, share in enumerate(per_seed):
            right = round(share * prompts)
            for i in range(prompts):
                ok = float(i < right)
                out.append({"arm": arm, "category": category, "seed": seed, "item_id": f"{category}-{i}",
                            "attribute_accuracy": ok, **{f"acc_{a}": ok for a in ATTRIBUTES}})
    return out


def test_intervals_use_students_t_over_seeds() -> None:
    mean, half = report.interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert report.interval([0.4]) == (0.4, None)
    assert report.t95(1) == 12.706 and report.t95(12) == report.t95(10) and report.t95(100) == 1.96


def test_summary_pairs_arms_with_floor_and_ceiling_and_reads_the_gap() -> None:
    records = _records({"base": [0.25, 0.25, 0.5], "keyword": [1.0, 1.0, 1.0], "below": [0.5, 0.5, 0.75],
                        "near": [0.75, 0.75, 1.0], "noisy": [0.75, 0.5, 0.75], "same": [0.25, 0.25, 0.5]})
    summary = report.summarise(records, ["base", "keyword", "below", "near", "noisy", "same"])["seen"]
    assert summary["base"]["all"]["mean"] == pytest.approx(1 / 3)
    assert summary["below"]["vs_base"] == {"mean": pytest.approx(0.25), "ci95": pytest.approx(0.0)}  # paired
    assert summary["below"]["gap_closed"] == pytest.approx((7 / 12 - 1 / 3) / (1 - 1 / 3))
    assert report.verdict(summary["base"]) == "(the floor)" and report.verdict(summary["keyword"]) == "(the ceiling)"
    assert report.verdict(summary["same"]) == "does not beat the floor"
    # +0.5, +0.25, +0.25 over three seeds: t(2) makes the interval wider than the mean
    assert report.verdict(summary["noisy"]) == "does not beat the floor"
    assert report.verdict(summary["below"]) == "beats the floor, below the ceiling"
    assert report.verdict(summary["near"]) == "beats the floor, not distinguishable from the ceiling"


def test_sanity_checks_fail_when_the_ceiling_is_low_or_the_floor_is_high() -> None:
    judge = {"renders": dict.fromkeys(ATTRIBUTES, 0.99), "held_out_combinations": dict.fromkeys(ATTRIBUTES, 0.97)}
    good = _records({"base": [0.25, 0.25], "keyword": [1.0, 1.0]}, "seen") + \
        _records({"base": [0.25, 0.25], "keyword": [1.0, 1.0]}, "held-out")
    arms = ["base", "keyword"]
    checks = report.sanity_checks(report.summarise(good, arms), judge, arms, {"base": 8, "keyword": 8})
    assert all(c["passed"] for c in checks), checks
    bad = _records({"base": [0.75, 0.75], "keyword": [0.75, 0.75]}, "seen") + \
        _records({"base": [0.25, 0.25], "keyword": [1.0, 1.0]}, "held-out")
    failed = {c["check"] for c in report.sanity_checks(report.summarise(bad, arms), judge, arms,
                                                       {"base": 8, "keyword": 8}) if not c["passed"]}
    assert failed == {"ceiling colour (seen)", "ceiling position (seen)",
                      "floor colour near chance (seen; chance 0.25)", "floor position near chance (seen; chance 0.25)"}
    weak_judge = {**judge, "renders": {**judge["renders"], "shape": 0.9}}
    missing = report.sanity_checks(report.summarise(good, arms), weak_judge, arms, {"base": 8, "keyword": 6})
    assert {c["check"].split(" (")[0] for c in missing if not c["passed"]} == {
        "judge accuracy on unseen renders", "every arm made every image"}


def test_the_frozen_text_encoder_keeps_each_word_recognisable_in_its_outputs() -> None:
    """The base model can follow a keyword prompt only if the colour word's output vector still says which colour
    it is, wherever the word sits and whatever surrounds it: nearest-centroid over the colour token's outputs of
    one half of the prompts must read the other half's colour (CLIP's own 0.02-scale init read it ~half the time)."""
    import torch

    from adapter.experiment import base_model

    tokenizer = base_model.build_tokenizer()
    encoder = base_model.build_text_encoder(tokenizer)
    rng = random.Random(3)
    colours = list(COLOURS)
    labels, prompts = [], []
    for attributes in [c for c in combinations() for _ in range(4)]:
        labels.append(colours.index(attributes["colour"]))
        prompts.append(clean_prompt(keyword_prompt(attributes, rng)))
    hidden = base_model.encode_texts(tokenizer, encoder, prompts)
    colour_ids = {tokenizer.convert_tokens_to_ids(f"{c}</w>"): i for i, c in enumerate(colours)}
    vectors = []
    for row, text in enumerate(prompts):
        ids = tokenizer(text, padding="max_length", max_length=base_model.MAX_TOKENS, truncation=True).input_ids
        position = next(p for p, token in enumerate(ids) if token in colour_ids)
        assert colour_ids[ids[position]] == labels[row]
        vectors.append(torch.nn.functional.normalize(hidden[row, position], dim=0))
    vectors, truth = torch.stack(vectors), torch.tensor(labels)
    fit, check = torch.arange(len(truth)) % 2 == 0, torch.arange(len(truth)) % 2 == 1
    centroids = torch.stack([vectors[fit & (truth == c)].mean(0) for c in range(len(colours))])
    read = (vectors[check] @ centroids.T).argmax(1)
    assert (read == truth[check]).float().mean() >= 0.95
