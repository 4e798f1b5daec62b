"""Everything about files on disk: names, manifests, fingerprints, atomic writes, output directories.

Every artifact directory a stage writes holds a `manifest.json` that describes it (kind, schema version, tool
version, the stage's configuration, input fingerprints, models, counts, timings). The manifest is written last, so
its presence means the directory is complete; a stage that reads an artifact reads its manifest first and refuses
what does not fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llm2slm_cli import __version__
from llm2slm_cli.errors import UserError

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
FEATURES_INDEX = "index.parquet"
FEATURES_SHARD = "features-{:05d}.safetensors"
FEATURES_SHARD_INDEX = "index-{:05d}.parquet"
PREDICTIONS = "predictions.parquet"
LABELS = "examples.parquet"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_STEP = "step-{:06d}"
CHECKPOINT_FINAL = "final"
MODEL_CONFIG = "llm2slm.json"
SLM_CONFIG = "slm_config.json"
MODEL_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
RNG_STATE = "rng_state-{}.pt"
TOKENIZER_DIR = "tokenizer"
SLM_TOKENIZER_DIR = "slm_tokenizer"
BUNDLED_LLM = "llm"  # an exported checkpoint's own copy of its LLM (export --include-llm)
MODEL_CARD = "README.md"

KIND_FEATURES = "features"
KIND_CHECKPOINT = "checkpoint"
KIND_TRAINING = "training"
KIND_PREDICTIONS = "predictions"
KIND_LABELS = "labels"
KIND_EVALUATION = "evaluation"
KIND_BENCHMARK = "benchmark"
METRICS = "metrics.json"
SCORES = "scores.parquet"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """One fingerprint for an input made of several files (line-aligned pairs), order-sensitive."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and not paths[0].exists() and ":" in str(paths[0]):  # DIR:SPLIT of a datasets DatasetDict
        base, _, split = str(paths[0]).rpartition(":")
        if (Path(base) / split).is_dir():
            paths = [Path(base) / split]
    if len(paths) == 1 and not paths[0].is_dir():
        return sha256_file(paths[0])
    if len(paths) == 1:  # a directory used as input (distill-labels output, a datasets directory): all its files
        paths = sorted(p for p in paths[0].rglob("*") if p.is_file() and p.name != MANIFEST)
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_path(path: Path) -> Path:
    """A temporary sibling name to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    tmp = atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A stage config as plain JSON (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


def environment() -> dict[str, Any]:
    """Hardware and library versions, recorded in manifests and benchmark outputs."""
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file an artifact holds, for its manifest (checked by `verify_file`)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_file(path: Path, record: dict[str, Any] | None, what: str = "file") -> None:
    """Refuse a file that is missing, or whose size or sha256 differs from what its manifest recorded."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} is missing", path=path)
    if record is None:  # written by an older version without checksums
        return
    size = path.stat().st_size
    if size != record["bytes"]:
        raise UserError(f"{what} is damaged (truncated or overwritten): {size} bytes, the manifest says "
                        f"{record['bytes']}", path=path)
    if sha256_file(path) != record["sha256"]:
        raise UserError(f"{what} is damaged: its sha256 differs from the manifest's", path=path)


def make_manifest(kind: str, config: Any, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": now(),
        "config": config_to_dict(config) if dataclasses.is_dataclass(config) else config,
        **fields,
        "environment": environment(),
    }


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    """The manifest of an artifact directory, checked for kind and schema version."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UserError(f"no such directory (expected a '{kind}' artifact)", path=directory)
    if not path.is_file():
        raise UserError(f"no {MANIFEST}: not a complete '{kind}' artifact (an unfinished run? use --resume)",
                        path=directory)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable manifest ({e})", path=path) from None
    if manifest.get("kind") != kind:
        raise UserError(f"is a '{manifest.get('kind')}' artifact, expected '{kind}'", path=directory)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"schema version {manifest.get('schema_version')} is not supported "
                        f"(this tool reads version {SCHEMA_VERSION})", path=path)
    return manifest


def read_json_or_none(path: Path, key: str) -> Any:
    """One key of a JSON file, or None when the file is unreadable (for messages about foreign directories)."""
    try:
        return json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def prepare_output_dir(out: Path, *, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> bool:
    """Create `out` for a stage; returns True when there is earlier work in it to resume.

    A directory with files in it is refused unless the user asked to overwrite it (its contents are removed) or to
    resume (its contents are kept and the stage continues where it stopped).
    """
    out = Path(out)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", path=out)
    has_content = out.is_dir() and any(out.iterdir())
    if has_content and not (overwrite or resume):
        hint = " or --resume to continue an interrupted run" if resumable else ""
        raise UserError(f"output directory exists and is not empty: pass --overwrite to replace it{hint}", path=out)
    if has_content and overwrite:
        shutil.rmtree(out)
    if resume and has_content and (out / MANIFEST).is_file():
        raise UserError("this run already finished (manifest.json present); nothing to resume", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory ({e.strerror})", path=out) from None
    return bool(resume and has_content)


def input_sha256(paths: Iterable[Path | str]) -> str | None:
    """The fingerprint of a stage's input files; None for a Hugging Face dataset (its files are not ours)."""
    paths = list(paths)
    if any(str(p).startswith("hf:") for p in paths):
        return None
    return sha256_files(paths)


def resume_plan(out: Path, name: str, plan: dict[str, Any], resuming: bool, stage: str) -> Path:
    """Record what a sharded stage is about to do; on --resume, refuse if that differs from the interrupted run
    (its finished shards would not fit). Returns the plan's path, removed by the stage when it completes."""
    path = Path(out) / name
    if resuming:
        if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(plan, default=str)):
            raise UserError(f"cannot resume: the inputs, model or options differ from the interrupted run (or it "
                            f"is not a {stage} run); use --overwrite to start over", path=out)
    else:
        atomic_write_json(path, plan)
    return path
