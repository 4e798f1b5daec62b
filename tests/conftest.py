"""Shared fixtures: small real task files and a CLI runner. Models are tiny presets built from configs."""

from __future__ import annotations

import json
import os
import random
import string
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm2slm_cli.cli import app

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
# train's data cache (corpus.py) in a folder of this test session's own, never the user's
os.environ.setdefault("LLM2SLM_DATA_CACHE", tempfile.mkdtemp(prefix="llm2slm-data-cache-"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models: two torch threads only wait on each other (and crawl when another process shares the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same_weights_and_log(a: Path, b: Path) -> list[dict]:
    """Assert that two training runs' final weights are bitwise equal and their logs equal (but for the speed);
    returns the log."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)

    def log(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "examples_per_second"}
                for line in (d / "train_log.jsonl").read_text().splitlines()]

    assert log(a) == log(b)
    return log(a)


def key_value_rows(n: int, seed: int = 0) -> list[dict]:
    """A lookup task: a random 4-letter key maps to a random letter. Unseen keys can only be answered by a model
    that knows the table, which makes it a clean test of whether LLM features reach the SLM."""
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(4)))
    rows = [{"id": f"k{i}", "src": k, "tgt": rng.choice(string.ascii_lowercase)} for i, k in enumerate(sorted(keys))]
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def kv_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kv")
    rows = key_value_rows(120)
    return {"all": write_jsonl(d / "all.jsonl", rows), "train": write_jsonl(d / "train.jsonl", rows[:80]),
            "dev": write_jsonl(d / "dev.jsonl", rows[80:])}


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> dict[str, Path]:
    """Short English prompts with targets of varied lengths (so batches need padding)."""
    d = tmp_path_factory.mktemp("toy")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rng = random.Random(1)
    rows = []
    for i in range(24):
        src = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        rows.append({"id": f"t{i}", "src": src, "tgt": src.upper()[: rng.randint(2, 12)]})
    return {"train": write_jsonl(d / "train.jsonl", rows[:16]), "dev": write_jsonl(d / "dev.jsonl", rows[16:])}


@pytest.fixture
def decode_calls(monkeypatch) -> list:
    """Counts the calls of our decoding loop (decoding.decode), so that a test of it can assert that it ran and not
    transformers' generate (options decode does not know fall back to generate without a word)."""
    from llm2slm_cli import decoding

    calls: list = []
    real = decoding.decode
    monkeypatch.setattr(decoding, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, code: int = 0):
        result = self.runner.invoke(app, [str(a) for a in args])
        if result.exit_code != code:
            raise AssertionError(f"exit {result.exit_code} (expected {code}) for {args}:\n{result.output}\n"
                                 f"{result.exception!r}")
        return result


def error_line(cli, *args) -> str:
    """The one `error:` line of a command that must exit with code 2 (never a traceback)."""
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0].removeprefix("error: ")


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


SERVE_TEMPLATE = "shout: {src}"


@pytest.fixture(scope="session")
def trained_checkpoint(toy_files, tmp_path_factory) -> Path:
    """An LLM-to-SLM checkpoint (tiny-llama -> tiny-llama, a template) trained for a few steps in the test with the
    train stage itself (enough for responses that differ by prompt): what `load`, `generate --prompt`, `serve` and
    `export` are tested on."""
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.stages import train

    run = tmp_path_factory.mktemp("served") / "run"
    train.run(TrainConfig(inputs=[toy_files["train"]], llm="tiny-llama", slm="tiny-llama", template=SERVE_TEMPLATE,
                          out=run, batch_size=8, micro_batch_size=8, max_steps=3, lr=1e-3, device="cpu",
                          quiet=True))
    return run / "final"


@pytest.fixture
def crash_distill_on_shard(monkeypatch):
    """crash_distill_on_shard(k): distill-labels raises while writing shard k (its k+1-th examples part); call the
    returned function to let it write again."""
    from llm2slm_cli.stages import distill

    real = distill.labels_table

    def arm(k: int):
        calls = {"n": 0}

        def crash(rows, *shard):
            calls["n"] += 1
            if calls["n"] == k + 1:
                raise RuntimeError(f"simulated crash while writing shard {k}")
            return real(rows, *shard)

        monkeypatch.setattr(distill, "labels_table", crash)
        return lambda: monkeypatch.setattr(distill, "labels_table", real)

    return arm


def send_chat_completion(handler, model: str, content: str) -> None:
    """Answer an OpenAI-style chat request on a BaseHTTPRequestHandler (the fake judge endpoints of the tests)."""
    data = json.dumps({"id": "c1", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
