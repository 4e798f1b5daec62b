"""Every quality number of the study's tables, from the committed predictions and ../shared/data alone.

    python rescore.py RESULTS --shared SHARED --baseline SLM_ROW --gemma LLM_ROW[,LLM_ROW] ROW...

RESULTS/<row>/newstest2013-dev500.de holds a row's greedy output for the first 500 newstest2013 sentences, one line
per sentence (a row named <row>--<setting> is the same checkpoint under another decoding setting, compared with
SLM_ROW--<setting>). For each row this prints BLEU and chrF with 95% confidence intervals and the p-value of the chrF
difference against the SLM alone (sacrebleu's paired bootstrap, 1,000 resamples, its fixed seed: the numbers `eval
--paired-with` wrote), the share of Gemma's best chrF among the --gemma rows, and four output rates:

- distinct: outputs that occur once among the 500;
- loops: outputs holding a word n-gram (n <= 4) repeated 3 or more times in a row (the eval stage's rule);
- copies: outputs closer to the English source than to the German reference (sentence chrF against each);
- leaks: outputs holding a rare word (at most 10 occurrences in the German side of the pool) of a few-shot example
  shown with that sentence -- the two fixed pairs of the `llm` row or the sentence's own pairs (fewshot.py) -- that
  is in neither the source nor the reference. Rows that never saw an example give the rule's base rate.

Where RESULTS/<row>/eval.json (the eval stage's metrics.json) exists, its BLEU, chrF, intervals and p-value must
equal the recomputed ones; a difference is printed and the exit code is 1. Rows with a committed train_log.jsonl get
their dev cross-entropy at every evaluation in a second table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from fewshot import FIXED, dev500, read_lines, records, whole_pool

from llm2slm_cli.stages.evaluate import one_line, repetition_loop

PREDICTIONS = "newstest2013-dev500.de"
SAMPLES = 1000
WORD = re.compile(r"[^\W\d_]{5,}")


def words(text: str) -> set[str]:
    return {w.casefold() for w in WORD.findall(text)}


def paired(system: list[str], baseline: list[str], refs: list[str]) -> dict:
    """What `eval --paired-with` computes (the same sacrebleu call)."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    metrics = {"bleu": BLEU(), "chrf": CHRF()}
    _, scores = PairedTest([("baseline", baseline), ("system", system)], metrics, references=[refs], test_type="bs",
                           n_samples=SAMPLES)()
    out = {}
    for name in metrics:
        key = next(k for k in scores if k.lower().startswith(name))
        s = scores[key][1]
        out[name] = {"score": float(s.score), "mean": float(s.mean), "ci95": float(s.ci),
                     "baseline_score": float(scores[key][0].score),
                     "p_value": None if s.p_value is None else float(s.p_value)}
    return out


def rates(hyps: list[str], src: list[str], refs: list[str], rare_examples: list[set[str]]) -> dict[str, float]:
    from sacrebleu import sentence_chrf

    n = len(hyps)
    counts = Counter(hyps)
    copies = sum(1 for h, s, r in zip(hyps, src, refs)
                 if h.strip() and sentence_chrf(h, [s]).score > sentence_chrf(h, [r]).score)
    leaks = sum(1 for h, s, r, ex in zip(hyps, src, refs, rare_examples)
                if (words(h) & ex) - words(s) - words(r))
    return {"distinct": len(counts) / n, "loops": sum(map(repetition_loop, hyps)) / n, "copies": copies / n,
            "leaks": leaks / n}


def p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return f"<= {1 / SAMPLES:.3f}" if p <= 1 / SAMPLES + 1e-12 else f"{p:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("rows", nargs="+")
    parser.add_argument("--shared", type=Path, required=True, help="../shared/data")
    parser.add_argument("--baseline", required=True, help="the SLM-alone row")
    parser.add_argument("--gemma", default="", help="Gemma's rows, comma-separated: the best chrF is the reference")
    args = parser.parse_args()
    if not args.shared.is_dir():
        print(f"skipping: {args.shared} not found (the references live in ../shared/data)")
        return
    src, refs = dev500(args.shared)
    refs = [one_line(r) for r in refs]  # as eval reads them
    pool_en, pool_de = whole_pool(args.shared)
    frequency = Counter(w.casefold() for line in pool_de for w in WORD.findall(line))
    fixed = set().union(*(words(en) | words(de) for en, de in FIXED))

    def rare(ws: set[str]) -> set[str]:
        return {w for w in ws if frequency[w] <= 10}

    shots = records(pool_en, pool_de, src, refs)
    rare_examples = [rare(fixed | set().union(*(words(v) for k, v in r.items() if k.startswith("ex"))))
                     for r in shots]

    def load(row: str) -> list[str]:
        path = args.results / row / PREDICTIONS
        if not path.is_file():
            raise SystemExit(f"error: {path} not found")
        lines = [one_line(h) for h in read_lines(path)]
        if len(lines) != len(src):
            raise SystemExit(f"error: {path} has {len(lines)} lines, the dev set {len(src)}")
        return lines

    scored = {}
    for row in args.rows:
        setting = row.partition("--")[2]
        base = args.baseline + (f"--{setting}" if setting else "")
        scored[row] = (paired(load(row), load(base), refs), rates(load(row), src, refs, rare_examples), base)
    gemma = [r for r in args.gemma.split(",") if r]
    for r in gemma:
        if r not in scored:
            scored[r] = (paired(load(r), load(args.baseline), refs), rates(load(r), src, refs, rare_examples),
                         args.baseline)
    best = max((scored[r][0]["chrf"]["score"] for r in gemma), default=None)

    print("| row | BLEU [95% CI] | chrF [95% CI] | chrF vs SLM alone | p | % of Gemma's chrF | distinct | loops | "
          "copies | leaks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mismatches = []
    for row in args.rows:
        result, r, base = scored[row]
        b, c = result["bleu"], result["chrf"]
        is_base = row == base
        delta = "(baseline)" if is_base else f"{c['score'] - c['baseline_score']:+.2f}"
        share = f"{100 * c['score'] / best:.0f}%" if best else "-"
        print(f"| {row} | {b['score']:.2f} [{b['mean'] - b['ci95']:.2f}, {b['mean'] + b['ci95']:.2f}] | "
              f"{c['score']:.2f} [{c['mean'] - c['ci95']:.2f}, {c['mean'] + c['ci95']:.2f}] | {delta} | "
              f"{'-' if is_base else p_text(c['p_value'])} | {share} | {r['distinct']:.0%} | {r['loops']:.0%} | "
              f"{r['copies']:.0%} | {r['leaks']:.0%} |")
        committed = args.results / row / "eval.json"
        if committed.is_file():
            ev = json.loads(committed.read_text())["paired"]
            for name in ("bleu", "chrf"):
                for key in ("score", "mean", "ci95") + (() if is_base else ("p_value",)):
                    if abs(ev[name][key] - result[name][key]) > 1e-6:
                        mismatches.append(f"{row}: {name} {key} {result[name][key]} recomputed, {ev[name][key]} "
                                          "in eval.json")
    curves = {row: [json.loads(line) for line in (args.results / row / "train_log.jsonl").read_text().splitlines()]
              for row in args.rows if (args.results / row / "train_log.jsonl").is_file()}
    if curves:  # dev cross-entropy at every evaluation, from the committed training logs
        steps = sorted({e["step"] for log in curves.values() for e in log if "dev_loss" in e})
        print("\n| dev cross-entropy at step | " + " | ".join(map(str, steps)) + " |")
        print("|---|" + "---|" * len(steps))
        for row, log in curves.items():
            dev = {e["step"]: e["dev_loss"] for e in log if "dev_loss" in e}
            print(f"| {row} | " + " | ".join(f"{dev[t]:.3f}" if t in dev else "-" for t in steps) + " |")
    for m in mismatches:
        print(f"MISMATCH {m}", file=sys.stderr)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
