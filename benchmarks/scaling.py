"""How the stages scale with the corpus: wall time and peak memory of `train --max-steps 1` (a first run, which
reads and tokenizes the corpus once, and a second run, which finds it in the data cache), `train --streaming
--max-steps 1` (nothing stored), `encode` and `generate`, on synthetic pairs of 10-40 words a side (deterministic: the
same --seed writes the same files).

    python benchmarks/scaling.py --out runs/scaling --sizes 10000,100000,1000000,4500000

Each measurement is one fresh process (`python -m llm2slm_cli ...` under a small wrapper that reports its own peak
RSS and, separately, its children's: datasets' tokenizing processes). Writes results.json, results.md (the table
docs/BENCHMARKS.md quotes) and scaling.png. --stages picks what to run; --max-decode-size skips encode and generate
above that many pairs (they do the work for every pair: at millions of pairs that is hours on a CPU, and the
features of `encode` take tokens x hidden size x 2 bytes of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

VOCABULARY = ("time year people way day man thing woman life child world school state family student group country "
              "problem hand part place case week company system program question work government number night point "
              "home water room mother area money story fact month lot right study book eye job word business issue "
              "side kind head house service friend father power hour game line end member law car city community "
              "name president team minute idea kid body information back parent face others level office door health "
              "person art war history party result change morning reason research girl guy moment air teacher force "
              "education")
WORDS = VOCABULARY.split()

CHILD = """
import resource, sys, time
from llm2slm_cli.cli import app
start = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as e:
    code = e.code or 0
wall = time.perf_counter() - start
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print("SCALING", code, wall, own, children, file=sys.stderr)
"""


def write_pairs(path: Path, n: int, seed: int) -> None:
    """n pairs of 10-40 random words a side, ids p0..p{n-1}; written once (a complete file is renamed into place)."""
    if path.is_file():
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            src = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
            tgt = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
            f.write(json.dumps({"id": f"p{i}", "src": src, "tgt": tgt}) + "\n")
    os.replace(tmp, path)


def measure(args: list[str]) -> dict:
    """One stage in a fresh process: its exit code, wall seconds (interpreter start included), peak RSS in MB."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = [x for x in done.stderr.splitlines() if x.startswith("SCALING ")]
    if not line:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed:\n{done.stderr[-2000:]}")
    code, inner, own, children = line[-1].split()[1:]
    if int(code):
        raise SystemExit(f"{' '.join(map(str, args[:2]))} exited {code}:\n{done.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "stage_s": round(float(inner), 2), "rss_mb": round(float(own), 1),
            "children_rss_mb": round(float(children), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="10000,100000,1000000,4500000")
    parser.add_argument("--stages", default="train,streaming,encode,generate")
    parser.add_argument("--max-decode-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a suffix for the stage names (e.g. ' before' for a run of an "
                                                     "older checkout, with --no-data-cache)")
    parser.add_argument("--no-data-cache", action="store_true", help="leave --data-cache out (older versions)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    stages = args.stages.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["stage"], r["pairs"]) for r in results}
    for n in sizes:
        data = args.out / f"pairs-{n}.jsonl"
        write_pairs(data, n, args.seed)
        todo = []
        if "train" in stages:
            cache = args.out / f"cache-{n}"
            train = ["train", data, "--slm", "tiny-gpt2", "--max-steps", "1", "--batch-size", "16",
                     "--micro-batch-size", "16", "--out", args.out / f"train-{n}", "--overwrite", "--quiet",
                     *([] if args.no_data_cache else ["--data-cache", cache])]
            todo += [("train (first run)", train, True), ("train (cached)", train, False)]
        if "streaming" in stages:  # nothing stored: the records the first step needs are read, no more
            todo.append(("train (streaming)", ["train", data, "--slm", "tiny-gpt2", "--max-steps", "1",
                                               "--batch-size", "16", "--micro-batch-size", "16", "--streaming",
                                               "--out", args.out / f"stream-{n}", "--overwrite", "--quiet"], False))
        if n <= args.max_decode_size:
            if "encode" in stages:
                todo.append(("encode", ["encode", data, "--model", "tiny-t5-large", "--out", args.out / f"enc-{n}",
                                        "--overwrite", "--quiet", "--max-length", "64"], False))
            if "generate" in stages:
                todo.append(("generate", ["generate", data, "--model", "tiny-gpt2", "--out", args.out / f"gen-{n}",
                                          "--overwrite", "--quiet", "--num-beams", "1", "--max-new-tokens", "8",
                                          "--batch-size", "64", "--max-length", "64"], False))
        for stage, argv, fresh in todo:
            stage += args.label
            if (stage, n) in done:
                continue
            if fresh:
                subprocess.run(["rm", "-rf", str(args.out / f"cache-{n}")], check=True)
            r = {"stage": stage, "pairs": n, **measure(argv)}
            r["pairs_per_s"] = round(n / r["stage_s"], 1)
            print(json.dumps(r), flush=True)
            results.append(r)
            results_path.write_text(json.dumps(results, indent=1))
    write_report(args.out, results)


def write_report(out: Path, results: list[dict]) -> None:
    import datasets
    import torch
    import transformers

    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
           f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
           f"datasets {datasets.__version__}")
    lines = [f"Environment: {env}", "",
             "| stage | pairs | wall s | peak RSS MB | largest child's peak RSS MB | pairs/s |",
             "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["stage"], r["pairs"])):
        lines.append(f"| {r['stage']} | {r['pairs']:,} | {r['wall_s']:.1f} | {r['rss_mb']:,.0f} | "
                     f"{r['children_rss_mb']:,.0f} | {r['pairs_per_s']:,.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in sorted({r["stage"] for r in results}):
        rows = sorted((r for r in results if r["stage"] == stage), key=lambda r: r["pairs"])
        a.plot([r["pairs"] for r in rows], [r["wall_s"] for r in rows], "o-", label=stage)
        b.plot([r["pairs"] for r in rows], [r["rss_mb"] for r in rows], "o-", label=stage)
    for ax, label in ((a, "wall seconds"), (b, "peak RSS, MB")):
        ax.set_xscale("log")
        ax.set_xlabel("pairs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)


if __name__ == "__main__":
    main()
