"""Train with stored T5-Large-shaped features (docs/BENCHMARKS.md, "Training input pipeline"): the peak resident
memory of `train` against the same SLM trained alone, and the share of the training loop spent waiting for data,
for --num-workers 0 and 1. Each stage runs in its own process (peak memory: that process's ru_maxrss).

    python recipes/speed/train_input.py --out runs/train-input [--examples 48] [--source OLD_TREE]

--source runs the stages from another source tree (e.g. `git archive <commit> | tar -x -C OLD_TREE`), for the
numbers before a change; its data wait is timed around Training.batch, where older trees build their batches.
Presets with fresh weights: preset:t5-large (the LLM, 738M) and preset:t5-small (the SLM); the T5 tokenizer from
../shared/data/tokenizers/t5. Translation prompts: the first --examples lines of newstest2013 (en-de).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
TOKENIZER = DATA / "tokenizers" / "t5"
TEMPLATE = "translate English to German: {src}"

# Runs one stage in this process, then prints its peak memory (and, for older trees, the time spent in
# Training.batch) as the last line.
DRIVER = r"""
import json, resource, sys, time
from llm2slm_cli.cli import app
waited = [0.0]
try:
    from llm2slm_cli.stages import train
    if not hasattr(train, "train_plan") and hasattr(train, "Training"):  # before batching.py: time the batches
        real = train.Training.batch
        def timed(self, *a, **k):
            t = time.perf_counter()
            try:
                return real(self, *a, **k)
            finally:
                waited[0] += time.perf_counter() - t
        train.Training.batch = timed
except ImportError:
    pass
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "batch_seconds": waited[0]}))
"""


def stage(args: list[str], source: Path | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    # `python -c` puts the working directory first on sys.path: run where the tree asked for is found first
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, text=True,
                          cwd=source or ROOT)
    if done.returncode:
        sys.exit(f"{' '.join(args[:1])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--source", type=lambda p: Path(p).resolve(), default=None,
                        help="run the stages from this source tree")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    en = (DATA / "translation/en-de/dev/newstest2013.en").read_text().splitlines()[: args.examples]
    de = (DATA / "translation/en-de/dev/newstest2013.de").read_text().splitlines()[: args.examples]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"n{i}", "src": s, "tgt": t}) + "\n"
                            for i, (s, t) in enumerate(zip(en, de))))
    feats = out / "feats"
    rows = {}
    if not (feats / "manifest.json").is_file():
        rows["encode (T5-Large)"] = stage(["encode", str(data), "--model", "preset:t5-large", "--tokenizer",
                                           str(TOKENIZER), "--template", TEMPLATE, "--max-length", "128",
                                           "--out", str(feats), "--overwrite", "--quiet"], args.source)
    common = ["--slm", "preset:t5-small", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps",
              str(args.steps), "--max-target-length", "128", "--device", "cpu", "--overwrite", "--quiet"]
    alone = stage(["train", str(data), *common, "--slm-tokenizer", str(TOKENIZER), "--template", TEMPLATE,
                   "--max-length", "128", "--out", str(out / "alone")], args.source)
    rows["T5-Small alone"] = {**alone, **_timing(out / "alone")}
    for workers in ([0, 1] if args.source is None else [None]):
        extra = [] if workers is None else ["--num-workers", str(workers)]
        run = out / f"stored-w{workers}"
        got = stage(["train", str(data), "--llm", "preset:t5-large", "--tokenizer", str(TOKENIZER), "--features",
                     str(feats), *common, *extra, "--out", str(run)], args.source)
        rows[f"T5-Large features -> T5-Small, --num-workers {workers}"] = {**got, **_timing(run)}
    base = rows["T5-Small alone"]["maxrss_mib"]
    print(f"{'run':<50} {'peak RSS MiB':>12} {'x alone':>8} {'seconds':>8} {'data wait':>9}")
    for name, r in rows.items():
        wait = r.get("data_wait_share")
        if wait is None and r.get("seconds"):
            wait = r["batch_seconds"] / r["seconds"]
        print(f"{name:<50} {r['maxrss_mib']:>12.0f} {r['maxrss_mib'] / base:>8.2f} {r.get('seconds') or 0:>8.1f} "
              f"{'' if wait is None else f'{wait:.2%}':>9}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def _timing(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    return {k: manifest["timing"].get(k) for k in ("seconds", "data_wait_share", "data_wait_seconds")}


if __name__ == "__main__":
    main()
