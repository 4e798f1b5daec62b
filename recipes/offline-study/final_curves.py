"""Learning curves of the final rows (and the pilots they came from), read from each run's train_log.jsonl.

    python final_curves.py RUNS --plot FILE.png

Left: dev cross-entropy against training pairs seen (final rows and the KD pilots, log scale); right: training
cross-entropy per step of the final rows. Rows (those that exist): the first final pair (final/slm-d2-kd,
final/llm2slm-d2-kd-k6, 400 steps), the second (final/slm-d2-kd-1000, final/llm2slm-d2-kd-std-1000-k6: 1,000 steps,
standardised features), and the KD pilots they came from.
"""

import argparse
import json
from pathlib import Path


def log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [("final/slm-d2-kd", "--", "o"), ("final/llm2slm-d2-kd-k6", "-", "o"),
            ("final/slm-d2-kd-1000", "--", "s"), ("final/llm2slm-d2-kd-std-1000-k6", "-", "s"),
            ("pilots/slm-d2-kd", ":", "x"), ("pilots/llm2slm-d2-k6-kd-zero", "-.", "x"),
            ("pilots/llm2slm-d2-k6-kd-zero-std", "-.", "+")]
    for name, style, marker in rows:
        path = args.runs / name / "train" / "train_log.jsonl"
        if not path.is_file():
            continue
        records = log(path)
        dev = [(r["step"] * args.batch, r["dev_loss"]) for r in records if "dev_loss" in r]
        a.plot([x for x, _ in dev], [y for _, y in dev], style, marker=marker, label=name)
        if name.startswith("final/"):
            b.plot([r["step"] * args.batch for r in records], [r.get("ce", r["loss"]) for r in records], style,
                   alpha=0.7, label=name)
    a.axhline(2.08, color="gray", lw=0.8)
    a.text(500, 2.2, "Gemma-3-270M whole, untrained (first 50 refs): 2.08", fontsize=8, color="gray")
    a.set_xscale("log")
    a.set_xlabel("training pairs seen")
    a.set_ylabel("dev cross-entropy (nats/token)")
    a.set_title("dev loss: final rows and pilots (SLM alone dashed/dotted)")
    b.set_xlabel("training pairs seen")
    b.set_ylabel("training cross-entropy (nats/token)")
    b.set_ylim(3, 12)
    b.set_title("final rows: training cross-entropy per step")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
