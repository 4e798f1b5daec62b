"""What a `bench` run writes and prints: bench.parquet, bench.json, manifest.json, the PNG plots, the console
tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli.config import BenchConfig

BENCH_TABLE = "bench.parquet"
BENCH_JSON = "bench.json"
PLOT_MS_PER_TOKEN = "ms_per_token.png"
PLOT_RUNTIME_LENGTH = "runtime_vs_length.png"
PLOT_FLOPS_LENGTH = "flops_vs_length.png"
PLOT_QUALITY = "quality_runtime.png"

COLUMNS = ["label", "role", "engine", "part", "llm", "slm", "device", "dtype", "batch_size", "prompt_length",
           "new_tokens", "num_beams", "repeats", "seconds_median", "seconds_min", "seconds_max", "ms_per_token",
           "ms_per_token_min", "ms_per_token_max", "tokens_per_s", "speedup_vs_llm", "time_vs_slm", "slm_row",
           "flops_per_token", "flops_total", "weights_mb", "cuda_peak_mb", "process_peak_rss_mb", "acceptance_rate",
           "tokens_per_llm_call", "greedy_match", "run_seconds", "threads", "error"]


def write_outputs(out: Path, config: BenchConfig, rows: list[dict[str, Any]], quality: dict[str, tuple[str, float]],
                   identities: dict[str, Any], seconds: float, skipped: list[str],
                   throughput: list[dict[str, Any]], by_threads: dict[str, dict[int, float | None]] | None = None
                   ) -> None:
    """bench.parquet, bench.json (with --threads auto: every row's ms/token at each thread count), the plots and
    the manifest."""
    import pyarrow as pa
    import torch

    table = pa.Table.from_pylist(rows, schema=_schema())
    A.write_parquet(out / BENCH_TABLE, table)
    settings = A.config_to_dict(config)
    A.atomic_write_json(out / BENCH_JSON, {
        "rows": rows, "settings": settings, "environment": A.environment(), "torch_threads": torch.get_num_threads(),
        "quality": {k: {"metric": m, "score": v} for k, (m, v) in quality.items()},
        "skipped": skipped,
        "throughput": throughput,
        **({"ms_per_token_by_threads": {key: {str(n): ms for n, ms in counts.items()}
                                         for key, counts in by_threads.items()}} if by_threads else {}),
    })
    plots = [PLOT_MS_PER_TOKEN]
    plot_ms_per_token(rows, out / PLOT_MS_PER_TOKEN)
    if any(r["part"] == "sweep" for r in rows):
        plot_vs_length(rows, out / PLOT_RUNTIME_LENGTH, flops=False)
        plots.append(PLOT_RUNTIME_LENGTH)
        if config.flops:
            plot_vs_length(rows, out / PLOT_FLOPS_LENGTH, flops=True)
            plots.append(PLOT_FLOPS_LENGTH)
    if quality:
        plot_quality(rows, quality, out / PLOT_QUALITY)
        plots.append(PLOT_QUALITY)
    manifest = A.make_manifest(A.KIND_BENCHMARK, config, models=identities,
                               counts={"rows": len(rows), "models": len(identities)},
                               files=[BENCH_TABLE, BENCH_JSON, *plots], timing={"seconds": round(seconds, 3)},
                               torch_threads=torch.get_num_threads())
    A.atomic_write_json(out / A.MANIFEST, manifest)


def _schema():
    import pyarrow as pa

    strings = {"label", "role", "engine", "part", "llm", "slm", "device", "dtype", "slm_row", "error"}
    ints = {"batch_size", "prompt_length", "new_tokens", "num_beams", "repeats", "threads"}
    fields = []
    for c in COLUMNS:
        if c == "run_seconds":
            fields.append(pa.field(c, pa.list_(pa.float64())))
        else:
            fields.append(pa.field(c, pa.string() if c in strings else pa.int64() if c in ints else pa.float64()))
    return pa.schema(fields)


def _save(fig: Any, path: Path) -> None:
    import os

    tmp = A.atomic_path(path)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ms_per_token(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of ms per generated token per row, one bar per batch size, whiskers from the fastest to the slowest
    (rows that failed have no bar)."""
    plt = _pyplot()
    main = [r for r in rows if r["part"] == "main" and r["error"] is None]
    labels = list(dict.fromkeys(r["label"] for r in main))
    batches = sorted({r["batch_size"] for r in main})
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 4))
    for j, b in enumerate(batches):
        xs, ys, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            r = next((r for r in main if r["label"] == label and r["batch_size"] == b), None)
            if r is None:
                continue
            xs.append(i + (j - (len(batches) - 1) / 2) * width)
            ys.append(r["ms_per_token"])
            lo.append(r["ms_per_token"] - r["ms_per_token_min"])
            hi.append(r["ms_per_token_max"] - r["ms_per_token"])
            if r["speedup_vs_llm"] is not None and r["role"] != "LLM":
                ax.annotate(f"{r['speedup_vs_llm']:.1f}x", (xs[-1], ys[-1]), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 3), textcoords="offset points")
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"batch {b}")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    first = main[0] if main else {"new_tokens": "?", "prompt_length": "?"}
    ax.set_ylabel("ms per generated token (median)")
    ax.set_title(f"{first['new_tokens']} new tokens after a {first['prompt_length']}-token prompt "
                 "(labels: speedup vs LLM)", fontsize=9)
    if len(batches) > 1:
        ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_vs_length(rows: list[dict[str, Any]], path: Path, *, flops: bool) -> None:
    """Total runtime (paper Figure 5) or total FLOPs (Figure 6) against the number of generated tokens."""
    plt = _pyplot()
    sweep = [r for r in rows if r["part"] == "sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["label"] for r in sweep):
        points = sorted((r["new_tokens"], r["flops_total"] / 1e9 if flops else r["seconds_median"])
                        for r in sweep if r["label"] == label and (not flops or r["flops_total"] is not None))
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("GFLOPs (whole generation)" if flops else "seconds (median, whole generation)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if sweep:
        ax.set_title(f"batch {sweep[0]['batch_size']}, {sweep[0]['prompt_length']}-token prompt", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_quality(rows: list[dict[str, Any]], quality: dict[str, tuple[str, float]], path: Path) -> None:
    """Quality against ms per token (paper Figure 3), at the first batch size."""
    plt = _pyplot()
    main = [r for r in rows if r["part"] == "main" and r["error"] is None]
    if not main:
        return
    batch = main[0]["batch_size"]
    metrics = sorted({m for m, _ in quality.values()})
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (metric, score) in quality.items():
        r = next((r for r in main if r["label"] == label and r["batch_size"] == batch), None)
        if r is None:  # a row that failed
            continue
        ax.scatter(r["ms_per_token"], score)
        ax.annotate(label if len(metrics) == 1 else f"{label} ({metric})", (r["ms_per_token"], score),
                    xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"ms per generated token (batch {batch})")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "quality (metric per point)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], quality: dict[str, tuple[str, float]]) -> None:
    from rich.console import Console
    from rich.markup import escape  # labels are user strings, and 'LLM [transformers]' is one of ours
    from rich.table import Table

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160  # a log file: no need to squeeze the columns
    main = [r for r in rows if r["part"] == "main"]
    cuda = any(r["cuda_peak_mb"] is not None for r in rows)
    table = Table(title=f"{main[0]['new_tokens']} new tokens after a {main[0]['prompt_length']}-token prompt: "
                        "ms per decoding step of the whole batch (median of repeats)")
    names = ["row", "batch", "ms/token", "min-max", "tokens/s", "speedup vs LLM", "time vs SLM", "GFLOPs/token",
             "weights MB", "CUDA peak MB" if cuda else "process peak RSS MB"] + (["quality"] if quality else [])
    spec = any(r["acceptance_rate"] is not None for r in main)
    names += ["accepted", "tokens/LLM call"] if spec else []
    checked = any(r["greedy_match"] is not None for r in main)
    names += ["greedy = ours"] if checked else []
    for name in names:
        table.add_column(name, justify="left" if name == "row" else "right")
    for r in main:
        q = quality.get(r["label"])
        if r["error"] is not None:  # the row failed: its error is said below the table
            table.add_row(escape(r["label"]), "-", "failed", *["-"] * (len(names) - 3))
            continue
        cells = [escape(r["label"]), str(r["batch_size"]), f"{r['ms_per_token']:.2f}",
                 f"{r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f}", f"{r['tokens_per_s']:.1f}",
                 num(r["speedup_vs_llm"], ".2f"), num(r["time_vs_slm"], ".2f"),
                 num(r["flops_per_token"] / 1e9 if r["flops_per_token"] is not None else None, ".3f"),
                 f"{r['weights_mb']:.1f}", num(r["cuda_peak_mb"] if cuda else r["process_peak_rss_mb"], ".0f")]
        cells += [f"{q[1]:.2f} {q[0]}" if q else "-"] if quality else []
        cells += [num(r["acceptance_rate"], ".1%"), num(r["tokens_per_llm_call"], ".2f")] if spec else []
        cells += [num(r["greedy_match"], ".0%")] if checked else []
        table.add_row(*cells)
    console.print(table)
    for r in (r for r in main if r["error"] is not None):
        console.print(f"row {r['label']!r} failed: {r['error']}", markup=False, highlight=False)
    sweep = [r for r in rows if r["part"] == "sweep"]
    if sweep:
        lengths = sorted({r["new_tokens"] for r in sweep})
        t = Table(title=f"seconds per whole generation against its length (batch {sweep[0]['batch_size']})")
        t.add_column("row")
        for n in lengths:
            t.add_column(str(n), justify="right")
        for label in dict.fromkeys(r["label"] for r in sweep):
            by_n = {r["new_tokens"]: r["seconds_median"] for r in sweep if r["label"] == label}
            t.add_row(escape(label), *(num(by_n.get(n), ".3f") for n in lengths))
        console.print(t)


def print_throughput(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="encode: LLM prompt tokens/s; train: LLM-to-SLM optimizer steps on stored features")
    for name in ("stage", "batch", "prompt tokens", "target tokens", "s/batch", "examples/s", "tokens/s"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for r in rows:
        table.add_row(r["stage"], str(r["batch_size"]), str(r["prompt_length"]), str(r["target_length"] or "-"),
                      f"{r['seconds_median']:.3f}", f"{r['examples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}")
    console.print(table)
