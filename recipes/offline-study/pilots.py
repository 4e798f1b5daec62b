"""The pilots' learning curves, read from what the toolkit's stages wrote under RUNS/pilots/<name>/.

    python pilots.py RUNS/pilots NAME... [--mid 50] [--plot FILE.png]

For each pilot: the dev cross-entropy at every step `train --eval-every` logged it (train_log.jsonl), chrF and BLEU of
greedy outputs at step --mid and at the end (eval-mid/, eval-final/: metrics.json), the share of distinct outputs and
of outputs falling into a repetition loop (eval's `outputs`), the wall time and examples/s of training. Prints a
Markdown table; --plot draws dev loss against step and chrF at both points.
"""

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pilot(directory: Path) -> dict:
    log = read_log(directory / "train" / "train_log.jsonl")
    manifest = json.loads((directory / "train" / "manifest.json").read_text())
    evals = {}
    for point in ("mid", "final"):
        path = directory / f"eval-{point}" / "metrics.json"
        if path.is_file():
            evals[point] = json.loads(path.read_text())
    return {"dev": {r["step"]: r["dev_loss"] for r in log if "dev_loss" in r},
            "final_dev": manifest["result"]["dev_loss"], "seconds": manifest["timing"]["seconds"],
            "examples_per_second": manifest["timing"]["examples_per_second"], "evals": evals,
            "kd": log[-1].get("kd"), "ce": log[-1].get("ce", log[-1]["loss"]),
            "params": manifest["counts"]["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--mid", type=int, default=50)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    found = {n: pilot(args.root / n) for n in args.names if (args.root / n / "train" / "manifest.json").is_file()}
    if not found:
        raise SystemExit(f"error: no finished pilot under {args.root}")
    steps = sorted({s for p in found.values() for s in p["dev"]})
    print("| pilot | " + " | ".join(f"dev CE @{s}" for s in steps) + f" | chrF @{args.mid} | chrF end | BLEU end | "
          "distinct | loops | train min | params |")
    print("|---|" + "---|" * (len(steps) + 7))
    for name, p in found.items():
        cells = [f"{p['dev'][s]:.3f}" if s in p["dev"] else "-" for s in steps]
        mid, end = p["evals"].get("mid"), p["evals"].get("final")
        chrf = [f"{e['metrics']['chrf']['score']:.1f}" if e else "-" for e in (mid, end)]
        bleu = f"{end['metrics']['bleu']['score']:.2f}" if end else "-"
        out = end.get("outputs", {}) if end else {}
        print(f"| {name} | " + " | ".join(cells) + f" | {chrf[0]} | {chrf[1]} | {bleu} | "
              f"{out.get('distinct', 0):.0%} | {out.get('repetition_loops', 0):.0%} | {p['seconds'] / 60:.1f} | "
              f"{p['params'] / 1e6:.1f}M |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, p in found.items():
            style = "--" if name.startswith("slm") else "-"
            xs = sorted(p["dev"])
            a.plot(xs, [p["dev"][s] for s in xs], style, marker="o", label=name)
            pts = [(args.mid if k == "mid" else max(xs), e["metrics"]["chrf"]["score"])
                   for k, e in sorted(p["evals"].items(), key=lambda kv: kv[0] != "mid")]
            b.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=name)
        a.set_xlabel("optimizer step")
        a.set_ylabel("dev cross-entropy (nats/token)")
        b.set_xlabel("optimizer step")
        b.set_ylabel("chrF, greedy (dev)")
        a.set_title("pilots: dev loss (SLM alone dashed)")
        b.set_title("pilots: chrF")
        for ax in (a, b):
            ax.grid(True, alpha=0.3)
        b.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
