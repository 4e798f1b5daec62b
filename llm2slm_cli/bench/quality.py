"""Quality scores for the quality-runtime plot: read from `eval` output directories (--quality LABEL=DIR)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli.errors import UserError

METRICS_FILE = "metrics.json"  # what `eval` writes
QUALITY_METRICS = ("bleu", "rougeL", "chrf")  # the first one an eval result has is plotted


def read_quality(label: str, directory: Path, metric: str = "auto") -> tuple[str, float]:
    """The score `metric` (auto: BLEU, else ROUGE-L, else chrF) of an `eval` output directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--quality {label}: no such directory (expected an `eval` output)", path=directory)
    path = directory / METRICS_FILE
    if not path.is_file():
        raise UserError(f"--quality {label}: no {METRICS_FILE}: not an `eval` output directory", path=directory)
    if (directory / A.MANIFEST).is_file():  # an `eval` output: its kind, and its metrics' sha256 where recorded
        manifest = A.read_manifest(directory, A.KIND_EVALUATION)
        A.verify_file(path, (manifest.get("files") or {}).get(METRICS_FILE), "evaluation metrics")
    # without a manifest: a score file written by hand ({"bleu": {"score": x}} and the shapes _metric reads)
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
