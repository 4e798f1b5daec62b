"""The Python API (`from llm2slm_cli import load`), `generate --prompt` / stdin, the decoding loop's streaming hook,
--config / --print-config and `export`: each checked against the file pipeline's own output."""

from __future__ import annotations

import json
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from conftest import SERVE_TEMPLATE, write_jsonl

from llm2slm_cli import load
from llm2slm_cli.api import PromptTruncatedWarning
from llm2slm_cli.errors import UserError


def prompts(toy_files) -> list[str]:
    return [json.loads(line)["src"] for line in toy_files["dev"].read_text().splitlines()]


def predictions(cli, tmp_path, name, *args):
    cli("generate", *args, "--out", tmp_path / name, "--quiet")
    return pq.read_table(tmp_path / name / "predictions.parquet").to_pylist()


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    return load(trained_checkpoint, device="cpu")


@pytest.mark.parametrize("beams", [1, 2])
def test_load_generates_what_generate_writes(cli, model, trained_checkpoint, toy_files, tmp_path, beams):
    rows = predictions(cli, tmp_path, "pred", toy_files["dev"], "--model", trained_checkpoint, "--num-beams", beams,
                       "--max-new-tokens", 6)
    texts = prompts(toy_files)
    assert model.kind == "llm2slm" and model.template == SERVE_TEMPLATE
    assert model.generate(texts, num_beams=beams, max_new_tokens=6) == [r["prediction"] for r in rows]
    assert [len(c.token_ids) for c in model.complete(texts, num_beams=beams, max_new_tokens=6)] == \
        [r["n_tokens"] for r in rows]
    assert rows[0]["prompt"] == SERVE_TEMPLATE.format(src=texts[0])  # the template was applied on both sides
    assert len({r["prediction"] for r in rows}) > 1  # responses depend on the prompt
    # one prompt at a time (other padding) gives the same greedy tokens
    if beams == 1:
        assert [model.generate(p, num_beams=1, max_new_tokens=6)[0] for p in texts] == [r["prediction"] for r in rows]


def test_plain_model_and_speculative_decoding(cli, model, trained_checkpoint, toy_files, tmp_path):
    texts = prompts(toy_files)
    plain = load("tiny-llama", device="cpu")
    assert plain.kind == "plain" and plain.template is None
    rows = predictions(cli, tmp_path, "plain", toy_files["dev"], "--model", "tiny-llama", "--num-beams", 1,
                       "--max-new-tokens", 6)
    assert plain.generate(texts, num_beams=1, max_new_tokens=6) == [r["prediction"] for r in rows]

    spec = load("tiny-llama", draft=trained_checkpoint, gamma=3, device="cpu")
    assert spec.kind == "speculative"
    rows = predictions(cli, tmp_path, "spec", toy_files["dev"], "--model", trained_checkpoint, "--speculative",
                       "--gamma", 3, "--max-new-tokens", 6)
    got = spec.generate(texts, max_new_tokens=6)
    assert got == [r["prediction"] for r in rows]
    # the output is the LLM's own greedy output for the templated prompts
    assert got == plain.generate([SERVE_TEMPLATE.format(src=t) for t in texts], num_beams=1, max_new_tokens=6)
    with pytest.raises(UserError, match="one sequence"):
        spec.generate(texts, num_beams=4)


def test_the_streaming_hook_changes_no_output():
    """decoding.decode and speculative_generate with a streamer: the same tokens as without, and the streamer saw
    exactly them; a streamer that stops a row ends that row there and leaves the others as they were."""
    from llm2slm_cli.data import pad
    from llm2slm_cli.decoding import Search, generate_plain, speculative_generate
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, _right_to_left

    llm = FrozenLLM("tiny-llama")
    tok = llm.tokenizer
    ids, mask = pad([tok(p).input_ids for p in ["alpha beta", "a much longer prompt here", "x"]], tok.pad_token_id)
    left, left_mask = _right_to_left(ids, mask)
    for sample in (False, True):
        search = Search(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        do_sample=sample, temperature=0.9, top_p=0.8)
        torch.manual_seed(3)
        plain = generate_plain(llm.model, left, left_mask, search)
        seen = []
        torch.manual_seed(3)
        streamed = generate_plain(llm.model, left, left_mask, search,
                                  streamer=lambda t, seen=seen: seen.append(t.clone()))
        assert torch.equal(plain, streamed) and torch.equal(torch.cat(seen, 1), plain)
        # stop row 1 after 3 tokens: it is padded from there, the others are unchanged
        count = {"n": 0}

        def stop_row_one(t, count=count):
            count["n"] += 1
            return [False, count["n"] >= 3, False]

        torch.manual_seed(3)
        stopped = generate_plain(llm.model, left, left_mask, search, streamer=stop_row_one)
        assert torch.equal(stopped[[0, 2]], plain[[0, 2]]) and torch.equal(stopped[1, :3], plain[1, :3])
        assert (stopped[1, 3:] == tok.pad_token_id).all()

    torch.manual_seed(0)
    draft = LLMToSLM.build("tiny-gpt2", llm).eval()
    expected, _ = speculative_generate(draft, llm, ids, mask, gamma=3, max_new_tokens=12)
    chunks = []
    got, _ = speculative_generate(draft, llm, ids, mask, gamma=3, max_new_tokens=12,
                                  streamer=lambda t: chunks.append(t.tolist()))
    assert got == expected
    rows = [[t for chunk in chunks for t in chunk[i]] for i in range(3)]
    assert [r[: len(e)] for r, e in zip(rows, expected)] == expected


def test_rows_of_one_batch_keep_their_own_limits_and_stop_strings(model, toy_files):
    texts = prompts(toy_files)[:4]
    full = model.complete(texts, num_beams=1, max_new_tokens=8)
    limits = [2, 8, 5, 8]
    stop = full[3].text[2:4] if len(full[3].text) >= 4 else "\u2603"
    cut = model.complete(texts[:3], num_beams=1, max_new_tokens=8)  # the same batch, then row-wise limits
    assert cut == full[:3]
    decoding = [model.decoding(num_beams=1, max_new_tokens=n, stop=[stop] if i == 3 else []) for i, n in
                enumerate(limits)]
    ids = model.prompt_ids([model.prompt_text(t) for t in texts])
    rows = [model.row(len(i), d) for i, d in zip(ids, decoding)]
    batched = model.run(ids, decoding[0], rows)
    for i, (b, f) in enumerate(zip(batched, full)):
        if i == 3 and stop != "\u2603":
            assert b.finish_reason == "stop" and b.text == f.text[: f.text.find(stop)]
        else:
            assert b.token_ids == f.token_ids[: limits[i]]
            assert b.finish_reason == ("length" if len(f.token_ids) >= limits[i] else f.finish_reason)


def test_stream_gives_the_response_piece_by_piece(model, toy_files):
    text = prompts(toy_files)[1]
    pieces = list(model.stream(text, num_beams=1, max_new_tokens=8))
    assert len(pieces) > 1 and "".join(pieces) == model.complete(text, num_beams=1, max_new_tokens=8)[0].text
    beam = list(model.stream(text, num_beams=2, max_new_tokens=8))  # beam search: whole at the end
    assert "".join(beam) == model.complete(text, num_beams=2, max_new_tokens=8)[0].text
    assert model.generate({"src": text}, num_beams=1) == model.generate(text, num_beams=1)


def test_api_mistakes_are_user_errors(model):
    with pytest.raises(UserError, match="unknown decoding option"):
        model.generate("a", beams=2)
    with pytest.raises(UserError, match="empty prompt"):
        model.generate("  ")
    with pytest.raises(UserError, match="max_new_tokens"):
        model.generate("a", max_new_tokens=0)
    with pytest.raises(UserError, match="top_p"):
        model.generate("a", sample=True, top_p=0)
    with pytest.raises(UserError, match="chat template"):
        model.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match="fills the fields"):
        load("tiny-gpt2", template="{a} and {b}", device="cpu").generate("x")
    with pytest.raises(UserError, match="over this model's limit"):
        model.complete("alpha " * 600, strict=True)


EMPTY_CHAT = "{% for m in messages %}{% endfor %}"  # renders every conversation as an empty prompt


@pytest.fixture(scope="module")
def plain():
    return load("tiny-gpt2", device="cpu", chat_template=EMPTY_CHAT)


@pytest.mark.parametrize("call, args, options, name", [
    ("generate", (None,), {}, "prompts"),
    ("generate", (123,), {}, "prompts"),
    ("generate", (["a", 3],), {}, "prompts[1]"),
    ("generate", ("a",), {"max_new_tokens": "5"}, "max_new_tokens"),
    ("generate", ("a",), {"max_new_tokens": 2.5}, "max_new_tokens"),
    ("generate", ("a",), {"max_new_tokens": True}, "max_new_tokens"),
    ("generate", ("a",), {"max_new_tokens": 0}, "max_new_tokens"),
    ("generate", ("a",), {"num_beams": 1.5}, "num_beams"),
    ("generate", ("a",), {"num_beams": 0}, "num_beams"),
    ("generate", ("a",), {"seed": 2**70}, "seed"),
    ("generate", ("a",), {"seed": 2**63}, "seed"),
    ("generate", ("a",), {"seed": -1}, "seed"),
    ("generate", ("a",), {"seed": "7"}, "seed"),
    ("generate", ("a",), {"stop": 5}, "stop"),
    ("generate", ("a",), {"stop": [""]}, "stop[0]"),
    ("generate", ("a",), {"stop": ["x", 5]}, "stop[1]"),
    ("generate", ("a",), {"batch_size": 0}, "batch_size"),
    ("generate", ("a",), {"batch_size": -1}, "batch_size"),
    ("generate", ("a",), {"batch_size": 2.0}, "batch_size"),
    ("generate", ("a",), {"sample": True, "temperature": "hot"}, "temperature"),
    ("generate", ("a",), {"sample": True, "temperature": True}, "temperature"),
    ("generate", ("a",), {"sample": True, "top_p": float("nan")}, "top_p"),
    ("generate", ("a",), {"sample": True, "top_p": 0}, "top_p"),
    ("generate", ("a",), {"sample": "yes"}, "sample"),
    ("generate", ("a",), {"sample": True, "num_beams": 3}, "num_beams"),
    ("generate", ("a",), {"length_penalty": float("inf")}, "length_penalty"),
    ("generate", ("a",), {"first_line": 1}, "first_line"),
    ("generate", ("a",), {"template": "no"}, "template"),
    ("complete", ("a",), {"on_text": 5}, "on_text"),
    ("complete", ([],), {"max_new_tokens": 2.5}, "max_new_tokens"),  # checked even with nothing to decode
    ("stream", (None,), {}, "prompt"),
    ("stream", ("a",), {"seed": 2**64}, "seed"),
    ("chat", ([{"role": "user", "content": "hi"}],), {}, "messages"),  # the template renders an empty prompt
    ("chat", ("hi",), {}, "messages"),
    ("chat", ([],), {}, "messages"),
    ("chat", ([{"content": "hi"}],), {}, "messages[0]"),
    ("chat", ([{"role": "user", "content": "hi"}],), {"max_new_tokens": 1.5}, "max_new_tokens"),
])
def test_bad_arguments_are_one_error_naming_the_argument(plain, call, args, options, name):
    """Strict types (a bool is not an int, 2.5 is not an int, a string is not a number), ranges, and one
    UserError whose one-line message starts with the argument's name: never a raw TypeError or a silent cast."""
    from llm2slm_cli.validation import InvalidArgument

    with pytest.raises(UserError) as caught:
        result = getattr(plain, call)(*args, **options)
        if call == "stream":
            list(result)
    e = caught.value
    assert isinstance(e, InvalidArgument) and e.param == name, repr(e)
    assert e.message.startswith(f"{name}: ") and "\n" not in e.message and "--" not in e.message, e.message


def test_a_broken_chat_template_is_refused_at_load(tmp_path):
    with pytest.raises(UserError, match=r"^chat_template: not a valid Jinja template \(line 1: "):
        load("tiny-gpt2", device="cpu", chat_template="{% for m in messages %}{{ m.content }")
    path = tmp_path / "chat.jinja"
    path.write_text("{{ messages | no_such_filter }}")
    with pytest.raises(UserError, match=f"^chat_template {path}: not a valid Jinja template .*no_such_filter"):
        load("tiny-gpt2", device="cpu", chat_template=path)


def test_generate_prompt_and_stdin_print_responses(cli, model, toy_files):
    texts = prompts(toy_files)[:3]
    expected = model.generate(texts, num_beams=1, max_new_tokens=6)
    common = ["--model", model.name, "--num-beams", 1, "--max-new-tokens", 6]
    args = [a for t in texts for a in ("--prompt", t)]
    out = cli("generate", *common, *args, "--json").stdout.splitlines()
    assert [json.loads(line)["prediction"] for line in out] == expected
    assert [json.loads(line)["id"] for line in out] == ["0", "1", "2"]
    # one prompt streams its response to the terminal: the same text
    assert cli("generate", *common, "--prompt", texts[0]).stdout == expected[0] + "\n"
    # stdin: plain lines (blank lines skipped), or JSONL with the field options
    assert cli.runner.invoke(_app(), ["generate", "-", *map(str, common)], input="\n".join(texts) + "\n\n"
                             ).stdout.splitlines() == expected
    records = "".join(json.dumps({"key": f"k{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    result = cli.runner.invoke(_app(), ["generate", "-", *map(str, common), "--json", "--template",
                                        "shout: {text}", "--id-field", "key"], input=records)
    assert result.exit_code == 0, result.output
    assert [(json.loads(x)["id"], json.loads(x)["prediction"]) for x in result.stdout.splitlines()] == \
        [(f"k{i}", e) for i, e in enumerate(expected)]
    # a line separator inside a prompt (U+2028, as some news sentences hold) is part of the prompt, as in a file
    joined = texts[0] + "\u2028" + texts[1]
    one = cli.runner.invoke(_app(), ["generate", "-", *map(str, common), "--json"], input=joined + "\r\n")
    shown = [json.loads(x)["prompt"] for x in one.stdout.split("\n") if x]  # (the checkpoint's template around it)
    assert len(shown) == 1 and shown[0].endswith(joined)
    bad = cli.runner.invoke(_app(), ["generate", "-", "--model", model.name], input='{"src": "a"}\n{"src": \n')
    assert bad.exit_code == 2 and "<stdin>, line 2: malformed JSON" in bad.output
    for wrong in (["--prompt", "a", "--out", "o"], ["--prompt", "a", toy_files["dev"]], []):
        result = cli("generate", "--model", model.name, *wrong, code=2)
        assert result.output.startswith("error:") and "Traceback" not in result.output


def test_over_long_prompts_are_cut_and_said_once(cli, trained_checkpoint, tmp_path):
    """One policy for a prompt over the model's limit in `generate`, the Python API and `serve` (test_serve.py): it
    is cut to its first tokens and said once (a warning per Model, a line per run); strict refuses it."""
    fresh = load(trained_checkpoint, device="cpu")
    long, limit = "alpha " * 600, fresh.max_prompt_length
    n = len(fresh.tokenizer(fresh.prompt_text(long))["input_ids"])
    notice = f"a prompt has {n} tokens (and 1 more prompt), over this model's limit of {limit}: it is cut to its " \
        f"first {limit} tokens"
    with pytest.warns(PromptTruncatedWarning) as said:
        got = fresh.generate([long, "alpha", long], num_beams=1, max_new_tokens=4)
    assert [str(w.message) for w in said] == [f"{notice}; strict=True refuses such prompts (said once per model)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per Model
        assert fresh.generate(long, num_beams=1, max_new_tokens=4) == got[:1]
    first = fresh.tokenize([fresh.prompt_text(long)])[0][0]
    assert len(first) == limit and first == fresh.tokenizer(fresh.prompt_text(long))["input_ids"][:limit]
    decoding = fresh.decoding(num_beams=1, max_new_tokens=4)
    assert fresh.run([first], decoding, [fresh.row(limit, decoding)])[0].text.strip() == got[0] == got[2]
    with pytest.raises(UserError, match=f"the prompt has {n} tokens, over this model's limit of {limit}"):
        fresh.generate(long, strict=True)

    common = ["--model", trained_checkpoint, "--num-beams", 1, "--max-new-tokens", 4]
    result = cli("generate", *common, "--prompt", long, "--prompt", "alpha", "--prompt", long)
    assert result.stdout.splitlines() == got
    assert [line for line in result.stderr.splitlines() if "warning" in line] == \
        [f"warning: {notice} (--max-length; --strict refuses such prompts)"]
    data = write_jsonl(tmp_path / "long.jsonl", [{"src": long}, {"src": "alpha"}, {"src": long}])
    result = cli("generate", data, *common, "--out", tmp_path / "pred")
    assert [line for line in result.stderr.splitlines() if "warning" in line] == \
        [f"warning: 2 of 3 prompts are longer than --max-length {limit} tokens and are cut to their first {limit} "
         "(--strict refuses them)"]
    assert [r["prediction"] for r in pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pylist()] == got
    assert "over --max-length" in cli("generate", data, *common, "--out", tmp_path / "strict", "--strict",
                                      code=2).output


def _app():
    from llm2slm_cli.cli import app

    return app


def test_config_file_and_print_config(cli, toy_files, tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: tiny-gpt2\nnum-beams: 2\nmax_new_tokens: 7\ninputs: [{toy_files['dev']}]\n"
                   f"out: {tmp_path / 'o'}\n")
    printed = cli("generate", "--config", cfg, "--max-new-tokens", 3, "--print-config").stdout
    import yaml

    effective = yaml.safe_load(printed)
    assert effective["model"] == "tiny-gpt2" and effective["num_beams"] == 2 and effective["max_new_tokens"] == 3
    assert effective["inputs"] == [str(toy_files["dev"])] and effective["length_penalty"] == 0.6
    assert not (tmp_path / "o").exists()  # --print-config runs nothing
    # what --print-config writes is a config file giving the same configuration (JSON too)
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert cli("generate", "--config", again, "--print-config").stdout == printed
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(effective))
    assert cli("generate", "--config", as_json, "--print-config").stdout == printed
    # a config file runs the stage
    cli("generate", "--config", again, "--quiet")
    assert pq.read_table(tmp_path / "o" / "predictions.parquet").num_rows == 8
    for text, message in [("nope: 1\n", "unknown option nope for `llm2slm generate`"),
                          ("[1, 2]\n", "expected a mapping"), ("model: [\n", "not valid YAML")]:
        cfg.write_text(text)
        result = cli("generate", "--config", cfg, code=2)
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "--config FILE" in cli("train", "--help").output and "--print-config" in cli("serve", "--help").output


def test_export_writes_a_loadable_directory_with_a_model_card(cli, model, trained_checkpoint, toy_files, tmp_path):
    from huggingface_hub import ModelCard

    pred = tmp_path / "pred"
    cli("generate", toy_files["dev"], "--model", trained_checkpoint, "--out", pred, "--num-beams", 1,
        "--max-new-tokens", 4, "--quiet")
    cli("eval", pred, "--out", tmp_path / "eval", "--metrics", "chrf,rouge", "--quiet")
    out = tmp_path / "export"
    cli("export", trained_checkpoint, "--out", out, "--eval", tmp_path / "eval", "--quiet")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "manifest.json", "llm2slm.json", "slm_config.json", "model.safetensors"} <= files
    assert not any(f.startswith(("optimizer", "rng_state", "trainer_state", ".")) for f in files)
    card = (out / "README.md").read_text()
    identity = json.loads((trained_checkpoint / "llm2slm.json").read_text())["llm"]
    assert "`tiny-llama`" in card and identity["fingerprint"] in card and SERVE_TEMPLATE in card
    assert f"`{toy_files['train'].name}`" in card and "lr 0.001" in card and "chrf" in card
    assert "model = load(MODEL_DIR)" in card and "llm2slm serve --model MODEL_DIR" in card
    assert str(toy_files["train"].parent) not in card and str(out) not in card  # no local path (test_model_card.py)
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["library_name"] == "transformers" and "llm2slm" in meta["tags"]
    texts = prompts(toy_files)
    assert load(out, device="cpu").generate(texts, num_beams=1, max_new_tokens=6) == \
        model.generate(texts, num_beams=1, max_new_tokens=6)
    # with the LLM copied in, loading takes it from there
    bundled = tmp_path / "bundled"
    cli("export", trained_checkpoint, "--out", bundled, "--include-llm", "yes", "--quiet")
    again = load(bundled, device="cpu")
    assert again.impl.llm.spec == str(bundled / "llm")
    assert again.generate(texts[:2], num_beams=1, max_new_tokens=6) == model.generate(texts[:2], num_beams=1,
                                                                                      max_new_tokens=6)
    assert "error:" in cli("export", trained_checkpoint, "--out", out, code=2).output  # refuses to clobber
    assert "not an llm2slm checkpoint" in cli("export", toy_files["dev"].parent, "--out", tmp_path / "x",
                                              code=2).output
