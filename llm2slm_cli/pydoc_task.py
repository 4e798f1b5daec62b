"""A real summarisation task that every machine has offline: Python functions -> the first line of their docstring.

The functions come from the Python standard library's own source, read with `ast`. The prompt is the function's
code with its docstring removed; the target is the docstring's first sentence line. Splits are by source file (a
hash of its path), so no file contributes to two splits. Run:

    python -m llm2slm_cli.pydoc_task --out data/pydoc [--max-train N --max-dev N --max-test N]

which writes train.jsonl, dev.jsonl, test.jsonl (id, src, tgt, file) and a manifest with the Python version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

from llm2slm_cli import artifacts as A

_GOOD_SUMMARY = re.compile(r"^[A-Z][A-Za-z0-9 ,.'()_\-]+\.$")


def _summary(doc: str) -> str | None:
    first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    words = first.split()
    if not 4 <= len(words) <= 16 or not _GOOD_SUMMARY.match(first):
        return None
    return first


def _without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, source: str) -> str | None:
    lines = source.splitlines()
    doc = node.body[0]
    start, end = node.lineno - 1, node.end_lineno
    if node.decorator_list:
        start = node.decorator_list[0].lineno - 1
    kept = lines[start: doc.lineno - 1] + lines[doc.end_lineno: end]
    if len(kept) < 3:  # a signature and nothing else says too little
        return None
    indent = min(len(line) - len(line.lstrip()) for line in kept if line.strip())
    return "\n".join(line[indent:] for line in kept).strip()


def extract(stdlib: Path | None = None, max_chars: int = 1500) -> list[dict[str, str]]:
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or node.name.startswith("__"):
                continue
            summary = _summary(doc)
            code = _without_docstring(node, source) if summary else None
            if not code or len(code) > max_chars:
                continue
            rows.append({"id": f"{rel}:{node.lineno}", "src": code, "tgt": summary, "file": rel})
    return rows


def split_of(file: str) -> str:
    bucket = int(hashlib.sha256(file.encode()).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "dev" if bucket < 4 else "train"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-dev", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    args = parser.parse_args(argv)
    rows = extract()
    limits = {"train": args.max_train, "dev": args.max_dev, "test": args.max_test}
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "dev", "test"):
        chosen = [r for r in rows if split_of(r["file"]) == split]
        # a spread over the whole library rather than its first files, the same on every run
        chosen.sort(key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        chosen = chosen[: limits[split]] if limits[split] else chosen
        A.atomic_write_bytes(args.out / f"{split}.jsonl",
                             "".join(json.dumps(r) + "\n" for r in chosen).encode())
        counts[split] = len(chosen)
    A.atomic_write_json(args.out / "manifest.json", {
        "kind": "pydoc-task", "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
        "counts": counts, "functions_found": len(rows)})
    print(f"{counts} examples from {len(rows)} documented functions of Python {sys.version.split()[0]} "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
