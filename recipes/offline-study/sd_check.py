"""Speculative decoding against the LLM alone on the same prompts (generate's outputs): a Markdown table of outputs
identical to the LLM's greedy output, acceptance, tokens per LLM call and tokens/s, from each run's predictions and
manifest.

    python sd_check.py LLM_PRED_DIR SD_PRED_DIR...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def main(llm: str, *runs: str) -> None:
    base = pq.read_table(Path(llm) / "predictions.parquet").to_pylist()
    llm_manifest = json.loads((Path(llm) / "manifest.json").read_text())
    print("| run | outputs identical to the LLM's | acceptance | tokens per LLM call | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| {Path(llm).name} (the LLM alone) | - | - | 1 | {llm_manifest['timing']['tokens_per_second']:.2f} |")
    for run in runs:
        rows = pq.read_table(Path(run) / "predictions.parquet").to_pylist()
        if [r["id"] for r in rows] != [r["id"] for r in base]:
            raise SystemExit(f"error: {run} answers other prompts than {llm}")
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(rows, base))
        manifest = json.loads((Path(run) / "manifest.json").read_text())
        sd = manifest["speculative"]
        print(f"| {Path(run).name} | {same} of {len(rows)} | {100 * sd['acceptance_rate']:.1f}% "
              f"({sd['accepted']:,} of {sd['drafted']:,}) | {sd['tokens_per_llm_call']:.2f} | "
              f"{manifest['timing']['tokens_per_second']:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
