"""Nothing silently wrong, part 2 (issue 15): train's --resume checks what it resumes, sharded stages check the
parts an earlier run wrote, checkpoints and cached features are verified before use, --overwrite keeps the old
output until the new one is ready, and decoding.py and llm2slm.py no longer import each other."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_jsonl

PACKAGE = Path(__file__).resolve().parents[1] / "llm2slm_cli"
LLM2SLM = [sys.executable, "-m", "llm2slm_cli"]


def _error(cli, *args) -> str:
    """The one `error:` line of a command that must exit with code 2."""
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0].removeprefix("error: ")


def _flip(path: Path, at: int = -5) -> None:
    """One flipped bit, same size: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- the import circle


def _imports(module: str) -> set[str]:
    """The llm2slm_cli modules `module` imports anywhere (inside functions too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm2slm_cli"):
            found.add(node.module.removeprefix("llm2slm_cli").lstrip("."))
            found.update(a.name for a in node.names if node.module == "llm2slm_cli")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("llm2slm_cli.") for a in node.names if a.name.startswith("llm2slm_cli."))
    return found


def test_decoding_and_llm2slm_do_not_import_each_other():
    assert "llm2slm" not in _imports("decoding") or "decoding" not in _imports("llm2slm")
    assert "llm2slm" not in _imports("decoding")  # the shared helpers come from padding.py
    from llm2slm_cli import llm2slm, padding

    assert llm2slm._right_to_left is padding.right_to_left and llm2slm.strip_generated is padding.strip_generated
