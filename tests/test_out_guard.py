"""No stage may delete what it did not write: an --out that is, contains or is inside any input of the stage (examples,
checkpoint, run directory, features, labels, predictions, references, dev files, --init-from, --tokenizer, --cache,
--eval, --quality, a model or verifier given as a local path, the LLM a checkpoint records) is refused with one line
naming both paths and exit 2, before anything is read, locked or written -- with --overwrite too. Before, `export
RUN/final --out RUN --overwrite` exited 0 and RUN then held only the export."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import Cli, error_line


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_files) -> Path:
    """Real artifacts of every stage, each small: examples, a finished run with a step checkpoint, features,
    labels, predictions, an eval, a converted (plain) LLM and an LLM-to-SLM run that names that LLM by its path."""
    cli = Cli()
    w = tmp_path_factory.mktemp("world")
    (w / "data").mkdir()
    for name in ("train", "dev"):
        shutil.copy(toy_files[name], w / "data" / f"{name}.jsonl")
    train, dev = w / "data" / "train.jsonl", w / "data" / "dev.jsonl"
    cli("train", train, "--slm", "tiny-gpt2", "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "4",
        "--save-every", "2", "--out", w / "run", "--quiet")
    cli("encode", train, "--model", "tiny-llama", "--out", w / "feats", "--quiet")
    cli("distill-labels", train, "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2", "--out",
        w / "labels", "--quiet")
    cli("generate", dev, "--model", w / "run" / "final", "--num-beams", "1", "--max-new-tokens", "2", "--out",
        w / "pred", "--quiet")
    cli("eval", w / "pred", "--refs", dev, "--metrics", "chrf", "--out", w / "eval", "--quiet")
    cli("convert", "tiny-llama", "--out", w / "llm", "--quiet")
    cli("train", train, "--llm", w / "llm", "--slm", "tiny-llama", "--batch-size", "8", "--micro-batch-size", "8",
        "--max-steps", "1", "--out", w / "l2s", "--quiet")
    (w / "cache").mkdir()
    (w / "cache" / "kept.txt").write_text("a file of the feature cache\n")
    return w


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(cli, world: Path, args: list, out: Path, relation: str, spec: Path | str | None) -> str:
    """`args --out out --overwrite` exits 2 with one line naming --out and the input; nothing changed anywhere in
    the world (every file hashed before and after), and an --out that did not exist still does not."""
    before = _snapshot(world)
    existed = out.exists()
    msg = error_line(cli, *args, "--out", out, "--overwrite")
    assert _snapshot(world) == before, f"a refused {args[0]} changed its inputs"
    assert out.exists() == existed
    if spec is not None:
        assert msg.startswith(f"--out {out} {relation} ") and str(spec) in msg, msg
        assert "give another --out" in msg, msg
    return msg


def test_export_into_its_own_run_directory_is_refused(cli, world):
    """The reported case: `export RUN/final --out RUN --overwrite` deleted the run (its log, manifest, step
    checkpoints and final/ itself)."""
    run = world / "run"
    assert {p.name for p in run.iterdir()} >= {"final", "step-000002", "train_log.jsonl", "manifest.json"}
    msg = _refused(cli, world, ["export", run / "final"], run, "contains", run / "final")
    assert msg.startswith(f"--out {run} contains the checkpoint {run / 'final'}: "), msg
    _refused(cli, world, ["export", run / "final"], run / "final", "is", run / "final")
    _refused(cli, world, ["export", run / "final"], run / "final" / "exported", "is inside", run / "final")
    _refused(cli, world, ["export", run / "final", "--eval", world / "eval"], world / "eval", "is",
             world / "eval")
    _refused(cli, world, ["export", run / "step-000002"], run, "contains", run / "step-000002")
    _refused(cli, world, ["export", run / "final"], run / "manifest.json", "is", run / "manifest.json")


def test_export_through_a_symlink_is_refused(cli, world, tmp_path):
    """Paths are compared resolved: a symlink to the run directory, or a checkpoint named through one."""
    link = tmp_path / "link"
    link.symlink_to(world / "run", target_is_directory=True)
    msg = _refused(cli, world, ["export", world / "run" / "final"], link, "contains", world / "run" / "final")
    assert str((world / "run").resolve()) in msg, msg
    _refused(cli, world, ["export", link / "final"], world / "run", "contains", link / "final")
    assert link.is_symlink() and (world / "run" / "final" / "model.safetensors").is_file()


def test_encode(cli, world):
    data = world / "data" / "train.jsonl"
    args = ["encode", data, "--model", "tiny-llama", "--cache", world / "cache"]
    _refused(cli, world, args, data, "is", data)
    _refused(cli, world, args, world / "data", "contains", data)
    _refused(cli, world, args, world / "cache" / "feats", "is inside", world / "cache")
    _refused(cli, world, args, world, "contains", data)


def test_distill_labels(cli, world):
    data = world / "data" / "train.jsonl"
    tokenizer = world / "run" / "final" / "tokenizer"
    args = ["distill-labels", data, "--model", "tiny-gpt2", "--tokenizer", tokenizer]
    _refused(cli, world, args, data, "is", data)
    _refused(cli, world, args, world / "data", "contains", data)
    _refused(cli, world, args, tokenizer / "labels", "is inside", tokenizer)


def test_train(cli, world):
    labels, feats, dev = world / "labels", world / "feats", world / "data" / "dev.jsonl"
    args = ["train", labels, "--llm", "tiny-llama", "--slm", "tiny-llama", "--features", feats, "--dev", dev,
            "--max-steps", "1"]
    _refused(cli, world, args, labels, "is", labels)
    _refused(cli, world, args, labels / "run", "is inside", labels)
    _refused(cli, world, args, feats, "is", feats)
    _refused(cli, world, args, feats / "run", "is inside", feats)
    _refused(cli, world, args, world / "data", "contains", dev)
    init = ["train", world / "data" / "train.jsonl", "--slm", "tiny-gpt2", "--init-from", world / "run" / "final",
            "--max-steps", "1"]
    _refused(cli, world, init, world / "run", "contains", world / "run" / "final")
    _refused(cli, world, init, world / "run" / "final", "is", world / "run" / "final")
    _refused(cli, world, init, world / "run" / "final" / "again", "is inside", world / "run" / "final")
    # --resume on its own --out is allowed (the out is not an input then), but not with an input inside it
    msg = error_line(cli, *init, "--out", world / "run", "--resume")
    assert msg.startswith(f"--out {world / 'run'} contains the --init-from input"), msg


def test_generate(cli, world):
    final, dev = world / "run" / "final", world / "data" / "dev.jsonl"
    args = ["generate", dev, "--model", final, "--num-beams", "1", "--max-new-tokens", "2"]
    _refused(cli, world, args, final, "is", final)
    _refused(cli, world, args, world / "run", "contains", final)
    _refused(cli, world, args, final / "pred", "is inside", final)
    _refused(cli, world, args, world / "data", "contains", dev)
    _refused(cli, world, args + ["--features", world / "feats"], world / "feats", "is", world / "feats")


def test_generate_protects_the_local_llm_a_checkpoint_names_and_a_verifier(cli, world):
    """A checkpoint loads its LLM from the path it records: `generate --model l2s/final --out LLM --overwrite`
    would delete the LLM after loading it. A --verifier given as a path is an input too."""
    final, llm, dev = world / "l2s" / "final", world / "llm", world / "data" / "dev.jsonl"
    args = ["generate", dev, "--model", final, "--num-beams", "1", "--max-new-tokens", "2"]
    msg = _refused(cli, world, args, llm, "is", llm)
    assert f"is the LLM of --model input {final}" in msg, msg
    _refused(cli, world, args, llm / "pred", "is inside", llm)
    spec = ["generate", dev, "--model", world / "run" / "final", "--speculative", "--verifier", llm,
            "--max-new-tokens", "2"]
    _refused(cli, world, spec, llm, "is", llm)
    _refused(cli, world, ["export", final], llm, "is", llm)


def test_eval(cli, world):
    pred, dev = world / "pred", world / "data" / "dev.jsonl"
    args = ["eval", pred, "--refs", dev, "--metrics", "chrf"]
    _refused(cli, world, args, pred, "is", None)  # refused as before, by eval's own check
    _refused(cli, world, args, pred / "eval", "is inside", pred)
    _refused(cli, world, args, world / "data", "contains", dev)
    _refused(cli, world, args, dev, "is", dev)
    paired = ["eval", pred, "--metrics", "chrf", "--paired-with", world / "l2s"]
    _refused(cli, world, paired, world / "l2s", "is", world / "l2s")


def test_bench(cli, world):
    final = world / "run" / "final"
    quick = ["bench", "--prompt-length", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--no-flops"]
    args = [*quick, "--model", f"c={final}"]
    _refused(cli, world, args, final, "is", final)
    _refused(cli, world, args, world / "run", "contains", final)
    _refused(cli, world, args, final / "bench", "is inside", final)
    slm = [*quick, "--slm", world / "llm", "--quality", f"SLM={world / 'eval'}"]
    _refused(cli, world, slm, world / "llm", "is", world / "llm")
    _refused(cli, world, slm, world / "eval" / "bench", "is inside", world / "eval")


def test_convert(cli, world):
    llm = world / "llm"
    _refused(cli, world, ["convert", llm], llm, "is", llm)
    _refused(cli, world, ["convert", llm], world, "contains", llm)
    _refused(cli, world, ["convert", llm], llm / "again", "is inside", llm)


def test_hub_ids_and_presets_are_not_paths(cli, world, tmp_path, monkeypatch):
    """A model named by a preset or hub id is no file here: an --out of the same name is not one of the inputs; a
    sibling of an input is not either."""
    monkeypatch.chdir(tmp_path)
    dev = world / "data" / "dev.jsonl"
    cli("generate", dev, "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2", "--out", "tiny-gpt2",
        "--quiet")
    assert (tmp_path / "tiny-gpt2" / "predictions.parquet").is_file()
    before = _snapshot(world)
    cli("export", world / "run" / "final", "--out", tmp_path / "exported", "--quiet")
    assert _snapshot(world) == before


def test_the_check_names_resolved_paths(tmp_path, monkeypatch):
    """check_out_not_input directly: relative names are compared resolved, and the message shows the resolved
    paths when they differ from what was given."""
    from llm2slm_cli import artifacts as A
    from llm2slm_cli.config import ConvertConfig
    from llm2slm_cli.errors import UserError

    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        A.check_out_not_input(Path("model") / ".." / "model" / "x", ConvertConfig(source="model", out=Path("o")))
    assert e.value.message.startswith("--out model/../model/x is inside the source model (") and \
        str(tmp_path.resolve() / "model" / "x") in e.value.message, e.value.message
    A.check_out_not_input(Path("other"), ConvertConfig(source="model", out=Path("other")))
    A.check_out_not_input(Path("model2"), ConvertConfig(source="model", out=Path("model2")))  # a prefix only
