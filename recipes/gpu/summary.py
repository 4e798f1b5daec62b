"""The device check's table, from what `llm2slm bench` wrote under OUT/{eager,compiled,throughput}/bench.json.

    python summary.py OUT > OUT/summary.md

Per row and batch size: ms/token eagerly and with --compile, the compiled speedup, the speedup against the LLM alone
(same mode), the paper's ratio where it gives one, and peak CUDA memory. Then train examples/s and encode tokens/s.
A part that did not run is named, not guessed.
"""

import json
import sys
from pathlib import Path

# arXiv 2402.16844: LLM-to-SLM speed against the LLM alone (100 new tokens after a 100-token prompt)
PAPER = {("t5-large", "t5-small"): "4.2x (translation)", ("t5-large", "gpt2"): "3.0x (summarisation)"}


def _rows(path: Path) -> dict | None:
    f = path / "bench.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _name(spec: str | None) -> str:
    return (spec or "").removeprefix("preset:")


def main() -> None:
    out = Path(sys.argv[1])
    import platform

    print(f"host: {platform.node()} ({platform.machine()})\n")
    eager, compiled, throughput = (_rows(out / p) for p in ("eager", "compiled", "throughput"))
    print("# Device check: the paper protocol (100-token prompt, 100 new tokens, greedy)\n")
    env = (eager or compiled or throughput or {}).get("environment", {})
    if env:
        print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, (dict, list))) +
              "\n")
    missing = [p for p, d in (("eager", eager), ("compiled", compiled), ("throughput", throughput)) if d is None]
    if missing:
        print(f"not measured (the part failed: see its .log): {', '.join(missing)}\n")
    if eager or compiled:
        def key(r):
            return (r["label"], r["batch_size"])

        base = {key(r): r for r in (eager or {}).get("rows", []) if r.get("part", "main") == "main"}
        comp = {key(r): r for r in (compiled or {}).get("rows", []) if r.get("part", "main") == "main"}
        print("| row | batch | ms/token eager | ms/token compiled | compiled speedup | vs LLM eager | "
              "vs LLM compiled | paper | CUDA peak MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in sorted(set(base) | set(comp), key=lambda k: (k[1], k[0])):
            e, c = base.get(k), comp.get(k)
            r = e or c
            ms_e = f"{e['ms_per_token']:.2f}" if e else "-"
            ms_c = f"{c['ms_per_token']:.2f}" if c else "-"
            gain = f"{e['ms_per_token'] / c['ms_per_token']:.2f}x" if e and c else "-"
            vs_e = f"{e['speedup_vs_llm']:.2f}x" if e and e.get("speedup_vs_llm") else "-"
            vs_c = f"{c['speedup_vs_llm']:.2f}x" if c and c.get("speedup_vs_llm") else "-"
            pair = (_name(r.get("llm")), _name(r.get("slm"))) if r.get("llm") and r.get("slm") else None
            peak = max((x["cuda_peak_mb"] for x in (e, c) if x and x.get("cuda_peak_mb") is not None), default=None)
            print(f"| {r['label']} | {k[1]} | {ms_e} | {ms_c} | {gain} | {vs_e} | {vs_c} | "
                  f"{PAPER.get(pair, '-') if pair else '-'} | {'-' if peak is None else f'{peak:.0f}'} |")
        print()
    if throughput and throughput.get("throughput"):
        print("| stage | batch | prompt tokens | examples/s | tokens/s |")
        print("|---|---|---|---|---|")
        for r in throughput["throughput"]:
            print(f"| {r['stage']} | {r['batch_size']} | {r['prompt_length']} | {r['examples_per_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
