"""`llm2slm bench`: the promised rows and columns, exact lengths, consistent numbers, plots, and clean errors.

One small benchmark (tiny presets, 8 new tokens after 12-token prompts) runs once for the module; timings are only
checked for consistency, never for speed.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from llm2slm_cli import loading as M
from llm2slm_cli.stages.bench import COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
# One thread: on a busy 2-core machine torch's spinning worker threads make tiny models 30x slower.
FAST = ["--new-tokens", "8", "--prompt-length", "12", "--repeats", "2", "--warmup", "1", "--threads", "1"]
TINY = ["--new-tokens", "3", "--prompt-length", "5", "--repeats", "1", "--warmup", "0", "--no-flops", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny-t5-large -> tiny-t5 checkpoint with a fresh projector (speed does not depend on training)."""
    from llm2slm_cli.checkpoint import save
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    d = tmp_path_factory.mktemp("ckpt") / "final"
    save(LLMToSLM.build("tiny-t5", FrozenLLM("tiny-t5-large", tokenizer_optional=True)), d)
    return d


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "metrics.json").write_text(json.dumps({"bleu": {"score": 12.5, "signature": "nrefs:1"},
                                                "chrf": {"score": 40.0}, "rouge": {"rougeL": 0.3}}))
    return d


@pytest.fixture(scope="module")
def bench(cli, tmp_path_factory, checkpoint, eval_dir):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = cli("bench", "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--model", f"trained={checkpoint}",
                 *FAST, "--batch-size", "2", "--lengths", "4,8", "--quality", f"trained={eval_dir}",
                 "--out", out, "--quiet", "--json")
    table = pq.read_table(out / "bench.parquet")
    return {"out": out, "table": table, "rows": table.to_pylist(), "stdout": result.stdout}


def _main(rows):
    return {r["label"]: r for r in rows if r["part"] == "main"}


def test_rows_and_columns(bench):
    assert bench["table"].column_names == COLUMNS
    main = _main(bench["rows"])
    assert list(main) == ["LLM", "SLM", "LLM-to-SLM", "trained"]
    assert [main[k]["role"] for k in main] == ["LLM", "SLM", "LLM-to-SLM", "checkpoint"]
    assert main["LLM-to-SLM"]["llm"] == "tiny-t5-large" and main["LLM-to-SLM"]["slm"] == "tiny-t5"
    assert main["trained"]["llm"] == "tiny-t5-large"
    sweep = sorted((r["label"], r["new_tokens"]) for r in bench["rows"] if r["part"] == "sweep")
    assert sweep == sorted((label, n) for label in main for n in (4, 8))
    assert all(r["batch_size"] == 2 for r in bench["rows"])
    assert json.loads(bench["stdout"]) == json.loads(json.dumps(bench["rows"]))


def test_numbers_are_consistent(bench):
    for r in bench["rows"]:
        assert r["repeats"] == len(r["run_seconds"]) == 2
        assert all(s > 0 for s in r["run_seconds"])
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
        assert r["ms_per_token"] == pytest.approx(r["seconds_median"] / r["new_tokens"] * 1000)
        assert r["ms_per_token_min"] <= r["ms_per_token"] <= r["ms_per_token_max"]
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["new_tokens"] / r["seconds_median"])
        assert r["flops_per_token"] > 0 and r["flops_total"] == pytest.approx(r["flops_per_token"] * r["new_tokens"])
        assert r["weights_mb"] > 0 and r["process_peak_rss_mb"] > 0 and r["cuda_peak_mb"] is None
        llm = next(x for x in bench["rows"] if x["role"] == "LLM" and x["part"] == r["part"]
                   and x["new_tokens"] == r["new_tokens"])
        assert r["speedup_vs_llm"] == pytest.approx(llm["seconds_median"] / r["seconds_median"])
    main = _main(bench["rows"])
    assert main["LLM"]["speedup_vs_llm"] == 1.0 and main["SLM"]["time_vs_slm"] == 1.0
    assert main["LLM"]["slm_row"] == main["LLM-to-SLM"]["slm_row"] == main["trained"]["slm_row"] == "SLM"
    assert main["LLM-to-SLM"]["time_vs_slm"] == pytest.approx(main["LLM-to-SLM"]["seconds_median"]
                                                              / main["SLM"]["seconds_median"])


def test_flops_and_weights(bench):
    main = _main(bench["rows"])
    # LLM-to-SLM adds the LLM encoder's pass (and the projector) to what the SLM does
    assert main["LLM-to-SLM"]["flops_per_token"] > main["SLM"]["flops_per_token"]
    assert main["trained"]["flops_per_token"] == main["LLM-to-SLM"]["flops_per_token"]  # same shapes
    assert main["LLM-to-SLM"]["weights_mb"] > main["LLM"]["weights_mb"] > main["SLM"]["weights_mb"]
    for label in main:  # longer generations cost more in all
        by_n = {r["new_tokens"]: r for r in bench["rows"] if r["part"] == "sweep" and r["label"] == label}
        assert by_n[8]["flops_total"] > by_n[4]["flops_total"]


def test_files_plots_and_manifest(bench):
    out = bench["out"]
    for name in ["ms_per_token.png", "runtime_vs_length.png", "flops_vs_length.png", "quality_runtime.png"]:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), name
    assert {p.name for p in out.iterdir()} == {"bench.parquet", "bench.json", "manifest.json", "ms_per_token.png",
                                               "runtime_vs_length.png", "flops_vs_length.png", "quality_runtime.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "benchmark" and set(manifest["models"]) == {"LLM", "SLM", "LLM-to-SLM", "trained"}
    report = json.loads((out / "bench.json").read_text())
    assert len(report["rows"]) == len(bench["rows"]) and report["torch_threads"] == 1
    assert report["environment"]["torch"] and report["settings"]["new_tokens"] == 8
    assert report["quality"] == {"trained": {"metric": "bleu", "score": 12.5}}


def test_generation_length_is_exact_and_checked():
    from llm2slm_cli.bench import timing as B
    from llm2slm_cli.errors import UserError
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    ids, mask = B.random_prompts(260, {0, 1}, 2, 6, 0, "cpu")
    assert ids.min() >= 10 and ids.max() < 260 and mask.all()
    assert (ids == B.random_prompts(260, {0, 1}, 2, 6, 0, "cpu")[0]).all()  # seeded
    llm = FrozenLLM("tiny-llama", tokenizer_optional=True)  # decoder-only LLM
    models = [M.load_model("tiny-t5"), llm.model]
    llm2slm = [LLMToSLM.build("tiny-gpt2", llm), LLMToSLM.build("tiny-t5", llm)]
    fns = [B.plain_generate(m, engine) for m in models for engine in ("llm2slm", "transformers")] + \
        [B.llm2slm_generate(m, engine) for m in llm2slm for engine in ("llm2slm", "transformers")]
    for fn in fns:
        for beams in (1, 2):
            assert fn(ids, mask, **B.generation_kwargs(5, beams)) == 5
    short = B.Row("short", "SLM", None, "x", lambda ids, mask, **kw: kw["max_new_tokens"] - 1, [], 260)
    with pytest.raises(UserError, match="generated 4 tokens instead of 5"):
        B.measure([short], batch=2, prompt_length=6, new_tokens=5, num_beams=1, warmup=0, repeats=1, flops=False,
                  seed=0, device=ids.device)


def test_encoder_only_llm_has_no_llm_row(cli, tmp_path):
    cli("bench", "--llm", "tiny-bert", "--slm", "tiny-gpt2", *TINY, "--out", tmp_path / "o", "--quiet")
    rows = pq.read_table(tmp_path / "o" / "bench.parquet").to_pylist()
    assert [r["label"] for r in rows] == ["SLM", "LLM-to-SLM"]
    assert rows[0]["flops_per_token"] is None and rows[1]["speedup_vs_llm"] is None
    assert not (tmp_path / "o" / "flops_vs_length.png").exists()


def test_several_slms_in_one_run(cli, tmp_path):
    cli("bench", "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--slm", "tiny-gpt2", *TINY, "--out", tmp_path / "o",
        "--quiet")
    rows = {r["label"]: r for r in pq.read_table(tmp_path / "o" / "bench.parquet").to_pylist()}
    assert list(rows) == ["LLM", "SLM:tiny-t5", "SLM:tiny-gpt2", "LLM-to-SLM:tiny-t5", "LLM-to-SLM:tiny-gpt2"]
    assert rows["LLM-to-SLM:tiny-gpt2"]["slm_row"] == "SLM:tiny-gpt2"
    assert rows["LLM"]["slm_row"] is None  # two SLMs: no single one to compare the LLM with


def _error(cli, *args) -> str:
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, checkpoint, eval_dir):
    out = tmp_path / "o"
    assert "nothing to measure" in _error(cli, "bench", "--out", out)
    assert "no row labelled 'nope'" in _error(cli, "bench", "--slm", "tiny-t5", "--quality", f"nope={eval_dir}",
                                               "--out", out)
    msg = _error(cli, "bench", "--slm", "tiny-t5", "--quality", f"SLM={tmp_path / 'missing'}", "--out", out)
    assert "missing: --quality SLM: no such directory" in msg
    (tmp_path / "empty").mkdir()
    assert "no metrics.json" in _error(cli, "bench", "--slm", "tiny-t5", "--quality", f"SLM={tmp_path / 'empty'}",
                                       "--out", out)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text(json.dumps({"ter": {"score": 3.0}}))
    assert "no BLEU, ROUGE-L or chrF" in _error(cli, "bench", "--slm", "tiny-t5", "--quality",
                                                f"SLM={tmp_path / 'odd'}", "--out", out)
    assert "takes LABEL=DIR" in _error(cli, "bench", "--model", str(checkpoint), "--out", out)
    (tmp_path / "plain").mkdir()  # beside --out: a folder holding --out is refused as an input before it is read
    assert "not an llm2slm checkpoint" in _error(cli, "bench", "--model", f"x={tmp_path / 'plain'}", "--out", out)
    assert "two rows are labelled 'SLM'" in _error(cli, "bench", "--slm", "tiny-t5", "--model",
                                                   f"SLM={checkpoint}", "--out", out)
    assert "--lengths must be" in _error(cli, "bench", "--slm", "tiny-t5", "--lengths", "4,x", "--out", out)
    assert "reads at most 1024 positions" in _error(cli, "bench", "--slm", "tiny-gpt2", "--prompt-length", "1000",
                                                    "--new-tokens", "30", "--out", out)
    assert not out.exists()  # nothing is created before the options are known to be good


def test_python_api_takes_one_slm_as_a_string(tmp_path):
    from llm2slm_cli.config import BenchConfig

    assert BenchConfig(out=tmp_path, slm="tiny-t5").slm == ["tiny-t5"]


def test_compare_assisted_and_throughput(cli, tmp_path):
    """bench --compare: every generate row twice (ours, transformers'), assisted generation at batch 1 only (listed
    as not measured at batch 2), speedups against transformers' LLM row; --throughput: encode and train tables."""
    out = tmp_path / "cmp"
    cli("bench", "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--compare", "--assistant", "assisted=tiny-t5",
        *TINY, "--batch-size", "1", "--batch-size", "2", "--throughput", "--throughput-batch-sizes", "1,2",
        "--throughput-lengths", "4,8", "--throughput-target-length", "3", "--out", out, "--quiet")
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    assert labels == ["LLM [transformers]", "LLM", "SLM [transformers]", "SLM", "LLM-to-SLM [transformers]",
                      "LLM-to-SLM", "assisted"]
    engines = {r["label"]: r["engine"] for r in rows}
    assert engines["LLM"] == engines["SLM"] == engines["LLM-to-SLM"] == "llm2slm"
    assert engines["LLM [transformers]"] == engines["assisted"] == "transformers"
    assert sorted(r["batch_size"] for r in rows if r["label"] == "assisted") == [1]
    for r in rows:
        ref = next(x for x in rows if x["label"] == "LLM [transformers]" and x["batch_size"] == r["batch_size"])
        assert r["speedup_vs_llm"] == pytest.approx(ref["seconds_median"] / r["seconds_median"])
        if r["label"] == "LLM-to-SLM":
            assert r["slm_row"] == "SLM"
        if r["label"] == "LLM-to-SLM [transformers]":
            assert r["slm_row"] == "SLM [transformers]"
    report = json.loads((out / "bench.json").read_text())
    assert report["skipped"] == ["assisted, batch 2: transformers' assisted generation takes batch size 1"]
    grid = [(t["stage"], t["batch_size"], t["prompt_length"]) for t in report["throughput"]]
    assert grid == [(stage, b, n) for stage in ("encode", "train") for n in (4, 8) for b in (1, 2)]
    for t in report["throughput"]:
        assert t["examples_per_s"] == pytest.approx(t["batch_size"] / t["seconds_median"])
        tokens = t["prompt_length"] if t["stage"] == "encode" else t["target_length"]
        assert t["tokens_per_s"] == pytest.approx(t["batch_size"] * tokens / t["seconds_median"])


def test_assistant_must_be_a_plain_model(cli, tmp_path, checkpoint):
    result = cli("bench", "--llm", "tiny-t5-large", "--assistant", f"a={checkpoint}", *TINY, "--out",
                 tmp_path / "o", code=2)
    assert "reads the LLM's features" in result.output
    result = cli("bench", "--slm", "tiny-t5", "--throughput", *TINY, "--out", tmp_path / "o2", code=2)
    assert "--throughput needs --llm" in result.output


def test_rows_of_one_model_are_timed_interleaved():
    """Warm-ups first, then run i of every row before run i + 1 of any; a row that cannot run is reported as such
    and the others are still measured."""
    import torch

    from llm2slm_cli.bench import timing as B

    calls: list[str] = []

    def fn(name):
        def run(ids, mask, **kw):
            if name == "beamless" and kw["num_beams"] > 1:
                raise B.Unsupported("greedy only")
            calls.append(name)
            return kw["max_new_tokens"]
        return run

    rows = [B.Row(n, "SLM", None, "x", fn(n), [torch.nn.Linear(2, 2)], 260) for n in ("a", "b")]
    got = B.measure(rows, batch=2, prompt_length=6, new_tokens=4, num_beams=1, warmup=2, repeats=3, flops=False,
                    seed=0, device=torch.device("cpu"))
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert [g["label"] for g in got] == ["a", "b"] and all(len(g["run_seconds"]) == 3 for g in got)
    calls.clear()
    rows.append(B.Row("beamless", "SLM", None, "x", fn("beamless"), [], 260))
    got = B.measure(rows, batch=1, prompt_length=6, new_tokens=4, num_beams=2, warmup=2, repeats=2, flops=False,
                    seed=0, device=torch.device("cpu"), warm=True)  # a sweep point: one untimed run each
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert isinstance(got[2], B.Unsupported) and got[0]["num_beams"] == 2 and got[1]["repeats"] == 2


def test_text_prompts_cut_or_whole():
    from llm2slm_cli.bench import timing as B
    from llm2slm_cli.errors import UserError

    tok = M.builtin_tokenizer("bytes")
    texts = ["abcdefgh", "xyz", "0123", "klmnopqrstuv", "wxyz"]
    n = len(tok("0123")["input_ids"])  # the byte tokenizer's ids for 4 characters, special tokens included
    ids, mask = B.text_prompts(tok, texts, 2, n, "cpu")  # cut: the first two of at least n tokens
    assert ids.tolist() == [tok("abcdefgh")["input_ids"][:n], tok("0123")["input_ids"]] and mask.all()
    ids, _ = B.text_prompts(tok, texts, 2, n, "cpu", whole=True)  # whole: exactly n tokens, uncut
    assert ids.tolist() == [tok("0123")["input_ids"], tok("wxyz")["input_ids"]]
    with pytest.raises(UserError, match=f"2 prompts of exactly {n} tokens; 3 are needed"):
        B.text_prompts(tok, texts, 3, n, "cpu", whole=True)


def test_threads_auto_reports_each_row_at_its_fastest_count(cli, tmp_path):
    """--threads auto measures every row at 1..cores threads and keeps each at its fastest, with the count; every
    count's ms/token is in bench.json."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args = TINY[:-2]  # all but "--threads 1"
    assert TINY[-2:] == ["--threads", "1"]
    cli("bench", "--slm", "tiny-gpt2", *args, "--threads", "auto", "--out", tmp_path / "o", "--quiet")
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    by_threads = report["ms_per_token_by_threads"]
    assert report["rows"] and len(by_threads) == len(report["rows"])
    for row in report["rows"]:
        counts = by_threads[f"{row['label']} | {row['part']} | batch {row['batch_size']} | {row['new_tokens']} tokens"]
        assert sorted(map(int, counts)) == list(range(1, cores + 1))
        assert row["ms_per_token"] == min(counts.values()) and counts[str(row["threads"])] == row["ms_per_token"]


def test_fastest_keeps_the_quickest_measurement_and_one_error_only_where_all_failed():
    from llm2slm_cli.stages.bench import fastest

    def row(label, threads, ms, error=None):
        return {"label": label, "part": "main", "batch_size": 1, "new_tokens": 3, "threads": threads,
                "ms_per_token": ms, "error": error}

    runs = [[row("a", 1, 9.0), row("b", 1, None, "crashed")], [row("a", 2, 7.5), row("b", 2, None, "crashed")]]
    rows, by_threads = fastest(runs)
    assert [(r["label"], r["threads"], r["ms_per_token"], r["error"]) for r in rows] == [
        ("a", 2, 7.5, None), ("b", 1, None, "crashed")]
    assert by_threads["a | main | batch 1 | 3 tokens"] == {1: 9.0, 2: 7.5}
    assert fastest([[row("a", 1, 9.0)]]) == ([row("a", 1, 9.0)], {})


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_threads_takes_a_positive_number_or_auto(cli, value):
    assert "--threads takes a positive number or auto" in _error(cli, "bench", "--slm", "tiny-gpt2", "--threads",
                                                                 value, "--out", "o")
