"""int8 through torchao (quantize.py, int8_linear.py): weight-only and dynamic int8 against float32 on tiny models,
the compiled steps against the eager ones, the combinations refused, and no deprecation notice on the way."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import error_line
from test_decoding import PROMPTS, _batch, _model

from llm2slm_cli import config, load, quantize
from llm2slm_cli import loading as M
from llm2slm_cli.bench.timing import weight_bytes
from llm2slm_cli.decoding import DECODE_OPTIONS, set_decode_options
from llm2slm_cli.errors import UserError

torchao = pytest.importorskip("torchao", reason="torchao is the int8 extra: pip install -e '.[int8]'")

GREEDY = dict(do_sample=False, num_beams=1, max_new_tokens=12)
API_GREEDY = dict(num_beams=1, max_new_tokens=12)


def _logits(model, ids):
    extra = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.inference_mode():
        return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-t5", "tiny-llama"])
def test_torchao_int8_logits_stay_close_to_float32(spec):
    """Weight-only int8 moves the logits by weight rounding alone (2% of the largest); dynamic int8 also rounds the
    activations (5%, as torch.ao's does)."""
    torch.manual_seed(0)
    ids = torch.randint(10, 250, (2, 9))
    f = _logits(M.load_model(spec, role="model").eval(), ids)
    for mode, bound in (("int8-weight", 0.02), ("int8-dynamic", 0.05)):
        q = M.load_model(spec, role="model").eval()
        names = quantize.quantize_linears(q, quantize=mode)
        assert names and all(type(q.get_submodule(n).weight).__name__ == "Int8Tensor" for n in names)
        y = _logits(q, ids)
        assert 0 < (f - y).abs().max() < bound * f.abs().max(), mode
        assert torch.nn.functional.cosine_similarity(f, y, dim=-1).min() > 0.999 if mode == "int8-weight" else 0.99


@pytest.mark.parametrize("slm,llm", [("tiny-gpt2", None), ("tiny-t5", "tiny-t5-large"), ("tiny-llama", "tiny-llama")])
def test_weight_only_int8_gives_float32_greedy_tokens(tmp_path, slm, llm):
    """Through the Python API, our loop, a batch of prompts that end at different steps: weight-only int8 emits
    float32's greedy tokens exactly on these models; every Linear of the SLM and the LLM's feature path is int8."""
    from llm2slm_cli import checkpoint

    model = _model(slm, llm)
    checkpoint.save(model, tmp_path / "ckpt")
    ref = load(tmp_path / "ckpt", device="cpu").generate(PROMPTS, **API_GREEDY)
    q = load(tmp_path / "ckpt", quantize="int8-weight", device="cpu")
    assert q.generate(PROMPTS, **API_GREEDY) == ref
    assert q.identity["quantization"] == {"quantize": "int8-weight", "library": "torchao", "head": "int8",
                                          "layers": q.identity["quantization"]["layers"]}
    impl = q.impl
    plain = [n for n, m in impl.slm.named_modules() if type(m) is torch.nn.Linear]
    assert plain == [] and type(impl.slm.get_output_embeddings()).__name__ == "Int8WeightLinear"
    if llm is not None:  # the projector stays float32 (it runs once per prompt)
        assert [type(m).__name__ for m in impl.projector.modules() if isinstance(m, torch.nn.Linear)] == ["Linear"] * 2


def test_the_fused_few_row_product_equals_torchaos_own():
    """Int8WeightLinear's compiled product (one int8 loop over the weight) against torchao's dequantize-then-mm, for
    the rows it takes (1 to 8) and more (torchao's product, compiled)."""
    from llm2slm_cli.int8_linear import ROWS, Int8WeightLinear

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48))
    quantize.quantize_linears(layer, quantize="int8-weight")
    assert type(layer[0]) is Int8WeightLinear
    compiled = torch.compile(layer, fullgraph=True)
    for rows in (1, 3, ROWS, ROWS + 5):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            eager, fused = layer(x), compiled(x)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
        float_weight = layer[0].weight.dequantize()
        torch.testing.assert_close(eager, x @ float_weight.T + layer[0].bias, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torch.compile of a tiny model's step: about half a minute on a 2-core CPU
@pytest.mark.parametrize("slm,llm,mode", [("tiny-llama", None, "int8-weight"), ("tiny-llama", None, "int8-dynamic"),
                                          ("tiny-t5", "tiny-t5-large", "int8-weight")])
def test_compiled_int8_steps_give_the_eager_int8_tokens(slm, llm, mode):
    """--quantize int8-weight/int8-dynamic --compile: the static cache and compiled one-token steps emit the eager
    int8 model's greedy tokens (rows ending at different steps), decoder-only and encoder-decoder."""
    model = _model(slm, llm)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh weights pick one token at every step: noise makes the tokens vary
        for p in model.slm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
    quantize.quantize_model(model, mode)
    ids, mask = _batch(model)
    settings = {**GREEDY, "min_new_tokens": 6}
    eager = model.generate_ids(ids, mask, **settings)
    set_decode_options(model.slm, static_cache=True, compile=True)
    try:
        compiled = model.generate_ids(ids, mask, **settings)
    finally:
        model.slm.__dict__.pop(DECODE_OPTIONS)
    assert torch.equal(eager, compiled)
    assert len(set(eager.flatten().tolist())) > 4  # tokens that vary, not one token over and over


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--compile"], "torch.ao's quantized kernels run eagerly; use --quantize int8-weight"),
    (["--quantize", "int8-weight", "--speculative"], "not for speculative decoding"),
    (["--quantize", "int8-dynamic", "--dtype", "bfloat16"], "quantizes float32 weights"),
])
def test_bad_combinations_are_refused_in_one_line(cli, tmp_path, toy_files, args, message):
    assert message in error_line(cli, "generate", toy_files["dev"], "--model", "tiny-gpt2", "--out", tmp_path / "o",
                                 *args)


def test_an_unknown_mode_is_refused_with_the_choices(cli, tmp_path, toy_files):
    result = cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--out", tmp_path / "o", "--quantize", "int4",
                 code=2)
    assert "'int4' is not one of 'none', 'int8-weight', 'int8-dynamic', 'int8', 'int8-body'" in result.output


def test_torchao_modes_are_refused_off_the_cpu_and_without_torchao(monkeypatch):
    with pytest.raises(UserError, match="for decoding on a CPU"):
        quantize.check_quantize("int8-weight", device=torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(UserError, match=r"need torchao: pip install 'llm2slm-cli\[int8\]'"):
        quantize.quantize_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), quantize="int8-weight")


def test_the_choices_are_the_same_everywhere():
    assert config.QUANTIZE_CHOICES == quantize.QUANTIZE_CHOICES
    for cls in (config.GenerateConfig, config.BenchConfig, config.ServeConfig):
        field = cls.__dataclass_fields__["quantize"]
        assert field.metadata["choices"] == quantize.QUANTIZE_CHOICES


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic", "int8", "int8-body"])
def test_no_deprecation_warning_is_raised(mode):
    """Every mode quantizes and runs with warnings as errors: torchao's modes raise none, torch.ao's fallback has its
    notices silenced where it is called."""
    model = M.load_model("tiny-gpt2", role="model").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize.quantize_model(type("Plain", (), {"model": model})(), mode)
        with torch.inference_mode():
            model(input_ids=torch.randint(10, 250, (1, 5)))
    assert [str(w.message)[:80] for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            or "deprecat" in str(w.message).lower()] == []


def test_a_fresh_process_says_nothing_about_deprecation(tmp_path):
    """torchao's import (transformers makes it on loading a model) and an int8-weight quantization print nothing
    deprecated: no warning, no log record."""
    code = ("import torch; from llm2slm_cli import loading as M, quantize\n"
            "m = M.load_model('tiny-llama', role='model').eval()\n"
            "quantize.quantize_model(type('P', (), {'model': m})(), 'int8-weight')\n"
            "print(m(input_ids=torch.ones(1, 3, dtype=torch.long)).logits.shape)\n")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    said = (out.stdout + out.stderr).lower()
    assert "deprecat" not in said and "failed to load" not in said, said[-2000:]


def test_bench_weight_bytes_count_torchaos_int8_data_and_scales():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    assert weight_bytes([model]) == (64 * 32 + 32 + 32 + 32) * 4
    quantize.quantize_linears(model, quantize="int8-weight")
    # int8 weight + a float32 scale and an int8 zero point (symmetric: 0) per output channel + float32 bias; the norm
    assert weight_bytes([model]) == 64 * 32 + 32 * (4 + 1) + 32 * 4 + (32 + 32) * 4


def test_generate_records_the_torchao_mode(cli, tmp_path, toy_files):
    cli("generate", toy_files["dev"], "--model", "tiny-t5", "--num-beams", 1, "--max-new-tokens", 4, "--quantize",
        "int8-weight", "--device", "cpu", "--out", tmp_path / "p", "--quiet")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["model"]["quantization"]["quantize"] == "int8-weight"
    assert manifest["model"]["quantization"]["library"] == "torchao"
