"""Recipes run as written: the smoke recipe chains every available stage through the CLI, and every command line any
recipe would run parses against the real CLI (a dry run: nothing is trained, downloaded or read)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "{", "}"}

# Each recipe's dry-run cases: extra make arguments, and the stages its commands must include.
DRY_RUNS = {
    "smoke": [((), {"encode", "train", "generate", "distill-labels", "eval", "bench"})],
    "offline": [
        ((), {"encode", "train", "generate", "eval", "bench"}),
        (("SLM=preset:t5-small", "SLM_TOKENIZER=t5", "LLM2SLM_OPTS=--tokenizer-mode llm --fusion add", "en-de"),
         {"encode", "train", "generate", "eval", "bench"}),
    ],
    "paper-translation": [(("all", "kd"), {"distill-labels", "train", "generate", "eval", "bench"})],
    "paper-summarization": [((), {"train", "generate", "eval", "bench"})],
    "speculative": [((), {"distill-labels", "train", "bench"})],
    "speed": [((), {"bench"}), (("gemma-sd",), {"bench"})],
    "gpu": [((), {"bench"}), (("SMOKE=1",), {"bench"})],
    "offline-study": [((), {"convert", "encode", "train", "generate", "eval", "bench"}),
                      (("DS=2", "KS=1 4", "slm-d2", "llm2slm-d2-k4"), {"convert", "encode", "train", "generate",
                                                                        "eval"}),
                      (("pilots",), {"convert", "distill-labels", "encode", "train", "generate", "eval"}),
                      (("final",), {"convert", "distill-labels", "encode", "train", "generate", "eval", "bench"}),
                      (("sd", "sd-gammas"), {"convert", "distill-labels", "encode", "train",
                                                          "generate", "bench"}),
                      (("MAX_TRAIN=0", "F_OPTS=--slm-layers 2", "publish"), {"convert", "encode", "train",
                                                                               "generate", "eval"})],
    "paper-ablations": [((), {"distill-labels", "train", "generate", "eval", "bench"}),
                        (("counts",), {"train"})],
    "paper-instructions": [
        (("JUDGE_URL=http://127.0.0.1:8000/v1", "JUDGE_MODEL=judge"), {"train", "generate", "eval", "bench"}),
        (("METRICS=rouge",), {"train", "generate", "eval", "bench"}),
    ],
}


def test_every_recipe_says_what_it_is_for_and_how_to_run_it():
    makefiles = sorted((ROOT / "recipes").glob("*/Makefile"))
    assert makefiles
    for path in makefiles:
        head = path.read_text().splitlines()[:6]
        assert head[0].startswith("# ") and any("make" in line for line in head), path
        assert any(f"make -C recipes/{path.parent.name}" in line for line in head), path


def test_every_recipe_has_a_dry_run_case():
    assert sorted(p.parent.name for p in (ROOT / "recipes").glob("*/Makefile")) == sorted(DRY_RUNS)


def llm2slm_commands(make_output: str) -> list[list[str]]:
    """Every `llm2slm STAGE ...` invocation in `make -n` output, as argument lists (stage first)."""
    commands = []
    for line in make_output.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token not in SHELL_OPERATORS:
                segment.append(token)
                continue
            starts = [i for i, t in enumerate(segment) if os.path.basename(t) == "llm2slm"]
            if starts:
                commands.append(_without_redirections(segment[starts[0] + 1:]))
            segment = []
    return commands


def _without_redirections(args: list[str]) -> list[str]:
    """A command's arguments less its shell redirections (`> log`, `2>&1`: shlex gives "2", ">&", "1")."""
    out: list[str] = []
    skip = False
    for token in args:
        if skip:
            skip = False
        elif token in (">", ">>", "<", ">&", "&>"):
            skip = True
            if token == ">&" and out and out[-1].isdigit():
                out.pop()
        else:
            out.append(token)
    return out


def dry_run(recipe: str, runs: Path, *args: str) -> str:
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(ROOT / "recipes" / recipe), f"RUNS={runs}",
         f"LLM2SLM={BIN / 'llm2slm'}", f"PYTHON={sys.executable}", f"SHARED={runs.parent / 'no-shared-data'}",
         *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("recipe,args,stages", [(r, a, s) for r, cases in DRY_RUNS.items() for a, s in cases],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_recipe_commands_parse_against_the_cli(recipe, args, stages, tmp_path):
    """Parsing only (click's make_context): unknown options, missing required ones and bad choices fail here."""
    import typer.main

    from llm2slm_cli.cli import app

    runs = tmp_path / "runs"
    # SHARED points at a directory that does not exist: the dry run must not need ../shared/data.
    commands = llm2slm_commands(dry_run(recipe, runs, *args))
    assert {c[0] for c in commands} >= stages, commands
    group = typer.main.get_command(app)
    failures = []
    for stage, *argv in commands:
        if stage not in group.commands:
            failures.append(f"unknown stage {stage!r}")
            continue
        try:
            ctx = group.commands[stage].make_context(stage, list(argv), resilient_parsing=False)  # it eats its list
        except Exception as e:  # click's usage errors, whichever click typer ships
            failures.append(f"llm2slm {stage} {shlex.join(argv)}\n  -> {getattr(e, 'format_message', e.__str__)()}")
            continue
        out = Path(ctx.params["out"])
        if not out.is_relative_to(runs):
            failures.append(f"llm2slm {stage} writes {out}, outside RUNS={runs}")
    assert not failures, "\n".join(failures)


def test_offline_recipe_skips_cleanly_without_shared_data(tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT / "recipes" / "offline"),
                             f"RUNS={tmp_path / 'runs'}", f"SHARED={tmp_path / 'absent'}",
                             f"LLM2SLM={BIN / 'llm2slm'}", f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipping: ../shared/data not found") == 1, result.stdout
    assert not (tmp_path / "runs").exists() or not any(p.is_file() for p in (tmp_path / "runs").rglob("*"))


@pytest.mark.slow
def test_smoke_recipe(tmp_path):
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(["make", "-C", str(ROOT / "recipes" / "smoke"), f"RUNS={tmp_path}",
                           f"LLM2SLM={bin_dir / 'llm2slm'}", f"PYTHON={sys.executable}"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in ("pred-llm2slm", "pred-slm"):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["kind"] == "predictions" and manifest["counts"]["examples"] == 8
    assert json.loads((tmp_path / "llm2slm" / "manifest.json").read_text())["model"]["llm"]["name"] == "tiny-t5-large"
    kinds = {run: json.loads((tmp_path / run / "manifest.json").read_text())["kind"]
             for run in ("feats", "labels", "kd", "eval-llm2slm", "eval-slm", "bench")}
    assert kinds == {"feats": "features", "labels": "labels", "kd": "training", "eval-llm2slm": "evaluation",
                     "eval-slm": "evaluation", "bench": "benchmark"}
    labels = [r["label"] for r in json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]]
    assert {"LLM", "SLM", "LLM-to-SLM", "llm2slm", "slm"} <= set(labels)
    assert (tmp_path / "bench" / "quality_runtime.png").stat().st_size > 0


def test_offline_study_curves_table_and_plot(tmp_path):
    """recipes/offline-study/curves.py reads each row's train_log.jsonl (train's own format) and its manifest."""
    for name, losses, dev in (("llm2slm-d1-k2", [9.0, 6.5, 5.25], 5.5), ("slm-d1", [10.0, 7.0, 6.0], 6.25)):
        train = tmp_path / name / "train"
        train.mkdir(parents=True)
        (train / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s + 1, "epoch": 0, "loss": v, "lr": 1e-4, "examples_per_second": 8.0 + s}) + "\n"
            for s, v in enumerate(losses)))
        (train / "manifest.json").write_text(json.dumps({"result": {"train_loss": losses[-1], "dev_loss": dev}}))
    plot = tmp_path / "bench" / "loss_curves.png"
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "offline-study" / "curves.py"), str(tmp_path),
                           "--steps", "1,3,5", "--plot", str(plot)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:4] == [
        "| row | step 1 | step 3 | step 5 | dev loss | examples/s |",
        "|---|---|---|---|---|---|",
        "| slm-d1 | 10.00 | 6.00 | - | 6.250 | 9.00 |",
        "| llm2slm-d1-k2 | 9.00 | 5.25 | - | 5.500 | 9.00 |",
    ]
    assert plot.stat().st_size > 0
    missing = subprocess.run([sys.executable, str(ROOT / "recipes" / "offline-study" / "curves.py"),
                              str(tmp_path / "none")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no */train/train_log.jsonl" in missing.stderr


@pytest.mark.slow
def test_gpu_device_check_runs_end_to_end_on_tiny_presets(tmp_path):
    """recipes/gpu's commands as a GPU machine would run them, on tiny presets on this CPU: every part measured
    (eager, --compile, throughput) and summary.md with every row at both batch sizes."""
    done = subprocess.run(["make", "-C", str(ROOT / "recipes" / "gpu"), "SMOKE=1", f"OUT={tmp_path}",
                           f"LLM2SLM={BIN / 'llm2slm'}", f"PYTHON={sys.executable}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    logs = "".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    summary = (tmp_path / "summary.md").read_text()
    assert "not measured" not in summary, summary + logs
    for part in ("eager", "compiled"):
        rows = json.loads((tmp_path / part / "bench.json").read_text())["rows"]
        assert sorted((r["label"], r["batch_size"]) for r in rows if r.get("part", "main") == "main") == sorted(
            (label, b) for label in ("LLM", "SLM:tiny-t5", "SLM:tiny-gpt2", "LLM-to-SLM:tiny-t5",
                                     "LLM-to-SLM:tiny-gpt2") for b in (1, 2)), rows
    stages = [r["stage"] for r in json.loads((tmp_path / "throughput" / "bench.json").read_text())["throughput"]]
    assert stages == ["encode", "train"]
    assert summary.count("| LLM-to-SLM") == 4


def _study_script(name: str):
    import importlib.util

    folder = ROOT / "recipes" / "offline-study"
    sys.path.insert(0, str(folder))  # rescore.py imports fewshot.py
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_fewshot_examples_are_aligned_pairs_fixed_per_sentence(tmp_path):
    """fewshot.py: each sentence's examples are real pairs of the pool (a U+2028 inside a line splits nothing), the
    same for the same (seed, sentence) whatever the other sentences, and never outside the length limits."""
    fewshot = _study_script("fewshot")
    words = " ".join(f"w{i}" for i in range(20))
    en = [f"{i} {words}" for i in range(50)] + ["short"]
    de = [f"{i} {words}\u2028mit Trenner" for i in range(50)] + ["kurz"]
    (tmp_path / "pool.en").write_text("\n".join(en) + "\n")
    (tmp_path / "pool.de").write_text("\n".join(de) + "\n")
    pool_en, pool_de = fewshot.read_lines(tmp_path / "pool.en"), fewshot.read_lines(tmp_path / "pool.de")
    assert len(pool_de) == 51  # str.splitlines would give 101
    rows = fewshot.records(pool_en, pool_de, ["a", "b", "c"], ["A", "B", "C"], seed=3)
    again = fewshot.records(pool_en, pool_de, ["a", "b"], ["A", "B"], seed=3)
    assert rows[:2] == again and [r["id"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        for j in (1, 2):
            assert r[f"ex{j}_de"].split()[0] == r[f"ex{j}_en"].split()[0]  # the same pair
            assert "short" not in r[f"ex{j}_en"]
        assert r["ex1_en"] != r["ex2_en"]
    assert fewshot.records(pool_en, pool_de, ["a"], ["A"], seed=4)[0] != rows[0]


def test_rescore_flags_a_committed_number_that_does_not_match(tmp_path):
    """rescore.py recomputes chrF from the committed predictions and refuses an eval.json that says otherwise."""
    rescore = _study_script("rescore")
    refs = ["Das ist ein kleiner Test .", "Ein zweiter Satz hier .", "Und noch einer ."]
    hyp = ["Das ist ein Test .", "Ein Satz hier .", "Und noch einer ."]
    got = rescore.paired(hyp, hyp, refs)
    from sacrebleu.metrics import CHRF

    assert abs(got["chrf"]["score"] - CHRF().corpus_score(hyp, [refs]).score) < 1e-9
    assert rescore.p_text(0.000999000999000999) == "<= 0.001" and rescore.p_text(0.0123) == "0.012"
    r = rescore.rates(["die die die die", "Hello world again", "Timoshenko kam"], ["x", "Hello world again", "y"],
                      ["a", "Hallo Welt", "b"], [set(), set(), {"timoshenko"}])
    assert r == {"distinct": 1.0, "loops": 1 / 3, "copies": 1 / 3, "leaks": 1 / 3}


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "translation").is_dir(),
                    reason="../shared/data (the study's references) is only on development machines")
def test_the_committed_study_results_rescore_to_their_eval_metrics():
    """make rescore: every committed row's BLEU, chrF, intervals and p-value equal what eval wrote (exit 0)."""
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT / "recipes" / "offline-study"),
                             f"PYTHON={sys.executable}", f"SHARED={ROOT.parent / 'shared' / 'data'}", "rescore"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| llm2slm-d2-ce-std-26k-k6 |" in result.stdout and "MISMATCH" not in result.stderr
