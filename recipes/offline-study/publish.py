"""Copy the study's dev results into the repository, where anyone can re-score them (rescore.py).

    python publish.py RUNS RESULTS --baseline SLM_ROW ROW...

ROW is a final row (RUNS/final/ROW/pred-dev500 and eval-dev500) or ROW--SETTING, the same checkpoint under a
decoding setting (RUNS/decode/SETTING/ROW/pred and eval). Writes RESULTS/ROW/newstest2013-dev500.de (the
predictions, one line per sentence, whitespace runs joined as eval reads them) and RESULTS/ROW/eval.json (eval's
metrics.json with the run folders replaced by row names and RUNS, sacrebleu signatures kept); a trained row also gets
its train_log.jsonl, a row with blind predictions (pred-blind beside pred) its flores200-devtest-500.de.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq


def folders(runs: Path, row: str) -> tuple[Path, Path]:
    name, _, setting = row.partition("--")
    if setting:
        return runs / "decode" / setting / name / "pred", runs / "decode" / setting / name / "eval"
    return runs / "final" / name / "pred-dev500", runs / "final" / name / "eval-dev500"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("rows", nargs="+")
    parser.add_argument("--baseline", required=True)
    args = parser.parse_args()
    for row in args.rows:
        pred, evaluation = folders(args.runs, row)
        rows = pq.read_table(pred / "predictions.parquet").to_pylist()
        metrics = json.loads((evaluation / "metrics.json").read_text())
        setting = row.partition("--")[2]
        metrics["predictions"]["dir"] = row
        metrics["references"] = {"files": ["newstest2013 (first 500 lines, ../shared/data)"]}
        if metrics.get("paired"):
            metrics["paired"]["baseline"] = args.baseline + (f"--{setting}" if setting else "")
        out = args.results / row
        out.mkdir(parents=True, exist_ok=True)
        (out / "newstest2013-dev500.de").write_text("".join(" ".join(r["prediction"].split()) + "\n" for r in rows))
        text = json.dumps(metrics, indent=1, ensure_ascii=False)
        for prefix in {str(args.runs.resolve()), str(args.runs)}:  # no machine's folders in a committed file
            text = text.replace(prefix, "RUNS")
        (out / "eval.json").write_text(text + "\n")
        blind = pred.parent / "pred-blind" / "predictions.parquet"
        if blind.is_file():  # the blind sentences under the same decoding, one line per source line
            lines = pq.read_table(blind).to_pylist()
            (out / "flores200-devtest-500.de").write_text("".join(" ".join(r["prediction"].split()) + "\n"
                                                                   for r in lines))
        log = args.runs / "final" / row / "train" / "train_log.jsonl"
        if not setting and log.is_file():  # a trained row: its loss at every step, dev loss at every evaluation
            shutil.copyfile(log, out / "train_log.jsonl")
        print(f"{out}: {len(rows)} predictions, chrF {metrics['metrics']['chrf']['score']:.2f}")


if __name__ == "__main__":
    main()
