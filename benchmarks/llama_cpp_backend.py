"""LLM-to-SLM decoded by llama.cpp against our float32 loop and against llama.cpp running the whole LLM: quality
and speed, every step a `llm2slm` command.

    python benchmarks/llama_cpp_backend.py CHECKPOINT --src dev500.en --refs dev500.de \
        --whole-gguf gemma-3-270m-q4_k_m.gguf --out runs/llama-cpp-backend [--quantizations Q8_0,Q4_K_M]

1. `export CHECKPOINT --gguf Q` for each quantization, --jobs at a time (the SLM alone, trimmed vocabulary kept;
   the LLM not copied);
2. one `bench --threads auto` run, alone on the machine: float32 ours (--model), each export through llama.cpp
   (--llama-cpp-model), and the whole LLM's GGUF in llama.cpp (--llama-cpp), paper protocol (100-token random
   prompts, exactly 100 new tokens, batch 1, greedy, median of --repeats), each row at its fastest thread count;
3. `generate` the source sentences greedily (--num-beams 1 --max-new-tokens 128) with the float32 loop
   (--backend torch) and with each export (--backend llama-cpp), --jobs at a time (one thread each); `eval
   --metrics chrf` for each;
4. agreement with float32: the share of sentences whose output is identical, and of float32's tokens (the
   predictions re-tokenized by the checkpoint's tokenizer) that come before each sentence's first difference.

Writes summary.json and prints Markdown tables. Steps whose output directory is complete are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLM2SLM = [sys.executable, "-m", "llm2slm_cli"]


def run(*args: object) -> None:
    print("+ llm2slm " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([*LLM2SLM, *(str(a) for a in args)], check=True)


def run_all(commands: list[list[object]], jobs: int) -> None:
    """Commands `jobs` at a time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            args = pending.pop(0)
            print("+ llm2slm " + " ".join(str(a) for a in args), flush=True)
            running.append(subprocess.Popen([*LLM2SLM, *(str(a) for a in args)], env=env))
        time.sleep(1)  # whichever ends first frees its slot
        for proc in [p for p in running if p.poll() is not None]:
            if proc.returncode:
                raise SystemExit(f"a command failed (exit {proc.returncode})")
            running.remove(proc)


def done(directory: Path) -> bool:
    return (directory / "manifest.json").is_file()


def agreement(tokenizer, ours: list[str], theirs: list[str]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(ours, theirs))
    kept = total = 0
    for a, b in zip(ours, theirs):
        ta = tokenizer(a, add_special_tokens=False)["input_ids"]
        tb = tokenizer(b, add_special_tokens=False)["input_ids"]
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        kept += first if ta != tb else len(ta)
        total += len(ta)
    return {"identical_sentences": same / len(ours), "tokens_before_first_difference": kept / max(total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--refs", type=Path, required=True)
    ap.add_argument("--whole-gguf", type=Path, required=True, help="the whole LLM as GGUF (the peer row)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quantizations", default="Q8_0,Q4_K_M")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-quality", action="store_true", help="exports and bench only (speed does not depend on the "
                    "weights: an earlier checkpoint of the same run has the same shapes)")
    ap.add_argument("--jobs", type=int, default=3, help="export and generate runs at a time (one thread each)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    quantizations = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    decode = ["--num-beams", 1, "--max-new-tokens", args.max_new_tokens, "--overwrite", "--quiet"]

    rows = {"float32 (torch)": (args.checkpoint, ["--backend", "torch"])}
    run_all([["export", args.checkpoint, "--gguf", q, "--include-llm", "no", "--out", out / f"export-{q}",
              "--overwrite", "--quiet"] for q in quantizations if not done(out / f"export-{q}")], args.jobs)
    rows.update({f"{q} (llama.cpp)": (out / f"export-{q}", ["--backend", "llama-cpp"]) for q in quantizations})
    summary: dict = {"rows": {}}
    if not args.skip_bench:
        bench = out / "bench"
        if not done(bench):
            models = [a for q in quantizations for a in ("--llama-cpp-model", f"ours-{q}={out / f'export-{q}'}")]
            run("bench", "--model", f"ours-float32={args.checkpoint}", *models, "--llama-cpp",
                f"whole-{args.whole_gguf.stem}={args.whole_gguf}", "--threads", args.threads, "--repeats",
                args.repeats, "--no-flops", "--out", bench, "--overwrite", "--quiet")
        table = json.loads((bench / "bench.json").read_text())
        summary["bench"] = [{k: r.get(k) for k in ("label", "engine", "threads", "ms_per_token", "weights_mb")}
                            for r in table["rows"] if r.get("part", "main") == "main"]
    if args.skip_quality:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return
    names = {label: label.split()[0] for label in rows}
    run_all([["generate", args.src, args.refs, "--model", model, *backend, *decode, "--out",
              out / f"pred-{names[label]}"] for label, (model, backend) in rows.items()
             if not done(out / f"pred-{names[label]}")], args.jobs)
    predictions = {}
    for label in rows:
        pred, ev = out / f"pred-{names[label]}", out / f"eval-{names[label]}"
        if not done(ev):
            run("eval", pred, "--metrics", "chrf", "--out", ev, "--overwrite", "--quiet")
        import pyarrow.parquet as pq

        predictions[label] = pq.read_table(pred / "predictions.parquet")["prediction"].to_pylist()
        metrics = json.loads((ev / "metrics.json").read_text())["metrics"]
        manifest = json.loads((pred / "manifest.json").read_text())
        summary["rows"][label] = {"chrf": metrics["chrf"]["score"], "tokens_per_second":
                                  manifest["timing"]["tokens_per_second"], "generated_tokens":
                                  manifest["counts"]["generated_tokens"]}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.checkpoint / "tokenizer"))
    ours = predictions["float32 (torch)"]
    for label, texts in predictions.items():
        summary["rows"][label].update(agreement(tok, ours, texts))

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| row | chrF | identical sentences | float32 tokens before first difference |")
    print("|---|---:|---:|---:|")
    for label, r in summary["rows"].items():
        print(f"| {label} | {r['chrf']:.2f} | {r['identical_sentences']:.1%} | "
              f"{r['tokens_before_first_difference']:.1%} |")
    if "bench" in summary:
        print("\n| bench row | engine | threads | ms/token | weights MB |")
        print("|---|---|---:|---:|---:|")
        for r in summary["bench"]:
            print(f"| {r['label']} | {r['engine']} | {r['threads']} | {r['ms_per_token']:.2f} | "
                  f"{r['weights_mb']:.1f} |")


if __name__ == "__main__":
    main()
