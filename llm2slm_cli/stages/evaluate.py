"""`llm2slm eval`: score the predictions of `generate` against references.

Corpus BLEU and chrF come from sacrebleu, stored with their signatures so a number can be compared across papers;
ROUGE from Google's rouge-score (the package the summarization literature reports); optionally an LLM judge's 1-10
rating (judge.py). Corpus numbers go to metrics.json, per-example scores to scores.parquet, so a reader can find
the examples behind a score.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import judge, runtime
from llm2slm_cli.config import EvalConfig
from llm2slm_cli.data import Fields, read_examples
from llm2slm_cli.errors import UserError

METRIC_NAMES = ("bleu", "chrf", "rouge", "judge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_AGGREGATION = "mean over examples of the F-measure, x 100 (no bootstrap)"
ROUGE_LSUM_SENTENCES = ("rougeLsum splits prediction and reference into sentences at newlines (the CNN/DailyMail "
                        "convention: one highlight per line); text without newlines is one sentence")


def parse_metrics(config: EvalConfig) -> list[str]:
    """The requested metrics in canonical order; refuses unknown names and a judge without an endpoint."""
    names = {m.strip().lower() for m in config.metrics.split(",") if m.strip()}
    unknown = sorted(names - set(METRIC_NAMES))
    if unknown:
        raise UserError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                        f"--metrics: choose from {', '.join(METRIC_NAMES)}")
    if not names:
        raise UserError(f"--metrics is empty: choose from {', '.join(METRIC_NAMES)}")
    if "judge" in names:
        if not config.judge_url or not config.judge_model:
            raise UserError("--metrics judge needs --judge-url (an OpenAI-compatible API, e.g. "
                            "http://127.0.0.1:8000/v1) and --judge-model")
        if not config.judge_url.startswith(("http://", "https://")):
            raise UserError(f"--judge-url {config.judge_url!r} must start with http:// or https://")
        if config.judge_timeout <= 0:
            raise UserError(f"--judge-timeout must be positive, got {config.judge_timeout}")
    return [m for m in METRIC_NAMES if m in names]


def load_predictions(directory: Path, *, need_prompt: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest and rows of a `generate` output, checked: ids present and unique."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = A.read_manifest(directory, A.KIND_PREDICTIONS)
    path = Path(directory) / A.PREDICTIONS
    if not path.is_file():
        raise UserError(f"no {A.PREDICTIONS} beside its manifest", path=directory)
    A.verify_file(path, manifest.get("files", {}).get(A.PREDICTIONS), "predictions file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"not a readable Parquet file ({e})", path=path) from None
    needed = ["id", "prediction"] + (["prompt"] if need_prompt else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise UserError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (has: "
                        f"{', '.join(table.column_names)})", path=path)
    rows = table.to_pylist()
    if not rows:
        raise UserError("no predictions", path=path)
    seen: set[str] = set()
    for n, row in enumerate(rows):
        if row["id"] is None:
            raise UserError(f"row {n}: empty id", path=path, field="id")
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise UserError(f"row {n}: duplicate id {row['id']!r}", path=path, field="id")
        seen.add(row["id"])
        row["prediction"] = row["prediction"] or ""  # a model that said nothing scores zero, not an error
    return manifest, rows


def load_references(config: EvalConfig, rows: list[dict[str, Any]], predictions_path: Path
                    ) -> tuple[list[str], dict[str, Any]]:
    """One reference per prediction: from --refs joined on id, else from the predictions' own `reference` column."""
    if config.refs:
        fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field,
                        template=config.template)
        examples = read_examples(config.refs, fields, require_target=True)
        by_id = {e.id: e.target or "" for e in examples}
        absent = [row["id"] for row in rows if row["id"] not in by_id]
        if absent:
            where = str(config.refs[0]) if len(config.refs) == 1 else f"{config.refs[0]} + {config.refs[1]}"
            also = f" ({len(absent)} of {len(rows)} predictions have none)" if len(absent) > 1 else ""
            how = ("ids of line-aligned files are line numbers from 0" if len(config.refs) == 2
                   else f"ids come from --id-field '{config.id_field}'")
            raise UserError(f"no reference for prediction id {absent[0]!r}{also}; {how}", path=where)
        local = not any(str(p).startswith("hf:") for p in config.refs)
        info = {"source": "refs", "files": [str(p) for p in config.refs],
                "sha256": A.sha256_files(config.refs) if local else None,
                "unused": len(by_id) - len(rows)}
        return [by_id[row["id"]] for row in rows], info
    if rows and "reference" in rows[0]:
        for row in rows:
            if row["reference"] is None:
                raise UserError(f"prediction id {row['id']!r} has no reference: pass --refs FILE",
                                path=predictions_path)
        return [row["reference"] for row in rows], {"source": "predictions", "files": [str(predictions_path)]}
    raise UserError("no references: the predictions have no 'reference' column (their inputs had no targets); "
                    "pass --refs FILE", path=predictions_path)


def one_line(text: str) -> str:
    return " ".join(text.split())


def bleu(hypotheses: list[str], references: list[str], tokenize: str, lowercase: bool
         ) -> tuple[dict[str, Any], list[float]]:
    """Corpus BLEU with its signature and breakdown, and sentence BLEU per example (effective order, as
    sacrebleu.sentence_bleu)."""
    from sacrebleu.metrics import BLEU

    try:
        corpus_metric = BLEU(tokenize=tokenize, lowercase=lowercase)
        sentence_metric = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
    except Exception as e:  # a tokenizer whose extra package or model file is missing
        raise UserError(f"--bleu-tokenize {tokenize} is unavailable: {one_line(str(e))}") from None
    score = corpus_metric.corpus_score(hypotheses, [references])
    per_example = [sentence_metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    result = {
        "score": score.score,
        "signature": str(corpus_metric.get_signature()),
        "precisions": list(score.precisions),
        "bp": score.bp,
        "ratio": score.ratio,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
        "counts": list(score.counts),
        "totals": list(score.totals),
        "sentence_signature": str(sentence_metric.get_signature()),  # known only after scoring
    }
    return result, per_example


def chrf(hypotheses: list[str], references: list[str], lowercase: bool) -> tuple[dict[str, Any], list[float]]:
    from sacrebleu.metrics import CHRF

    metric = CHRF(lowercase=lowercase)
    score = metric.corpus_score(hypotheses, [references])
    per_example = [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    return {"score": score.score, "signature": str(metric.get_signature())}, per_example


def rouge(hypotheses: list[str], references: list[str]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """ROUGE-1/2/L/Lsum F-measures (Porter-stemmed); the corpus value is their mean over examples."""
    from importlib.metadata import version

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_example: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for h, r in zip(hypotheses, references):
        scores = scorer.score(r, h)  # (target, prediction)
        for t in ROUGE_TYPES:
            per_example[t].append(scores[t].fmeasure * 100)
    result: dict[str, Any] = {t: sum(v) / len(v) for t, v in per_example.items()}
    result.update(aggregation=ROUGE_AGGREGATION, stemmer="porter (use_stemmer=True)",
                  rougeLsum_sentences=ROUGE_LSUM_SENTENCES, package=f"rouge-score {version('rouge-score')}")
    return result, per_example


def run_judge(config: EvalConfig, rows: list[dict[str, Any]], references: list[str]):
    """Ratings for every example and their summary (mean over parsed ratings only)."""
    import os

    items = [(row["prompt"] or "", ref, row["prediction"]) for row, ref in zip(rows, references)]
    api_key = os.environ.get(config.judge_api_key_env) if config.judge_api_key_env else None
    with runtime.progress(config.quiet) as bar:
        task = bar.add_task("judge", total=len(items), rate="")
        verdicts = judge.judge_all(items, base_url=config.judge_url or "", model=config.judge_model or "",
                                   api_key=api_key, timeout=config.judge_timeout,
                                   on_done=lambda: bar.update(task, advance=1))
    ratings = [v.rating for v in verdicts if v.rating is not None]
    summary = {
        "mean": sum(ratings) / len(ratings) if ratings else None,
        "parsed": len(ratings),
        "unparsable": sum(1 for v in verdicts if v.rating is None and not v.failed),
        "failed": sum(1 for v in verdicts if v.failed),
        "scale": [1, 10],
        "model": config.judge_model,
        "url": judge.endpoint(config.judge_url or ""),
        "prompt": judge.PROMPT_NAME,
        "temperature": 0,
        "aggregation": "mean over parsed ratings; unparsable and failed examples are counted, not scored",
    }
    return summary, verdicts


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def run(config: EvalConfig) -> dict[str, Any]:
    """Score, write metrics.json + scores.parquet + manifest.json, and return the metrics."""
    names = parse_metrics(config)
    out, pred_dir = Path(config.out), Path(config.predictions)
    _check_out(config, out, pred_dir)
    start = time.perf_counter()
    pred_manifest, rows = load_predictions(pred_dir, need_prompt="judge" in names)
    references, ref_info = load_references(config, rows, pred_dir / A.PREDICTIONS)
    metrics, outputs, columns = _score(config, names, rows, references)
    paired = None if config.paired_with is None else paired_bootstrap(
        config, rows, [row["prediction"] for row in rows], references)
    seconds = time.perf_counter() - start
    result = {
        "metrics": metrics,
        "outputs": outputs,
        "paired": paired,
        "counts": {"examples": len(rows), "unused_references": ref_info.get("unused", 0)},
        "predictions": {"dir": str(pred_dir), "model": pred_manifest.get("model"),
                        "generation": pred_manifest.get("generation"),
                        "inputs": pred_manifest.get("inputs"),  # the prompts' file or dataset (export's card names it)
                        "sha256": A.sha256_file(pred_dir / A.PREDICTIONS)},
        "references": {k: v for k, v in ref_info.items() if k != "unused"},
        "scores_file": {"name": A.SCORES, "columns": list(columns),
                        "repetition_loop": "the output holds a word n-gram (n <= 4) repeated 3 or more times in a row",
                        "scale": "bleu and chrf: sentence scores (0-100); rouge*: F-measure x 100; "
                                 "judge_rating: 1-10, null when unparsable or failed"},
    }
    _write(config, out, result, columns, seconds)
    if config.json:
        print(json.dumps(result, indent=2))
    if not config.quiet:
        _print_table(result, out)
    return result


def _check_out(config: EvalConfig, out: Path, pred_dir: Path) -> None:
    """--out is none of the inputs, and a non-empty one without --overwrite is refused before any long work."""
    if _same_or_inside(pred_dir, out):
        raise UserError("--out would hold or replace the predictions being scored: choose another directory",
                        path=out)
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    if not config.overwrite and out.exists():
        A.prepare_output_dir(out, resumable=False)


def _score(config: EvalConfig, names: list[str], rows: list[dict[str, Any]],
           references: list[str]) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """Corpus metrics, output statistics (distinct, loops, empty) and the per-example score columns."""
    import pyarrow as pa

    hypotheses = [row["prediction"] for row in rows]
    metrics: dict[str, Any] = {}
    columns: dict[str, Any] = {
        "id": pa.array([row["id"] for row in rows], pa.string()),
        "prediction": pa.array(hypotheses, pa.string()),
        "reference": pa.array(references, pa.string()),
    }
    if "bleu" in names:
        metrics["bleu"], per = bleu(hypotheses, references, config.bleu_tokenize, config.lowercase)
        columns["bleu"] = pa.array(per, pa.float64())
    if "chrf" in names:
        metrics["chrf"], per = chrf(hypotheses, references, config.lowercase)
        columns["chrf"] = pa.array(per, pa.float64())
    if "rouge" in names:
        metrics["rouge"], per_type = rouge(hypotheses, references)
        for t in ROUGE_TYPES:
            columns[t] = pa.array(per_type[t], pa.float64())
    if "judge" in names:
        metrics["judge"], verdicts = run_judge(config, rows, references)
        columns["judge_rating"] = pa.array([v.rating for v in verdicts], pa.float64())
        columns["judge_error"] = pa.array([v.error for v in verdicts], pa.string())
        columns["judge_reply"] = pa.array([v.reply for v in verdicts], pa.string())
    loops = [repetition_loop(h) for h in hypotheses]
    columns["repetition_loop"] = pa.array(loops, pa.bool_())
    outputs = {"distinct": len(set(hypotheses)) / len(hypotheses), "repetition_loops": sum(loops) / len(loops),
               "empty": sum(1 for h in hypotheses if not h.strip()) / len(hypotheses)}
    return metrics, outputs, columns


def _write(config: EvalConfig, out: Path, result: dict[str, Any], columns: dict[str, Any], seconds: float) -> None:
    """scores.parquet, metrics.json and the manifest hashing both; with --overwrite the old results are removed
    only now, when the new ones are ready to be written."""
    import pyarrow as pa

    A.prepare_output_dir(out, overwrite=config.overwrite, resumable=False)
    A.write_parquet(out / A.SCORES, pa.table(columns))
    A.atomic_write_json(out / A.METRICS, result)
    A.atomic_write_json(out / A.MANIFEST, A.make_manifest(
        A.KIND_EVALUATION, config, predictions=result["predictions"], references=result["references"],
        counts=result["counts"], scores=_headline(result["metrics"]), timing={"seconds": round(seconds, 3)},
        files={name: A.file_record(out / name) for name in (A.METRICS, A.SCORES)}))


def repetition_loop(text: str, times: int = 3, longest: int = 4) -> bool:
    """Does the output fall into a loop: somewhere, one n-gram of n <= `longest` words repeated `times` or more times
    in a row (what a degenerate decoder writes until its length limit: "die die die", "der Regierung der Regierung
    der Regierung")? A loop cut by the length limit mid-cycle still counts."""
    words = text.split()
    for n in range(1, longest + 1):
        for start in range(0, len(words) - n * times + 1):
            gram = words[start: start + n]
            if all(words[start + k * n: start + (k + 1) * n] == gram for k in range(1, times)):
                return True
    return False


def paired_bootstrap(config: EvalConfig, rows: list[dict[str, Any]], hypotheses: list[str],
                     references: list[str]) -> dict[str, Any]:
    """BLEU and chrF of these predictions and of --paired-with's on the same examples, with 95% confidence intervals
    and the p-value of the difference (sacrebleu's paired bootstrap resampling, --bootstrap-samples resamples)."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    _, base_rows = load_predictions(Path(config.paired_with), need_prompt=False)
    base = {row["id"]: row["prediction"] for row in base_rows}
    missing = [row["id"] for row in rows if row["id"] not in base]
    if missing or len(base) != len(rows):
        raise UserError(f"--paired-with must hold predictions of the same examples: {len(missing)} of {len(rows)} "
                        f"ids are not there" + (f" (e.g. {missing[0]!r})" if missing else
                                                f", and it has {len(base)} predictions"), path=config.paired_with)
    systems = [("baseline", [one_line(base[row["id"]]) for row in rows]),
               ("system", [one_line(h) for h in hypotheses])]
    metrics = {"bleu": BLEU(tokenize=config.bleu_tokenize, lowercase=config.lowercase),
               "chrf": CHRF(lowercase=config.lowercase)}
    signatures, scores = PairedTest(systems, metrics, references=[[one_line(r) for r in references]],
                                    test_type="bs", n_samples=config.bootstrap_samples)()
    out: dict[str, Any] = {"baseline": str(config.paired_with), "samples": config.bootstrap_samples}
    for name in metrics:
        key = next(k for k in scores if k.lower().startswith(name))
        b, s = scores[key]
        # sacrebleu gives numpy scalars (chrF's as float32): plain floats for JSON
        out[name] = {"score": float(s.score), "mean": float(s.mean), "ci95": float(s.ci),
                     "baseline_score": float(b.score), "baseline_mean": float(b.mean), "baseline_ci95": float(b.ci),
                     "delta": float(s.score - b.score), "p_value": None if s.p_value is None else float(s.p_value),
                     "signature": str(signatures[key])}
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The one number per metric, for the manifest and the table."""
    out: dict[str, float | None] = {}
    for name, m in metrics.items():
        if name == "rouge":
            out.update({t: m[t] for t in ROUGE_TYPES})
        else:
            out[name] = m["score"] if "score" in m else m["mean"]
    return out


def _print_table(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    metrics = result["metrics"]
    table = Table(title=f"{result['counts']['examples']} examples", title_justify="left")
    table.add_column("metric")
    table.add_column("score", justify="right")
    table.add_column("details", overflow="fold")  # signatures have no spaces to wrap at
    if "bleu" in metrics:
        b = metrics["bleu"]
        precisions = "/".join(f"{p:.1f}" for p in b["precisions"])
        table.add_row("BLEU", f"{b['score']:.2f}",
                      f"{precisions} (BP {b['bp']:.3f}, ratio {b['ratio']:.3f}, {b['sys_len']}/{b['ref_len']})\n"
                      f"{b['signature']}")
    if "chrf" in metrics:
        table.add_row("chrF", f"{metrics['chrf']['score']:.2f}", metrics["chrf"]["signature"])
    if "rouge" in metrics:
        for t, label in zip(ROUGE_TYPES, ("ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum")):
            table.add_row(label, f"{metrics['rouge'][t]:.2f}", "mean F x 100, stemmed" if t == "rouge1" else "")
    if "judge" in metrics:
        j = metrics["judge"]
        table.add_row("judge", "-" if j["mean"] is None else f"{j['mean']:.2f}",
                      escape(f"{j['parsed']} rated, {j['unparsable']} unparsable, {j['failed']} failed "
                             f"({j['model']})"))
    console = Console(stderr=True, highlight=False)
    console.print(table)
    console.print(f"-> {out}", markup=False)
