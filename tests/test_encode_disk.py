"""`encode` says how much disk its features take before it encodes, and refuses (one line, --out as it was) when the
file system that holds --out cannot take them: on --resume only the shards still to do count, with --overwrite the
files it replaces count as free. The free space is faked through shutil.disk_usage, which the stage reads."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import error_line, write_jsonl
from safetensors import safe_open

from llm2slm_cli import artifacts as A
from llm2slm_cli.config import EncodeConfig
from llm2slm_cli.features import feature_bytes, index_bytes
from llm2slm_cli.stages import encode

ESTIMATE = re.compile(r"^features: ([\d,]+) tokens x (\d+) x (\d+) bytes = [\d.]+ [kMGT]?B \(([\d,]+) bytes\) "
                      r"in (.+)$", re.MULTILINE)
OPTIONS = ["--model", "tiny-t5-large", "--shard-size", "7", "--batch-size", "4", "--device", "cpu"]
Usage = collections.namedtuple("Usage", "total used free")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """25 prompts of varied length: four shards of 7, 7, 7 and 4."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"id": f"e{i}", "src": " ".join(words[(i * 7 + j) % 6] for j in range(1 + i % 7))} for i in range(25)]
    return write_jsonl(tmp_path_factory.mktemp("disk") / "d.jsonl", rows)


@pytest.fixture(scope="module")
def encoded(cli, prompts, tmp_path_factory) -> tuple[Path, str]:
    """One run with room on the disk (not --quiet): its directory and what it printed."""
    out = tmp_path_factory.mktemp("encoded") / "f"
    return out, cli("encode", prompts, *OPTIONS, "--out", out).output


def _shapes(out: Path) -> list[tuple[int, ...]]:
    shapes = []
    for f in sorted(out.glob("features-*.safetensors")):
        with safe_open(f, framework="pt") as st:
            sl = st.get_slice("features")
            assert sl.get_dtype() == "F16"
            shapes.append(tuple(sl.get_shape()))
    return shapes


def _need(out: Path, shards: set[int] | None = None) -> int:
    """What the run in `out` needed on disk, from its index alone (all shards, or only `shards` still to do)."""
    import pyarrow.parquet as pq

    index = pq.read_table(out / "index.parquet").to_pylist()
    d_model = json.loads((out / "manifest.json").read_text())["d_model"]
    todo = [r for r in index if shards is None or r["shard"] in shards]
    tokens = sum(r["length"] for r in todo)
    return (feature_bytes(tokens, d_model, "float16") + index_bytes(tokens, len(todo))
            + index_bytes(sum(r["length"] for r in index), len(index)))


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(A.shutil, "disk_usage", lambda path: Usage(1 << 50, 0, free))


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_size_arithmetic():
    assert feature_bytes(4_500_000 * 30, 1024, "float16") == 276_480_000_000  # WMT14 En-De at 30 tokens a prompt
    assert feature_bytes(563, 96, "bfloat16") == 108_096
    assert index_bytes(10, 2) == 4 * 10 + 64 * 2
    assert [A.human_bytes(n) for n in (276_480_000_000, 2_500_000_000, 108_096, 999, 0)] == \
        ["276.5 GB", "2.5 GB", "108.1 kB", "999 bytes", "0 bytes"]


def test_owned_bytes_leaves_out_hard_linked_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "own").write_bytes(b"x" * 10)
    (tmp_path / "elsewhere").write_bytes(b"y" * 100)
    os.link(tmp_path / "elsewhere", tmp_path / "d" / "linked")  # what a --cache entry shares: freed by nothing
    assert A.owned_bytes(tmp_path / "d") == 10
    assert A.owned_bytes(tmp_path / "missing") == 0


def test_the_printed_estimate_is_the_size_of_the_feature_tensors(encoded):
    out, output = encoded
    (line,) = ESTIMATE.findall(output)
    tokens, d_model, element, total, where = line
    shapes = _shapes(out)
    assert len(shapes) == 4 and {s[1] for s in shapes} == {96}
    rows = sum(s[0] for s in shapes)
    assert (_number(tokens), int(d_model), int(element), where) == (rows, 96, 2, str(out))
    assert _number(total) == rows * 96 * 2 == sum(s[0] * s[1] for s in shapes) * 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimate"] == {"bytes": rows * 96 * 2} and manifest["counts"]["tokens"] == rows
    assert output.index("features: ") < output.index("encoded 25 prompts")  # said before the work


def test_too_little_space_is_refused_before_anything_is_written(cli, prompts, encoded, tmp_path, monkeypatch):
    need = _need(encoded[0])
    out = tmp_path / "f"
    _free(monkeypatch, need - 1)
    msg = error_line(cli, "encode", prompts, *OPTIONS, "--out", out)
    assert msg == (f"{out}: the features need {A.human_bytes(need)} on disk ({need:,} bytes with the index) but its "
                   f"file system has {A.human_bytes(need - 1)} free: free some space, or give an --out on a larger "
                   "disk, or skip the feature files: `train --llm MODEL` without --features encodes each batch on the "
                   "fly")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file left either
    _free(monkeypatch, need)  # exactly enough: it runs, and --quiet says nothing
    result = cli("encode", prompts, *OPTIONS, "--out", out, "--quiet")
    assert result.output == ""
    _same_files(encoded[0], out)


def test_overwrite_counts_the_files_it_replaces_as_free(cli, prompts, encoded, tmp_path, monkeypatch):
    out = tmp_path / "f"
    shutil.copytree(encoded[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replaced = sum(p.stat().st_size for p in out.iterdir())
    need = _need(encoded[0])
    _free(monkeypatch, need - replaced - 1)
    msg = error_line(cli, "encode", prompts, *OPTIONS, "--out", out, "--overwrite", "--quiet")
    assert f"has {A.human_bytes(need - 1)} free (with the files --overwrite replaces): " in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output is kept
    _free(monkeypatch, need - replaced)
    cli("encode", prompts, *OPTIONS, "--out", out, "--overwrite", "--quiet")
    _same_files(encoded[0], out)


def test_resume_needs_room_only_for_the_shards_still_to_do(cli, prompts, encoded, tmp_path, monkeypatch):
    out = tmp_path / "f"
    real, calls = encode.index_table, []

    def crash_on_shard_2(rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in shard 2")
        return real(rows)

    monkeypatch.setattr(encode, "index_table", crash_on_shard_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode.run(EncodeConfig(inputs=[prompts], model="tiny-t5-large", out=out, shard_size=7, batch_size=4,
                                device="cpu", quiet=True))
    monkeypatch.setattr(encode, "index_table", real)
    left = sorted(p.name for p in out.iterdir())
    need = _need(encoded[0], shards={2, 3})
    assert need < _need(encoded[0])
    _free(monkeypatch, need - 1)
    result = cli("encode", prompts, *OPTIONS, "--out", out, "--resume", code=2)
    assert "; 2 of 4 shards already there\n" in result.output
    assert f"error: {out}: the features still to write need {A.human_bytes(need)} on disk ({need:,} bytes " \
        in result.output
    assert sorted(p.name for p in out.iterdir()) == left  # the complete shards stay
    _free(monkeypatch, need)
    cli("encode", prompts, *OPTIONS, "--out", out, "--resume", "--quiet")
    _same_files(encoded[0], out)
