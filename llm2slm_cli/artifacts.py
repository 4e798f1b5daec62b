"""Everything about files on disk: names, manifests, fingerprints, atomic writes, output directories.

Every artifact directory a stage writes holds a `manifest.json` that describes it (kind, schema version, tool
version, the stage's configuration, input fingerprints, models, counts, timings). The manifest is written last, so
its presence means the directory is complete; a stage that reads an artifact reads its manifest first and refuses
what does not fit.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from llm2slm_cli.errors import UserError
from llm2slm_cli.version import __version__

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
STREAM_STATE = "stream_state.json"  # train --streaming: the position in the stream (streaming.py)
TOKENIZER_DIR = "tokenizer"
SLM_TOKENIZER_DIR = "slm_tokenizer"
BUNDLED_LLM = "llm"  # an exported checkpoint's own copy of its LLM (export --include-llm)
BUNDLED_LLM_IDENTITY = "llm2slm-llm.json"  # in that copy: the fingerprint of the LLM it copies, and its files' sha256
FINGERPRINT_FILES = "files"  # an LLM identity's fingerprint_kind: its weight files' sha256 (weights_fingerprint)
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


class DiskFull(UserError):
    """The disk (or the user's quota) is full: one line naming the path; what was being written was removed."""


_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(e: BaseException, where: Path | str | None = None) -> bool:
    """Whether `e` means a full disk or quota: an OSError's errno, or the words of the libraries that drop it
    (safetensors' Rust I/O error; Arrow's message). torch.save only says that a write failed: then whether the file
    system at `where` has (almost) no space left decides."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if any(words in text for words in _DISK_FULL_WORDS):
        return True
    if where is not None and isinstance(e, RuntimeError) and ("inline_container" in text or "write failed" in text):
        try:
            return free_space(where) < 1 << 20
        except OSError:
            return False
    return False


def free_space(where: Path | str) -> int:
    """Bytes this user may still write on the file system that holds `where`, or would hold it (its nearest existing
    parent)."""
    place = Path(where)
    while not place.exists() and place != place.parent:
        place = place.parent
    return shutil.disk_usage(place).free


def owned_bytes(directory: Path | str) -> int:
    """What removing `directory` would free: the sizes of its files that have no other hard link (a file linked from
    a cache stays on disk)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    total = 0
    for f in directory.rglob("*"):
        with suppress(OSError):
            st = f.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_size
    return total


def human_bytes(n: int) -> str:
    """A size in decimal units: 2.5 GB, 276.5 GB, 78.0 kB."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_full_error(e: BaseException, path: Path | str) -> DiskFull:
    quota = getattr(e, "errno", None) == errno.EDQUOT or "quota" in str(e).lower()
    return DiskFull(f"{'disk quota exceeded' if quota else 'no space left on device'} while writing here "
                    "(the unfinished file was removed): free some space, then run the command again", path=path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def library_temporaries(directory: Path) -> list[Path]:
    """Files `.tmpXXXXXX` that safetensors (Rust's tempfile) writes beside its target before renaming it: a
    process killed meanwhile leaves one."""
    import re

    return [p for p in Path(directory).glob(".tmp*") if re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name) and p.is_file()]


def remove_temporaries(directory: Path | str | None) -> None:
    """The temporaries this process left in `directory` (files `.NAME.tmp-PID`, directories `.NAME.tmp`, and the
    libraries' own): after a failure, so that nothing half-written stays (none is ever read, but they hold space)."""
    if directory is None or not Path(directory).is_dir():
        return
    for p in Path(directory).glob(".*.tmp*"):
        if p.name.endswith((f".tmp-{os.getpid()}", ".tmp")):
            _remove(p)
    for p in library_temporaries(Path(directory)):
        _remove(p)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed to `path` when the block completes. If the block fails the
    temporary is removed, and a full disk becomes a one-line DiskFull naming `path`."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if is_disk_full(e, path):
            raise disk_full_error(e, path) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(Path(path)) as tmp, open(tmp, "wb") as f:  # closed before it is renamed
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_path(path: Path) -> Path:
    """A temporary sibling name to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    with atomic_output(Path(path)) as tmp:
        pq.write_table(table, tmp)


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


# A checkpoint's own files that its manifest hashes (train, export and checkpoint.save write the records).
CHECKPOINT_FILES = {MODEL_WEIGHTS: "checkpoint weights file", MODEL_CONFIG: "checkpoint config",
                    SLM_CONFIG: "checkpoint SLM config"}
UNVERIFIED_CHECKPOINTS = "LLM2SLM_UNVERIFIED_CHECKPOINTS"  # =1: load checkpoints that have no manifest


CHECKPOINT_DIRS = (TOKENIZER_DIR, SLM_TOKENIZER_DIR)  # every file in them is hashed too ("tokenizer/vocab.json")


def checkpoint_records(directory: Path) -> dict[str, Any]:
    """Size and sha256 of a checkpoint's weights, llm2slm.json, slm_config.json and every file of its tokenizer
    directories, for its manifest."""
    directory = Path(directory)
    records = {name: file_record(directory / name) for name in CHECKPOINT_FILES if (directory / name).is_file()}
    for sub in CHECKPOINT_DIRS:
        for path in sorted(p for p in (directory / sub).rglob("*") if p.is_file()):
            records[path.relative_to(directory).as_posix()] = file_record(path)
    return records


def verify_checkpoint(directory: Path, *, unverified: bool = False) -> dict[str, Any]:
    """A checkpoint's manifest, after its weights and config files were checked against it; refuses a checkpoint
    without a manifest (random bytes in its weights would load silently) unless `unverified` or the environment
    variable LLM2SLM_UNVERIFIED_CHECKPOINTS=1 allows it (then {}). Manifests of older versions hash the weights
    only: their config files are not checked."""
    directory = Path(directory)
    allowed = unverified or os.environ.get(UNVERIFIED_CHECKPOINTS) == "1"
    if not (directory / MANIFEST).is_file():
        if allowed:
            return {}
        raise UserError(f"no {MANIFEST}: this checkpoint's files cannot be verified (damaged weights would load "
                        f"silently); to load it anyway, set {UNVERIFIED_CHECKPOINTS}=1", path=directory)
    manifest = read_manifest(directory, KIND_CHECKPOINT)
    files = manifest.get("files") or {}
    if MODEL_WEIGHTS not in files and not allowed:
        raise UserError(f"the manifest records no sha256 of {MODEL_WEIGHTS}: the weights cannot be verified (set "
                        f"{UNVERIFIED_CHECKPOINTS}=1 to load them anyway)", path=directory / MANIFEST)
    for name, what in CHECKPOINT_FILES.items():
        if name in files:
            verify_file(directory / name, files[name], what)
    recorded = {name for name in files if name.partition("/")[0] in CHECKPOINT_DIRS}
    for name in sorted(recorded):  # manifests of older versions record no tokenizer files: nothing to check there
        verify_file(directory / name, files[name], "checkpoint tokenizer file")
    if recorded:
        for sub in CHECKPOINT_DIRS:
            extra = sorted(p.relative_to(directory).as_posix() for p in (directory / sub).rglob("*")
                           if p.is_file() and p.relative_to(directory).as_posix() not in recorded)
            if extra:
                raise UserError(f"{extra[0]} is not in the checkpoint's manifest (a file added after training "
                                "would change the tokenizer unchecked)", path=directory)
    return manifest


def directory_records(directory: Path) -> dict[str, Any]:
    """Size and sha256 of every file under `directory` (by its path inside it, "tokenizer/vocab.json"), its
    manifest excepted: what a step checkpoint's manifest records, so that everything --resume loads is checked."""
    directory = Path(directory)
    return {name: file_record(directory / name) for name in sorted(_file_names(directory))}


# trainer_state.json of a step checkpoint, as `train` writes it and --resume reads it
TRAINER_STATE_SCHEMA = {"step": int, "total_steps?": int, "seed?": int, "batch_size?": int,
                        "run?": {"options": dict, "inputs": dict}, "loss?": (float, int, type(None)),
                        "dev_loss?": (float, int, type(None))}


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """A step checkpoint's trainer_state.json, refused (one line naming it) unless it has the shape `train` writes
    and its step is the one in the directory's name."""
    path = Path(directory) / TRAINER_STATE
    state = read_json_table(path, "trainer state")
    check_schema(state, TRAINER_STATE_SCHEMA, path)
    named = Path(directory).name.removeprefix("step-")
    if state["step"] < 1 or not named.isdigit() or int(named) != state["step"]:
        raise UserError(f"'step' is {state['step']}, but the checkpoint is {Path(directory).name} (a damaged or "
                        "edited file)", path=path)
    return state


def verify_step_checkpoint(directory: Path) -> dict[str, Any]:
    """Before --resume loads anything from a step checkpoint: every file in it (weights, configs, tokenizer,
    optimizer and scheduler state, RNG states, trainer state) against the size and sha256 its manifest recorded, no
    file that it does not record, and trainer_state.json's shape. Returns the trainer state. A checkpoint of an
    older version, whose manifest records no training state, is refused unless LLM2SLM_UNVERIFIED_CHECKPOINTS=1
    (then only what it records is checked)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        verify_checkpoint(directory)  # refused, unless allowed
        return read_trainer_state(directory)
    manifest = read_manifest(directory, KIND_CHECKPOINT)
    files = manifest.get("files") or {}
    if TRAINER_STATE not in files:
        if os.environ.get(UNVERIFIED_CHECKPOINTS) != "1":
            raise UserError(f"the manifest records no sha256 of the training state ({TRAINER_STATE}, "
                            f"{OPTIMIZER_STATE}): a checkpoint of an older version, which cannot be verified; to "
                            f"resume it anyway, set {UNVERIFIED_CHECKPOINTS}=1", path=directory / MANIFEST)
        verify_checkpoint(directory)
        return read_trainer_state(directory)
    for name in sorted(files):
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"the manifest names a file outside the checkpoint: {name!r}", path=directory / MANIFEST)
        verify_file(directory / name, files[name], _step_file_kind(name))
    extra = sorted(_file_names(directory) - set(files))
    if extra:
        raise UserError("is not in the checkpoint's manifest (a file added after it was written would be loaded "
                        "unchecked)", path=directory / extra[0])
    return read_trainer_state(directory)


def _step_file_kind(name: str) -> str:
    """What a file of a step checkpoint is, for messages ("checkpoint optimizer state is damaged")."""
    if name in CHECKPOINT_FILES:
        return CHECKPOINT_FILES[name]
    if name.partition("/")[0] in CHECKPOINT_DIRS:
        return "checkpoint tokenizer file"
    if name == OPTIMIZER_STATE:
        return "checkpoint optimizer and scheduler state"
    if name == TRAINER_STATE:
        return "checkpoint trainer state"
    if name.startswith("rng_state-"):
        return "checkpoint RNG state"
    return "checkpoint file"


def _file_names(directory: Path) -> set[str]:
    """The files under `directory` by their path inside it, its manifest excepted."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST}


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
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"unreadable manifest ({e})", path=path) from None
    except OSError as e:
        raise UserError(f"cannot read the manifest ({e.strerror or e})", path=path) from None
    if not isinstance(manifest, dict):
        raise UserError(f"the manifest is {_json_kind(manifest)}, expected a table (a JSON object)", path=path)
    if manifest.get("kind") != kind:
        raise UserError(f"is a '{manifest.get('kind')}' artifact, expected '{kind}'", path=directory)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"schema version {manifest.get('schema_version')} is not supported "
                        f"(this tool reads version {SCHEMA_VERSION})", path=path)
    check_schema(manifest, MANIFEST_SCHEMA.get(kind, {}), path)
    return manifest


NONE = type(None)
FILES = "files"  # a schema entry: file name -> {"bytes", "sha256"} (what file_record writes)
_FILE_RECORD = {"bytes": int, "sha256": str}
_LLM_IDENTITY = {"name": str, "kind": str, "layer": (int, str), "d_model": int, "fingerprint": str,
                 "fingerprint_kind?": str, "tokenizer_fingerprint?": (str, NONE)}
_EVERY_KIND = {"config?": dict, "files?": FILES}

# What the readers of each kind take from its manifest, so that a manifest of another shape (edited by hand, cut,
# written by something else) is one line naming the key, never a TypeError deep in a stage. Keys ending in "?" may be
# absent; a value is a JSON type or a tuple of them, a nested table (dict), a list of tables ([table]) or FILES.
MANIFEST_SCHEMA: dict[str, dict[str, Any]] = {
    KIND_FEATURES: {**_EVERY_KIND, "llm": _LLM_IDENTITY, "layer": (int, str), "d_model": int, "max_length": int,
                    "template": (str, NONE), "feature_dtype": str,
                    "shards": [{"file": str, **_FILE_RECORD, "examples?": int}]},
    KIND_LABELS: {**_EVERY_KIND, "template?": (str, NONE), "llm?": (dict, NONE), "logits?": (dict, NONE)},
    KIND_CHECKPOINT: {**_EVERY_KIND, "model?": (dict, NONE), "step?": (int, NONE), "counts?": (dict, NONE)},
    KIND_PREDICTIONS: {**_EVERY_KIND, "model?": (dict, NONE), "generation?": (dict, NONE)},
    KIND_TRAINING: {**_EVERY_KIND, "result?": (dict, NONE), "timing?": (dict, NONE), "inputs?": (dict, NONE),
                    "counts?": (dict, NONE)},
    KIND_EVALUATION: dict(_EVERY_KIND),
}


def _json_kind(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "text", bool: "true/false", NONE: "null", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def check_schema(value: Any, schema: Any, path: Path, where: str = "") -> None:
    """Refuse `value` (a parsed JSON file) unless it has the shape `schema` describes (see MANIFEST_SCHEMA)."""
    def bad(expected: str) -> UserError:
        return UserError(f"'{where or 'the file'}' is {_json_kind(value)}, expected {expected} (a damaged or foreign "
                         "file)", path=path)

    if schema == FILES:
        if not isinstance(value, dict):
            raise bad("a table of file names")
        for name, record in value.items():
            check_schema(record, _FILE_RECORD, path, f"{where}.{name}")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise bad("a table")
        for key, sub in schema.items():
            name = key.removesuffix("?")
            if name in value:
                check_schema(value[name], sub, path, f"{where}.{name}" if where else name)
            elif not key.endswith("?"):
                raise UserError(f"no '{f'{where}.{name}' if where else name}' in it (a damaged or foreign file)",
                                path=path)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise bad("a list")
        for i, item in enumerate(value):
            check_schema(item, schema[0], path, f"{where}[{i}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad(" or ".join(_json_kind(t()) if t is not NONE else "null" for t in types))


def read_json_table(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold a table (an object): one line for a missing, unreadable or other-shaped file."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no {what} here (an incomplete directory?)", path=path) from None
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable {what} ({e})", path=path) from None
    except OSError as e:
        raise UserError(f"cannot read the {what} ({e.strerror or e})", path=path) from None
    if not isinstance(value, dict):
        raise UserError(f"the {what} is {_json_kind(value)}, expected a table (a JSON object)", path=path)
    return value


def read_json_or_none(path: Path, key: str) -> Any:
    """One key of a JSON file, or None when the file is unreadable (for messages about foreign directories)."""
    try:
        return json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


_LOCKS: dict[str, tuple[int, Path]] = {}


def lock_output(out: Path) -> None:
    """Hold an exclusive OS lock (flock) on the output directory `out` until `release_output` (or the process
    ends): a second llm2slm process given the same --out is refused at once, instead of the two writing (or
    --overwrite deleting) each other's files. The lock file `.NAME.lock` sits beside `out` -- inside it --overwrite
    would delete it -- and is removed on release. Taken again by the process that holds it, it is a no-op."""
    import fcntl

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        parent = out.parent.resolve()
    except OSError as e:
        raise UserError(f"cannot create output directory ({e.strerror})", path=out) from None
    key = str(parent / out.name)
    if key in _LOCKS:
        return
    path = parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a parent we may not write to: no lock (the stage's own writes will say what is wrong)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a file system without locks
            raise UserError(f"another llm2slm process{f' (pid {holder})' if holder else ''} is writing this output "
                            "directory: wait for it to finish, or give another --out", path=out) from None
        try:  # its last holder may have removed the file between our open and our lock: lock a fresh one then
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = (fd, path)


def release_output(out: Path | None = None) -> None:
    """Give up the lock on `out` (None: every lock this process holds)."""
    if out is not None:
        out = Path(out)
        try:
            keys = [str(out.parent.resolve() / out.name)]
        except OSError:
            return
    else:
        keys = list(_LOCKS)
    for key in keys:
        if key in _LOCKS:
            fd, path = _LOCKS.pop(key)
            with suppress(OSError):
                path.unlink(missing_ok=True)  # while still locked: a newcomer locks a fresh file
            os.close(fd)


atexit.register(release_output)


# Options of a stage config that may name a local file or directory the stage reads, besides those typed Path: models
# (a hub id or preset is not a path; a directory or .gguf file is), and bench's LABEL=PATH lists.
MODEL_OPTIONS = ("model", "llm", "slm", "verifier", "draft", "source")
LABELLED_OPTIONS = ("model", "speculative", "assistant", "ctranslate2", "llama_cpp", "peer_source", "quality")
ARGUMENT_NAMES = {"inputs": "the input", "predictions": "the predictions", "checkpoint": "the checkpoint",
                  "source": "the source"}


def local_input(spec: Any) -> Path | None:
    """The local file or directory an input `spec` names, or None for what is not on this disk (a hub id, preset:,
    package:, hf: dataset, - for stdin). DIR:SPLIT of a datasets DatasetDict names DIR."""
    text = str(spec).strip() if spec is not None else ""
    if not text or text == "-" or text.startswith(("hf:", "preset:", "package:")):
        return None
    path = Path(text).expanduser()
    if path.exists() or path.is_symlink():
        return path
    base, sep, _ = text.rpartition(":")
    if sep and base and Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    return None


def stage_inputs(config: Any) -> list[tuple[str, str]]:
    """(what, spec) for every option of a stage config that names something it reads: each field typed Path (or a
    list of them), the model options, bench's LABEL=PATH items; never --out. For a checkpoint among them, the LLM it
    records as well (loaded from that path when it is a local one)."""
    found: list[tuple[str, str]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "out" or value is None or not ("Path" in str(f.type) or f.name in MODEL_OPTIONS
                                                    or f.name in LABELLED_OPTIONS):
            continue
        what = (ARGUMENT_NAMES.get(f.name, f"the {f.name}") if f.metadata.get("argument") else
            f"the {f.metadata.get('name') or '--' + f.name.replace('_', '-')} input")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            item = str(item)
            if isinstance(value, list) and f.name in LABELLED_OPTIONS and "=" in item:
                item = item.partition("=")[2].strip()  # LABEL=PATH
            found.append((what, item))
    for what, spec in list(found):
        path = local_input(spec)
        if path is not None and (path / MODEL_CONFIG).is_file():
            llm = read_json_or_none(path / MODEL_CONFIG, "llm")
            if isinstance(llm, dict) and isinstance(llm.get("name"), str):
                found.append((f"the LLM of {what.removeprefix('the ')} {spec}", llm["name"]))
    return found


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path.expanduser())).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compared as written
        return Path(os.path.abspath(path.expanduser()))


def check_out_not_input(out: Path | str | None, config: Any = None,
                        extra: Iterable[tuple[str, Path | str | None]] = ()) -> None:
    """Refuse an --out that is, contains or is inside anything the stage reads (`stage_inputs(config)` and `extra`):
    a stage deletes (--overwrite), replaces or writes into --out, and must never touch what it did not write. Paths
    are compared resolved, symlinks followed; inputs that are not on this disk (hub ids, presets) are not paths.
    Called first, before anything is read, locked or written."""
    if out is None or str(out) == os.devnull:
        return
    target = _resolved(Path(out))
    inputs = [*(stage_inputs(config) if config is not None else []), *extra]
    for what, spec in inputs:
        path = local_input(spec)
        if path is None:
            continue
        source = _resolved(path)
        if source == target:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "is inside"
        else:
            continue
        both = f" ({target} and {source})" if (str(target), str(source)) != (str(out), str(spec)) else ""
        raise UserError(f"--out {out} {relation} {what} {spec}{both}: a stage never writes where it reads (it "
                        "would replace or delete it): give another --out")


def check_output_dir(out: Path, *, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> bool:
    """Refuse an output directory a stage may not write, before any work, and without changing it; returns whether
    it holds files. Another llm2slm process writing `out` is refused first (`lock_output`, held from now on); a
    directory with files in it unless the user asked to overwrite or to resume it; a finished run to resume."""
    out = Path(out)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    lock_output(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", path=out)
    has_content = out.is_dir() and any(out.iterdir())
    if has_content and not (overwrite or resume):
        hint = " or --resume to continue an interrupted run" if resumable else ""
        raise UserError(f"output directory exists and is not empty: pass --overwrite to replace it{hint}", path=out)
    if resume and has_content and (out / MANIFEST).is_file():
        raise UserError("this run already finished (manifest.json present); nothing to resume", path=out)
    return has_content


def prepare_output_dir(out: Path, *, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> bool:
    """Create `out` for a stage; returns True when there is earlier work in it to resume.

    A directory with files in it is refused unless the user asked to overwrite it (its contents are removed) or to
    resume (its contents are kept and the stage continues where it stopped); see `check_output_dir`. Stages call
    this only once their inputs, models and options have passed every check, so that --overwrite never deletes the
    previous output for a run that cannot happen.
    """
    out = Path(out)
    has_content = check_output_dir(out, overwrite=overwrite, resume=resume, resumable=resumable)
    if has_content and overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory ({e.strerror})", path=out) from None
    return bool(resume and has_content)


def replace_output_dir(built: Path, out: Path) -> None:
    """Put the directory `built` (a complete output, written beside `out`) in the place of `out`: the previous output
    is only removed once the new one is there, so a refused or failed run leaves it as it was."""
    built, out = Path(built), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(built, out)
    _remove(old)


def building_dir(out: Path) -> Path:
    """A fresh temporary sibling of `out` to build a whole output in (for `replace_output_dir`)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create output directory ({e.strerror})", path=out) from None
    return tmp


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
