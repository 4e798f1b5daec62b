"""export quotes only what it verified: metrics whose sha256 eval recorded, and a full disk names the destination."""

import errno
import json
import os
import shutil

import pytest


@pytest.fixture()
def scored(cli, trained_checkpoint, toy_files, tmp_path):
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    cli("generate", toy_files["dev"], "--model", trained_checkpoint, "--out", pred, "--num-beams", 1,
        "--max-new-tokens", 4, "--quiet")
    cli("eval", pred, "--out", ev, "--metrics", "chrf", "--quiet")
    return ev


def test_export_refuses_a_hand_edited_metrics_file(cli, trained_checkpoint, scored, tmp_path):
    metrics = json.loads((scored / "metrics.json").read_text())
    metrics["metrics"]["chrf"]["score"] = 99.0  # a number the eval never measured
    (scored / "metrics.json").write_text(json.dumps(metrics))
    result = cli("export", trained_checkpoint, "--out", tmp_path / "x", "--eval", scored, "--quiet", code=2)
    assert "metrics file is damaged" in result.output and str(scored / "metrics.json") in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_export_quotes_untouched_metrics(cli, trained_checkpoint, scored, tmp_path):
    cli("export", trained_checkpoint, "--out", tmp_path / "x", "--eval", scored, "--quiet")
    score = json.loads((scored / "metrics.json").read_text())["metrics"]["chrf"]["score"]
    assert f"{score:.2f}"[:4] in (tmp_path / "x" / "README.md").read_text()


def test_export_on_a_full_disk_names_the_destination(cli, trained_checkpoint, tmp_path, monkeypatch):
    def full(*args, **kwargs):  # what shutil's copy raises when the destination's disk fills: source named first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(trained_checkpoint / "model.safetensors"), None,
                      str(tmp_path / "x" / "model.safetensors"))

    monkeypatch.setattr(shutil, "copyfile", full)
    result = cli("export", trained_checkpoint, "--out", tmp_path / "x", "--quiet", code=2)
    line = result.output.strip()
    assert "no space left on device" in line and str(tmp_path / "x") in line, line
    assert str(trained_checkpoint) not in line and len(line.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]
