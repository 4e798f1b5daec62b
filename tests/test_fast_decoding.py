"""Faster decoding, same tokens: the static-cache (and compiled) path of decoding.decode against the eager one, and
int8 weights on a CPU (quantize.py) against float32, through the Python API and `generate`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import error_line
from test_decoding import PROMPTS, SETTINGS, _batch, _model

from llm2slm_cli import checkpoint, load
from llm2slm_cli import loading as M
from llm2slm_cli.decoding import DECODE_OPTIONS, Search, generate_plain, set_decode_options
from llm2slm_cli.errors import UserError
from llm2slm_cli.padding import strip_generated
from llm2slm_cli.quantize import check_quantize, quantize_linears

PAIRS = [("tiny-gpt2", None), ("tiny-t5", "tiny-t5-large"), ("tiny-llama", "tiny-llama")]


def _static_and_eager(model, ids, mask, settings, **options):
    eager = model.generate_ids(ids, mask, **settings)
    set_decode_options(model.slm, static_cache=True, **options)
    try:
        static = model.generate_ids(ids, mask, **settings)
    finally:
        model.slm.__dict__.pop(DECODE_OPTIONS)
    return eager, static


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[1], SETTINGS[3],
                                      dict(do_sample=False, num_beams=1, max_new_tokens=20, min_new_tokens=4)],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("slm,llm", PAIRS)
def test_static_cache_gives_the_eager_tokens(slm, llm, settings, decode_calls):
    """Decoder-only and encoder-decoder SLMs, alone and fed by an LLM; greedy and beam search; rows that end at
    different steps (the end-token head of test_decoding)."""
    model = _model(slm, llm)
    ids, mask = _batch(model)
    eager, static = _static_and_eager(model, ids, mask, settings)
    assert len(decode_calls) == 2
    assert torch.equal(eager, static)


def _host_syncs(monkeypatch) -> dict[str, int]:
    """Counts the tensor -> Python conversions (each waits for the device) from here on."""
    counts = {"n": 0}
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_static_greedy_waits_on_the_device_only_every_check(monkeypatch):
    """A decoder-only model on the static path: the finished flags stay on the device and are read every
    `check_every` steps; nothing else in a step converts a tensor to Python (the eager cache's masks do, every
    step)."""
    model = M.load_model("tiny-llama", role="model").eval()
    ids = torch.randint(10, 250, (2, 7))
    search = Search(max_new_tokens=16, eos_token_id=model.config.eos_token_id, pad_token_id=0, check_every=8)
    counts = _host_syncs(monkeypatch)
    generate_plain(model, ids, torch.ones_like(ids), dataclasses.replace(search, static_cache=True))
    static = counts["n"]
    counts["n"] = 0
    generate_plain(model, ids, torch.ones_like(ids), search)
    assert static <= 16 // 8 + 1 < counts["n"]  # the checks, and one in the prompt's pass


@pytest.mark.slow  # torch.compile with inductor takes about a minute per model on a 2-core CPU
@pytest.mark.parametrize("slm,llm", [("tiny-gpt2", None), ("tiny-t5", "tiny-t5-large")])
def test_compiled_steps_give_the_eager_tokens(slm, llm):
    model = _model(slm, llm)
    ids, mask = _batch(model)
    settings = dict(do_sample=False, num_beams=1, max_new_tokens=10)
    eager, compiled = _static_and_eager(model, ids, mask, settings, compile=True)
    assert torch.equal(eager, compiled)


# ------------------------------------------------------------------------------------------------------- int8


def _checkpoint(tmp_path, slm: str, llm: str | None):
    model = _model(slm, llm)
    checkpoint.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _linears(module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@pytest.mark.parametrize("slm,llm", PAIRS)
def test_int8_quantizes_every_linear_but_what_stays_float(tmp_path, slm, llm):
    """Every Linear of the SLM (GPT2's Conv1D layers included) and of the LLM's feature path; the head too unless
    int8-body; the projector and embeddings stay float32."""
    ckpt = _checkpoint(tmp_path, slm, llm)
    for mode in ("int8", "int8-body"):
        model = load(ckpt, quantize=mode, device="cpu")
        impl = model.impl
        head = impl.slm.get_output_embeddings()
        left = _linears(impl.slm)
        assert left == ([] if mode == "int8" else [n for n, m in impl.slm.named_modules() if m is head])
        assert type(impl.slm.get_input_embeddings()) is not torch.nn.Linear
        if llm is not None:
            part = impl.llm.model.get_encoder() if impl.llm.kind == "encoder-decoder" else impl.llm.model.base_model
            assert _linears(part) == []
            assert len(_linears(impl.projector)) == 2
        assert model.identity["quantization"]["head"] == ("int8" if mode == "int8" else "float32")


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-t5", "tiny-llama"])
def test_int8_logits_stay_close_to_float32(spec):
    model = M.load_model(spec, role="model").eval()
    int8 = M.load_model(spec, role="model").eval()
    assert quantize_linears(int8)
    ids = torch.randint(10, 250, (2, 9))
    extra = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.inference_mode():
        f, q = model(input_ids=ids, **extra).logits, int8(input_ids=ids, **extra).logits
    assert (f - q).abs().max() < 0.05 * f.abs().max()
    assert torch.nn.functional.cosine_similarity(f, q, dim=-1).min() > 0.99
    assert (f.argmax(-1) == q.argmax(-1)).float().mean() >= 0.75


def test_generate_int8_runs_our_loop_and_records_it(cli, tmp_path, toy_files, decode_calls):
    ckpt = _checkpoint(tmp_path, "tiny-t5", "tiny-t5-large")
    out = {}
    for mode in ("none", "int8"):
        cli("generate", toy_files["dev"], "--model", ckpt, "--num-beams", 1, "--max-new-tokens", 6, "--quantize",
            mode, "--device", "cpu", "--out", tmp_path / mode, "--quiet")
        out[mode] = json.loads((tmp_path / mode / "manifest.json").read_text())
    assert len(decode_calls) == 2
    assert "quantization" not in out["none"]["model"]
    assert out["int8"]["model"]["quantization"]["quantize"] == "int8"
    assert out["int8"]["model"]["quantization"]["layers"] > 0
    first = load(ckpt, device="cpu").generate(PROMPTS, num_beams=1, max_new_tokens=1)
    assert load(ckpt, quantize="int8", device="cpu").generate(PROMPTS, num_beams=1, max_new_tokens=1) == first


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--dtype", "bfloat16"], "quantizes float32 weights"),
    (["--quantize", "int8", "--compile"], "do not go together"),
    (["--quantize", "int8-body", "--speculative"], "not for speculative decoding"),
    (["--compile", "--speculative"], "not for speculative decoding"),
])
def test_bad_combinations_are_refused(cli, tmp_path, toy_files, args, message):
    line = error_line(cli, "generate", toy_files["dev"], "--model", "tiny-gpt2", "--out", tmp_path / "o", *args)
    assert message in line


def test_int8_is_refused_off_the_cpu(cli, tmp_path, toy_files):
    result = cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--out", tmp_path / "o", "--quantize", "int4",
                 code=2)
    assert "'int4' is not one of 'none', 'int8-weight', 'int8-dynamic', 'int8', 'int8-body'" in result.output
    with pytest.raises(UserError, match="for decoding on a CPU"):
        check_quantize("int8", device=torch.device("cuda", 0))
    check_quantize("int8", device=torch.device("cpu"))
    with pytest.raises(UserError, match="quantize must be one of"):
        load("tiny-gpt2", quantize="int4")


def test_bench_quantize_times_int8_models_and_refuses_half_precision(cli, tmp_path, monkeypatch):
    """bench --quantize int8: the SLM row, the LLM row and LLM-to-SLM (its SLM; the shared LLM once) decode with
    int8 Linear layers -- every Linear but the input embeddings is a dynamically quantized one when timed."""
    import torch

    from llm2slm_cli.bench import timing as B

    seen = []
    real = B.measure

    def spy(rows, **kw):
        for row in rows:
            linears = [m for mod in row.modules for m in mod.modules() if type(m) is torch.nn.Linear]
            quantized = [m for mod in row.modules for m in mod.modules() if "DynamicQuantizedLinear" in type(m).__name__
                         or type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao")]
            seen.append((row.label, len(quantized) > 0, linears))
        return real(rows, **kw)

    monkeypatch.setattr(B, "measure", spy)
    cli("bench", "--llm", "tiny-t5-large", "--slm", "tiny-gpt2", "--quantize", "int8", "--new-tokens", "3",
        "--prompt-length", "4", "--repeats", "1", "--warmup", "0", "--no-flops", "--out", tmp_path / "b", "--quiet")
    labels = {label for label, _, _ in seen}
    assert labels == {"LLM", "SLM", "LLM-to-SLM"}, seen
    assert all(q for _, q, _ in seen), seen
    # what stays float (as in generate --quantize): the projector's two layers and the vocabulary adapter's
    # projection of the LLM's embedding rows (the SLM's input embedding)
    assert {label: len(lin) for label, _, lin in seen} == {"SLM": 0, "LLM": 0, "LLM-to-SLM": 3}, seen
    assert "--quantize int8 quantizes float32 weights" in error_line(
        cli, "bench", "--slm", "tiny-gpt2", "--quantize", "int8", "--dtype", "bfloat16", "--out", tmp_path / "x")


@pytest.mark.parametrize("beams", [dict(num_beams=4, length_penalty=1.0, early_stopping=False),
                                   dict(num_beams=4, length_penalty=0.6, early_stopping=True),
                                   dict(num_beams=2, length_penalty=2.0, early_stopping="never")],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-t5", "tiny-llama"])
def test_beam_search_asking_every_8_steps_gives_the_same_beams_and_waits_only_then(spec, beams, monkeypatch):
    """Beam search's stopping question goes to the device every `check_every` steps (a GPU's 8): the beams are those
    of asking every step (only padded longer), and on the static path nothing else in a step waits."""
    from test_decoding import _ends_sometimes

    from llm2slm_cli.data import pad
    from llm2slm_cli.llm2slm import _right_to_left

    torch.manual_seed(1)
    model = M.load_model(spec, role="model").eval()
    tok = M.load_tokenizer(spec)
    _ends_sometimes(model, tok.eos_token_id)
    ids, mask = pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)
    if not model.config.is_encoder_decoder:
        ids, mask = _right_to_left(ids, mask)
    search = Search(max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **beams)
    every = generate_plain(model, ids, mask, search)
    ours = []  # conversions to Python made by our loop (transformers' T5 checks its encoder mask every step)
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            import sys

            if sys._getframe(1).f_code.co_filename.endswith("decoding.py"):
                ours.append(1)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sparse = generate_plain(model, ids, mask, dataclasses.replace(search, check_every=8, static_cache=True))
    monkeypatch.undo()
    eos, padding = tok.eos_token_id, tok.pad_token_id
    assert strip_generated(sparse, eos, padding) == strip_generated(every, eos, padding)
    assert 1 <= len(ours) <= 16 // 8, ours  # the checks alone


def test_bench_weight_bytes_count_the_packed_weights_of_int8_linears():
    from llm2slm_cli.bench.timing import weight_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    assert weight_bytes([model]) == (64 * 32 + 32 + 32 + 32) * 4
    q = model
    quantize_linears(q)  # torch.ao's dynamic quantization, its deprecation notices silenced
    # int8 weight + a float64 scale and an int64 zero point per output channel + float32 bias; the norm as before
    assert weight_bytes([q]) == 64 * 32 + 32 * (8 + 8) + 32 * 4 + (32 + 32) * 4
