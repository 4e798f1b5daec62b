"""Reading examples in every supported format, prompt templates, and padding of token batches.

An example is (id, prompt, target). Inputs are local files -- JSONL, Parquet, CSV/TSV, one text file of prompts, or
two line-aligned text files (prompts, targets) -- or a Hugging Face dataset named `hf:NAME[:CONFIG][:SPLIT]` (needs
network access). Every record is validated here, and a bad one is reported with its file, line (or row) and field.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli.errors import UserError
from llm2slm_cli.runtime import say

TEXT_SUFFIXES = {".txt", ".text", ".src", ".tgt"}
# rows of a table made Python objects at a time (a table of millions of rows never becomes one list)
TABLE_BATCH = 10_000


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    target: str | None
    # Where the record stands in its input ("line 3", "row 2", "line 1, row 0"), for the error messages of later
    # checks (an over-long prompt under --strict); not part of the example's identity.
    place: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Fields:
    """Where an example's parts come from in a record. `template` (str.format syntax over the record's fields, e.g.
    "translate English to German: {src}") builds the prompt; without it the prompt is the `prompt` field."""

    prompt: str = "src"
    target: str | None = "tgt"
    id: str | None = "id"
    template: str | None = None


def _lookup(record: dict[str, Any], name: str) -> Any:
    """`a.b` reaches into nested records (Hugging Face translation datasets: `translation.en`); a column whose name
    has a dot in it is found by its whole name first."""
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):  # a[0]: an item of a list
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(name)
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


def _show(value: Any, limit: int = 60) -> str:
    """A value quoted for an error message: one line, and short whatever the input holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_bytes(path: Path) -> bytes:
    with _open_binary(path) as f:
        try:
            return f.read()
        except OSError as e:
            raise UserError(f"cannot read ({e.strerror or e})", path=path) from None


# What a file that is not text usually is, by its first bytes (none of them starts a line of text).
_NOT_TEXT = {b"\x1f\x8b": "gzip-compressed", b"\xfd7zXZ\x00": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed",
             b"PK\x03\x04": "a zip archive"}


def _not_text(data: bytes) -> str | None:
    for magic, what in _NOT_TEXT.items():
        if data.startswith(magic):
            return f"this is {what}, not text: decompress it first"
    if data[:3] == b"BZh" and data[4:10] == b"1AY&SY":
        return "this is bzip2-compressed, not text: decompress it first"
    if data[:4] == data[-4:] == b"PAR1" and len(data) >= 12:
        return "this is a Parquet file, not text: name it .parquet"
    return None


def _decode_text(data: bytes, path: Path) -> str:
    """A text file's contents: UTF-8, a leading byte order mark dropped. Anything else is refused where it breaks."""
    what = _not_text(data)
    if what:
        raise UserError(what, path=path)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError("UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)", path=path)
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start: e.start].decode("utf-8", "replace")) + 1
        raise UserError(f"invalid UTF-8 at column {column} (byte 0x{data[e.start]:02x})", path=path,
                        line=data.count(b"\n", 0, e.start) + 1) from None
    nul = text.find("\0")
    if nul >= 0:
        raise UserError("NUL byte: a binary or UTF-16 file?", path=path, line=text.count("\n", 0, nul) + 1)
    return text


def split_lines(text: str) -> list[str]:
    """Lines without their ends (LF or CRLF); a final line end adds no empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _decode_lines(path: Path) -> list[str]:
    return [line for _, line in _text_lines(path)]


def _open_binary(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by the caller's `with`)
    except FileNotFoundError:
        raise UserError("no such file", path=path) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file of examples", path=path) from None
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", path=path) from None
    except ValueError as e:  # a NUL character in the name
        raise UserError(f"not a valid file name ({e})", path=_show(str(path))) from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A text file's lines, numbered from 1, without their ends (LF or CRLF), read as they are needed, so a file
    larger than memory reads in constant memory. The checks and messages are _decode_text's, made line by line (a
    line feed byte is never inside a UTF-8 sequence, so decoding line by line finds what decoding the whole does)."""
    with _open_binary(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        if size > 16:  # what _not_text looks at: the first bytes, and the last four (Parquet's footer)
            f.seek(size - 4)
            head += f.read(4)
        what = _not_text(head)
        if what:
            raise UserError(what, path=path)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError("UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)", path=path)
        f.seek(0)
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            raw = raw.removesuffix(b"\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8", "replace")) + 1
                raise UserError(f"invalid UTF-8 at column {column} (byte 0x{raw[e.start]:02x})", path=path,
                                line=n) from None
            if "\0" in line:
                raise UserError("NUL byte: a binary or UTF-16 file?", path=path, line=n)
            yield n, line.removesuffix("\r")


_JSON_SPACE = " \t\n\r"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_error(e: Exception, path: Path, line: int) -> UserError:
    """A decoding failure of the JSON that starts on `line` (json's own positions are relative to that text)."""
    if isinstance(e, json.JSONDecodeError):
        return UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=line + e.lineno - 1)
    if isinstance(e, RecursionError):
        return UserError("malformed JSON (nested too deeply)", path=path, line=line)
    return UserError(f"malformed JSON ({str(e).split(';')[0]})", path=path, line=line)  # huge integer, NaN


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


def records_jsonl(path: Path, text: str | None = None, skip: int = 0
                  ) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """The objects of a JSON Lines file (read line by line), or of `text` when given; the first `skip` records are
    passed over unparsed."""
    lines = _text_lines(path) if text is None else enumerate(split_lines(text), 1)
    for i, line in lines:
        if not line.strip():
            continue
        if skip:
            skip -= 1
            continue
        try:
            rec = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise _json_error(e, path, i) from None
        if not isinstance(rec, dict):
            raise UserError(f"expected a JSON object, got {_json_type(rec)}", path=path, line=i)
        yield {"line": i}, rec


def _records_json(path: Path) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """A .json file: either JSON Lines, or one JSON array of objects (Alpaca style)."""
    text = _decode_text(_read_bytes(path), path)
    head = text.lstrip(_JSON_SPACE)[:1]
    if head == "[":
        yield from _json_array(text, path)
        return
    try:
        yield from records_jsonl(path, text)
    except UserError:
        if head == "{":
            try:
                whole = json.loads(text, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                raise UserError("one JSON object over several lines: give one object per line (JSON Lines) or a "
                                "JSON array of objects", path=path) from None
        raise


def _json_array(text: str, path: Path) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """The objects of a JSON array, each with the line it starts on and its position (row) in the array."""
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    n, pos, line = len(text), 0, 1

    def skip(p: int) -> int:
        nonlocal line
        start = p
        while p < n and text[p] in _JSON_SPACE:
            p += 1
        line += text.count("\n", start, p)
        return p

    def column(p: int) -> int:
        return p - (text.rfind("\n", 0, p) + 1) + 1

    pos = skip(skip(0) + 1)  # past "["
    row = 0
    if pos < n and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            try:
                item, end = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError) as e:
                if isinstance(e, json.JSONDecodeError):
                    raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=path,
                                    line=e.lineno) from None
                raise _json_error(e, path, line) from None
            if not isinstance(item, dict):
                raise UserError(f"expected a JSON object, got {_json_type(item)}", path=path, line=line, row=row)
            yield {"line": line, "row": row}, item
            line += text.count("\n", pos, end)
            pos = skip(end)
            row += 1
            if pos < n and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos = skip(pos + 1)
                break
            raise UserError(f"malformed JSON (expecting ',' or ']' at column {column(pos)})", path=path, line=line)
    if pos < n:
        raise UserError(f"malformed JSON (extra data after the array at column {column(pos)})", path=path, line=line)


def _records_csv(path: Path, delimiter: str) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """CSV/TSV with a header line. Quoting is strict (an unclosed quote is an error, not a field that swallows the
    rest of the file); every row has exactly the header's columns; blank lines are skipped."""
    name = "TSV" if delimiter == "\t" else "CSV"
    text = _decode_text(_read_bytes(path), path)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long documents are fine in a cell
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            why = "a quoted value that never closes" if "end of data" in str(e) else e
            raise UserError(f"malformed {name} ({why})", path=path, line=start) from None
        if not values:
            continue
        if header is None:
            seen: set[str] = set()
            for column in values:
                if column in seen:
                    raise UserError(f"column {_show(column)} appears twice in the header", path=path, line=start)
                seen.add(column)
            header, header_line = values, start
            continue
        if len(values) != len(header):
            raise UserError(f"{len(values)} values, but the header (line {header_line}) has {len(header)} columns",
                            path=path, line=start)
        yield {"line": start}, dict(zip(header, values))


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        _read_bytes(path)  # raises the same "no such file" / "is a directory" errors as the other formats
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"not a readable Parquet file ({e})", path=path) from None
    names = table.column_names
    for column in names:
        if names.count(column) > 1:
            raise UserError(f"column {_show(column)} appears twice", path=path)
    return table


def _records_table(table, path: Path, row0: int = 0) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """The rows of a table (or of one record batch of a larger one, whose first row is `row0`) as records, a
    batch of TABLE_BATCH rows made Python objects at a time."""
    import pyarrow as pa

    conversion_errors = (pa.ArrowException, ValueError, OverflowError, UnicodeDecodeError)
    for start in range(0, table.num_rows, TABLE_BATCH):
        part = table.slice(start, TABLE_BATCH)
        try:
            rows = part.to_pylist()
        except conversion_errors as e:  # find the value: invalid UTF-8 in a string column, a date out of range ...
            for column in part.column_names:
                for row, value in enumerate(part.column(column), row0 + start):
                    try:
                        value.as_py()
                    except UnicodeDecodeError:
                        raise UserError("invalid UTF-8 in a string column", path=path, row=row,
                                        field=column) from None
                    except conversion_errors as bad:
                        raise UserError(f"unreadable value ({bad})", path=path, row=row, field=column) from None
            raise UserError(f"unreadable values ({e})", path=path) from None
        for row, rec in enumerate(rows, row0 + start):
            yield {"row": row}, rec


def _records_parquet_stream(path: Path) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """A Parquet file's rows, one record batch at a time (train --streaming: the file is never read whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        _read_bytes(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"not a readable Parquet file ({e})", path=path) from None
    names = parquet.schema_arrow.names
    for column in names:
        if names.count(column) > 1:
            raise UserError(f"column {_show(column)} appears twice", path=path)
    row0 = 0
    batches = parquet.iter_batches(batch_size=TABLE_BATCH)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"not a readable Parquet file ({e})", path=path) from None
        if batch is None:
            return
        yield from _records_table(pa.Table.from_batches([batch]), path, row0)
        row0 += batch.num_rows


def dataset_source(spec: str) -> tuple[Path, str | None] | None:
    """A directory `datasets` wrote with save_to_disk -- a Dataset, or a DatasetDict named with its split as
    `DIR:SPLIT` -- as (directory, split); None for anything else."""
    path, split = Path(spec), None
    if not path.exists() and ":" in spec:
        base, _, split = spec.rpartition(":")
        path = Path(base)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return path, split or None
    return None


def _records_dataset(directory: Path, split: str | None) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    """The rows of a save_to_disk directory, through datasets.load_from_disk."""
    try:
        import datasets

        ds = datasets.load_from_disk(str(directory))
    except Exception as e:  # noqa: BLE001 -- a damaged directory makes datasets raise many kinds of errors
        raise UserError(f"not a readable `datasets` directory ({type(e).__name__}: {_show(str(e), 200)})",
                        path=directory) from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise UserError(f"a DatasetDict with splits {', '.join(ds)}: name one as {directory}:SPLIT",
                            path=directory)
        split = split or next(iter(ds))
        if split not in ds:
            raise UserError(f"no split {split!r} (the splits: {', '.join(ds)})", path=directory)
        ds, where = ds[split], f"{directory}:{split}"
    elif split is not None:
        raise UserError(f"a Dataset without splits: give {directory} without :{split}", path=directory)
    else:
        where = str(directory)
    yield from _records_table(ds.with_format("arrow")[:], where)


def _read_arrow(path: Path):
    """An .arrow file: the Arrow streaming format `datasets` caches and shards in, or the Arrow file format."""
    import pyarrow as pa

    if not Path(path).is_file():
        _read_bytes(path)  # the usual "no such file" / "is a directory"
    for open_arrow in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.OSFile(str(path)) as source:  # read into memory: the table outlives the file handle
                table = open_arrow(source).read_all()
        except (pa.ArrowException, OSError, ValueError):
            continue
        names = table.column_names
        for column in names:
            if names.count(column) > 1:
                raise UserError(f"column {_show(column)} appears twice", path=path)
        return table
    raise UserError("not a readable Arrow file (neither Arrow's streaming nor its file format)", path=path)


def hf_dataset_parts(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` as (name, config, split); the split defaults to train."""
    parts = re.split(r":(?![^\[]*\])", spec.removeprefix("hf:"))  # a split may be sliced: train[:10000]
    return parts[0], parts[1] if len(parts) > 2 else None, parts[-1] if len(parts) > 1 else "train"


def _records_hf(spec: str, streaming: bool = False) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
    name, config, split = hf_dataset_parts(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # the hub's errors are many and all mean "cannot get this dataset"
        raise UserError(f"cannot load Hugging Face dataset {spec!r}: {e}") from None
    for row, rec in enumerate(ds):
        yield {"row": row}, rec


def read_examples(inputs: Sequence[Path | str], fields: Fields = Fields(), *,
                  require_target: bool = False) -> list[Example]:
    """Read and validate all examples of one input (one path, or two line-aligned text files).

    Every example has a non-empty prompt and a unique id; with `require_target`, a target too. Anything else in the
    input raises UserError naming the file, line or row, and field.
    """
    return list(iter_examples(inputs, fields, require_target=require_target))


def iter_examples(inputs: Sequence[Path | str], fields: Fields = Fields(), *, require_target: bool = False,
                  unique: bool = True, streaming: bool = False, skip: int = 0) -> Iterator[Example]:
    """read_examples one example at a time: JSON Lines and text files are read line by line, so an input larger
    than memory streams through. `unique=False` leaves the check that ids are unique to the caller (a set of every
    id is what costs memory at millions of examples: corpus.py checks their hashes instead). `streaming` reads
    Parquet files a record batch at a time and hub datasets with datasets' streaming (train --streaming). `skip`
    starts after that many examples of an input read and checked before (a stream's resume; the caller knows it is
    the same input by its sha256): JSON Lines and text files pass over their lines unparsed, other formats read
    them and leave them out."""
    if skip:
        if _skips_raw(inputs):
            yield from _iter_examples(inputs, fields, require_target, unique, streaming, skip)
        else:
            yield from itertools.islice(_iter_examples(inputs, fields, require_target, unique, streaming, 0), skip,
                                        None)
        return
    yield from _iter_examples(inputs, fields, require_target, unique, streaming, 0)


def _skips_raw(inputs: Sequence[Path | str]) -> bool:
    """Inputs whose records are lines, which a skip passes over without parsing them."""
    paths = [str(p) for p in inputs]
    if len(paths) == 2:
        return True
    path = Path(paths[0])
    return (not paths[0].startswith("hf:") and dataset_source(paths[0]) is None and not path.is_dir()
            and path.suffix.lower() not in (".arrow", ".json", ".parquet", ".csv", ".tsv"))


def _iter_examples(inputs: Sequence[Path | str], fields: Fields, require_target: bool, unique: bool,
                   streaming: bool, skip: int) -> Iterator[Example]:
    inputs = [str(p) for p in inputs]
    if not inputs or len(inputs) > 2:
        raise UserError("give one input file (JSONL, JSON, Parquet, CSV, TSV, text) or two line-aligned text "
                        "files (prompts, targets)")
    if len(inputs) == 2:
        yield from _read_pairs(Path(inputs[0]), Path(inputs[1]), fields, require_target, unique, skip)
        return
    src = inputs[0]
    if src.startswith("hf:"):
        yield from _examples(_records_hf(src, streaming), src, fields, require_target, unique)
        return
    dataset = dataset_source(src)
    if dataset is not None:
        yield from _examples(_records_dataset(*dataset), src, fields, require_target, unique)
        return
    path = Path(src)
    if path.is_dir():
        yield from _read_labels(path, fields, require_target, unique)
        return
    suffix = path.suffix.lower()
    if suffix == ".arrow":
        records = _records_table(_read_arrow(path), path)
    elif suffix in (".jsonl", ".ndjson"):
        records = records_jsonl(path, skip=skip)
    elif suffix == ".json":
        records = _records_json(path)
    elif suffix == ".parquet":
        records = _records_parquet_stream(path) if streaming else _records_table(_read_parquet(path), path)
    elif suffix == ".csv":
        records = _records_csv(path, ",")
    elif suffix == ".tsv":
        records = _records_csv(path, "\t")
    else:  # any other file: one prompt per line
        records = (({"line": i}, {fields.prompt: line}) for i, line in itertools.islice(_text_lines(path), skip, None))
    yield from _examples(records, path, fields, require_target, unique, start=skip)


def _read_labels(directory: Path, fields: Fields, require_target: bool, unique: bool = True) -> Iterator[Example]:
    """The output directory of distill-labels: prompts with the template already applied, LLM targets."""
    if not (directory / A.MANIFEST).is_file():
        raise UserError(f"a directory without {A.MANIFEST}: give a file of examples, a directory that `datasets` "
                        "saved (save_to_disk; DIR:SPLIT for a DatasetDict), or the output directory of "
                        "distill-labels (if it is one, that run did not finish: continue it with --resume)",
                        path=directory)
    manifest = A.read_manifest(directory, A.KIND_LABELS)
    made_with = manifest.get("template")
    if fields.template is not None and fields.template != made_with:
        raise UserError(f"these labels were made with template {made_with!r}, not {fields.template!r}",
                        path=directory)
    path = directory / A.LABELS
    if not path.is_file():
        raise UserError(f"no {A.LABELS} beside its manifest: the labels are incomplete", path=directory)
    A.verify_file(path, manifest.get("files", {}).get(A.LABELS), "labels file")
    table = _read_parquet(path)
    missing = [c for c in ("id", "prompt", "target") if c not in table.column_names]
    if missing:
        raise UserError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}", path=path)
    kept, empty = 0, []
    for e in _examples(_records_table(table, path), path, Fields(prompt="prompt", target="target", id="id"), False,
                       unique):
        if require_target and not (e.target or "").strip():
            empty.append(e.id)  # the LLM answered nothing: there is nothing to learn from this example
            continue
        kept += 1
        yield e
    if empty:
        say(f"warning: {directory}: skipping {len(empty)} examples the LLM answered with nothing "
            f"(e.g. {empty[0]!r})")
    if not kept:
        raise UserError("no examples with a non-empty LLM answer", path=directory)


def _read_pairs(src: Path, tgt: Path, fields: Fields, require_target: bool, unique: bool = True, skip: int = 0
                ) -> Iterator[Example]:
    """Two line-aligned text files, read side by side line by line (their line counts are compared as they end)."""
    a, b = _text_lines(src), _text_lines(tgt)
    next_a, next_b = next(a, None), next(b, None)  # both files open (and are checked) before the first example

    def pairs() -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
        x, y = next_a, next_b
        while x is not None and y is not None:
            if x[0] > skip:
                yield {"line": x[0]}, {prompt_name: x[1], target_name: y[1]}
            x, y = next(a, None), next(b, None)
        if x is not None or y is not None:
            n_a = x[0] + sum(1 for _ in a) if x is not None else y[0] - 1
            n_b = y[0] + sum(1 for _ in b) if y is not None else x[0] - 1
            raise UserError(f"line count {n_a} differs from {n_b} in {tgt}: line-aligned files must match "
                            f"(line {min(n_a, n_b) + 1} of the longer one has no partner)", path=src)

    prompt_name = fields.prompt
    target_name = fields.target or "tgt"
    pair_fields = Fields(prompt=prompt_name, target=target_name, id=None, template=fields.template)
    for i, ex in enumerate(_examples(pairs(), src, pair_fields, require_target, unique, start=skip), skip + 1):
        if not ex.target or not ex.target.strip():
            raise UserError("empty target", path=tgt, line=i)
        yield ex


class _Record:
    """One input record and where it came from (line and/or row), for error messages."""

    def __init__(self, rec: dict[str, Any], path: Path | str, where: dict[str, int]) -> None:
        self.rec, self.path, self.where = rec, path, where

    def error(self, message: str, field: str | None = None) -> UserError:
        return UserError(message, path=self.path, field=field, **self.where)

    def place(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.where.items())

    def get(self, name: str, *, required: bool = True) -> Any:
        try:
            return _lookup(self.rec, name)
        except KeyError:
            if required:
                names = [k if isinstance(k, str) and k.isprintable() and len(k) <= 40 else _show(k, 40)
                         for k in list(self.rec)[:12]]
                more = f", ... ({len(self.rec) - 12} more)" if len(self.rec) > 12 else ""
                has = f"the record has: {', '.join(names)}{more}" if names else "the record is empty"
                raise self.error(f"missing field ({has})", name) from None
            return None

    def text(self, name: str, value: Any) -> str:
        """A text value: a string, or a number (ids are often numbers). Never null, true/false, a list or object."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            got = "null" if value is None else type(value).__name__
            raise self.error(f"expected text, got {got}", name)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(f"expected text, got the number {value}", name)
        return self.valid(name, str(value))

    def valid(self, name: str, text: str) -> str:
        """Text that every later step can encode: no NUL, no lone surrogate (JSON escapes like \\ud800 make them)."""
        if "\0" in text:
            raise self.error("contains a NUL character", name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.error(f"invalid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
                             f"{e.start + 1}", name) from None
        return text


def _template_path(name: str) -> str:
    """A template field as the field options name it: `{translation.en}` (and str.format's `{translation[en]}`)
    is the field `translation.en`; str.format itself would read `.en` as an attribute, which a record has not."""
    return re.sub(r"\[([^\]]*)\]", r".\1", name)


def _template_value(r: _Record, name: str) -> Any:
    """The record's value for a template field `name` (`src`, `translation.en`, `translation[en]`): text or a
    number."""
    path = _template_path(name)
    value = r.get(path)
    if value is None:
        raise r.error("expected a value for the template, got null", path)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise r.error(f"expected text for the template, got {type(value).__name__}", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise r.error(f"expected text for the template, got the number {value}", path)
    return value


def _render(template: str, r: _Record) -> str:
    """str.format over the record, each field looked up as a field option would be (`_template_path`)."""
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            value = _template_value(r, name)
            if conversion:
                value = {"r": repr, "s": str, "a": ascii}[conversion](value)
            parts.append(format(value, spec or ""))
    return "".join(parts)


def to_examples(records: Iterator[tuple[dict[str, int], dict[str, Any]]], path: Path | str, fields: Fields,
                require_target: bool) -> list[Example]:
    """The checked examples of `records` (pairs of where each stands and its fields), as a list."""
    return list(_examples(records, path, fields, require_target))


def _examples(records: Iterator[tuple[dict[str, int], dict[str, Any]]], path: Path | str, fields: Fields,
              require_target: bool, unique: bool = True, start: int = 0) -> Iterator[Example]:
    """The checked examples of `records`; `start`: how many records came before these (a skip), which numbers
    the examples without an id on from there."""
    if fields.template:
        template_fields(fields.template)  # a malformed template fails before the first record
    count = start
    seen: dict[str, _Record] = {}
    for n, (where, raw) in enumerate(records, start):
        r = _Record(raw, path, where)
        if fields.template:
            try:
                prompt = _render(fields.template, r)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError, OverflowError) as e:
                raise r.error(f"template {_show(fields.template)} does not fit this record ({_show(e)})") from None
            prompt_field = "template"
            prompt = r.valid(prompt_field, prompt)
        else:
            prompt = r.text(fields.prompt, r.get(fields.prompt))
            prompt_field = fields.prompt
        if not prompt.strip():
            raise r.error("empty prompt", prompt_field)

        target = None
        if fields.target:
            value = r.get(fields.target, required=require_target)
            if value is None and require_target:
                raise r.error("missing target (null)", fields.target)
            if value is not None:
                target = r.text(fields.target, value)
                if require_target and not target.strip():
                    raise r.error("empty target", fields.target)

        ex_id, numbered = str(n), True
        if fields.id:
            value = r.get(fields.id, required=False)
            if value is not None:
                ex_id, numbered = r.text(fields.id, value), False
                if not ex_id.strip():
                    raise r.error("empty id", fields.id)
        if unique:
            if ex_id in seen:
                raise r.error(duplicate_id_message(ex_id, seen[ex_id].place(), numbered and bool(fields.id),
                                                   fields.id), fields.id)
            seen[ex_id] = r
        count += 1
        yield Example(ex_id, prompt, target, r.place())
    if not count:
        raise UserError("no examples", path=path)


def duplicate_id_message(ex_id: str, first_place: str, numbered: bool, id_field: str | None) -> str:
    why = f" (a record without '{id_field}' is numbered from 0)" if numbered else ""
    return f"duplicate id {_show(ex_id)}{why} (first at {first_place})"




def pad(sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool = False):
    """Pad token id lists into (ids, attention_mask) LongTensors."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if not len(s):
            continue
        # an array (a memory-mapped corpus row is read-only) is copied as it is widened; a list is converted
        t = torch.from_numpy(s.astype("int64")) if hasattr(s, "astype") else torch.as_tensor(list(s), dtype=torch.long)
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
