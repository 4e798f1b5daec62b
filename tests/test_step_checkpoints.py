"""Step checkpoints are hashed and verified like final ones: every file of `step-NNNNNN/` (weights, configs,
tokenizer, optimizer and scheduler state, RNG states, trainer state) is recorded with its sha256 in the step's
manifest, written last, and `train --resume` checks them all before it loads anything. Damage is one line naming the
file, exit 2, and the run directory is left byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import Cli, error_line, same_weights_and_log

ARGS = ["--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "8", "--quiet"]
LATEST = "step-000006"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, toy_files) -> Path:
    """A run of 8 steps with --save-every 2, stopped after step 6: step-000002/4/6, no final/."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    Cli()("train", toy_files["train"], *ARGS, "--save-every", "2", "--stop-after", "6", "--out", run)
    assert sorted(p.name for p in run.iterdir()) == ["step-000002", "step-000004", LATEST, "train_log.jsonl"]
    return run


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (and beside it: nothing may be left there either) by its sha256."""
    return {p.relative_to(root.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.parent.rglob("*")) if p.is_file()}


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy" / "run"))


def _resume_refused(cli, toy_files, run: Path) -> str:
    before = _snapshot(run)
    msg = error_line(cli, "train", toy_files["train"], *ARGS, "--out", run, "--resume")
    assert _snapshot(run) == before, "a refused --resume changed the run directory"
    return msg


def _files(step: Path) -> list[str]:
    return sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())


def test_every_file_of_a_step_checkpoint_is_in_its_manifest(stopped):
    for step in sorted(stopped.glob("step-*")):
        recorded = json.loads((step / "manifest.json").read_text())["files"]
        on_disk = [name for name in _files(step) if name != "manifest.json"]
        assert sorted(recorded) == on_disk, step
        assert {"model.safetensors", "optimizer.pt", "rng_state-0.pt", "trainer_state.json", "llm2slm.json",
                "slm_config.json"} <= set(recorded), recorded
        for name, record in recorded.items():
            data = (step / name).read_bytes()
            assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_one_flipped_byte_in_any_file_of_the_latest_step_is_refused(cli, toy_files, stopped, tmp_path):
    """For every file of step-000006/ (the manifest itself included): one byte flipped in its middle, and --resume
    says which file, exits 2 and leaves the run as it was (before: a flipped byte in optimizer.pt resumed with exit
    0 and other final weights)."""
    names = _files(stopped / LATEST)
    assert len(names) >= 9, names
    for name in names:
        run = _copy(stopped, tmp_path / name.replace("/", "_"))
        path = run / LATEST / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        msg = _resume_refused(cli, toy_files, run)
        assert msg.startswith(f"{path}: "), (name, msg)
        assert "damaged" in msg or "unreadable manifest" in msg, (name, msg)
        assert not (run / "final").exists()


def test_a_deleted_file_of_the_latest_step_is_refused(cli, toy_files, stopped, tmp_path):
    """A file deleted from step-000006/ is named; the run does not go back to step-000004 unasked."""
    for name in _files(stopped / LATEST):
        run = _copy(stopped, tmp_path / name.replace("/", "_"))
        (run / LATEST / name).unlink()
        msg = _resume_refused(cli, toy_files, run)
        if name == "manifest.json":
            assert msg.startswith(f"{run / LATEST}: no manifest.json"), msg
        else:
            assert msg.startswith(f"{run / LATEST / name}: ") and "is missing" in msg, (name, msg)


def test_a_file_added_to_the_latest_step_is_refused(cli, toy_files, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    extra = run / LATEST / "rng_state-1.pt"  # another process's RNG state: would be loaded unchecked
    shutil.copy(run / LATEST / "rng_state-0.pt", extra)
    msg = _resume_refused(cli, toy_files, run)
    assert msg.startswith(f"{extra}: is not in the checkpoint's manifest"), msg


STATE_EDITS = {
    "empty": (lambda s: {}, "no 'step' in it"),
    "step-six": (lambda s: {**s, "step": "six"}, "'step' is text, expected an integer"),
    "step-3": (lambda s: {**s, "step": 3}, "'step' is 3, but the checkpoint is step-000006"),
    "step-true": (lambda s: {**s, "step": True}, "'step' is true/false, expected an integer"),
    "run-list": (lambda s: {**s, "run": []}, "'run' is a list, expected a table"),
}


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_an_edited_trainer_state_is_refused(cli, toy_files, stopped, tmp_path, edit):
    """trainer_state.json edited ({}, "step": "six", step 3 of a step-6 checkpoint, ...): its sha256 tells first;
    edited together with its manifest record, its shape does (before: KeyError, ValueError tracebacks, or a restart
    at step 3 on step-6 weights)."""
    change, shape_message = STATE_EDITS[edit]
    run = _copy(stopped, tmp_path)
    path = run / LATEST / "trainer_state.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    msg = _resume_refused(cli, toy_files, run)
    assert msg.startswith(f"{path}: checkpoint trainer state is damaged"), msg

    manifest_path = run / LATEST / "manifest.json"  # the edit recorded as if it had been written so
    manifest = json.loads(manifest_path.read_text())
    data = path.read_bytes()
    manifest["files"]["trainer_state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    msg = _resume_refused(cli, toy_files, run)
    assert msg.startswith(f"{path}: ") and shape_message in msg, msg


def test_a_truncated_optimizer_state_is_refused(cli, toy_files, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    path = run / LATEST / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:1000])
    msg = _resume_refused(cli, toy_files, run)
    assert msg == f"{path}: checkpoint optimizer and scheduler state is damaged (truncated or overwritten): 1000 " \
                  f"bytes, the manifest says {(stopped / LATEST / 'optimizer.pt').stat().st_size}", msg


def test_an_older_step_manifest_is_refused_unless_allowed(cli, toy_files, stopped, tmp_path, monkeypatch):
    """A step checkpoint of an older version records only its weights, configs and tokenizer: its training state
    cannot be verified, so --resume refuses it unless LLM2SLM_UNVERIFIED_CHECKPOINTS=1; then a damaged optimizer
    state is still one line, never a traceback."""
    run = _copy(stopped, tmp_path)
    manifest_path = run / LATEST / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items()
                         if k in ("model.safetensors", "llm2slm.json", "slm_config.json") or k.startswith("tokenizer/")}
    manifest_path.write_text(json.dumps(manifest))
    msg = _resume_refused(cli, toy_files, run)
    assert msg.startswith(f"{manifest_path}: the manifest records no sha256 of the training state") and \
        "LLM2SLM_UNVERIFIED_CHECKPOINTS=1" in msg, msg
    monkeypatch.setenv("LLM2SLM_UNVERIFIED_CHECKPOINTS", "1")
    optimizer = run / LATEST / "optimizer.pt"
    original = optimizer.read_bytes()
    optimizer.write_bytes(original[:1000])
    msg = _resume_refused(cli, toy_files, run)
    assert msg.startswith(f"{optimizer}: cannot resume from this checkpoint: unreadable training state"), msg
    optimizer.write_bytes(original)
    cli("train", toy_files["train"], *ARGS, "--out", run, "--resume")
    assert (run / "final" / "model.safetensors").is_file()


def test_an_undamaged_resume_is_exact_and_its_new_steps_are_verified(cli, toy_files, stopped, tmp_path):
    """The stopped run resumed gives the uninterrupted run's weights and log; a step the resumed run writes is
    recorded in full too, and resumes in its turn."""
    cli("train", toy_files["train"], *ARGS, "--save-every", "2", "--out", tmp_path / "straight")
    run = _copy(stopped, tmp_path)
    cli("train", toy_files["train"], *ARGS, "--save-every", "1", "--stop-after", "7", "--out", run, "--resume")
    step = run / "step-000007"
    recorded = json.loads((step / "manifest.json").read_text())["files"]
    assert sorted(recorded) == [n for n in _files(step) if n != "manifest.json"] and "optimizer.pt" in recorded
    cli("train", toy_files["train"], *ARGS, "--out", run, "--resume")
    assert len(same_weights_and_log(tmp_path / "straight", run)) == 8
