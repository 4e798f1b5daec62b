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
from pathlib import Path

import pytest
from conftest import write_jsonl

from llm2slm_cli import fingerprints

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


# ------------------------------------------------------------------------------------------- train --resume


def test_train_resume_refuses_other_options_and_inputs(cli, toy_files, tmp_path, monkeypatch):
    """A run stopped at step 2 of 6 (a step-000002 checkpoint) is resumed only by the same options and inputs."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(toy_files["train"].read_bytes())
    out = tmp_path / "run"
    args = ["train", data, "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6",
            "--out", out]
    cli(*args, "--save-every", "2", "--stop-after", "2", "--quiet")
    assert (out / "step-000002").is_dir() and not (out / "final").exists()

    msg = _error(cli, *args, "--resume", "--lr", "0.002")
    assert "cannot resume step-000002" in msg and "--lr 0.002 (the interrupted run's: 0.001)" in msg, msg
    msg = _error(cli, *args, "--resume", "--slm", "tiny-llama")
    assert "--slm tiny-llama (the interrupted run's: tiny-gpt2)" in msg, msg
    msg = _error(cli, *args, "--resume", "--max-steps", "1")  # below the checkpoint's step
    assert "--max-steps 1 (the interrupted run's: 6)" in msg, msg
    assert not (out / "final").exists(), "a refused resume must not leave a final/ that claims a finished run"
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data.read_text().replace('"tgt": "', '"tgt": "Z', 1))
    msg = _error(cli, *[changed if a == data else a for a in args], "--resume")
    assert "the training input's sha256" in msg, msg

    # an older checkpoint (no identity in trainer_state.json, a manifest that records no training state: resumed
    # only with LLM2SLM_UNVERIFIED_CHECKPOINTS=1): its manifest's options are compared
    state_path = out / "step-000002" / "trainer_state.json"
    manifest_path = out / "step-000002" / "manifest.json"
    state, manifest = state_path.read_text(), manifest_path.read_text()
    older = json.loads(manifest)
    older["files"] = {k: v for k, v in older["files"].items() if k not in ("trainer_state.json", "optimizer.pt")
                      and not k.startswith("rng_state-")}
    manifest_path.write_text(json.dumps(older))
    state_path.write_text(json.dumps({k: v for k, v in json.loads(state).items() if k != "run"}))
    monkeypatch.setenv("LLM2SLM_UNVERIFIED_CHECKPOINTS", "1")
    msg = _error(cli, *args, "--resume", "--lr", "0.002")
    assert "--lr 0.002 (the interrupted run's: 0.001)" in msg, msg
    monkeypatch.delenv("LLM2SLM_UNVERIFIED_CHECKPOINTS")
    state_path.write_text(state)
    manifest_path.write_text(manifest)

    # what does not change the weights may change; the same contents under another path resume
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())
    cli(*[moved if a == data else a for a in args], "--resume", "--quiet", "--save-every", "3")
    assert (out / "final" / "model.safetensors").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6


def test_train_resume_with_fewer_steps_than_done_is_refused(tmp_path):
    """check_resume's own step check (for a checkpoint whose run recorded the same --max-steps)."""
    from llm2slm_cli.errors import UserError
    from llm2slm_cli.stages.train import check_resume

    step = tmp_path / "run" / "step-000004"
    step.mkdir(parents=True)
    identity = {"options": {"lr": 0.001}, "inputs": {"inputs": "abc"}}
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "run": identity}))
    check_resume(step, identity, 6)
    with pytest.raises(UserError, match="it is at step 4, and this run has 3 steps"):
        check_resume(step, identity, 3)


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def slm_run(tmp_path_factory, toy_files) -> Path:
    """An SLM-alone run stopped at step 2 of 4: step-000002/ (resumable) and, finished in a copy, final/."""
    from conftest import Cli

    d = tmp_path_factory.mktemp("slm_run")
    Cli()("train", toy_files["train"], "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "4",
          "--max-steps", "4", "--stop-after", "2", "--out", d / "run", "--quiet")
    return d / "run"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_without_a_manifest_is_refused_unless_allowed(cli, toy_files, tmp_path, monkeypatch):
    from llm2slm_cli import checkpoint
    from llm2slm_cli.llm2slm import LLMToSLM

    checkpoint.save(LLMToSLM.build("tiny-gpt2", None), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "manifest.json").is_file(), "save_pretrained records the files' sha256"
    checkpoint.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()
    args = ["generate", toy_files["dev"], "--model", tmp_path / "ckpt", "--num-beams", "1", "--max-new-tokens", "2"]
    msg = _error(cli, *args, "--out", tmp_path / "p")
    assert "no manifest.json: this checkpoint's files cannot be verified" in msg and \
        "LLM2SLM_UNVERIFIED_CHECKPOINTS=1" in msg, msg
    msg = _error(cli, "train", toy_files["train"], "--slm", tmp_path / "ckpt", "--max-steps", "1", "--out",
                 tmp_path / "t")  # an SLM-alone checkpoint as the SLM of a new run
    assert "no manifest.json" in msg, msg
    monkeypatch.setenv("LLM2SLM_UNVERIFIED_CHECKPOINTS", "1")  # the documented escape
    cli(*args, "--out", tmp_path / "p2", "--quiet")
    checkpoint.load(tmp_path / "ckpt")


@pytest.mark.parametrize("file,change,what", [
    ("llm2slm.json", lambda c: {**c, "max_prompt_length": c["max_prompt_length"] - 1}, "checkpoint config"),
    ("slm_config.json", lambda c: {**c, "layer_norm_epsilon": 0.5}, "checkpoint SLM config"),
])
def test_a_checkpoints_config_files_are_covered_by_its_manifest(cli, slm_run, toy_files, tmp_path, file, change,
                                                                  what):
    """A config file edited into another valid one (no shape check can see it) is refused by its sha256, in final/,
    in a step checkpoint resumed, and where an SLM-alone checkpoint is the SLM of a new run."""
    run = _copy(slm_run, tmp_path / "run")
    step = run / "step-000002"
    path = step / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    msg = _error(cli, "generate", toy_files["dev"], "--model", step, "--out", tmp_path / "p")
    assert msg.startswith(f"{path}: {what} is damaged"), msg
    msg = _error(cli, "train", toy_files["train"], "--slm", step, "--max-steps", "1", "--out", tmp_path / "t")
    assert msg.startswith(f"{path}: {what} is damaged"), msg
    # an older manifest (weights only): its config files load unchecked, as before
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"] = {"model.safetensors": manifest["files"]["model.safetensors"]}
    (step / "manifest.json").write_text(json.dumps(manifest))
    cli("generate", toy_files["dev"], "--model", step, "--num-beams", "1", "--max-new-tokens", "2", "--out",
        tmp_path / "p", "--quiet")


@pytest.mark.parametrize("damage", ["edit", "delete", "add"])
def test_a_checkpoints_tokenizer_files_are_covered_by_its_manifest(cli, slm_run, toy_files, tmp_path, damage):
    """The probe's finding (benchmarks/probe.py): a tokenizer file edited into valid JSON of another shape made
    generate raise, and export copied a damaged tokenizer on unchecked. Every tokenizer file is hashed now."""
    run = _copy(slm_run, tmp_path / "run")
    final = run / "step-000002"
    recorded = json.loads((final / "manifest.json").read_text())["files"]
    tok_files = sorted(n for n in recorded if n.startswith("tokenizer/"))
    assert "tokenizer/tokenizer_config.json" in tok_files, recorded
    path = final / "tokenizer" / "tokenizer_config.json"
    if damage == "edit":
        path.write_text('["not", "a", "table"]')
        want = f"{path}: checkpoint tokenizer file is damaged"
    elif damage == "delete":
        path.unlink()
        want = f"{path}: checkpoint tokenizer file is missing"
    else:
        (final / "tokenizer" / "added_tokens.json").write_text('{"<x>": 5}')
        want = f"{final}: tokenizer/added_tokens.json is not in the checkpoint's manifest"
    for stage in (["generate", toy_files["dev"], "--model", final], ["export", final]):
        msg = _error(cli, *stage, "--out", tmp_path / "o")
        assert msg.startswith(want), msg
        assert not (tmp_path / "o").exists()


def test_a_damaged_step_checkpoint_is_not_resumed(cli, slm_run, toy_files, tmp_path):
    run = _copy(slm_run, tmp_path / "run")
    weights = run / "step-000002" / "model.safetensors"
    _flip(weights)
    msg = _error(cli, "train", toy_files["train"], "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size",
                 "4", "--max-steps", "4", "--out", run, "--resume")
    assert msg == f"{weights}: checkpoint weights file is damaged: its sha256 differs from the manifest's", msg
    assert not (run / "final").exists()


# ------------------------------------------------------------------------------- sharded stages: parts and ends

CRASH = """
import os, pathlib, signal, sys
from llm2slm_cli import artifacts
{patch}
from llm2slm_cli.cli import main
sys.argv = ["llm2slm", *sys.argv[1:]]
main()
"""
# SIGKILL at the start of writing shard 2's part: shards 0 and 1 are complete
KILL_AT_PART_2 = """
real_write = artifacts.write_parquet
def write_parquet(path, table):
    if pathlib.Path(path).name.endswith("-00002.parquet"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, table)
artifacts.write_parquet = write_parquet
"""
# SIGKILL when the finished run starts removing its part files (its manifest is written)
KILL_AT_CLEANUP = """
real_unlink = pathlib.Path.unlink
def unlink(self, *a, **k):
    if self.name.startswith("{prefix}-") and self.name.endswith(".parquet"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(self, *a, **k)
pathlib.Path.unlink = unlink
"""


def crash(patch: str, *args: object) -> None:
    """Run llm2slm in a real subprocess that SIGKILLs itself where `patch` says."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CRASH.format(patch=patch), *map(str, args), "--device", "cpu",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    rows = [{"id": f"e{i}", "src": " ".join(words[(i + j) % 5] for j in range(1 + i % 4)), "tgt": "ab"}
            for i in range(10)]
    return write_jsonl(tmp_path_factory.mktemp("ten") / "ten.jsonl", rows)


GENERATE = ["generate", "--model", "tiny-llama", "--sample", "--seed", "3", "--max-new-tokens", "3", "--shard-size",
            "2", "--batch-size", "2"]
DISTILL = ["distill-labels", "--model", "tiny-llama", "--sample", "--seed", "3", "--max-new-tokens", "3",
           "--shard-size", "2", "--batch-size", "2"]
ENCODE = ["encode", "--model", "tiny-t5", "--shard-size", "2", "--batch-size", "2"]


def test_generate_killed_after_its_manifest_is_finished_by_resume(cli, ten, tmp_path):
    """The window between writing the manifest and removing the parts: --resume removes what is left (exit 0)
    and the directory holds exactly what an uninterrupted run writes."""
    cli(*GENERATE, ten, "--out", tmp_path / "straight", "--quiet")
    out = tmp_path / "killed"
    crash(KILL_AT_CLEANUP.replace("{prefix}", "predictions"), *GENERATE, ten, "--out", out)
    assert (out / "manifest.json").is_file() and list(out.glob("predictions-*.parquet")), "not killed in the window"
    result = cli(*GENERATE, ten, "--out", out, "--resume")
    assert "this run had finished" in result.output
    assert not list(out.glob(".*")) and not list(out.glob("predictions-*"))
    same_files(tmp_path / "straight", out)
    cli("eval", out, "--out", tmp_path / "e", "--quiet")


def test_distill_killed_after_its_manifest_is_finished_by_resume(cli, ten, tmp_path):
    cli(*DISTILL, ten, "--out", tmp_path / "straight", "--quiet")
    out = tmp_path / "killed"
    crash(KILL_AT_CLEANUP.replace("{prefix}", "examples"), *DISTILL, ten, "--out", out)
    assert (out / "manifest.json").is_file() and list(out.glob("examples-*.parquet"))
    cli(*DISTILL, ten, "--out", out, "--resume", "--quiet")
    assert not list(out.glob(".*")) and not list(out.glob("examples-*"))
    same_files(tmp_path / "straight", out)


def _rewrite_part(path: Path) -> None:
    """A part that still reads as a valid table, but not the one the run wrote (bits flipped in a value)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = "prediction" if "prediction" in table.column_names else "target"
    values = table[column].to_pylist()
    values[0] = (values[0] or "") + "~"
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values, pa.string())), path)


@pytest.mark.parametrize("stage,part", [("generate", "predictions-00001.parquet"),
                                        ("distill", "examples-00000.parquet")])
def test_a_damaged_part_of_the_interrupted_run_is_redone(cli, ten, tmp_path, stage, part):
    args = GENERATE if stage == "generate" else DISTILL
    cli(*args, ten, "--out", tmp_path / "straight", "--quiet")
    out = tmp_path / "killed"
    crash(KILL_AT_PART_2, *args, ten, "--out", out)
    assert (out / part).is_file() and not (out / "manifest.json").exists()
    _rewrite_part(out / part)
    result = cli(*args, ten, "--out", out, "--resume")
    same_files(tmp_path / "straight", out)  # the damaged part did not reach the merged file
    assert f"warning: {out / part}: part file is damaged" in result.output and "redoing shard" in result.output


def test_a_damaged_feature_shard_of_the_interrupted_run_is_redone(cli, ten, tmp_path):
    cli(*ENCODE, ten, "--out", tmp_path / "straight", "--quiet")
    out = tmp_path / "killed"
    crash(KILL_AT_PART_2, *ENCODE, ten, "--out", out)
    shard = out / "features-00001.safetensors"
    assert shard.is_file() and (out / "index-00001.parquet").is_file()
    _flip(shard)
    result = cli(*ENCODE, ten, "--out", out, "--resume")
    same_files(tmp_path / "straight", out)
    assert f"warning: {shard}: part file is damaged: its sha256 differs" in result.output
    assert not list(out.glob(".*"))


def test_a_part_damaged_before_the_merge_is_refused_and_resume_redoes_it(cli, ten, tmp_path, monkeypatch):
    from llm2slm_cli.sharding import ShardedRun

    cli(*GENERATE, ten, "--out", tmp_path / "straight", "--quiet")
    out = tmp_path / "g"
    real = ShardedRun.finish

    def damage_then_finish(self):
        _rewrite_part(out / "predictions-00003.parquet")
        return real(self)

    monkeypatch.setattr(ShardedRun, "finish", damage_then_finish)
    msg = _error(cli, *GENERATE, ten, "--out", out, "--device", "cpu")
    assert msg.startswith(f"{out / 'predictions-00003.parquet'}: part file is damaged") and \
        "--resume to redo shard 3" in msg, msg
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    cli(*GENERATE, ten, "--out", out, "--resume", "--quiet")
    same_files(tmp_path / "straight", out)


# ----------------------------------------------------------------------- --overwrite keeps the old output


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _refused_and_kept(cli, out: Path, *args) -> str:
    before = _snapshot(out)
    assert (out / "manifest.json").is_file()
    msg = _error(cli, *args, "--out", out, "--overwrite")
    assert _snapshot(out) == before, "the previous output was changed by a run that was refused"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
                and not p.name.endswith(".lock")], "no temporary left beside --out"
    return msg


def test_overwrite_keeps_the_output_when_the_model_or_options_fail_late(cli, toy_files, slm_run, tmp_path):
    """encode (a layer the LLM lacks), distill-labels (--strict and an over-long prompt), generate (a damaged
    checkpoint): each is refused after --overwrite used to delete the previous output."""
    data = toy_files["train"]
    cli("encode", data, "--model", "tiny-llama", "--layer", "1", "--out", tmp_path / "f", "--quiet")
    msg = _refused_and_kept(cli, tmp_path / "f", "encode", data, "--model", "tiny-llama", "--layer", "99")
    assert "layer" in msg, msg
    distill = ["distill-labels", data, "--model", "tiny-llama", "--num-beams", "1", "--max-new-tokens", "2"]
    cli(*distill, "--out", tmp_path / "l", "--quiet")
    _refused_and_kept(cli, tmp_path / "l", *distill, "--strict", "--max-length", "2")
    generate = ["generate", toy_files["dev"], "--num-beams", "1", "--max-new-tokens", "2"]
    cli(*generate, "--model", "tiny-gpt2", "--out", tmp_path / "p", "--quiet")
    _copy(slm_run / "step-000002", tmp_path / "ckpt")  # a checkpoint with its manifest, then damaged
    _flip(tmp_path / "ckpt" / "model.safetensors")
    msg = _refused_and_kept(cli, tmp_path / "p", *generate, "--model", tmp_path / "ckpt")
    assert "checkpoint weights file is damaged" in msg, msg


def test_overwrite_keeps_the_output_when_convert_fails(cli, tmp_path):
    cli("convert", "tiny-gpt2", "--out", tmp_path / "c", "--quiet")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 4)
    msg = _refused_and_kept(cli, tmp_path / "c", "convert", bad)
    assert "GGUF" in msg, msg
    cli("convert", "tiny-llama", "--out", tmp_path / "c", "--overwrite", "--quiet")  # a good one replaces it
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["source"]["spec"] == "tiny-llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.") and not p.name.endswith(".lock")]


def test_overwrite_keeps_the_output_when_export_fails(cli, trained_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "export"
    cli("export", trained_checkpoint, "--out", out, "--quiet")
    # the LLM changed under its name
    monkeypatch.setattr(fingerprints, "weights_fingerprint", lambda *a, **k: "another LLM")
    msg = _refused_and_kept(cli, out, "export", trained_checkpoint, "--include-llm", "yes")
    assert "is not the one this checkpoint was trained with" in msg, msg
    monkeypatch.undo()
    cli("export", trained_checkpoint, "--out", out, "--overwrite", "--name", "again", "--quiet")
    assert "# again" in (out / "README.md").read_text()
    from llm2slm_cli.artifacts import verify_checkpoint

    assert {"model.safetensors", "llm2slm.json", "slm_config.json", "tokenizer/tokenizer_config.json"} <= set(
        verify_checkpoint(out)["files"])


def test_overwrite_keeps_the_output_when_eval_fails(cli, toy_files, tmp_path):
    """eval already scored before it removed anything (audited; this test passed before the change too)."""
    cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2", "--out",
        tmp_path / "p", "--quiet")
    cli("eval", tmp_path / "p", "--out", tmp_path / "e", "--quiet")
    predictions = tmp_path / "p" / "predictions.parquet"
    predictions.write_bytes(predictions.read_bytes()[:-1] + b"X")
    msg = _refused_and_kept(cli, tmp_path / "e", "eval", tmp_path / "p")
    assert "predictions file is damaged" in msg, msg


# ------------------------------------------------------------------------------------------- the feature cache


def test_a_damaged_cache_entry_is_encoded_again_and_replaced(cli, toy_files, tmp_path, monkeypatch):
    from llm2slm_cli.llm2slm import FrozenLLM

    cache = tmp_path / "cache"
    args = ["encode", toy_files["train"], "--model", "tiny-llama", "--layer", "1", "--cache", cache]
    cli(*args, "--out", tmp_path / "ref", "--quiet")  # the features as encoded (its own files: copied below)
    good = _snapshot(tmp_path / "ref")
    (entry,) = cache.iterdir()
    shard = entry / "features-00000.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[-3] ^= 0x01
    shard.unlink()  # the entry's own file (ref keeps its link to the good bytes)
    shard.write_bytes(bytes(damaged))

    result = cli(*args, "--out", tmp_path / "b", "--quiet")  # --quiet hides the progress, not this warning
    assert f"warning: the feature cache entry {entry} is damaged ({shard}: cached feature shard is damaged" in \
        result.output, result.output
    assert {k: v for k, v in _snapshot(tmp_path / "b").items() if k != "manifest.json"} == \
        {k: v for k, v in good.items() if k != "manifest.json"}
    assert shard.read_bytes() == good["features-00000.safetensors"], "the entry was replaced"
    assert not json.loads((tmp_path / "b" / "manifest.json").read_text())["cache"]["hit"]

    monkeypatch.setattr(FrozenLLM, "encode", lambda *a, **k: pytest.fail("the LLM ran on a sound cache entry"))
    cli(*args, "--out", tmp_path / "c", "--quiet")  # the replaced entry is linked again
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["cache"]["hit"]
    assert (tmp_path / "c" / "features-00000.safetensors").read_bytes() == good["features-00000.safetensors"]


def test_overwrite_keeps_the_output_when_bench_fails(cli, slm_run, tmp_path):
    quick = ["bench", "--prompt-length", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--no-flops"]
    cli(*quick, "--slm", "tiny-gpt2", "--out", tmp_path / "b", "--quiet")
    _copy(slm_run / "step-000002", tmp_path / "ckpt")  # a checkpoint with its manifest, then damaged
    _flip(tmp_path / "ckpt" / "model.safetensors")
    msg = _refused_and_kept(cli, tmp_path / "b", *quick, "--model", f"c={tmp_path / 'ckpt'}")
    assert "checkpoint weights file is damaged" in msg, msg


def test_bench_quality_verifies_an_eval_outputs_metrics(cli, toy_files, tmp_path):
    """The probe's finding: bench --quality read metrics.json of an `eval` output unchecked, so a score edited by
    hand (still valid JSON) went into the plot. eval's manifest hashes its files now; a hand-written score file
    without a manifest is still read (documented)."""
    cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2",
        "--out", tmp_path / "pred", "--quiet")
    cli("eval", tmp_path / "pred", "--out", tmp_path / "ev", "--quiet")
    manifest = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"metrics.json", "scores.parquet"}
    bench = ["bench", "--slm", "tiny-gpt2", "--new-tokens", "2", "--prompt-length", "2", "--repeats", "1",
             "--warmup", "0", "--no-flops", "--quiet"]
    cli(*bench, "--quality", f"SLM={tmp_path / 'ev'}", "--out", tmp_path / "b1")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    metrics["metrics"]["bleu"]["score"] = 99.0
    (tmp_path / "ev" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    msg = _error(cli, *bench, "--quality", f"SLM={tmp_path / 'ev'}", "--out", tmp_path / "b2")
    assert msg.startswith(f"{tmp_path / 'ev' / 'metrics.json'}: evaluation metrics is damaged"), msg


@pytest.mark.parametrize("damage, message", [
    ("negative_prompt_length", "'max_prompt_length' is -5, expected 1 or more"),
    ("truncated_weights", "cannot load weights"),
])
def test_an_unverified_checkpoint_that_is_damaged_is_one_line(cli, toy_files, tmp_path, monkeypatch, damage,
                                                              message):
    """With LLM2SLM_UNVERIFIED_CHECKPOINTS=1 nothing is hashed, so what is loaded is checked as it is read."""
    from llm2slm_cli import checkpoint
    from llm2slm_cli.llm2slm import LLMToSLM

    checkpoint.save(LLMToSLM.build("tiny-gpt2", None), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()
    if damage == "negative_prompt_length":
        path = tmp_path / "ckpt" / "llm2slm.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "max_prompt_length": -5}))
    else:
        path = tmp_path / "ckpt" / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setenv("LLM2SLM_UNVERIFIED_CHECKPOINTS", "1")
    msg = _error(cli, "generate", toy_files["dev"], "--model", tmp_path / "ckpt", "--num-beams", "1",
                 "--max-new-tokens", "2", "--out", tmp_path / "p")
    assert msg.startswith(f"{path}: ") and message in msg, msg
