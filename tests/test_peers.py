"""Peer runtimes as `llm2slm bench` rows: a real CTranslate2 row on a tiny converted preset (same protocol, exact
lengths, its greedy tokens checked against ours), and one-line errors for a runtime that is not installed or a model
that is not there. The llama.cpp row runs where llama-cpp-python is installed, on a GGUF file written here."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
from conftest import error_line

from llm2slm_cli import loading as M

TINY = ["--new-tokens", "6", "--prompt-length", "10", "--repeats", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory):
    """tiny-t5 with noisy weights saved as a transformers directory (hf/, beside it), then converted by
    CTranslate2's converter. Fresh weights alone decode one token over and over, which would make the greedy check
    trivially true; the noise makes the greedy tokens vary."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="needs the 'ctranslate2' extra: pip install -e "
                                                            "\".[ctranslate2]\"")
    import torch

    d = tmp_path_factory.mktemp("ct2")
    model = M.load_model("preset:tiny-t5")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
    M.save_plain(model, d / "hf")
    M.load_tokenizer("preset:tiny-t5").save_pretrained(str(d / "hf"))
    ctranslate2.converters.TransformersConverter(str(d / "hf")).convert(str(d / "ct2"))
    return d / "ct2"


def test_ctranslate2_rows_beside_ours(cli, ct2_dir, tmp_path):
    out = tmp_path / "b"
    hf = ct2_dir.parent / "hf"
    cli("bench", "--slm", hf, "--ctranslate2", f"ct2={ct2_dir}", "--ct2-compute-type", "float32,int8",
        "--peer-source", f"ct2={hf}", *TINY, "--out", out, "--quiet")
    rows = {r["label"]: r for r in pq.read_table(out / "bench.parquet").to_pylist()}
    assert set(rows) == {"SLM", "ct2 [float32]", "ct2 [int8]"}
    for label in ("ct2 [float32]", "ct2 [int8]"):
        r = rows[label]
        assert (r["role"], r["engine"], r["device"]) == ("peer", "ctranslate2", "cpu")
        assert r["new_tokens"] == 6 and r["prompt_length"] == 10 and r["batch_size"] == 1 and r["repeats"] == 2
        assert 0 < r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"] < 30
        assert r["ms_per_token"] == pytest.approx(r["seconds_median"] / 6 * 1000)
        assert r["flops_per_token"] is None and r["weights_mb"] == pytest.approx(
            (ct2_dir / "model.bin").stat().st_size / 2**20)
        assert r["time_vs_slm"] == pytest.approx(r["seconds_median"] / rows["SLM"]["seconds_median"])
    assert rows["ct2 [float32]"]["dtype"] == "float32" and rows["ct2 [int8]"]["dtype"] == "int8"
    assert rows["SLM"]["greedy_match"] is None
    models = json.loads((out / "manifest.json").read_text())["models"]
    check = models["ct2 [float32]"]["greedy_check"]
    # the same fp32 model decoded greedily by both: the same tokens
    assert check["equal"] and check["same_prefix_tokens"] == 6 and rows["ct2 [float32]"]["greedy_match"] == 1.0
    assert models["ct2 [int8]"]["runtime"] == "ctranslate2" and models["ct2 [int8]"]["threads"] == 1


def test_the_ctranslate2_row_generates_exactly_n_tokens(ct2_dir):
    """The length the row reports is the length CTranslate2 produced (end token suppressed until then)."""
    import torch

    from llm2slm_cli.bench.peers import CT2Model

    model = CT2Model(ct2_dir, "int8", torch.device("cpu"), threads=1)
    for n in (1, 7):
        assert [len(t) for t in model.generate_ids([[10, 11, 12], [40, 41, 42]], n, 1)] == [n, n]
    assert len(set(model.generate_ids([list(range(10, 20))], 6, 1)[0])) > 1  # the greedy check compares something


def test_a_missing_runtime_is_one_line_and_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # find_spec: not installed
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    (tmp_path / "ct2").mkdir()
    msg = error_line(cli, "bench", "--ctranslate2", f"x={tmp_path / 'ct2'}", "--out", tmp_path / "o")
    assert msg == ("--ctranslate2 needs the 'ctranslate2' extra (ctranslate2 is not installed): "
                   'pip install -e ".[ctranslate2]"')
    msg = error_line(cli, "bench", "--llama-cpp", f"x={tmp_path / 'm.gguf'}", "--out", tmp_path / "o")
    assert msg == ("--llama-cpp needs the 'llama-cpp' extra (llama_cpp is not installed): "
                   'pip install -e ".[llama-cpp]" (it compiles llama.cpp: minutes)')
    assert not (tmp_path / "o").exists()


def test_peer_inputs_are_checked_before_anything_runs(cli, tmp_path):
    pytest.importorskip("ctranslate2", reason="needs the 'ctranslate2' extra: pip install -e \".[ctranslate2]\"")
    (tmp_path / "ct2").mkdir()
    assert "not a CTranslate2 model directory" in error_line(cli, "bench", "--ctranslate2", f"x={tmp_path / 'ct2'}",
                                                             "--out", tmp_path / "o")
    assert "--ct2-compute-type" in error_line(cli, "bench", "--ctranslate2", f"x={tmp_path / 'ct2'}",
                                              "--ct2-compute-type",
                                              "int4", "--out", tmp_path / "o")
    assert "no --ctranslate2 or --llama-cpp row labelled 'y'" in error_line(
        cli, "bench", "--slm", "tiny-t5", "--peer-source", "y=tiny-t5", "--out", tmp_path / "o")


def test_llama_cpp_row(cli, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the 'llama-cpp' extra: pip install -e \".[llama-cpp]\"")
    gguf = tmp_path / "tiny-llama.gguf"
    _write_tiny_llama_gguf(gguf)
    out = tmp_path / "b"
    cli("bench", "--llama-cpp", f"lcpp={gguf}", *TINY, "--batch-size", "1", "--batch-size", "2", "--out", out,
        "--quiet")
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    assert [(r["label"], r["engine"], r["batch_size"], r["new_tokens"]) for r in rows] == [("lcpp", "llama.cpp", 1, 6)]
    assert 0 < rows[0]["seconds_median"] < 30
    assert any("llama.cpp rows take batch size 1" in s for s in json.loads((out / "bench.json").read_text())["skipped"])
    # the greedy tokens come from the logits of the context (llama-cpp-python 0.3.36 leaves `scores` at zero
    # without logits_all, which made every token 0): they are llama.cpp's own argmax
    import llama_cpp
    import numpy as np

    from llm2slm_cli.bench.peers import LlamaCppModel

    prompt = list(range(10, 20))
    tokens = LlamaCppModel(gguf, 1, 64).generate_ids([prompt], 3, 1)[0]
    ref = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, logits_all=True, verbose=False)
    ref.eval(prompt)
    assert tokens[0] == int(np.argmax(ref.scores[len(prompt) - 1])) and tokens != [0, 0, 0], tokens


def _write_tiny_llama_gguf(path) -> None:
    """A tiny Llama in GGUF (fresh weights, a 260-token byte vocabulary), written with the gguf package."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    d, ff, layers, heads, kv, vocab = 64, 128, 2, 4, 2, 260
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3, 3] + [6] * 256)  # unknown, control x3, byte tokens
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab, d)
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    tensor("output.weight", vocab, d)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", d, d)
        tensor(f"blk.{i}.attn_k.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_v.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_output.weight", d, d)
        tensor(f"blk.{i}.ffn_gate.weight", ff, d)
        tensor(f"blk.{i}.ffn_up.weight", ff, d)
        tensor(f"blk.{i}.ffn_down.weight", d, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# A peer runtime the bench's child process loads instead of a real one: "good" decodes, "crash" dies of SIGSEGV in
# its first decode (as llama-cpp-python does on some CPUs), "hang" never returns.
FAKE_PEER = """
import os, signal, sys, time
from llm2slm_cli.bench import measure, peers

class Fake:
    engine, vocab_size, special_ids, file_bytes, version, device = "llama.cpp", 300, {0, 1, 2}, 24, "fake", "cpu"

    def __init__(self, label):
        self.label = label

    def generate_ids(self, prompts, n, num_beams):
        if self.label == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.label == "hang":
            time.sleep(600)
        return [[5] * n for _ in prompts]

peers.load_peer = lambda plan, device, context: Fake(plan.label)
measure.peer_child(sys.argv[1], sys.argv[2])
"""


@pytest.fixture
def fake_peer(monkeypatch, tmp_path):
    """--llama-cpp LABEL=FILE rows whose child process runs FAKE_PEER; returns the (header-only) GGUF file."""
    from llm2slm_cli.bench import measure, peers

    monkeypatch.setattr(peers, "require", lambda module, option: None)  # no llama-cpp-python needed
    monkeypatch.setattr(measure, "peer_command",
                        lambda request, result: [sys.executable, "-c", FAKE_PEER, str(request), str(result)])
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    return gguf


def test_a_peer_that_crashes_is_its_rows_error_and_every_other_row_is_kept(cli, fake_peer, tmp_path):
    out = tmp_path / "b"
    result = cli("bench", "--slm", "tiny-gpt2", "--llama-cpp", f"good={fake_peer}", "--llama-cpp",
                 f"crash={fake_peer}", *TINY, "--out", out)
    rows = {r["label"]: r for r in pq.read_table(out / "bench.parquet").to_pylist()}
    assert list(rows) == ["SLM", "good", "crash"]
    for label in ("SLM", "good"):  # measured, in this process and in the good child
        assert rows[label]["error"] is None and 0 < rows[label]["seconds_median"] < 30
        assert rows[label]["new_tokens"] == 6 and rows[label]["repeats"] == 2
    assert (rows["good"]["engine"], rows["good"]["dtype"], rows["good"]["device"]) == ("llama.cpp", "gguf", "cpu")
    crash = rows["crash"]
    assert crash["error"] == "the llama.cpp process died of signal SIGSEGV before it finished this row"
    assert (crash["role"], crash["engine"], crash["new_tokens"], crash["prompt_length"]) == ("peer", "llama.cpp", 6, 10)
    assert crash["seconds_median"] is None and crash["ms_per_token"] is None and crash["speedup_vs_llm"] is None
    assert "row 'crash' failed: the llama.cpp process died of signal SIGSEGV" in result.output
    models = json.loads((out / "manifest.json").read_text())["models"]
    assert models["crash"]["error"] == crash["error"] and models["good"]["version"] == "fake"
    assert [r["label"] for r in json.loads((out / "bench.json").read_text())["rows"]] == ["SLM", "good", "crash"]
    assert (out / "ms_per_token.png").is_file()


def test_a_peer_that_hangs_is_stopped_at_the_time_limit(cli, fake_peer, tmp_path):
    out = tmp_path / "b"
    cli("bench", "--slm", "tiny-gpt2", "--llama-cpp", f"hang={fake_peer}", *TINY, "--peer-timeout", "3", "--out", out,
        "--quiet")
    rows = {r["label"]: r for r in pq.read_table(out / "bench.parquet").to_pylist()}
    assert rows["hang"]["error"] == "no result within --peer-timeout 3 s: the llama.cpp process was stopped (a hang?)"
    assert rows["SLM"]["error"] is None and rows["SLM"]["seconds_median"] > 0


def test_a_peer_process_that_exits_without_a_result_says_how(monkeypatch):
    from llm2slm_cli.bench import measure
    from llm2slm_cli.bench.plan import Plan

    plan = Plan("x", "peer", None, None, engine="llama.cpp")
    for code, how in ((139, "exited with code 139 (128 + SIGSEGV)"), (3, "exited with code 3")):
        child = f"import os, sys; print('ggml: out of luck', file=sys.stderr, flush=True); os._exit({code})"
        monkeypatch.setattr(measure, "peer_command", lambda request, result, child=child: [sys.executable, "-c", child])
        assert measure.run_peer_child({"plan": plan}, timeout=60) == {
            "error": f"the llama.cpp process {how} before it finished this row (its last words: ggml: out of luck)"}


def test_rows_whose_repeats_vary_by_more_than_1_3x_are_warned_about():
    from llm2slm_cli.bench.timing import unsteady

    def row(label, part, seconds, batch=1, n=8):
        return {"label": label, "part": part, "batch_size": batch, "new_tokens": n, "run_seconds": seconds}

    rows = [row("SLM", "main", [0.010, 0.011, 0.014]),  # 1.4x
            row("LLM", "main", [0.0100, 0.0125]),  # 1.25x: steady enough
            row("SLM", "sweep", [0.1, 0.2, 0.15], n=50),  # 2x
            row("one", "main", [0.5]),  # one repeat: nothing to compare
            row("failed", "main", None)]
    assert unsteady(rows) == [
        "warning: row 'SLM' (batch 1): its 3 repeats vary 1.40x (10 to 14 ms), more than 1.3x: the machine was "
        "busy, so its median is less sure",
        "warning: row 'SLM' (50 tokens): its 3 repeats vary 2.00x (100 to 200 ms), more than 1.3x: the machine "
        "was busy, so its median is less sure"]
