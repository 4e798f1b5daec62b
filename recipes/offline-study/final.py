"""The study's final table, read from what the toolkit's stages wrote under RUNS/final/<row>/.

    python final.py RUNS/final llm slm-NAME llm2slm-NAME-kK

Per row: BLEU and chrF on the first 500 newstest2013 sentences with their 95% confidence intervals and the p-value
against the SLM alone (eval --paired-with: sacrebleu's paired bootstrap), the share of distinct outputs and of
outputs ending in a repetition loop (eval), ms/token and the speedup against Gemma alone (bench, one run), parameters
and the training budget (train's manifest). Prints a Markdown table.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("rows", nargs="+")
    parser.add_argument("--bench", default="bench", help="the speed bench's directory under ROOT")
    args = parser.parse_args()
    bench = json.loads((args.root / args.bench / "bench.json").read_text())
    speed = {r["label"]: r for r in bench["rows"] if r.get("part", "main") == "main" and r["batch_size"] == 1}
    print("| row | BLEU [95% CI] | chrF [95% CI] | p (chrF vs SLM alone) | distinct | loops | ms/token | "
          "speedup vs Gemma | parameters | training budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in args.rows:
        metrics = json.loads((args.root / row / "eval-dev500" / "metrics.json").read_text())
        paired = metrics["paired"]
        cells = []
        for name in ("bleu", "chrf"):
            p = paired[name]
            cells.append(f"{p['score']:.2f} [{p['mean'] - p['ci95']:.2f}, {p['mean'] + p['ci95']:.2f}]")
        baseline = Path(paired["baseline"]).resolve() == (args.root / row / "pred-dev500").resolve()
        p_value = None if baseline else paired["chrf"]["p_value"]
        out = metrics["outputs"]
        label = "LLM" if row == "llm" else row
        s = speed.get(label, {})
        train = args.root / row / "train" / "manifest.json"
        if train.is_file():
            m = json.loads(train.read_text())
            c = m["counts"]
            params = f"{c['parameters'] / 1e6:.1f}M"
            batch = m["config"]["batch_size"]
            epochs = c["steps"] * batch / c["train_examples"]
            minutes = m["timing"]["seconds"] / 60
            budget = (f"{c['steps']} steps of {batch} ({epochs:.2f} epochs of {c['train_examples']:,}), "
                      f"{minutes:.0f} min")
        else:
            params, budget = "268.1M", "none (2-shot prompt)"
        ms = f"{s['ms_per_token']:.1f}" if s else "-"
        speedup = f"{s['speedup_vs_llm']:.1f}x" if s and s.get("speedup_vs_llm") else "-"
        print(f"| {row} | {cells[0]} | {cells[1]} | {'(baseline)' if baseline else f'{p_value:.4f}'} | "
              f"{out['distinct']:.0%} | {out['repetition_loops']:.0%} | {ms} | {speedup} | {params} | {budget} |")


if __name__ == "__main__":
    main()
