"""Recipes run as written: the smoke recipe chains every available stage through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_says_what_it_is_for_and_how_to_run_it():
    makefiles = sorted((ROOT / "recipes").glob("*/Makefile"))
    assert makefiles
    for path in makefiles:
        head = path.read_text().splitlines()[:6]
        assert head[0].startswith("# ") and any("make" in line for line in head), path


@pytest.mark.slow
def test_smoke_recipe(tmp_path):
    bin_dir = Path(sys.executable).parent
    subprocess.run(["make", "-C", str(ROOT / "recipes" / "smoke"), f"RUNS={tmp_path}",
                    f"LLM2SLM={bin_dir / 'llm2slm'}", f"PYTHON={sys.executable}"], check=True,
                   capture_output=True, text=True)
    for run in ("pred-llm2slm", "pred-slm"):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["kind"] == "predictions" and manifest["counts"]["examples"] == 8
    assert json.loads((tmp_path / "llm2slm" / "manifest.json").read_text())["model"]["llm"]["name"] == "tiny-t5-large"
