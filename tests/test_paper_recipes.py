"""The paper recipes run, not only parse: `make -C recipes/paper-*` end to end, as a GPU user runs them, but offline
and small. A Hugging Face home in the test's temporary directory holds tiny fresh-weight models under the real hub
ids (t5-large, gpt2, google/flan-t5-base, ...) and a few dozen rows of each hub dataset (wmt14, wmt16,
cnn_dailymail, tatsu-lab/alpaca) with the real schema (tests/hub_standins.py); only the step counts and sizes are
set small, through the recipes' own variables. Every row, table and plot target of each recipe's `all` is built,
and `make -q` then finds nothing left to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA, send_chat_completion
from hub_standins import datasets_rows

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKENIZERS = SHARED_DATA / "tokenizers"

# Few steps, small batches, short generations, one timed repeat: sizes only, every command as the recipe writes it.
SMALL = ["MAX_STEPS=2", "BATCH=4", "MICRO_BATCH=4", "GEN_BATCH=8", "MAX_NEW_TOKENS=8",
         "BENCH=--repeats 1 --warmup 0 --prompt-length 8 --new-tokens 8"]
JOBS = min(4, os.cpu_count() or 1)  # every command is one process on one torch thread
TEST_ROWS = 8  # hub_standins.SPLITS["test"], and N_TEST below
BENCH_FILES = {"manifest.json", "bench.parquet", "bench.json", "ms_per_token.png", "quality_runtime.png"}
SWEEP_FILES = {"runtime_vs_length.png", "flops_vs_length.png"}  # bench --lengths


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a user whose Hugging Face cache holds the stand-ins, offline."""
    if not all((TOKENIZERS / f).is_file() for f in ("t5/spiece.model", "gpt2/vocab.json", "gpt2/merges.txt")):
        pytest.skip("../shared/data/tokenizers (the real T5 and GPT2 vocabularies the stand-in models use) not found")
    home = tmp_path_factory.mktemp("hf_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "hub_standins.py"), str(home), str(TOKENIZERS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def make(recipe: str, runs: Path, env: dict[str, str], *args: str, question: bool = False):
    """`make -C recipes/RECIPE` as a user runs it, with the small sizes; question: only ask whether every target is
    up to date (`make -q`)."""
    command = ["make", "--no-print-directory", "-C", str(ROOT / "recipes" / recipe), f"RUNS={runs}",
               f"LLM2SLM={BIN / 'llm2slm'}", f"PYTHON={sys.executable}", *SMALL, *args]
    if question:
        return subprocess.run([*command, "-q"], env=env, capture_output=True, text=True)
    start = time.monotonic()
    done = subprocess.run([*command, f"-j{JOBS}", "--output-sync=target"], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, f"make {recipe} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    print(f"make -j{JOBS} -C recipes/{recipe} {' '.join(args)}: {time.monotonic() - start:.0f} s")
    return done


def assert_built(runs: Path, rows: list[str], metrics: set[str], n: int = TEST_ROWS, trained: bool = True) -> None:
    """Each row's checkpoint (when it trains), predictions for every test example, and metrics."""
    for row in rows:
        if trained:
            assert (runs / row / "train" / "final" / "model.safetensors").is_file(), row
            assert json.loads((runs / row / "train" / "manifest.json").read_text())["kind"] == "training", row
        pred = json.loads((runs / row / "pred" / "manifest.json").read_text())
        assert pred["kind"] == "predictions" and pred["counts"]["examples"] == n, (row, pred["counts"])
        got = json.loads((runs / row / "eval" / "metrics.json").read_text())["metrics"]
        assert metrics <= set(got), (row, sorted(got))


def assert_bench(directory: Path, rows: list[str], sweep: list[int] | None = None) -> None:
    """Every row timed (and, with the --lengths sweep, at every length) with its quality beside it; the plots."""
    assert {p.name for p in directory.iterdir()} >= BENCH_FILES | (SWEEP_FILES if sweep else set()), directory
    table = json.loads((directory / "bench.json").read_text())
    assert [r["label"] for r in table["rows"] if r["part"] == "main"] == rows and not table["skipped"], table["rows"]
    swept = [(r["label"], r["new_tokens"]) for r in table["rows"] if r["part"] == "sweep"]
    assert swept == [(row, n) for row in rows for n in sweep or []], swept
    assert sorted(table["quality"]) == sorted(rows), table["quality"]
    for plot in directory.glob("*.png"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_paper_translation(hf_env, tmp_path):
    """`make` = all three pairs, each with T5-Large alone and T5-Small / T5-v1.1-Small / GPT2 alone and with
    T5-Large's features, then the speed table and plots; `kd` (En-De here) trains on T5-Large's own translations."""
    runs = tmp_path / "runs"
    make("paper-translation", runs, hf_env, "LENGTHS=4,8")
    make("paper-translation", runs, hf_env, "LENGTHS=4,8", "kd", "PAIRS=de")
    rows = [f"{s}-{kind}" for s in ("t5-small", "t5-v1_1-small", "gpt2") for kind in ("alone", "llm2slm")]
    for pair in ("de", "fr", "ro"):
        assert_built(runs / pair, rows, {"bleu", "chrf"})
        assert_built(runs / pair, ["llm"], {"bleu", "chrf"}, trained=False)
        assert_bench(runs / pair / "bench", ["LLM", *rows], sweep=[4, 8])
    assert_built(runs / "de", ["t5-small-llm2slm-kd"], {"bleu", "chrf"})
    assert json.loads((runs / "de" / "labels" / "manifest.json").read_text())["kind"] == "labels"
    assert make("paper-translation", runs, hf_env, "LENGTHS=4,8", question=True).returncode == 0
    assert make("paper-translation", runs, hf_env, "LENGTHS=4,8", "kd", "PAIRS=de", question=True).returncode == 0
    # each pair decoded its own test split, with its own prompt and references
    wmt = datasets_rows()
    for pair, name, language in (("de", "German", "wmt14"), ("fr", "French", "wmt14"), ("ro", "Romanian", "wmt16")):
        test = wmt[language][f"{pair}-en"]["test"]
        got = pq.read_table(runs / pair / "llm" / "pred" / "predictions.parquet").to_pylist()
        assert [(r["prompt"], r["reference"]) for r in got] == [
            (f"translate English to {name}: {t['translation']['en']}", t["translation"][pair]) for t in test]


def test_paper_summarization(hf_env, tmp_path):
    runs = tmp_path / "runs"
    make("paper-summarization", runs, hf_env, "LENGTHS=4,8")
    assert_built(runs, ["slm", "llm2slm"], {"rouge"})
    assert_built(runs, ["llm"], {"rouge"}, trained=False)
    assert_bench(runs / "bench", ["LLM", "slm", "llm2slm"], sweep=[4, 8])
    assert make("paper-summarization", runs, hf_env, "LENGTHS=4,8", question=True).returncode == 0


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that rates every answer 7."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body["model"]))
        send_chat_completion(self, body["model"], "Helpful enough.\nRating: [[7]]")

    def log_message(self, *args) -> None:
        pass


def test_paper_instructions(hf_env, tmp_path):
    """The default metrics, judge and ROUGE, with a judge endpoint the user provides (here a fake one)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in hf_env.items() if k.lower() not in ("http_proxy", "all_proxy")}
    env["OPENAI_API_KEY"] = "test-key"
    runs = tmp_path / "runs"
    judge = [f"JUDGE_URL=http://127.0.0.1:{server.server_address[1]}/v1", "JUDGE_MODEL=judge", f"N_TEST={TEST_ROWS}"]
    try:
        make("paper-instructions", runs, env, *judge)
    finally:
        server.shutdown()
        server.server_close()
    assert len((runs / "data" / "test.jsonl").read_text().splitlines()) == TEST_ROWS
    assert_built(runs, ["slm", "llm2slm"], {"judge", "rouge"})
    assert_built(runs, ["llm"], {"judge", "rouge"}, trained=False)
    assert len(server.requests) == 3 * TEST_ROWS
    assert {r[:2] for r in server.requests} == {("/v1/chat/completions", "Bearer test-key")}
    for row in ("llm", "slm", "llm2slm"):
        assert json.loads((runs / row / "eval" / "metrics.json").read_text())["metrics"]["judge"]["mean"] == 7.0
    assert_bench(runs / "bench", ["LLM", "slm", "llm2slm"])
    assert make("paper-instructions", runs, env, *judge, question=True).returncode == 0


def test_paper_ablations(hf_env, tmp_path):
    """Tables 6, 7, 9 and 11 and Figure 4: every row trained, decoded and scored; Table 6's parameter counts;
    Figure 4's speed table and plots."""
    runs = tmp_path / "runs"
    make("paper-ablations", runs, hf_env)
    t6 = [f"table6/{s}-{m}" for s in ("gpt2", "t5-small") for m in ("frozen", "prompt", "prefix", "lora")]
    rows = [*t6, "table7/references", "table7/llm-labels",
            *(f"table9/layer-{k}" for k in ("4", "12", "24", "all")),
            "table11/add-llm-tokenizer", "table11/replace-llm-tokenizer", "table11/replace-slm-tokenizer",
            *(f"figure4/gpt2-l{d}" for d in (1, 2, 4))]
    assert_built(runs, rows, {"bleu", "chrf"})
    assert_built(runs, ["figure4/llm"], {"bleu", "chrf"}, trained=False)
    counts = [json.loads(line) for line in (runs / "table6" / "counts.jsonl").read_text().splitlines()]
    assert [(c["slm"], c["peft"], c["freeze_slm"]) for c in counts] == [
        (s, m, m is None) for s in ("gpt2", "t5-small") for m in (None, "prompt", "prefix", "lora")]
    assert all(0 < c["trainable_parameters"] < c["parameters"] for c in counts), counts
    assert json.loads((runs / "table7" / "labels" / "manifest.json").read_text())["kind"] == "labels"
    # each row is the model its table names
    model = {row: json.loads((runs / row / "train" / "final" / "llm2slm.json").read_text()) for row in rows}
    for k in ("4", "12", "24", "all"):
        llm = model[f"table9/layer-{k}"]["llm"]
        assert (llm["name"], llm["layer"]) == ("gpt2-xl", int(k) if k.isdigit() else k), llm
    for d in (1, 2, 4):
        assert model[f"figure4/gpt2-l{d}"]["slm_layers"] == d
    t11 = [model[f"table11/{r}"] for r in ("add-llm-tokenizer", "replace-llm-tokenizer", "replace-slm-tokenizer")]
    assert [(m["fusion"], m["tokenizer"], m["vocab_adapter"]) for m in t11] == [
        ("add", "llm", True), ("replace", "llm", True), ("replace", "slm", False)]  # GPT2's vocabulary is not T5's
    assert_bench(runs / "figure4" / "bench", ["LLM", "gpt2-l1", "gpt2-l2", "gpt2-l4"])
    assert make("paper-ablations", runs, hf_env, question=True).returncode == 0
