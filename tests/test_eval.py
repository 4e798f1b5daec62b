"""`llm2slm eval`: numbers equal sacrebleu's and rouge-score's own, references from any source agree, the judge's
ratings are parsed strictly (a local fake OpenAI server), and user mistakes end in one line and exit code 2."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
from conftest import send_chat_completion, write_jsonl
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from llm2slm_cli import artifacts as A
from llm2slm_cli import judge

# (prompt, prediction, reference): exact, near, unrelated, paraphrased, stemming, case-only, empty outputs.
ROWS = [
    ("Summarize: The cat sat on the mat all afternoon.", "The cat sat on the mat.", "The cat sat on the mat."),
    ("Summarize: A fox leapt over a sleeping dog.", "A quick brown fox jumps over the lazy dog.",
     "The quick brown fox jumped over the lazy dog."),
    ("Summarize: Markets reacted to the rate decision.", "I like turtles.",
     "Stock markets fell sharply on Monday after the central bank raised interest rates."),
    ("Summarize: The weather service issued a warning.", "Heavy rain is expected across the north tomorrow.",
     "Forecasters expect heavy rain in northern regions on Tuesday."),
    ("Summarize: The museum reopened.", "The museum reopened on Friday after two years of repairs.",
     "The museum reopened on Friday after two years of repairs."),
    ("Summarize: Children played outside.", "The children were running in the parks.",
     "The child runs in the park."),
    ("Summarize: Facts about France.", "PARIS is the capital of France.", "Paris is the capital of France."),
    ("Summarize: The committee met again.", "", "The committee postponed its decision until next month."),
]
# Multi-sentence summaries, one sentence per line (CNN/DailyMail style): the second has its sentences swapped,
# which changes ROUGE-Lsum but not ROUGE-1.
MULTILINE = [
    ("Summarize: The storm.", "A storm hit the coast on Sunday.\nThousands lost power.",
     "A storm hit the coast on Sunday.\nThousands lost power."),
    ("Summarize: The match.", "The fans celebrated late into the night.\nThe home team won the final.",
     "The home team won the final.\nThe fans celebrated late into the night."),
]
MODEL = {"name": "runs/t5l-t5s/final", "kind": "llm2slm", "llm": "t5-large", "slm": "t5-small"}
SCORE_COLUMNS = ["id", "prediction", "reference", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum",
                 "repetition_loop"]
ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def make_predictions(directory: Path, rows: list[tuple[str, str, str]], *, with_reference: bool = True) -> Path:
    """A `generate` output directory written by hand: predictions.parquet and a predictions manifest."""
    directory.mkdir(parents=True)
    columns = {
        "id": [str(i) for i in range(len(rows))],
        "prompt": [r[0] for r in rows],
        "prediction": [r[1] for r in rows],
        "n_tokens": pa.array([len(r[1].split()) + 1 for r in rows], pa.int32()),
    }
    if with_reference:
        columns["reference"] = [r[2] for r in rows]
    A.write_parquet(directory / A.PREDICTIONS, pa.table(columns))
    A.atomic_write_json(directory / A.MANIFEST, A.make_manifest(
        A.KIND_PREDICTIONS, {"model": MODEL["name"]}, model=MODEL, generation={"num_beams": 4},
        counts={"examples": len(rows)}))
    return directory


@pytest.fixture(scope="module")
def preds(tmp_path_factory) -> Path:
    return make_predictions(tmp_path_factory.mktemp("eval") / "pred", ROWS + MULTILINE)


def _error(cli, *args) -> str:
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _metrics(out: Path) -> dict:
    return json.loads((out / A.METRICS).read_text())


def test_scores_equal_sacrebleu_and_rouge_score(cli, preds, tmp_path):
    out = tmp_path / "eval"
    cli("eval", preds, "--out", out, "--quiet")
    assert sorted(p.name for p in out.iterdir()) == sorted([A.MANIFEST, A.METRICS, A.SCORES])
    hyps = [r[1] for r in ROWS + MULTILINE]
    refs = [r[2] for r in ROWS + MULTILINE]
    metrics = _metrics(out)
    m = metrics["metrics"]

    bleu = BLEU(tokenize="13a")
    expected = bleu.corpus_score(hyps, [refs])
    assert m["bleu"]["score"] == expected.score
    assert m["bleu"]["signature"] == str(bleu.get_signature())
    assert m["bleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert m["bleu"]["precisions"] == expected.precisions and m["bleu"]["bp"] == expected.bp
    assert (m["bleu"]["sys_len"], m["bleu"]["ref_len"]) == (expected.sys_len, expected.ref_len)
    assert m["bleu"]["counts"] == expected.counts and m["bleu"]["totals"] == expected.totals
    assert 0 < m["bleu"]["score"] < 100

    chrf = CHRF()
    assert m["chrf"]["score"] == chrf.corpus_score(hyps, [refs]).score
    assert m["chrf"]["signature"] == str(chrf.get_signature())

    scorer = rouge_scorer.RougeScorer(ROUGE, use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    for t in ROUGE:
        assert m["rouge"][t] == pytest.approx(sum(s[t].fmeasure for s in direct) / len(direct) * 100, abs=1e-9)
    assert "mean" in m["rouge"]["aggregation"] and "newline" in m["rouge"]["rougeLsum_sentences"]
    assert "judge" not in m

    assert metrics["counts"] == {"examples": len(hyps), "unused_references": 0}
    assert metrics["predictions"]["model"] == MODEL
    assert metrics["references"]["source"] == "predictions"

    scores = pq.read_table(out / A.SCORES).to_pylist()
    assert list(scores[0]) == SCORE_COLUMNS and len(scores) == len(hyps)
    assert [s["id"] for s in scores] == [str(i) for i in range(len(hyps))]
    for row, h, r, d in zip(scores, hyps, refs, direct):
        assert (row["prediction"], row["reference"]) == (h, r)
        assert row["bleu"] == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score, abs=1e-9)
        assert row["chrf"] == pytest.approx(CHRF().sentence_score(h, [r]).score, abs=1e-9)
        for t in ROUGE:
            assert row[t] == pytest.approx(d[t].fmeasure * 100, abs=1e-9)
    assert scores[0]["bleu"] == pytest.approx(100) and scores[0]["rouge1"] == pytest.approx(100)  # exact match
    assert scores[7]["bleu"] == 0 and scores[7]["rouge1"] == 0  # empty prediction
    swapped = scores[len(ROWS) + 1]
    assert swapped["rouge1"] == pytest.approx(100) and swapped["rougeLsum"] == pytest.approx(100)
    assert swapped["rougeL"] < 90

    manifest = A.read_manifest(out, A.KIND_EVALUATION)
    assert manifest["scores"]["bleu"] == m["bleu"]["score"] and manifest["config"]["metrics"] == "bleu,chrf,rouge"


def test_lowercase_and_tokenizer_options(cli, preds, tmp_path):
    out = tmp_path / "eval"
    cli("eval", preds, "--out", out, "--quiet", "--lowercase", "--bleu-tokenize", "intl", "--metrics", "chrf,bleu")
    hyps = [r[1] for r in ROWS + MULTILINE]
    refs = [r[2] for r in ROWS + MULTILINE]
    m = _metrics(out)["metrics"]
    assert sorted(m) == ["bleu", "chrf"]
    bleu = BLEU(tokenize="intl", lowercase=True)
    assert m["bleu"]["score"] == bleu.corpus_score(hyps, [refs]).score
    assert m["bleu"]["signature"] == str(bleu.get_signature()) and "case:lc|eff:no|tok:intl" in m["bleu"]["signature"]
    chrf = CHRF(lowercase=True)
    assert m["chrf"]["score"] == chrf.corpus_score(hyps, [refs]).score and "case:lc" in m["chrf"]["signature"]
    scores = pq.read_table(out / A.SCORES).to_pylist()
    assert list(scores[0]) == ["id", "prediction", "reference", "bleu", "chrf", "repetition_loop"]
    case_only = scores[6]
    direct = sacrebleu.sentence_bleu(ROWS[6][1], [ROWS[6][2]], tokenize="intl", lowercase=True).score
    assert case_only["bleu"] == direct == pytest.approx(100)


def test_refs_from_jsonl_and_text_pairs_agree(cli, tmp_path):
    plain = make_predictions(tmp_path / "plain", ROWS, with_reference=False)
    own = make_predictions(tmp_path / "own", ROWS)
    records = [{"id": str(i), "src": p, "tgt": r} for i, (p, _, r) in enumerate(ROWS)]
    extra = {"id": "unused", "src": "Summarize: nothing.", "tgt": "Nothing happened."}
    refs_jsonl = write_jsonl(tmp_path / "refs.jsonl", [extra, *reversed(records)])  # joined on id, not order
    src, tgt = tmp_path / "test.src", tmp_path / "test.tgt"
    src.write_text("".join(p + "\n" for p, _, _ in ROWS))
    tgt.write_text("".join(r + "\n" for _, _, r in ROWS))

    cli("eval", plain, "--refs", refs_jsonl, "--out", tmp_path / "a", "--quiet")
    cli("eval", plain, "--refs", src, "--refs", tgt, "--out", tmp_path / "b", "--quiet")
    cli("eval", own, "--out", tmp_path / "c", "--quiet")
    a, b, c = (_metrics(tmp_path / n) for n in "abc")
    assert a["metrics"] == b["metrics"] == c["metrics"]
    assert a["references"]["source"] == "refs" and a["references"]["files"] == [str(refs_jsonl)]
    assert a["references"]["sha256"] == A.sha256_file(refs_jsonl)
    assert b["references"]["files"] == [str(src), str(tgt)]
    assert a["counts"]["unused_references"] == 1 and b["counts"]["unused_references"] == 0
    assert pq.read_table(tmp_path / "a" / A.SCORES).equals(pq.read_table(tmp_path / "c" / A.SCORES))


def test_missing_reference_id(cli, tmp_path):
    plain = make_predictions(tmp_path / "plain", ROWS, with_reference=False)
    refs = write_jsonl(tmp_path / "refs.jsonl",
                       [{"id": str(i), "src": p, "tgt": r} for i, (p, _, r) in enumerate(ROWS) if i != 3])
    msg = _error(cli, "eval", plain, "--refs", refs, "--out", tmp_path / "o")
    assert f"{refs}: no reference for prediction id '3'" in msg
    assert not (tmp_path / "o").exists()
    assert "no references" in _error(cli, "eval", plain, "--out", tmp_path / "o")


def test_option_and_input_errors(cli, preds, tmp_path):
    out = tmp_path / "o"
    assert "unknown metric 'bluer'" in _error(cli, "eval", preds, "--out", out, "--metrics", "bleu,bluer")
    assert "needs --judge-url" in _error(cli, "eval", preds, "--out", out, "--metrics", "bleu,judge")
    assert "needs --judge-url" in _error(cli, "eval", preds, "--out", out, "--metrics", "judge",
                                         "--judge-url", "http://127.0.0.1:1/v1")
    assert "must start with http" in _error(cli, "eval", preds, "--out", out, "--metrics", "judge",
                                            "--judge-url", "localhost:8000", "--judge-model", "m")
    assert "would hold or replace the predictions" in _error(cli, "eval", preds, "--out", preds, "--overwrite")
    feats = tmp_path / "feats"
    feats.mkdir()
    A.atomic_write_json(feats / A.MANIFEST, A.make_manifest(A.KIND_FEATURES, {}))
    assert "is a 'features' artifact, expected 'predictions'" in _error(cli, "eval", feats, "--out", out)
    assert not out.exists()


def test_json_table_and_existing_output(cli, preds, tmp_path):
    out = tmp_path / "eval"
    result = cli("eval", preds, "--out", out, "--json")
    assert json.loads(result.stdout) == _metrics(out)
    assert "BLEU" in result.stderr and "ROUGE-Lsum" in result.stderr and "tok:13a" in result.stderr
    assert "exists and is not empty" in _error(cli, "eval", preds, "--out", out)
    quiet = cli("eval", preds, "--out", out, "--overwrite", "--quiet", "--metrics", "chrf")
    assert quiet.stdout == "" and quiet.stderr == ""
    assert list(_metrics(out)["metrics"]) == ["chrf"]


# --- the judge ------------------------------------------------------------------------------------------------

# Canned judge replies, chosen by a word of the question (the example's prompt).
REPLIES = {
    "cat": "The assistant's answer is identical to the reference answer.\nRating: [[8]]",
    "fox": 'Asked for the format "Rating: [[5]]": the tense differs and "quick brown" is kept.\nRating: [[3.5]]',
    "Markets": "The answer has nothing to do with the question, so I will not score it.",
    "weather": 500,  # the server fails on this one every time
    "museum": "Correct and complete. Rating: [[10]]",
}


class _FakeJudge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        question = body["messages"][-1]["content"].split("[Question]\n")[1].split("\n\n")[0]
        reply = next((r for key, r in REPLIES.items() if key in question), "Rating: [[6]]")
        if reply == 500:
            self.send_error(500, "overloaded")
            return
        send_chat_completion(self, body["model"], reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge_server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(judge, "RETRY_DELAYS", (0.0, 0.0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_judge_ratings_are_parsed_strictly(cli, tmp_path, judge_server, monkeypatch):
    rows = ROWS[:5]
    pred = make_predictions(tmp_path / "pred", rows)
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1"
    monkeypatch.setenv("TEST_JUDGE_KEY", "s3cret")
    out = tmp_path / "eval"
    cli("eval", pred, "--out", out, "--quiet", "--metrics", "bleu,judge", "--judge-url", url,
        "--judge-model", "judge-m", "--judge-api-key-env", "TEST_JUDGE_KEY")

    scores = pq.read_table(out / A.SCORES).to_pylist()
    assert list(scores[0]) == ["id", "prediction", "reference", "bleu", "judge_rating", "judge_error", "judge_reply",
                               "repetition_loop"]
    assert [s["judge_rating"] for s in scores] == [8.0, 3.5, None, None, 10.0]
    assert [s["judge_error"] is None for s in scores] == [True, True, False, False, True]
    assert scores[2]["judge_error"] == "unparsable: " + REPLIES["Markets"][:80]
    assert scores[2]["judge_reply"] == REPLIES["Markets"]
    assert scores[3]["judge_error"].startswith("failed: HTTP 500") and scores[3]["judge_reply"] is None

    j = _metrics(out)["metrics"]["judge"]
    assert j["mean"] == (8 + 3.5 + 10) / 3
    assert (j["parsed"], j["unparsable"], j["failed"]) == (3, 1, 1)
    assert j["model"] == "judge-m" and j["url"] == url + "/chat/completions"
    assert _metrics(out)["metrics"]["bleu"]["score"] == BLEU().corpus_score([r[1] for r in rows],
                                                                           [[r[2] for r in rows]]).score

    requests = judge_server.requests
    weather = [r for r in requests if "weather" in r["body"]["messages"][1]["content"]]
    assert len(weather) == 3  # one try and two retries
    assert len(requests) == 4 + 3
    for r in requests:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer s3cret"
        body = r["body"]
        assert body["model"] == "judge-m" and body["temperature"] == 0
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert all(isinstance(m["content"], str) for m in body["messages"])
        assert "[[" in body["messages"][0]["content"]
    cat = next(r["body"]["messages"][1]["content"] for r in requests
               if ROWS[0][0] in r["body"]["messages"][1]["content"])
    assert ROWS[0][0] in cat and f"[The Start of Reference Answer]\n{ROWS[0][2]}\n" in cat
    assert f"[The Start of Assistant's Answer]\n{ROWS[0][1]}\n" in cat and cat.endswith('"Rating: [[N]]".')

    # Without the key in the environment, no Authorization header is sent.
    monkeypatch.delenv("TEST_JUDGE_KEY")
    before = len(requests)
    cli("eval", pred, "--out", tmp_path / "eval2", "--quiet", "--metrics", "judge", "--judge-url", url,
        "--judge-model", "judge-m", "--judge-api-key-env", "TEST_JUDGE_KEY")
    assert all(r["auth"] is None for r in requests[before:])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_is_an_error(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(judge, "RETRY_DELAYS", (0.0, 0.0))
    pred = make_predictions(tmp_path / "pred", ROWS[:3])
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    msg = _error(cli, "eval", pred, "--out", tmp_path / "o", "--metrics", "judge", "--judge-url", url,
                 "--judge-model", "m")
    assert f"every request to {url}/chat/completions failed" in msg and "cannot connect" in msg
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(judge, "ABORT_AFTER", 2)
    monkeypatch.setattr(judge, "WORKERS", 1)
    msg = _error(cli, "eval", pred, "--out", tmp_path / "o", "--metrics", "judge", "--judge-url", url,
                 "--judge-model", "m")
    assert f"the first 2 requests to {url}/chat/completions all failed" in msg


@pytest.mark.parametrize(("reply", "rating"), [
    ("Rating: [[8]]", 8.0),
    ("Good answer.\nRating: [[7.5]]", 7.5),
    ("Rating: [[ 10 ]]", 10.0),
    ('The format is "Rating: [[5]]". Here the answer is wrong. Rating: [[2]]', 2.0),
    ("Rating: 8", None),
    ("Rating: [8]", None),
    ("Rating: [[eight]]", None),
    ("Rating: [[11]]", None),
    ("Rating: [[0]]", None),
    ("", None),
])
def test_parse_rating(reply, rating):
    assert judge.parse_rating(reply) == rating
