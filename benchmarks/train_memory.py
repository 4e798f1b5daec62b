"""Peak memory of `llm2slm train` against the number of training examples (features read memory-mapped).

    python benchmarks/train_memory.py --sizes 1000,50000 --steps 50 --out runs/train-memory

For each size: write N synthetic examples, `encode` them with a tiny preset LLM, then `train` a fixed number of steps
on them in a fresh process, and read that process's peak resident set size (getrusage of the child). Prints a
Markdown table and writes results.json. Only the train process is measured; encode runs once per size beforehand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import subprocess
import sys
import time
from pathlib import Path


def examples(n: int, path: Path) -> Path:
    rng = random.Random(n)
    with open(path, "w") as f:
        for i in range(n):
            src = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                           for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"id": f"x{i}", "src": src, "tgt": src[::-1][:40]}) + "\n")
    return path


def run(cmd: list[str]) -> dict[str, float]:
    """Seconds and peak memory (MiB) of one child process: the peaks of its
    anonymous memory (heap, tensors) and file-backed resident pages (memory-mapped features, shared libraries)
    polled from /proc every 20 ms. File-backed pages are clean page cache the kernel can drop at any time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {"seconds": time.perf_counter() - start, "anon_mib": peaks["RssAnon"] / 1024,
            "file_mib": peaks["RssFile"] / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,50000")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--llm", default="tiny-t5")
    ap.add_argument("--slm", default="tiny-gpt2")
    ap.add_argument("--out", type=Path, default=Path("runs/train-memory"))
    ap.add_argument("--reencode", action="store_true", help="encode again even if --out has the features")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "llm2slm_cli"]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        d = args.out / f"n{n}"
        d.mkdir(exist_ok=True)
        data = examples(n, d / "train.jsonl")
        encode_s = None
        if not (d / "features" / "manifest.json").is_file() or args.reencode:
            encode_s = run([*cli, "encode", str(data), "--model", args.llm, "--out", str(d / "features"),
                            "--batch-size", "128", "--overwrite", "--quiet"])["seconds"]
        train = run([*cli, "train", str(data), "--slm", args.slm, "--llm", args.llm, "--features",
                     str(d / "features"), "--out", str(d / "train"), "--max-steps", str(args.steps),
                     "--batch-size", "16", "--micro-batch-size", "16", "--overwrite", "--quiet"])
        features_mib = sum(p.stat().st_size for p in (d / "features").glob("*.safetensors")) / 2**20
        rows.append({"examples": n, "features_mib": round(features_mib, 1),
                     "encode_seconds": encode_s and round(encode_s, 1), "train_seconds": round(train["seconds"], 1),
                     "train_peak_anon_mib": round(train["anon_mib"], 1),
                     "train_peak_file_mib": round(train["file_mib"], 1)})
        print(rows[-1], flush=True)
    import torch
    import transformers

    result = {"rows": rows, "steps": args.steps, "llm": args.llm, "slm": args.slm,
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "torch": torch.__version__, "transformers": transformers.__version__}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| examples | features on disk (MiB) | train peak anonymous memory (MiB) | train peak file-backed resident "
          "(MiB) | train seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['examples']:,} | {r['features_mib']} | {r['train_peak_anon_mib']} | {r['train_peak_file_mib']} | "
              f"{r['train_seconds']} |")

if __name__ == "__main__":
    main()
