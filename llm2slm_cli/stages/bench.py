"""`llm2slm bench`: the paper's runtime protocol for the LLM alone, the SLM alone, LLM-to-SLM and trained checkpoints.

Which rows there are and which files come out is decided here; how a row is timed lives in benchmarking.py. Rows
run one after another with only their own models resident (so a GPU's peak memory is the row's own), but every
model is loaded once: the LLM serves its own row and every LLM-to-SLM row built on it.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import BenchConfig
from llm2slm_cli.errors import UserError

BENCH_TABLE = "bench.parquet"
BENCH_JSON = "bench.json"
PLOT_MS_PER_TOKEN = "ms_per_token.png"
PLOT_RUNTIME_LENGTH = "runtime_vs_length.png"
PLOT_FLOPS_LENGTH = "flops_vs_length.png"
PLOT_QUALITY = "quality_runtime.png"
METRICS_FILE = "metrics.json"  # what `eval` writes
QUALITY_METRICS = ("bleu", "rougeL", "chrf")  # the first one an eval result has is plotted

COLUMNS = ["label", "role", "engine", "part", "llm", "slm", "device", "dtype", "batch_size", "prompt_length",
           "new_tokens", "num_beams", "repeats", "seconds_median", "seconds_min", "seconds_max", "ms_per_token",
           "ms_per_token_min", "ms_per_token_max", "tokens_per_s", "speedup_vs_llm", "time_vs_slm", "slm_row",
           "flops_per_token", "flops_total", "weights_mb", "cuda_peak_mb", "process_peak_rss_mb", "acceptance_rate",
           "tokens_per_llm_call", "run_seconds"]


@dataclass
class Plan:
    """A row before anything is loaded: enough to check labels and options up front."""

    label: str
    role: str  # "LLM", "SLM", "LLM-to-SLM", "checkpoint", "speculative", "assisted"
    llm: str | None
    slm: str | None
    checkpoint: Path | None = None
    engine: str = "llm2slm"  # "llm2slm" (decoding.decode) or "transformers" (its generate)

    def twin(self) -> Plan:
        """The same row decoded by transformers' generate (bench --compare)."""
        return Plan(f"{self.label} [transformers]", self.role, self.llm, self.slm, self.checkpoint, "transformers")


def _short(spec: str) -> str:
    from llm2slm_cli import models as M

    try:
        src = M.resolve(spec)
    except UserError:
        return spec
    return src.name if src.kind == "preset" else Path(spec).name if src.kind != "hub" else spec


def _same_spec(spec: str | None) -> str | None:
    """A model name as the rows compare it ('tiny-t5' and 'preset:tiny-t5' are the same model)."""
    from llm2slm_cli import models as M

    if spec is None:
        return None
    try:
        return M.resolve(spec).spec
    except UserError:
        return spec


def plan_rows(config: BenchConfig) -> list[Plan]:
    from llm2slm_cli import models as M
    from llm2slm_cli.llm2slm import read_model_config

    plans: list[Plan] = []
    one = len(config.slm) == 1
    if config.llm and M.model_kind(M.load_config(config.llm)) != "encoder-only":  # an encoder cannot generate
        plans.append(Plan("LLM", "LLM", config.llm, None))
    plans += [Plan("SLM" if one else f"SLM:{_short(s)}", "SLM", None, s) for s in config.slm]
    if config.llm:
        plans += [Plan("LLM-to-SLM" if one else f"LLM-to-SLM:{_short(s)}", "LLM-to-SLM", config.llm, s)
                  for s in config.slm]
    for item in config.model:
        label, _, directory = (x.strip() for x in item.partition("="))
        cfg = read_model_config(Path(directory))
        plans.append(Plan(label, "checkpoint", cfg.llm["name"] if cfg.llm else None, cfg.slm, Path(directory)))
    if config.compare:  # every row that decodes with generate, once more with transformers' generate
        plans = [q for p in plans for q in (p.twin(), p)]
    for item in config.speculative:
        label, _, directory = (x.strip() for x in item.partition("="))
        cfg = read_model_config(Path(directory))
        if not config.llm:
            raise UserError(f"--speculative {label}: name the LLM that checks the drafts with --llm")
        plans.append(Plan(label, "speculative", config.llm, cfg.slm, Path(directory)))
    for item in config.assistant:
        label, _, spec = (x.strip() for x in item.partition("="))
        if not config.llm:
            raise UserError(f"--assistant {label}: name the LLM it drafts for with --llm")
        directory = Path(spec)
        if (directory / "llm2slm.json").is_file():
            cfg = read_model_config(directory)
            if cfg.llm is not None:
                raise UserError(f"--assistant {label}: {spec} reads the LLM's features; transformers' assisted "
                                "generation needs a plain model (a checkpoint trained without --llm, or a model)")
            plans.append(Plan(label, "assisted", config.llm, cfg.slm, directory, "transformers"))
        else:
            plans.append(Plan(label, "assisted", config.llm, spec, None, "transformers"))
    labels = [p.label for p in plans]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"two rows are labelled {label!r}: give each --model a label of its own")
    if M.DTYPES.get(config.dtype) == "float16":  # before any row is measured: every model of every row
        for p in plans:
            types = [A.read_json_or_none(p.checkpoint / A.SLM_CONFIG, "model_type") if p.checkpoint is not None
                     else M.load_config(p.slm).model_type if p.slm is not None else None,
                     M.load_config(p.llm).model_type if p.llm is not None and p.checkpoint is None else None]
            for model_type in types:
                M.refuse_float16(model_type, config.dtype, f"row {p.label!r}")
    longest = config.prompt_length + max([config.new_tokens, *_lengths(config)])
    for spec in {p.llm for p in plans if p.role == "LLM"} | set(config.slm):
        hf = M.load_config(spec)
        limit = getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)
        if M.model_kind(hf) == "decoder-only" and isinstance(limit, int) and longest > limit:
            raise UserError(f"{spec!r} reads at most {limit} positions: --prompt-length {config.prompt_length} plus "
                            f"{longest - config.prompt_length} new tokens is {longest}")
    return plans


def _lengths(config: BenchConfig) -> list[int]:
    return [int(x) for x in config.lengths.split(",") if x.strip()] if config.lengths else []


# ------------------------------------------------------------------------------------------------------ quality


def read_quality(label: str, directory: Path, metric: str = "auto") -> tuple[str, float]:
    """The score `metric` (auto: BLEU, else ROUGE-L, else chrF) of an `eval` output directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--quality {label}: no such directory (expected an `eval` output)", path=directory)
    path = directory / METRICS_FILE
    if not path.is_file():
        raise UserError(f"--quality {label}: no {METRICS_FILE}: not an `eval` output directory", path=directory)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable metrics ({e})", path=path) from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    for name in QUALITY_METRICS if metric == "auto" else (metric,):
        value = _metric(data, name)
        if value is not None:
            return name, value
    wanted = "BLEU, ROUGE-L or chrF" if metric == "auto" else metric
    raise UserError(f"--quality {label}: no {wanted} score in it", path=path)


def _metric(data: Any, name: str) -> float | None:
    """Accept {"bleu": {"score": x}}, {"bleu": x}, {"rouge": {"rougeL": x or {"fmeasure": x}}}, {"rougeL": x}."""
    if not isinstance(data, dict):
        return None
    lower = {str(k).lower(): v for k, v in data.items()}
    if name == "rougeL":
        rouge = lower.get("rouge")
        inner = {str(k).lower(): v for k, v in rouge.items()} if isinstance(rouge, dict) else {}
        candidates = [inner.get("rougel"), lower.get("rougel"), lower.get("rouge_l")]
    else:
        candidates = [lower.get(name)]
    for c in candidates:
        if isinstance(c, dict):
            c = c.get("score", c.get("fmeasure"))
        if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c):
            return float(c)
    return None


# ------------------------------------------------------------------------------------------------------ loading


def _plain_row(plan: Plan, model: Any, tokenizer: Any = None):
    from llm2slm_cli import benchmarking as B

    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.plain_generate(model, plan.engine), [model],
                 B.prompt_vocab(model.config, tokenizer), B.special_ids(model.config, tokenizer), tokenizer=tokenizer,
                 engine=plan.engine)


def _assisted_row(plan: Plan, model: Any, assistant: Any, tokenizer: Any = None):
    from llm2slm_cli import benchmarking as B

    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.assisted_generate(model, assistant), [model, assistant],
                 B.prompt_vocab(model.config, tokenizer), B.special_ids(model.config, tokenizer), tokenizer=tokenizer,
                 engine=plan.engine)


def _speculative_row(plan: Plan, draft: Any, verifier: Any, gamma: int):
    from llm2slm_cli import benchmarking as B
    from llm2slm_cli.decoding import SpeculativeStats

    stats = SpeculativeStats()
    config, tok = verifier.model.config, verifier.tokenizer
    modules = [draft, verifier.model] + ([draft.llm.model] if draft.llm is not None and
                                         draft.llm.model is not verifier.model else [])
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.speculative_generate_fn(draft, verifier, gamma, stats),
                 modules, B.prompt_vocab(config, tok), B.special_ids(config, tok), tokenizer=tok, speculative=stats)


def _llm2slm_row(plan: Plan, model: Any):
    from llm2slm_cli import benchmarking as B

    llm = model.llm if model.has_llm else None
    config = llm.config if llm is not None else model.slm.config
    tok = model.prompt_tokenizer
    modules = [model] + ([llm.model] if llm is not None else [])
    return B.Row(plan.label, plan.role, plan.llm, plan.slm, B.llm2slm_generate(model, plan.engine), modules,
                 B.prompt_vocab(config, tok), B.special_ids(config, tok) | {model.config.pad_token_id,
                                                                             model.config.eos_token_id},
                 tokenizer=tok, engine=plan.engine)


def _can_share(llm: Any, checkpoint: Path) -> bool:
    """Whether a checkpoint was made with exactly this LLM (weights, layer, tokenizer), so it need not load its own."""
    return _shared_llm(llm, checkpoint, any_layer=False) is not None


def _shared_llm(llm: Any, checkpoint: Path, *, any_layer: bool) -> Any:
    """The loaded LLM (a view at the checkpoint's layer with `any_layer`) if the checkpoint was made with exactly
    its weights and tokenizer; else None, and the checkpoint loads its own."""
    from llm2slm_cli.llm2slm import check_llm, read_model_config

    expected = read_model_config(checkpoint).llm
    if llm is None or expected is None or _same_spec(expected["name"]) != _same_spec(llm.spec):
        return None
    if expected.get("dtype") != llm.dtype:
        return None
    if any_layer and llm.kind == "decoder-only" and expected.get("layer") != llm.layer:
        llm = llm.at_layer(expected["layer"])
    try:
        check_llm(llm, expected, f"checkpoint {checkpoint}")
    except UserError:
        return None
    return llm


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ running


def run(config: BenchConfig) -> Path:
    import torch
    import transformers

    from llm2slm_cli import benchmarking as B

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
    device = runtime.device(config.device)
    A.check_output_dir(out, overwrite=config.overwrite, resumable=False)  # refused now; removed only when measured
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        transformers.logging.set_verbosity_error()  # fresh weights and forced lengths make generate chatty
        with runtime.timer() as clock:
            results, identities, skipped, throughput = measure_rows(config, plans, device)
        order = {label: i for i, label in enumerate(labels)}
        results.sort(key=lambda r: (r["part"] != "main", order[r["label"]], r["batch_size"], r["new_tokens"]))
        for r in results:
            r.update(device=str(device), dtype=config.dtype)
        B.add_ratios(results, lambda r: _same_spec(r["slm"]))
        rows = [{c: r[c] for c in COLUMNS} for r in results]
        A.prepare_output_dir(out, overwrite=config.overwrite, resumable=False)  # --overwrite: the old results go now
        _write_outputs(out, config, rows, quality, identities, clock["seconds"], skipped, throughput)
    finally:
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)  # a Python caller keeps its own setting
    if not config.quiet:
        _print_table(rows, quality)
        _print_throughput(throughput)
        for line in skipped:
            runtime.say(f"not measured: {line}")
    if config.json:
        print(json.dumps(rows, indent=2))
    runtime.say(f"measured {len(plans)} rows in {clock['seconds']:.0f}s -> {out}", config.quiet)
    return out


def measure_rows(config: BenchConfig, plans: list[Plan], device: Any
                 ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], list[dict[str, Any]]]:
    """Every row at every batch size (and sweep length); each model loaded once, only the row's own resident.

    SLMs alone first, then the LLM and everything built on it, then checkpoints that bring an LLM of their own."""
    from llm2slm_cli import benchmarking as B
    from llm2slm_cli import models as M
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    lengths = _lengths(config)
    dtype = M.torch_dtype(config.dtype)
    results: list[dict[str, Any]] = []
    identities: dict[str, Any] = {}
    skipped: list[str] = []
    throughput: list[dict[str, Any]] = []
    texts = _prompt_texts(config)
    common = dict(prompt_length=config.prompt_length, num_beams=config.num_beams, warmup=config.warmup,
                  repeats=config.repeats, flops=config.flops, seed=config.seed, device=device, texts=texts,
                  whole=config.whole_prompts)
    with runtime.progress(config.quiet) as bar:
        task = bar.add_task("bench", total=len(plans) * (len(config.batch_size) + len(lengths)), rate="")

        def measure(*rows: B.Row) -> None:
            """Rows sharing loaded models, timed side by side (B.measure); results listed row by row."""
            got: list[list[dict[str, Any]]] = [[] for _ in rows]
            names = " | ".join(r.label for r in rows)
            points = [("main", b, config.new_tokens) for b in config.batch_size] + \
                [("sweep", config.batch_size[0], n) for n in lengths]
            for part, batch, n in points:
                bar.update(task, description=f"{names}: batch {batch}" if part == "main" else f"{names}: {n} tokens")
                measured = B.measure(list(rows), batch=batch, new_tokens=n, warm=part == "sweep", **common)
                for row, mine, m in zip(rows, got, measured):
                    if isinstance(m, B.Unsupported):
                        skipped.append(f"{row.label}, batch {batch}: {m}" if part == "main" else
                                       f"{row.label}, {n} tokens: {m}")
                    else:
                        mine.append({**m, "part": part})
                        bar.update(task, rate=f"{m['ms_per_token']:.1f} ms/token")
                bar.update(task, advance=len(rows))
            for mine in got:
                results.extend(mine)

        slm_specs = list(dict.fromkeys(p.slm for p in plans if p.role == "SLM"))
        for spec in slm_specs:
            if M.model_kind(M.load_config(spec)) == "encoder-only":
                raise UserError(f"the SLM {spec!r} is encoder-only and cannot generate")
            slm = M.load_model(spec, dtype=config.dtype, role="SLM").to(device)
            tok = _tokenizer_or_none(spec) if texts else None
            group = [p for p in plans if p.role == "SLM" and p.slm == spec]
            for plan in group:
                identities[plan.label] = {"slm": plan.slm, "parameters": _count(slm), "engine": plan.engine}
            measure(*(_plain_row(plan, slm, tok) for plan in group))
            del slm
            _free()
        frozen = None
        if config.llm:
            frozen = FrozenLLM(config.llm, dtype=config.dtype, device=device, tokenizer_optional=not texts,
                               tokenizer_option=None)
            group = [p for p in plans if p.role == "LLM"]
            for plan in group:
                identities[plan.label] = {"llm": plan.llm, "parameters": _count(frozen.model), "engine": plan.engine}
            if group:
                measure(*(_plain_row(plan, frozen.model, frozen.tokenizer) for plan in group))
            if config.throughput:
                throughput += _throughput(config, frozen, device, bar)
            for spec in dict.fromkeys(p.slm for p in plans if p.role == "LLM-to-SLM"):
                model = LLMToSLM.build(spec, frozen, slm_dtype=config.dtype).to(device=device, dtype=dtype).eval()
                group = [p for p in plans if p.role == "LLM-to-SLM" and p.slm == spec]
                for plan in group:
                    identities[plan.label] = {"llm": plan.llm, "slm": plan.slm, "projector": "fresh",
                                              "vocab_adapter": model.config.vocab_adapter, "engine": plan.engine,
                                              "parameters": _count(model), "llm_parameters": _count(frozen.model)}
                measure(*(_llm2slm_row(plan, model) for plan in group))
                del model
                _free()
            for plan in (p for p in plans if p.role == "assisted"):
                if plan.checkpoint is not None:
                    assistant = LLMToSLM.from_pretrained(plan.checkpoint, device=device).plain_slm().to(dtype=dtype)
                else:
                    assistant = M.load_model(plan.slm, dtype=config.dtype, role="SLM").to(device).eval()
                if assistant.config.vocab_size != frozen.model.config.vocab_size and \
                        frozen.model.config.vocab_size < assistant.config.vocab_size:
                    raise UserError(f"--assistant {plan.label}: its vocabulary ({assistant.config.vocab_size}) is not "
                                    f"the LLM's ({frozen.model.config.vocab_size})")
                identities[plan.label] = {"assistant": str(plan.checkpoint or plan.slm), "verifier": plan.llm,
                                          "engine": plan.engine, "parameters": _count(assistant)}
                measure(_assisted_row(plan, frozen.model, assistant, frozen.tokenizer))
                del assistant
                _free()
            for plan in (p for p in plans if p.role == "speculative"):
                # a draft made with this LLM at another layer shares it too (speculative_generate reads its layer)
                draft = LLMToSLM.from_pretrained(plan.checkpoint, llm=_shared_llm(frozen, plan.checkpoint,
                                                                                  any_layer=True),
                                                 device=device).to(dtype=dtype)
                identities[plan.label] = {"draft": str(plan.checkpoint), "verifier": plan.llm, "gamma": config.gamma,
                                          "weights_sha256": A.sha256_file(plan.checkpoint / A.MODEL_WEIGHTS),
                                          "parameters": _count(draft), "engine": plan.engine}
                measure(_speculative_row(plan, draft.eval(), frozen, config.gamma))
                del draft
                _free()
        # Checkpoints made with exactly this LLM reuse it; the others then load their own, one at a time.
        checkpoints = list(dict.fromkeys(p.checkpoint for p in plans if p.role == "checkpoint"))
        shared = [c for c in checkpoints if _can_share(frozen, c)]
        for directory in shared + [c for c in checkpoints if c not in shared]:
            if directory not in shared and frozen is not None:
                frozen = None
                _free()
            model = LLMToSLM.from_pretrained(directory, llm=frozen, device=device).to(dtype=dtype).eval()
            group = [p for p in plans if p.role == "checkpoint" and p.checkpoint == directory]
            for plan in group:
                identities[plan.label] = {"checkpoint": str(directory), "llm": plan.llm, "slm": plan.slm,
                                          "weights_sha256": A.sha256_file(directory / A.MODEL_WEIGHTS),
                                          "parameters": _count(model), "engine": plan.engine}
            measure(*(_llm2slm_row(plan, model) for plan in group))
            del model
            _free()
    return results, identities, skipped, throughput


def _throughput(config: BenchConfig, frozen: Any, device: Any, bar: Any) -> list[dict[str, Any]]:
    """encode's prompt tokens/s and train's examples/s over the batch sizes x prompt lengths of --throughput."""
    from llm2slm_cli import benchmarking as B
    from llm2slm_cli.llm2slm import LLMToSLM

    batches = [int(x) for x in config.throughput_batch_sizes.split(",") if x.strip()]
    lengths = [int(x) for x in config.throughput_lengths.split(",") if x.strip()]
    common = dict(warmup=config.warmup, repeats=config.repeats, seed=config.seed, device=device)
    rows = []
    task = bar.add_task("throughput", total=2 * len(batches) * len(lengths), rate="")
    for length in lengths:
        for batch in batches:
            bar.update(task, description=f"encode {batch}x{length}")
            rows.append({"llm": config.llm, "slm": None, **B.encode_throughput(frozen, batch=batch, length=length,
                                                                                 **common)})
            bar.update(task, advance=1)
    model = LLMToSLM.build(config.slm[0], frozen, slm_dtype=config.dtype).to(device=device)
    for length in lengths:
        for batch in batches:
            bar.update(task, description=f"train {batch}x{length}")
            rows.append({"llm": config.llm, "slm": config.slm[0],
                         **B.train_throughput(model, batch=batch, length=length,
                                              target_length=config.throughput_target_length, **common)})
            bar.update(task, advance=1)
    del model
    _free()
    return rows


def _print_throughput(rows: list[dict[str, Any]]) -> None:
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


def _prompt_texts(config: BenchConfig) -> list[str] | None:
    """The prompts of --prompts (an examples file, with the template and fields of the other stages)."""
    if config.prompts is None:
        return None
    from llm2slm_cli.data import Fields, read_examples

    examples = read_examples([config.prompts], Fields(prompt=config.prompt_field, target=None, id=None,
                                                      template=config.template))
    return [e.prompt for e in examples]


def _tokenizer_or_none(spec: str):
    from llm2slm_cli import models as M

    try:
        return M.load_tokenizer(spec, local_only=True)
    except UserError:
        return None


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ outputs


def _write_outputs(out: Path, config: BenchConfig, rows: list[dict[str, Any]], quality: dict[str, tuple[str, float]],
                   identities: dict[str, Any], seconds: float, skipped: list[str],
                   throughput: list[dict[str, Any]]) -> None:
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

    strings = {"label", "role", "engine", "part", "llm", "slm", "device", "dtype", "slm_row"}
    ints = {"batch_size", "prompt_length", "new_tokens", "num_beams", "repeats"}
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
    """Bars of ms per generated token per row, one bar per batch size, whiskers from the fastest to the slowest."""
    plt = _pyplot()
    main = [r for r in rows if r["part"] == "main"]
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
    main = [r for r in rows if r["part"] == "main"]
    batch = main[0]["batch_size"]
    metrics = sorted({m for m, _ in quality.values()})
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (metric, score) in quality.items():
        r = next(r for r in main if r["label"] == label and r["batch_size"] == batch)
        ax.scatter(r["ms_per_token"], score)
        ax.annotate(label if len(metrics) == 1 else f"{label} ({metric})", (r["ms_per_token"], score),
                    xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"ms per generated token (batch {batch})")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "quality (metric per point)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]], quality: dict[str, tuple[str, float]]) -> None:
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
    for name in names:
        table.add_column(name, justify="left" if name == "row" else "right")
    for r in main:
        q = quality.get(r["label"])
        cells = [escape(r["label"]), str(r["batch_size"]), f"{r['ms_per_token']:.2f}",
                 f"{r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f}", f"{r['tokens_per_s']:.1f}",
                 num(r["speedup_vs_llm"], ".2f"), num(r["time_vs_slm"], ".2f"),
                 num(r["flops_per_token"] / 1e9 if r["flops_per_token"] is not None else None, ".3f"),
                 f"{r['weights_mb']:.1f}", num(r["cuda_peak_mb"] if cuda else r["process_peak_rss_mb"], ".0f")]
        cells += [f"{q[1]:.2f} {q[0]}" if q else "-"] if quality else []
        cells += [num(r["acceptance_rate"], ".1%"), num(r["tokens_per_llm_call"], ".2f")] if spec else []
        table.add_row(*cells)
    console.print(table)
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
