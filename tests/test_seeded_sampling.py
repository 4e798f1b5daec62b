"""A seeded sample depends on the prompt, the options and its seed, never on the prompts batched with it: each row
samples from a generator of its own. Checked for a decoder-only and an encoder-decoder model, through the Python API
(alone, and in batches of 3 and 8 beside other prompts with other seeds) and through `generate` (any --batch-size and
--shard-size, and --prompt alone)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from llm2slm_cli import load
from llm2slm_cli.generation import example_seed

TARGET = "alpha beta gamma"
OTHERS = ["one", "a much longer prompt with many more words in it", "x y", "delta epsilon", "zeta eta theta iota",
          "kappa", "lambda mu nu xi omicron pi rho"]
SAMPLE = dict(sample=True, top_p=1.0, temperature=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    """An encoder-decoder LLM-to-SLM checkpoint: tiny-t5-large -> tiny-t5 with a fresh projector."""
    from llm2slm_cli.checkpoint import save
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    d = tmp_path_factory.mktemp("t5ckpt") / "final"
    save(LLMToSLM.build("tiny-t5", FrozenLLM("tiny-t5-large")), d)
    return d


@pytest.fixture(params=["tiny-gpt2", "tiny-t5", "llm2slm-t5"])
def model(request):
    spec = request.getfixturevalue("t5_checkpoint") if request.param == "llm2slm-t5" else request.param
    return load(spec, device="cpu")


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(model):
    alone = model.generate([TARGET], seed=7, **SAMPLE)[0]
    # the first prompt of a call samples from the seed itself; the others from seeds of their own
    assert model.generate([TARGET, *OTHERS[:2]], seed=7, batch_size=3, **SAMPLE)[0] == alone
    assert model.generate([TARGET, *OTHERS], seed=7, batch_size=8, **SAMPLE)[0] == alone
    # a list gives each prompt its seed, wherever it stands
    assert model.generate([OTHERS[0], TARGET, OTHERS[1]], seed=[3, 7, 11], batch_size=3, **SAMPLE)[1] == alone
    mixed = [*OTHERS[:5], TARGET, *OTHERS[5:]]
    assert model.generate(mixed, seed=[50 + i if i != 5 else 7 for i in range(8)], batch_size=8, **SAMPLE)[5] == alone
    # and in a call of several prompts, prompt i samples as it would alone with example_seed(seed, i)
    assert model.generate([*OTHERS[:2], TARGET], seed=9, batch_size=3, **SAMPLE)[2] == \
        model.generate([TARGET], seed=example_seed(9, 2), **SAMPLE)[0]


def test_two_seeds_give_different_samples(model):
    prompts = [TARGET, *OTHERS[:3]]
    assert model.generate(prompts, seed=1, **SAMPLE) != model.generate(prompts, seed=2, **SAMPLE)
    assert model.generate(prompts, seed=1, **SAMPLE) == model.generate(prompts, seed=1, **SAMPLE)


def test_a_list_of_seeds_is_checked(model):
    from llm2slm_cli.validation import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"^seed: a list of seeds gives one per prompt: 1 seeds for 2 prompts$"):
        model.generate(["a", "b"], seed=[1], **SAMPLE)
    with pytest.raises(InvalidArgument, match=r"^seed\[1\]: input should be greater than or equal to 0, got -1$"):
        model.generate(["a", "b"], seed=[1, -1], **SAMPLE)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-t5"])
def test_generate_samples_each_example_from_its_own_seed(cli, spec, tmp_path):
    """Predictions do not depend on --batch-size or --shard-size, and example 0 is what --prompt gives alone."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"e{i}", "src": p} for i, p in enumerate([TARGET, *OTHERS])])
    options = ["--model", spec, "--sample", "--top-p", "1.0", "--seed", "7", "--max-new-tokens", "12", "--quiet"]
    runs = {}
    for batch, shard in ((1, 8), (3, 3), (8, 8)):
        out = tmp_path / f"b{batch}"
        cli("generate", data, *options, "--batch-size", batch, "--shard-size", shard, "--out", out)
        runs[batch] = pq.read_table(out / "predictions.parquet").to_pylist()
    assert runs[1] == runs[3] == runs[8]
    alone = json.loads(cli("generate", "--prompt", TARGET, *options, "--json").stdout)
    assert alone["prediction"] == runs[8][0]["prediction"]
    other = tmp_path / "seed8"
    cli("generate", data, *[o if o != "7" else "8" for o in options], "--out", other)
    assert pq.read_table(other / "predictions.parquet").to_pylist() != runs[8]
