"""Training splits at any size, on `datasets`: read once, tokenized once, then read memory-mapped.

A split passes through two cache entries, each an Arrow file that `datasets` wrote and a small `corpus.json`
beside it (what made it, its rows, its files' sizes), under --data-cache (default: datasets' own cache folder,
HF_DATASETS_CACHE, then llm2slm/):

    examples-<key>/   id, prompt (template applied), target, place: every record read and checked once (errors
                      name the file and line as read_examples does); key: the input files' sha256, the fields, the
                      template
    tokens-<key>/     prompt_ids, target_ids (int32), their lengths, truncated: `Dataset.map(batched=True,
                      num_proc=N)` over the examples, with the same tokenization as `generate` and `encode`
                      (runtime.tokenize_prompts / tokenize_targets); key: the examples' key, both tokenizers'
                      fingerprints, the two length limits

A second run, a `--resume` and every process of an `accelerate launch` open the entries instead of reading the
input again: no Python object per example is made, and lengths come from the Arrow columns as numpy arrays. An entry
is built under a temporary name and renamed (complete or absent), by one process at a time (a file lock); an entry
whose files differ from its record is built again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.data import Example, Fields, iter_examples
from llm2slm_cli.errors import UserError
from llm2slm_cli.fingerprints import tokenizer_fingerprint

SCHEMA = 1
RECORD = "corpus.json"
# from this many examples on, tokenization runs in one process per CPU core (below, starting them costs more)
PARALLEL_FROM = 100_000
WRITE_BATCH = 10_000


def default_cache() -> Path:
    """$LLM2SLM_DATA_CACHE, else datasets' cache folder (HF_DATASETS_CACHE)/llm2slm."""
    import datasets.config

    return Path(os.environ.get("LLM2SLM_DATA_CACHE") or Path(datasets.config.HF_DATASETS_CACHE) / "llm2slm")


# exercises what a vocabulary fingerprint does not see: special tokens added (a Llama tokenizer adds BOS to the same
# vocabulary GPT-2's does not), normalisation, white space, digits, accents
PROBE = "Hello,  World!\t42 times; caf\u00e9 na\u00efve \u00dcber \u2014 end."


def tokenizer_identity(tok) -> str:
    """What makes two tokenizers give the same ids: the vocabulary (fingerprints.tokenizer_fingerprint), the class,
    the special ids, the sides it pads and truncates, and its ids for PROBE with and without special tokens."""
    facts = [tokenizer_fingerprint(tok), type(tok).__name__, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
             tok.unk_token_id, getattr(tok, "padding_side", None), getattr(tok, "truncation_side", None),
             tok(PROBE, add_special_tokens=True, verbose=False)["input_ids"],
             tok(PROBE, add_special_tokens=False, verbose=False)["input_ids"]]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()


def take(column, indices: Sequence[int]):
    """`column.take(indices)` of a chunked (memory-mapped) column, chunk by chunk: pyarrow's own take on a
    ChunkedArray concatenates every chunk first, which reads the whole column into memory (gigabytes at millions of
    rows) to fetch a batch. Returns a plain array in the order of `indices`."""
    import numpy as np
    import pyarrow as pa

    indices = np.asarray(indices, dtype=np.int64)
    starts = np.cumsum([0] + [len(c) for c in column.chunks])
    which = np.searchsorted(starts, indices, side="right") - 1
    if len(indices) and (indices.min() < 0 or indices.max() >= starts[-1]):
        raise IndexError(f"row {int(indices.max())} of a column of {int(starts[-1])} rows")
    order = np.argsort(which, kind="stable")  # grouped by chunk, in request order within one
    pieces = [column.chunk(int(c)).take(pa.array(indices[order[which[order] == c]] - starts[c]))
              for c in np.unique(which)]
    if not pieces:
        return pa.array([], type=column.type)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(pieces).take(pa.array(inverse))


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"schema": SCHEMA, **parts}, sort_keys=True).encode()).hexdigest()[:32]


class Examples:
    """The checked examples of one split, memory-mapped (the `examples-<key>` entry)."""

    def __init__(self, entry: Path, record: dict[str, Any]) -> None:
        from datasets import Dataset

        self.entry, self.key, self.record = entry, record["key"], record
        self.dataset = Dataset.from_file(str(entry / "examples.arrow"))
        self.table = self.dataset.data.table

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: Sequence[int]) -> list[Example]:
        """These examples (in this order) as data.Example objects."""
        columns = [take(self.table.column(name), indices).to_pylist() for name in ("id", "prompt", "target", "place")]
        return [Example(*fields) for fields in zip(*columns)]

    def __getitem__(self, i: int) -> Example:
        return self.rows([i])[0]

    @property
    def has_targets(self) -> bool:
        return self.table.column("target").null_count < len(self)

    def ids(self, indices: Sequence[int]) -> list[str]:
        return take(self.table.column("id"), indices).to_pylist()


class Tokens:
    """The tokenized examples of one split, memory-mapped (the `tokens-<key>` entry): rows as int32 arrays."""

    def __init__(self, examples: Examples, entry: Path, record: dict[str, Any]) -> None:
        import pyarrow as pa
        from datasets import Dataset

        self.examples, self.entry, self.record = examples, entry, record
        self.table = pa.concat_tables([Dataset.from_file(str(entry / name)).data.table
                                       for name in sorted(record["files"])])
        self.prompt_lengths = self.table.column("prompt_length").to_numpy()
        self.target_lengths = (self.table.column("target_length").to_numpy()
                               if "target_length" in self.table.column_names else None)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, column: str, indices: Sequence[int]) -> list:
        """The token ids of `column` ("prompt_ids" or "target_ids") of these examples, each an int32 array."""
        taken = take(self.table.column(column), indices)
        values = taken.flatten().to_numpy()
        offsets = taken.offsets.to_numpy()
        offsets = offsets - offsets[0]
        return [values[offsets[k]: offsets[k + 1]] for k in range(len(taken))]

    def chunks(self, column: str, size: int = WRITE_BATCH) -> Iterator[tuple[range, list]]:
        """Every example's rows of `column`, `size` examples at a time: (their indices, their rows)."""
        for start in range(0, len(self), size):
            indices = range(start, min(start + size, len(self)))
            yield indices, self.rows(column, indices)

    def all_tokens(self, column: str):
        """Every token id of `column`, one flat int32 array per Arrow chunk (for counting, e.g. --trim-vocab)."""
        return [chunk.flatten().to_numpy() for chunk in self.table.column(column).chunks]

    @property
    def truncated_flags(self):
        return self.table.column("truncated").to_numpy(zero_copy_only=False)

    @property
    def truncated(self) -> int:
        return int(self.truncated_flags.sum())


def input_sha256(inputs: Sequence[Path | str], cache: Path | None = None) -> str | None:
    """artifacts.input_sha256 of a stage's inputs, remembered in the data cache by each file's (path, size,
    modification time, inode), as `datasets` keys its own cache: a second run over a corpus of gigabytes does not
    read it all again to know it is the same. An input it cannot read is refused as the readers refuse it ("no such
    file", "cannot read (...)"), before anything else."""
    try:
        return _remembered_sha256(inputs, cache)
    except (OSError, ValueError):
        for _ in iter_examples(inputs, Fields(prompt="", target=None, id=None)):
            break  # what is wrong is what reading says first
        raise


def _remembered_sha256(inputs: Sequence[Path | str], cache: Path | None) -> str | None:
    paths = [Path(p) for p in inputs]
    if any(str(p).startswith("hf:") for p in inputs) or not paths or not all(p.is_file() for p in paths):
        return A.input_sha256(inputs)  # a hub dataset, or directories: as they are
    stats = []
    for p in paths:
        st = p.stat()
        stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    memo = Path(cache if cache is not None else default_cache()) / "sha256" / f"{_key({'files': stats})}.json"
    try:
        return json.loads(memo.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = A.input_sha256(inputs)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        A.atomic_write_json(memo, {"sha256": sha, "files": stats})
    except OSError:  # a read-only cache: hashed again next time
        pass
    return sha


def open_examples(inputs: Sequence[Path | str], fields: Fields, *, require_target: bool, cache: Path | None,
                  input_sha: str | None, quiet: bool = False) -> Examples:
    """The examples of `inputs`, read and checked once: from the cache when an entry for the same input files,
    fields and template is there, else read now (in the input's order) and added."""
    cache = Path(cache) if cache is not None else default_cache()
    made_from = {"inputs_sha256": input_sha, "fields": [fields.prompt, fields.target, fields.id],
                 "template": fields.template, "require_target": require_target}
    if input_sha is None:  # a hub dataset: nothing of ours to fingerprint, so read each time, kept for this run only
        cache = _run_cache()
    key = _key({"kind": "examples", **made_from})
    entry = _entry(cache, f"examples-{key}", lambda tmp: _write_examples(inputs, fields, require_target, tmp),
                   {"kind": "examples", "key": key, "made_from": made_from}, quiet)
    return Examples(entry, _read_record(entry))


def _run_cache() -> Path:
    """A cache folder of this process only, removed when it exits."""
    import atexit
    import tempfile

    global _RUN_CACHE
    if _RUN_CACHE is None:
        _RUN_CACHE = Path(tempfile.mkdtemp(prefix="llm2slm-data-"))
        atexit.register(shutil.rmtree, _RUN_CACHE, True)
    return _RUN_CACHE


_RUN_CACHE: Path | None = None


def prompt_tokens(examples: Examples, tokenizer, max_length: int, *, strict: bool, inputs: Sequence,
                  num_proc: int | None = None, quiet: bool = False) -> Tokens:
    """The prompts alone tokenized (encode, generate, distill-labels), as open_tokens; with `strict`, an over-long
    prompt is refused with the message of runtime.tokenize_prompts (the first one, and how many there are)."""
    import numpy as np

    tokens = open_tokens(examples, tokenizer, None, max_length=max_length, max_target_length=None,
                         num_proc=num_proc, quiet=quiet)
    n_long = tokens.truncated
    if strict and n_long:
        e = examples[int(np.flatnonzero(tokens.truncated_flags)[0])]
        full = len(tokenizer(e.prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
        raise UserError(f"{runtime.places(inputs, [e])[0]}: prompt has {full} tokens, over --max-length "
                        f"{max_length} ({n_long} such prompt{'s' if n_long > 1 else ''}; drop --strict to truncate "
                        "them)")
    return tokens


def open_tokens(examples: Examples, prompt_tokenizer, target_tokenizer, *, max_length: int,
                max_target_length: int | None, num_proc: int | None = None, quiet: bool = False) -> Tokens:
    """The examples tokenized: from the cache, or now with `Dataset.map(batched=True, num_proc=...)` (default: one
    process per CPU core from PARALLEL_FROM examples on); the rows are the same whatever the number of processes.
    Without a target tokenizer, the prompts only."""
    made_from = {"examples": examples.key, "prompt_tokenizer": tokenizer_identity(prompt_tokenizer),
                 "target_tokenizer": tokenizer_identity(target_tokenizer) if target_tokenizer is not None else None,
                 "max_length": max_length,
                 "max_target_length": max_target_length}
    key = _key({"kind": "tokens", **made_from})
    if num_proc is None:
        num_proc = (os.cpu_count() or 1) if len(examples) >= PARALLEL_FROM else 1
    num_proc = max(1, min(num_proc, len(examples)))

    def build(tmp: Path) -> dict[str, Any]:
        return _write_tokens(examples, prompt_tokenizer, target_tokenizer, max_length, max_target_length, num_proc,
                             tmp, quiet)

    entry = _entry(examples.entry.parent, f"tokens-{key}", build, {"kind": "tokens", "key": key,
                                                                    "made_from": made_from}, quiet)
    return Tokens(examples, entry, _read_record(entry))


# ------------------------------------------------------------------------------------------------ cache entries


def _entry(cache: Path, name: str, build, record: dict[str, Any], quiet: bool) -> Path:
    """The entry `name` in `cache`: as it is when sound, else built by `build(tmp)` (which writes its files into
    tmp and returns counts for the record) and renamed into place. One process builds; the others wait for it."""
    from filelock import FileLock

    entry = cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data cache ({e.strerror or e}): give --data-cache DIR",
                        path=cache) from None
    with FileLock(str(cache / f".{name}.lock")):
        damage = _damage(entry) if entry.exists() else "absent"
        if damage is None:
            return entry
        if damage != "absent":
            runtime.say(f"warning: the data cache entry {entry} is damaged ({damage}): building it again")
            shutil.rmtree(entry, ignore_errors=True)
        tmp = cache / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            counts = build(tmp)
            files = {p.name: {"bytes": p.stat().st_size} for p in sorted(tmp.glob("*.arrow"))}
            A.atomic_write_json(tmp / RECORD, {**record, "schema": SCHEMA, "files": files, **counts,
                                               "created": A.now()})
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _read_record(entry: Path) -> dict[str, Any]:
    return json.loads((entry / RECORD).read_text())


def _damage(entry: Path) -> str | None:
    """What is wrong with an entry (its record unreadable, a file missing or of another size); None if nothing."""
    try:
        record = _read_record(entry)
        if record.get("schema") != SCHEMA:
            return f"schema {record.get('schema')}, expected {SCHEMA}"
        for name, info in record["files"].items():
            size = (entry / name).stat().st_size
            if size != info["bytes"]:
                return f"{name} has {size} bytes, its record says {info['bytes']}"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable record ({e})"
    return None


# ------------------------------------------------------------------------------------------------ building


def _write_examples(inputs: Sequence[Path | str], fields: Fields, require_target: bool, tmp: Path) -> dict:
    """Read and check every record into examples.arrow, streaming (constant memory for JSON Lines and text). Ids
    are checked for uniqueness by their 64-bit hashes (a set of millions of strings would not fit the memory this
    is for); a repeated hash is then looked at exactly, and the first repeated id refused as read_examples would."""
    import numpy as np
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"id": Value("string"), "prompt": Value("string"), "target": Value("string"),
                         "place": Value("string")})
    hashes = []
    batch: dict[str, list] = {name: [] for name in features}
    path = tmp / "examples.arrow"
    with ArrowWriter(features=features, path=str(path), writer_batch_size=WRITE_BATCH) as writer:
        for e in iter_examples(inputs, fields, require_target=require_target, unique=False):
            batch["id"].append(e.id)
            batch["prompt"].append(e.prompt)
            batch["target"].append(e.target)
            batch["place"].append(e.place)
            if len(batch["id"]) == WRITE_BATCH:
                hashes.append(np.fromiter((hash(i) for i in batch["id"]), np.int64, len(batch["id"])))
                writer.write_batch(batch)
                batch = {name: [] for name in features}
        if batch["id"]:
            hashes.append(np.fromiter((hash(i) for i in batch["id"]), np.int64, len(batch["id"])))
            writer.write_batch(batch)
        rows, _ = writer.finalize()
    _check_unique(np.concatenate(hashes), inputs, fields, require_target)
    return {"rows": rows}


def _check_unique(hashes, inputs: Sequence[Path | str], fields: Fields, require_target: bool) -> None:
    """Two examples whose ids hash alike: read the input again with the exact check (a set of every id), which
    refuses the first repeated id with read_examples' very message, or passes if the hashes only collided."""
    import numpy as np

    ordered = np.sort(hashes, kind="stable")
    if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        for _ in iter_examples(inputs, fields, require_target=require_target, unique=True):
            pass


def _tokenize(batch: dict[str, list], prompt_tokenizer, target_tokenizer, max_length: int,
              max_target_length: int) -> dict[str, list]:
    prompt_ids, truncated = runtime.tokenize_prompts(prompt_tokenizer, batch["prompt"], max_length)
    out = {"prompt_ids": prompt_ids, "prompt_length": [len(p) for p in prompt_ids], "truncated": truncated}
    if target_tokenizer is not None:
        target_ids = runtime.tokenize_targets(target_tokenizer, [t or "" for t in batch["target"]],
                                              max_target_length)
        out.update(target_ids=target_ids, target_length=[len(t) for t in target_ids])
    return out


def _write_tokens(examples: Examples, prompt_tokenizer, target_tokenizer, max_length: int, max_target_length: int,
                  num_proc: int, tmp: Path, quiet: bool) -> dict:
    from datasets import Features, List, Value
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # our stages show their own messages
    columns = {"prompt_ids": List(Value("int32")), "prompt_length": Value("int32"), "truncated": Value("bool")}
    if target_tokenizer is not None:
        columns.update(target_ids=List(Value("int32")), target_length=Value("int32"))
    features = Features(columns)
    runtime.say(f"tokenizing {len(examples):,} examples once ({num_proc} process{'es' if num_proc > 1 else ''}); "
                f"cached in {tmp.parent}", quiet or len(examples) < PARALLEL_FROM)
    tokens = examples.dataset.map(
        _tokenize, batched=True, batch_size=WRITE_BATCH, writer_batch_size=WRITE_BATCH, num_proc=num_proc if
        num_proc > 1 else None, remove_columns=examples.dataset.column_names, features=features,
        cache_file_name=str(tmp / "tokens.arrow"), load_from_cache_file=False,
        fn_kwargs={"prompt_tokenizer": prompt_tokenizer, "target_tokenizer": target_tokenizer,
                   "max_length": max_length, "max_target_length": max_target_length})
    rows = tokens.num_rows
    del tokens
    for stray in tmp.glob("cache-*.arrow"):  # what map may leave besides the named files
        stray.unlink()
    return {"rows": rows, "num_proc": num_proc}
