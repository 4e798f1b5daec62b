"""`llm2slm bench`: the paper's runtime protocol for the LLM alone, the SLM alone, LLM-to-SLM and trained checkpoints.

Rows run one after another with only their own models resident (so a GPU's peak memory is the row's own), but every
model is loaded once: the LLM serves its own row and every LLM-to-SLM row built on it. This module is the stage's
outline; its parts are the bench library, llm2slm_cli/bench/ (which rows, how they are built, timed and measured,
what is written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.bench import timing as B
from llm2slm_cli.bench.measure import measure_rows
from llm2slm_cli.bench.plan import plan_rows, same_spec
from llm2slm_cli.bench.quality import read_quality
from llm2slm_cli.bench.report import COLUMNS, print_table, print_throughput, write_outputs
from llm2slm_cli.config import BenchConfig
from llm2slm_cli.errors import UserError
from llm2slm_cli.quantize import check_decode_options, check_quantize

__all__ = ["COLUMNS", "run"]


def run(config: BenchConfig) -> Path:
    """Plan and check the rows and --quality, measure them all, then (only then) replace --out with the table,
    report, plots and manifest."""
    import torch
    import transformers

    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    device = runtime.device(config.device)
    check_decode_options(quantize=config.quantize, compile=config.compile,
                         speculative=bool(config.speculative or config.assistant))
    check_quantize(config.quantize, device=device, dtype=config.dtype)
    out = Path(config.out)
    plans = plan_rows(config)
    if not plans:
        raise UserError(f"--llm {config.llm} is encoder-only and cannot generate: add --slm or --model")
    labels = [p.label for p in plans]
    quality: dict[str, tuple[str, float]] = {}
    for item in config.quality:
        label, _, directory = (x.strip() for x in item.partition("="))
        if label not in labels:
            raise UserError(f"--quality {label}: there is no row labelled {label!r} (rows: {', '.join(labels)})")
        quality[label] = read_quality(label, Path(directory), config.quality_metric)
    A.check_output_dir(out, overwrite=config.overwrite, resumable=False)  # refused now; removed only when measured
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    by_threads: dict[str, dict[int, float | None]] = {}
    try:
        transformers.logging.set_verbosity_error()  # fresh weights and forced lengths make generate chatty
        with runtime.timer() as clock:
            runs = []
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            for count in config.thread_counts(cores):
                torch.set_num_threads(count or threads)
                results, identities, skipped, throughput = measure_rows(config, plans, device)
                for r in results:
                    r["threads"] = torch.get_num_threads()
                runs.append(results)
            results, by_threads = fastest(runs)
        order = {label: i for i, label in enumerate(labels)}
        results.sort(key=lambda r: (r["part"] != "main", order[r["label"]], r["batch_size"] or 0, r["new_tokens"]))
        for r in results:  # peer runtimes' rows carry their own; a row that failed carries its error
            r.setdefault("device", str(device))
            r.setdefault("dtype", config.dtype)
            r.setdefault("error", None)
        B.add_ratios(results, lambda r: same_spec(r["slm"]))
        rows = [{c: r[c] for c in COLUMNS} for r in results]
        A.prepare_output_dir(out, overwrite=config.overwrite, resumable=False)  # --overwrite: the old results go now
        write_outputs(out, config, rows, quality, identities, clock["seconds"], skipped, throughput,
                      by_threads if config.threads == "auto" else None)
    finally:
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)  # a Python caller keeps its own setting
    if not config.quiet:
        print_table(rows, quality)
        print_throughput(throughput)
        for line in skipped:
            runtime.say(f"not measured: {line}")
        for line in B.unsteady(rows):
            runtime.say(line)
        for key, counts in by_threads.items():  # --threads auto: what each count gave
            shown = ", ".join(f"{n}: {ms:.2f}" if ms is not None else f"{n}: failed" for n, ms in counts.items())
            runtime.say(f"threads, ms/token: {key}: {shown}")
    if config.json:
        print(json.dumps(rows, indent=2))
    runtime.say(f"measured {len(plans)} rows in {clock['seconds']:.0f}s -> {out}", config.quiet)
    return out


def row_key(r: dict) -> str:
    """What makes a row the same measurement at another thread count."""
    return f"{r['label']} | {r['part']} | batch {r['batch_size']} | {r['new_tokens']} tokens"


def fastest(runs: list[list[dict]]) -> tuple[list[dict], dict[str, dict[int, float | None]]]:
    """--threads auto: of the same row measured at each thread count, the fastest (lowest ms/token; a row that
    failed at every count keeps its first error), and every count's ms/token per row. One run: as it is."""
    if len(runs) == 1:
        return runs[0], {}
    by_threads: dict[str, dict[int, float | None]] = {}
    best: dict[str, dict] = {}
    for results in runs:
        for r in results:
            key = row_key(r)
            ms = r.get("ms_per_token") if not r.get("error") else None
            by_threads.setdefault(key, {})[r["threads"]] = ms
            kept = best.get(key)
            if kept is None or (ms is not None and (kept.get("error") or ms < kept["ms_per_token"])):
                best[key] = r
    return list(best.values()), by_threads
