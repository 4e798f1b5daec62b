"""export --gguf and --backend llama-cpp: a decoder-only SLM written to GGUF (trimmed vocabulary kept, with its id
map back to the tokenizer) decodes in llama.cpp from the fused prompt embeddings, and a float32 GGUF's greedy tokens
are exactly our float32 loop's (decoding.decode) on tiny Llama, Gemma-3, GPT2 and Qwen2 SLMs trained here.

Tests that run llama.cpp skip where llama-cpp-python is not installed (the 'llama-cpp' extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import error_line

GREEDY = {"do_sample": False, "num_beams": 1, "max_new_tokens": 24}
PROMPTS = ["alpha beta", "gamma", "delta epsilon zeta eta theta iota kappa alpha beta gamma", "iota kappa"]


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the 'llama-cpp' extra) is not installed")


def _tiny_gemma3(directory: Path) -> Path:
    """A fresh 2-layer Gemma-3 over tiny-llama's byte vocabulary (so it reads the LLM's tokens), one sliding layer
    whose window (6) is shorter than the prompts, then a full one: llama.cpp must take each layer's kind as given."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llm2slm_cli import loading as M

    config = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=512, bos_token_id=3, eos_token_id=1, pad_token_id=0)
    import torch

    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(directory)
    M.load_tokenizer("tiny-llama").save_pretrained(directory)
    return directory


def _tiny_qwen2(directory: Path) -> Path:
    """A fresh 2-layer Qwen2 (q, k, v biases) over tiny-llama's byte vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm2slm_cli import loading as M

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=3,
                         eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # fresh biases are zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(directory)
    M.load_tokenizer("tiny-llama").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(toy_files, tmp_path_factory) -> dict[str, Path]:
    """LLM-to-SLM checkpoints trained a few steps here with `train`: tiny-llama -> tiny-llama, and trimmed
    vocabularies on a Gemma-3 and a GPT2 SLM."""
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.stages import train

    root = tmp_path_factory.mktemp("gguf")
    slms = {"llama": ("tiny-llama", False), "gemma3-trim": (str(_tiny_gemma3(root / "gemma3-slm")), True),
            "gpt2-trim": ("tiny-gpt2", True), "qwen2": (str(_tiny_qwen2(root / "qwen2-slm")), False)}
    out = {}
    for name, (slm, trim) in slms.items():
        train.run(TrainConfig(inputs=[toy_files["train"]], llm="tiny-llama", slm=slm, template="shout: {src}",
                              out=root / name, batch_size=8, micro_batch_size=8, max_steps=3, lr=1e-3,
                              device="cpu", quiet=True, trim_vocab=trim))
        out[name] = root / name / "final"
    return out


def _export(cli, checkpoint: Path, out: Path, quantization: str) -> Path:
    cli("export", checkpoint, "--gguf", quantization, "--include-llm", "no", "--out", out, "--quiet")
    return out


def _decode(spec: Path, backend: str, prompts=PROMPTS, **generation) -> list[list[int]]:
    from llm2slm_cli.data import pad
    from llm2slm_cli.generation import open_model

    model, _, template, _ = open_model(str(spec), backend=backend)
    tok = model.prompt_tokenizer
    ids = [tok(template.format(src=p))["input_ids"] for p in prompts]
    return model.generate(*pad(ids, tok.pad_token_id), **{**GREEDY, **generation})


@pytest.mark.parametrize("name", ["llama", "gemma3-trim", "gpt2-trim", "qwen2"])
def test_an_f32_gguf_decodes_exactly_as_our_float32_loop(cli, checkpoints, tmp_path, name):
    _llama_cpp()
    exported = _export(cli, checkpoints[name], tmp_path / "x", "f32")
    ours = _decode(exported, "torch")
    theirs = _decode(exported, "llama-cpp")
    assert theirs == ours
    assert sum(len(t) for t in ours) > len(PROMPTS)  # real responses, not only end tokens
    # the exact-length protocol too (the end token banned until the last step): every token position compared
    forced = {"min_new_tokens": 24}
    assert _decode(exported, "llama-cpp", **forced) == _decode(exported, "torch", **forced)


def test_the_gguf_vocabulary_is_the_trimmed_one_mapped_back_to_the_tokenizer(cli, checkpoints, tmp_path):
    import gguf
    from safetensors.torch import load_file

    exported = _export(cli, checkpoints["gemma3-trim"], tmp_path / "x", "f32")
    kept = load_file(str(exported / "model.safetensors"))["slm_vocab"].tolist()
    reader = gguf.GGUFReader(str(exported / "slm.gguf"))
    token_ids = reader.get_field("llm2slm.token_ids").contents()
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    trim = json.loads((exported / "llm2slm.json").read_text())["trim_vocab"]
    assert token_ids == kept and len(tokens) == trim["kept"] < trim["full"] == 260
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.shape.tolist() == [64, trim["kept"]]
    assert reader.get_field("gemma3.attention.sliding_window_pattern").contents() == [True, False]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert "slm.gguf" in manifest["files"]


def test_quantized_ggufs_are_llama_cpps_own(cli, checkpoints, tmp_path):
    _llama_cpp()
    from llm2slm_cli import gguf_export

    sizes = {}
    for q in ("f32", "f16", "Q8_0", "Q4_K_M"):
        exported = _export(cli, checkpoints["gemma3-trim"], tmp_path / q, q)
        sizes[q] = (exported / "slm.gguf").stat().st_size
        assert gguf_export.read_metadata(exported / "slm.gguf")["file_type"] == {"f32": 0, "f16": 1, "Q8_0": 7,
                                                                                  "Q4_K_M": 15}[q]
        out = _decode(exported, "llama-cpp", prompts=PROMPTS[:2])
        assert len(out) == 2 and all(len(t) <= GREEDY["max_new_tokens"] for t in out)
    assert sizes["f32"] > sizes["f16"] > sizes["Q8_0"]


def test_generate_and_the_api_take_the_backend(cli, checkpoints, toy_files, tmp_path):
    _llama_cpp()
    from llm2slm_cli import load

    exported = _export(cli, checkpoints["gemma3-trim"], tmp_path / "x", "f32")
    for backend in ("torch", "llama-cpp"):
        cli("generate", toy_files["dev"], "--model", exported, "--backend", backend, "--num-beams", 1,
            "--max-new-tokens", 12, "--out", tmp_path / backend, "--quiet")
    import pyarrow.parquet as pq

    torch_rows = pq.read_table(tmp_path / "torch" / "predictions.parquet").to_pylist()
    llama_rows = pq.read_table(tmp_path / "llama-cpp" / "predictions.parquet").to_pylist()
    assert [r["prediction"] for r in llama_rows] == [r["prediction"] for r in torch_rows]
    manifest = json.loads((tmp_path / "llama-cpp" / "manifest.json").read_text())
    assert manifest["model"]["backend"] == "llama-cpp" and manifest["model"]["gguf_quantization"] == "f32"
    # stored features (`encode` with the checkpoint's LLM) instead of the LLM's pass: the same predictions
    cli("encode", toy_files["dev"], "--model", "tiny-llama", "--template", "shout: {src}", "--out", tmp_path / "f",
        "--quiet")
    cli("generate", toy_files["dev"], "--model", exported, "--backend", "llama-cpp", "--features", tmp_path / "f",
        "--num-beams", 1, "--max-new-tokens", 12, "--out", tmp_path / "stored", "--quiet")
    stored = pq.read_table(tmp_path / "stored" / "predictions.parquet").to_pylist()
    assert [r["prediction"] for r in stored] == [r["prediction"] for r in torch_rows]
    model, ours = load(exported, backend="llama-cpp"), load(exported)
    streamed: list[str] = []
    [result] = model.complete(["alpha beta"], num_beams=1, max_new_tokens=12,
                              on_text=lambda i, text: streamed.append(text))
    assert "".join(streamed) == result.text == ours.complete(["alpha beta"], num_beams=1, max_new_tokens=12)[0].text
    # sampling draws each prompt from its own seed's generator, as our loop does, over the same scores
    sampled = {"sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7, "max_new_tokens": 12}
    assert [r.token_ids for r in model.complete(PROMPTS, **sampled)] == \
        [r.token_ids for r in ours.complete(PROMPTS, **sampled)]


def test_bench_times_the_llama_cpp_backend_row(cli, checkpoints, tmp_path):
    _llama_cpp()
    exported = _export(cli, checkpoints["llama"], tmp_path / "x", "f32")
    cli("bench", "--model", f"ours={exported}", "--llama-cpp-model", f"ours-llama={exported}", "--prompt-length", 8,
        "--new-tokens", 4, "--repeats", 1, "--warmup", 0, "--out", tmp_path / "b", "--quiet")
    import pyarrow.parquet as pq

    rows = {r["label"]: r for r in pq.read_table(tmp_path / "b" / "bench.parquet").to_pylist()}
    assert rows["ours-llama"]["engine"] == "llama.cpp" and rows["ours"]["engine"] == "llm2slm"
    assert rows["ours-llama"]["new_tokens"] == 4 and rows["ours-llama"]["ms_per_token"] > 0
    assert rows["ours-llama"]["dtype"] == "gguf f32" and rows["ours"]["dtype"] == "float32"


def test_without_llama_cpp_python_the_backend_and_its_quantizations_are_one_line(cli, checkpoints, tmp_path,
                                                                                 monkeypatch):
    from llm2slm_cli import errors

    real = errors._installed
    monkeypatch.setattr(errors, "_installed", lambda module: module != "llama_cpp" and real(module))
    line = error_line(cli, "generate", "--model", checkpoints["llama"], "--prompt", "alpha", "--backend",
                      "llama-cpp")
    assert "'llama-cpp' extra" in line and 'pip install -e ".[llama-cpp]"' in line
    line = error_line(cli, "export", checkpoints["llama"], "--gguf", "Q4_K_M", "--out", tmp_path / "e")
    assert "'llama-cpp' extra" in line and not (tmp_path / "e").exists()
    cli("export", checkpoints["llama"], "--gguf", "f16", "--out", tmp_path / "f16", "--quiet")  # no llama.cpp needed
    assert (tmp_path / "f16" / "slm.gguf").read_bytes()[:4] == b"GGUF"


def test_bad_input_is_refused_in_one_line(cli, checkpoints, toy_files, tmp_path):
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.stages import train

    t5 = tmp_path / "t5"
    train.run(TrainConfig(inputs=[toy_files["train"]], llm="tiny-t5", slm="tiny-t5", out=t5, batch_size=8,
                          micro_batch_size=8, max_steps=1, device="cpu", quiet=True))
    line = error_line(cli, "export", t5 / "final", "--gguf", "f32", "--out", tmp_path / "e")
    assert "decoder-only" in line and "encoder-decoder" in line and not (tmp_path / "e").exists()
    line = error_line(cli, "generate", "--model", checkpoints["llama"], "--prompt", "alpha", "--gguf",
                      tmp_path / "x.gguf")
    assert "--backend llama-cpp" in line
    _llama_cpp()
    line = error_line(cli, "generate", "--model", t5 / "final", "--prompt", "alpha", "--backend", "llama-cpp")
    assert "encoder-decoder" in line
    line = error_line(cli, "generate", "--model", checkpoints["llama"], "--prompt", "alpha", "--backend",
                      "llama-cpp")
    assert "slm.gguf" in line and "export" in line
    other = _export(cli, checkpoints["gpt2-trim"], tmp_path / "other", "f32")
    line = error_line(cli, "generate", "--model", checkpoints["llama"], "--prompt", "alpha", "--backend",
                      "llama-cpp", "--gguf", other / "slm.gguf")
    assert "another checkpoint" in line
    (tmp_path / "not.gguf").write_text("hello")
    line = error_line(cli, "generate", "--model", checkpoints["llama"], "--prompt", "alpha", "--backend",
                      "llama-cpp", "--gguf", tmp_path / "not.gguf")
    assert "not a GGUF file" in line
    mine = _export(cli, checkpoints["llama"], tmp_path / "mine", "f32")
    line = error_line(cli, "generate", "--model", mine, "--prompt", "alpha", "--backend", "llama-cpp",
                      "--num-beams", 4)
    assert "greedily or samples" in line and "--num-beams" in line
    line = error_line(cli, "generate", "--model", mine, "--prompt", "alpha", "--backend", "llama-cpp",
                      "--repetition-penalty", 1.2)
    assert "greedily or samples" in line and "--repetition-penalty" in line
    # greedy is the default there: no --num-beams needed
    out = cli("generate", "--model", mine, "--prompt", "alpha", "--backend", "llama-cpp", "--max-new-tokens", 4)
    assert out.output.strip() == cli("generate", "--model", mine, "--prompt", "alpha", "--num-beams", 1,
                                     "--max-new-tokens", 4).output.strip()
    line = error_line(cli, "generate", "--model", "preset:tiny-llama", "--prompt", "alpha", "--backend", "llama-cpp")
    assert "checkpoint" in line


def test_serve_answers_concurrent_clients_through_llama_cpp(cli, checkpoints, tmp_path):
    _llama_cpp()
    pytest.importorskip("uvicorn", reason="needs the 'serve' extra: pip install -e \".[serve]\"")
    pytest.importorskip("openai", reason="needs the 'dev' extra: pip install -e \".[dev]\"")
    from concurrent.futures import ThreadPoolExecutor

    from llm2slm_cli import load
    from tests.test_serve import Running

    exported = _export(cli, checkpoints["gemma3-trim"], tmp_path / "x", "f32")
    want = [c.text.strip() for c in load(exported).complete(PROMPTS, num_beams=1, max_new_tokens=12)]
    running = Running(load(exported, backend="llama-cpp", device="cpu"), name="m", max_batch_size=4,
                      batch_wait_ms=50, max_queue=16)
    try:
        assert running.engine.batching == "request"  # no step-level batching over llama.cpp's cache

        def ask(prompt: str) -> str:
            got = running.client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
            return got.choices[0].text.strip()

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(ask, PROMPTS)) == want
    finally:
        running.close()
