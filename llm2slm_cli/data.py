"""Reading examples in every supported format, prompt templates, and padding of token batches.

An example is (id, prompt, target). Inputs are local files -- JSONL, Parquet, CSV/TSV, one text file of prompts, or
two line-aligned text files (prompts, targets) -- or a Hugging Face dataset named `hf:NAME[:CONFIG][:SPLIT]` (needs
network access). Every record is validated here, and a bad one is reported with its file, line (or row) and field.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2slm_cli.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".src", ".tgt"}


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    target: str | None


@dataclass(frozen=True)
class Fields:
    """Where an example's parts come from in a record. `template` (str.format syntax over the record's fields, e.g.
    "translate English to German: {src}") builds the prompt; without it the prompt is the `prompt` field."""

    prompt: str = "src"
    target: str | None = "tgt"
    id: str | None = "id"
    template: str | None = None


def _lookup(record: dict[str, Any], name: str) -> Any:
    """`a.b` reaches into nested records (Hugging Face translation datasets: `translation.en`)."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"invalid --template {template!r}: {e}") from None
    if not names:
        raise UserError(f"--template {template!r} names no field: write it like 'summarize: {{src}}'")
    if any(n == "" or n.isdigit() for n in names):
        raise UserError(f"--template {template!r}: use field names in braces, e.g. {{src}}, not positions")
    return names


def _decode_lines(path: Path) -> list[str]:
    data = _read_bytes(path)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError:
            raise UserError("invalid UTF-8", path=path, line=i) from None
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError("no such file", path=path) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file of examples", path=path) from None
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path=path) from None


def _records_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, line in enumerate(_decode_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=i) from None
        if not isinstance(rec, dict):
            raise UserError(f"expected a JSON object, got {type(rec).__name__}", path=path, line=i)
        yield i, rec


def _records_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file: either JSON Lines, or one JSON array of objects (Alpaca style)."""
    data = _read_bytes(path)
    head = data.lstrip()[:1]
    if head != b"[":
        yield from _records_jsonl(path)
        return
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError("invalid UTF-8", path=path) from None
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg})", path=path, line=e.lineno) from None
    for i, rec in enumerate(items):
        if not isinstance(rec, dict):
            raise UserError(f"item {i}: expected a JSON object, got {type(rec).__name__}", path=path)
        yield i, rec


def _records_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError("invalid UTF-8", path=path, line=line) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for rec in reader:
            if None in rec:
                raise UserError(f"more values than the {len(reader.fieldnames or [])} header columns",
                                path=path, line=reader.line_num)
            yield reader.line_num, rec
    except csv.Error as e:
        raise UserError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})", path=path,
                        line=reader.line_num) from None


def _records_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        _read_bytes(path)  # raises the same "no such file" / "is a directory" errors as the other formats
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"not a readable Parquet file ({e})", path=path) from None
    yield from enumerate(table.to_pylist())


def _records_hf(spec: str) -> Iterator[tuple[int, dict[str, Any]]]:
    parts = re.split(r":(?![^\[]*\])", spec.removeprefix("hf:"))  # a split may be sliced: train[:10000]
    name = parts[0]
    config = parts[1] if len(parts) > 2 else None
    split = parts[-1] if len(parts) > 1 else "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub's errors are many and all mean "cannot get this dataset"
        raise UserError(f"cannot load Hugging Face dataset {spec!r}: {e}") from None
    yield from enumerate(ds)


def _where(kind: str) -> str:
    return "row" if kind in ("parquet", "hf", "json-array") else "line"


def read_examples(inputs: Sequence[Path | str], fields: Fields = Fields(), *,
                  require_target: bool = False) -> list[Example]:
    """Read and validate all examples of one input (one path, or two line-aligned text files)."""
    inputs = [str(p) for p in inputs]
    if not inputs or len(inputs) > 2:
        raise UserError("give one input file (JSONL, JSON, Parquet, CSV, TSV, text) or two line-aligned text "
                        "files (prompts, targets)")
    if len(inputs) == 2:
        return _read_pairs(Path(inputs[0]), Path(inputs[1]), fields, require_target)

    src = inputs[0]
    if Path(src).is_dir():
        return _read_labels(Path(src), fields, require_target)
    if src.startswith("hf:"):
        records, path = _records_hf(src), src
    else:
        path = Path(src)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _records_jsonl(path)
        elif suffix == ".json":
            records = _records_json(path)
        elif suffix == ".parquet":
            records = _records_parquet(path)
        elif suffix == ".csv":
            records = _records_csv(path, ",")
        elif suffix == ".tsv":
            records = _records_csv(path, "\t")
        else:  # any other file: one prompt per line
            records = ((i, {fields.prompt: line}) for i, line in enumerate(_decode_lines(path), 1))
    return _to_examples(records, path, fields, require_target)


def _read_labels(directory: Path, fields: Fields, require_target: bool) -> list[Example]:
    """The output directory of distill-labels: prompts with the template already applied, LLM targets."""
    import pyarrow.parquet as pq

    from llm2slm_cli import artifacts as A

    manifest = A.read_manifest(directory, A.KIND_LABELS)
    if fields.template is not None and fields.template != manifest["template"]:
        raise UserError(f"these labels were made with template {manifest['template']!r}, not {fields.template!r}",
                        path=directory)
    table = pq.read_table(directory / A.LABELS).to_pydict()
    out, empty = [], []
    for ex_id, prompt, target in zip(table["id"], table["prompt"], table["target"]):
        if require_target and not (target or "").strip():
            empty.append(ex_id)  # the LLM answered nothing: there is nothing to learn from this example
            continue
        out.append(Example(ex_id, prompt, target))
    if empty:
        from llm2slm_cli.runtime import say

        say(f"warning: {directory}: skipping {len(empty)} examples the LLM answered with nothing "
            f"(e.g. {empty[0]!r})")
    if not out:
        raise UserError("no examples" + (" with a non-empty LLM answer" if empty else ""), path=directory)
    return out


def _read_pairs(src: Path, tgt: Path, fields: Fields, require_target: bool) -> list[Example]:
    a, b = _decode_lines(src), _decode_lines(tgt)
    if len(a) != len(b):
        raise UserError(f"line count {len(a)} differs from {len(b)} in {tgt}: line-aligned files must match",
                        path=src)
    prompt_name = fields.prompt
    target_name = fields.target or "tgt"
    records = ((i, {prompt_name: s, target_name: t}) for i, (s, t) in enumerate(zip(a, b), 1))
    pair_fields = Fields(prompt=prompt_name, target=target_name, id=None, template=fields.template)
    examples = _to_examples(records, src, pair_fields, require_target)
    for i, ex in enumerate(examples, 1):
        if not ex.target or not ex.target.strip():
            raise UserError("empty target", path=tgt, line=i)
    return examples


class _Record:
    """One input record and where it came from, for error messages."""

    def __init__(self, rec: dict[str, Any], path: Path | str, line: int, by_line: bool) -> None:
        self.rec = rec
        self.where: dict[str, Any] = {"path": path, "line": line} if by_line else {"path": path}
        self.row = "" if by_line else f"row {line}: "

    def error(self, message: str, field: str | None = None) -> UserError:
        return UserError(f"{self.row}{message}", field=field, **self.where)

    def get(self, name: str, *, required: bool = True) -> Any:
        try:
            return _lookup(self.rec, name)
        except KeyError:
            if required:
                raise self.error(f"missing field (the record has: {', '.join(map(str, self.rec))})",
                                 name) from None
            return None

    def text(self, name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(f"expected text, got {type(value).__name__}", name)
        return str(value)


def _to_examples(records: Iterator[tuple[int, dict[str, Any]]], path: Path | str, fields: Fields,
                 require_target: bool) -> list[Example]:
    kind = "hf" if str(path).startswith("hf:") else Path(path).suffix.lower().lstrip(".")
    template_names = template_fields(fields.template) if fields.template else []
    out: list[Example] = []
    seen: dict[str, int] = {}
    for n, (line, raw) in enumerate(records):
        r = _Record(raw, path, line, _where(kind) == "line")
        if fields.template:
            values = {}
            for name in template_names:
                top = name.split("[")[0].split(".")[0]
                values[top] = r.get(top)
            try:
                prompt = fields.template.format(**values)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
                raise r.error(f"template {fields.template!r} does not fit this record ({e})") from None
            prompt_field = "template"
        else:
            prompt = r.text(fields.prompt, r.get(fields.prompt))
            prompt_field = fields.prompt
        if not prompt.strip():
            raise r.error("empty prompt", prompt_field)

        target = None
        if fields.target:
            value = r.get(fields.target, required=require_target)
            if value is not None:
                target = r.text(fields.target, value)
                if require_target and not target.strip():
                    raise r.error("empty target", fields.target)

        ex_id = str(n)
        if fields.id:
            value = r.get(fields.id, required=False)
            if value is not None:
                ex_id = r.text(fields.id, value)
        if ex_id in seen:
            raise r.error(f"duplicate id {ex_id!r} (first seen in record {seen[ex_id] + 1})", fields.id)
        seen[ex_id] = n
        out.append(Example(ex_id, prompt, target))
    if not out:
        raise UserError("no examples", path=path)
    return out


def pad(sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool = False):
    """Pad token id lists into (ids, attention_mask) LongTensors."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if left:
            ids[i, width - len(s):] = t
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = t
            mask[i, : len(s)] = 1
    return ids, mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
