"""Training curves of the study's rows, read from each row's train/train_log.jsonl (written by `llm2slm train`).

    python curves.py RUNS [--steps 1,10,20,...] [--plot FILE.png]

Prints a Markdown table of the training loss at the given steps and the final dev loss, one row per trained row of
RUNS (slm-dD, llm2slm-dD-kK), and plots every curve on one log-scaled figure.
"""

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows(runs: Path) -> dict[str, list[dict]]:
    found = {p.parent.parent.name: read_log(p) for p in sorted(runs.glob("*/train/train_log.jsonl"))}
    # the SLM alone next to its LLM-to-SLM twin, shallowest SLM first
    return dict(sorted(found.items(), key=lambda kv: (kv[0].split("-")[1], kv[0].startswith("llm2slm"), kv[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--steps", default="1,10,20,40,60,80,100,120")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    logs = rows(args.runs)
    if not logs:
        raise SystemExit(f"error: no */train/train_log.jsonl under {args.runs}")
    print("| row | " + " | ".join(f"step {s}" for s in steps) + " | dev loss | examples/s |")
    print("|---|" + "---|" * (len(steps) + 2))
    for name, log in logs.items():
        by_step = {r["step"]: r for r in log}
        dev = [r["dev_loss"] for r in log if "dev_loss" in r]
        manifest = json.loads((args.runs / name / "train" / "manifest.json").read_text())
        dev_loss = manifest.get("result", {}).get("dev_loss", dev[-1] if dev else None)
        speed = sorted(r["examples_per_second"] for r in log)[len(log) // 2]
        cells = [f"{by_step[s]['loss']:.2f}" if s in by_step else "-" for s in steps]
        print(f"| {name} | " + " | ".join(cells) + f" | {dev_loss:.3f} | {speed:.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, log in logs.items():
            ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=name,
                    linestyle="--" if name.startswith("slm") else "-")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step (32 pairs)")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title("Gemma-3-270M study: SLM alone (dashed) vs LLM-to-SLM (solid)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
