"""`llm2slm serve`: a real server on 127.0.0.1 driven by the official `openai` client. Responses equal `generate`'s,
concurrent clients are batched and all answered right, bad requests get OpenAI error bodies with the right status,
a client that drops mid-stream frees its slot, and SIGTERM lets the request in flight finish before a clean exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm2slm_cli import load

pytest.importorskip("fastapi", reason="needs the 'serve' extra: pip install -e \".[serve]\"")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra: pip install -e \".[serve]\"")
httpx = pytest.importorskip("httpx", reason="needs the 'dev' extra: pip install -e \".[dev]\"")
openai = pytest.importorskip("openai", reason="needs the 'dev' extra: pip install -e \".[dev]\"")

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
NAME = "kv-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread of this process (uvicorn, as `llm2slm serve` runs it)."""

    def __init__(self, model, *, name: str, **engine) -> None:
        import uvicorn

        from llm2slm_cli.server.app import build_app
        from llm2slm_cli.server.serving import Engine, OpenAIServing

        limits = {k: engine.pop(k) for k in ("max_new_tokens", "max_tokens_limit") if k in engine}
        self.serving = OpenAIServing(model, Engine(model, **engine), name=name, **limits)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.serving), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    @property
    def engine(self):
        return self.serving.engine

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    return load(trained_checkpoint, device="cpu", chat_template=CHAT)


@pytest.fixture(scope="module")
def server(model):
    running = Running(model, name=NAME, max_batch_size=8, batch_wait_ms=20, max_queue=64)
    yield running
    running.close()


@pytest.fixture(scope="module")
def plain_server():
    """A plain model without a chat template, a queue of 2, room for long responses, request-level batches."""
    running = Running(load("tiny-gpt2", device="cpu"), name="tiny-gpt2", max_batch_size=4, batch_wait_ms=1,
                      max_queue=2, max_tokens_limit=4000, batching="request")
    yield running
    running.close()


@pytest.fixture(scope="module")
def request_server(trained_checkpoint):
    """The checkpoint served with request-level batches (its own Model: one engine per Model)."""
    running = Running(load(trained_checkpoint, device="cpu", chat_template=CHAT), name=NAME, max_batch_size=8,
                      batch_wait_ms=20, max_queue=64, batching="request")
    yield running
    running.close()


def dev_prompts(toy_files) -> list[str]:
    return [json.loads(line)["src"] for line in toy_files["dev"].read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy(cli, trained_checkpoint, toy_files, tmp_path_factory) -> list[dict]:
    """`llm2slm generate`'s greedy predictions for the dev prompts (the file pipeline)."""
    out = tmp_path_factory.mktemp("greedy") / "pred"
    cli("generate", toy_files["dev"], "--model", trained_checkpoint, "--out", out, "--num-beams", 1,
        "--max-new-tokens", 8, "--quiet")
    return pq.read_table(out / "predictions.parquet").to_pylist()



def _wait_healthy(proc, url: str, timeout: float = 120) -> None:
    """Until the server at `url` answers /health (its process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)

def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_completions_equal_generate(server, greedy, toy_files):
    for prompt, row in zip(dev_prompts(toy_files), greedy):
        got = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
        choice = got.choices[0]
        assert choice.text.strip() == row["prediction"]
        assert got.usage.completion_tokens == row["n_tokens"] and got.usage.prompt_tokens > 0
        assert choice.finish_reason == ("length" if row["n_tokens"] == 8 else "stop")
    # several prompts in one request: one choice each, in order
    many = server.client.completions.create(model=NAME, prompt=dev_prompts(toy_files)[:3], max_tokens=8,
                                            temperature=0)
    assert [c.text.strip() for c in sorted(many.choices, key=lambda c: c.index)] == \
        [r["prediction"] for r in greedy[:3]]


def test_streaming_equals_the_whole_response(server, model, toy_files):
    prompt = dev_prompts(toy_files)[0]
    whole = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    chunks = list(server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "answer"}, {"role": "user", "content": prompt}]
    chat = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = model.prompt_ids([model.chat_text(messages)], special_tokens=False)
    expected = model.run(ids, model.decoding(num_beams=1, max_new_tokens=8),
                         [model.row(len(ids[0]), model.decoding(num_beams=1, max_new_tokens=8))])[0]
    assert chat.choices[0].message.content == expected.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids[0]) and chat.usage.completion_tokens == len(expected.token_ids)
    stream = list(server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                        stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_sampling_with_a_seed_repeats_and_stop_strings_cut(server, toy_files):
    prompt = dev_prompts(toy_files)[2]
    a, b = (server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.3, top_p=0.95,
                                             seed=7).choices[0].text for _ in range(2))
    assert a == b
    full = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0).choices[0]
    stop = full.text[3:5]
    cut = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                           stop=[stop]).choices[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    beams = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8,
                                             extra_body={"num_beams": 2}).choices[0]
    assert isinstance(beams.text, str)


@pytest.mark.parametrize("on", ["server", "request_server"])
def test_a_seeded_request_samples_each_prompt_as_it_would_alone(request, on, model, toy_files):
    """A request's seed: its prompt i samples as the API does alone with example_seed(seed, i) (prompt 0: the seed
    itself), though the request's prompts decode together (in one batch with request-level batching; rows of the
    running batch with step-level batching)."""
    from llm2slm_cli.generation import example_seed

    server = request.getfixturevalue(on)
    prompts = dev_prompts(toy_files)[:3]
    before = len(server.engine.batches)
    got = server.client.completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=1.0, seed=7)
    if on == "request_server":
        assert list(server.engine.batches)[before:] == [3]
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    sample = dict(sample=True, top_p=1.0, temperature=1.0, max_new_tokens=8)
    assert texts == [model.complete([p], seed=example_seed(7, i), **sample)[0].text for i, p in enumerate(prompts)]
    assert texts == [c.text for c in model.complete(prompts, seed=7, **sample)]
    assert texts != [c.text for c in model.complete(prompts, seed=8, **sample)]


@pytest.mark.parametrize("on", ["server", "request_server"])
def test_sixteen_concurrent_clients_are_batched_and_all_right(request, on, greedy, toy_files):
    server = request.getfixturevalue(on)
    prompts = dev_prompts(toy_files)
    expected = {p: r["prediction"] for p, r in zip(prompts, greedy)}
    before, steps_before, completed = len(server.engine.batches), len(server.engine.step_sizes), \
        server.engine.completed

    def client(k: int) -> list[bool]:
        own = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        results = []
        for i in range(3):  # a bounded loop per client
            prompt = prompts[(k + i) % len(prompts)]
            if (k + i) % 2:
                text = "".join(c.choices[0].text for c in own.completions.create(
                    model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True))
            else:
                text = own.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
            results.append(text.strip() == expected[prompt])
        return results

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client, range(16)))
    assert all(all(r) for r in answers) and sum(len(r) for r in answers) == 48
    assert server.engine.completed - completed == 48 and server.engine.active == 0
    if on == "request_server":
        sizes = list(server.engine.batches)[before:]
        assert sum(sizes) == 48 and max(sizes) > 1  # requests were decoded together
    else:  # one running batch: rows joined it and left it, never a request-level batch
        assert len(server.engine.batches) == before
        assert max(list(server.engine.step_sizes)[steps_before:]) > 1


def test_speculative_decoding_is_served(trained_checkpoint, toy_files):
    """serve --model LLM --draft CKPT: the responses, streamed or not, are the LLM's own greedy ones."""
    from conftest import SERVE_TEMPLATE

    running = Running(load("tiny-llama", draft=trained_checkpoint, device="cpu"), name="spec", max_batch_size=4)
    try:
        llm = load("tiny-llama", device="cpu")
        prompts = dev_prompts(toy_files)[:4]
        expected = llm.complete([SERVE_TEMPLATE.format(src=p) for p in prompts], num_beams=1, max_new_tokens=10)
        for prompt, want in zip(prompts, expected):
            got = running.client.completions.create(model="spec", prompt=prompt, max_tokens=10, temperature=0)
            assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
            streamed = running.client.completions.create(model="spec", prompt=prompt, max_tokens=10, temperature=0,
                                                         stream=True)
            assert "".join(c.choices[0].text for c in streamed) == want.text
        assert [m.kind for m in running.serving.models().data] == ["speculative"]
        r = _post(running.url, {"model": "spec", "prompt": "a", "num_beams": 2})
        assert r.status_code == 400 and "one sequence" in r.json()["error"]["message"]
    finally:
        running.close()


def _post(url: str, body, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


def test_bad_requests_get_openai_errors(server, plain_server):
    ok = {"model": NAME, "prompt": "alpha", "max_tokens": 4}
    cases = [
        ('{"model": "kv-model", "prompt": ', 400, None),  # malformed JSON
        ("", 400, None),
        ({**ok, "max_tokens": "many"}, 400, "max_tokens"),  # wrong types
        ({**ok, "prompt": 5}, 400, "prompt"),
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "max_tokens": -3}, 400, "max_tokens"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": 10**12}, 400, "max_tokens"),  # over the server's limit
        ({**ok, "prompt": ""}, 400, "prompt"),
        ({**ok, "prompt": "   "}, 400, "prompt"),
        ({**ok, "prompt": []}, 400, "prompt"),
        ({**ok, "prompt": [[]]}, 400, "prompt"),
        ({**ok, "temperature": 3}, 400, "temperature"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "logprobs": 2}, 400, "logprobs"),
        ({**ok, "num_beams": 2, "temperature": 0.7}, 400, "num_beams"),
        ({"prompt": "alpha"}, 400, "model"),
        ({**ok, "model": "gpt-4"}, 404, "model"),
    ]
    for body, status, param in cases:
        r = _post(server.url, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and error["param"] == param, (body, error)
        assert "Traceback" not in r.text
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    for body, status in [({**chat, "messages": []}, 400), ({**chat, "messages": [{"role": "x", "content": "a"}]}, 400),
                         ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
                         ({**chat, "max_completion_tokens": -1}, 400)]:
        assert _post(server.url, body, "/v1/chat/completions").status_code == status, body
    # a model without a chat template: a clear 400
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        plain_server.client.chat.completions.create(model="tiny-gpt2", messages=chat["messages"])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="nope", prompt="a")
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert server.client.completions.create(model=NAME, prompt="alpha", max_tokens=2).choices  # still serving
    assert server.engine.active == 0


EMPTY_CHAT = "{% for m in messages %}{% endfor %}"  # renders every conversation as an empty prompt
CHAT_PATH = "/v1/chat/completions"
OK = {"model": NAME, "prompt": "alpha", "max_tokens": 4}
CHAT_OK = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ODD_CHAT = {**CHAT_OK, "model": "odd"}


@pytest.fixture(scope="module")
def odd_server():
    """A plain model whose chat template renders every conversation empty, and a queue of 2."""
    running = Running(load("tiny-gpt2", device="cpu", chat_template=EMPTY_CHAT), name="odd", max_batch_size=4,
                      batch_wait_ms=1, max_queue=2)
    yield running
    running.close()


@pytest.mark.parametrize("on, path, body, field", [
    ("server", "", {**OK, "seed": 2**64}, "seed"),
    ("server", "", {**OK, "seed": 10**400}, "seed"),
    ("server", "", {**OK, "seed": -1}, "seed"),
    ("server", "", {**OK, "seed": True}, "seed"),
    ("server", "", {**OK, "seed": 1.5}, "seed"),
    ("server", "", {**OK, "seed": "7"}, "seed"),
    ("server", "", {**OK, "temperature": 0.5, "seed": 2**63}, "seed"),
    ("server", "", {**OK, "max_tokens": True}, "max_tokens"),
    ("server", "", {**OK, "max_tokens": 2.5}, "max_tokens"),
    ("server", "", {**OK, "max_tokens": "5"}, "max_tokens"),
    ("server", "", {**OK, "max_tokens": 10**400}, "max_tokens"),
    ("server", "", {**OK, "temperature": True}, "temperature"),
    ("server", "", {**OK, "temperature": "0.5"}, "temperature"),
    ("server", "", '{"model": "kv-model", "prompt": "alpha", "temperature": NaN}', "temperature"),
    ("server", "", '{"model": "kv-model", "prompt": "alpha", "top_p": 1e400}', "top_p"),
    ("server", "", '{"model": "kv-model", "prompt": "alpha", "length_penalty": Infinity}', "length_penalty"),
    ("server", "", {**OK, "num_beams": 1.5}, "num_beams"),
    ("server", "", {**OK, "num_beams": True}, "num_beams"),
    ("server", "", {**OK, "n": True}, "n"),
    ("server", "", {**OK, "stream": "yes"}, "stream"),
    ("server", "", {**OK, "stop": [5]}, "stop"),
    ("server", "", {**OK, "stop": 5}, "stop"),
    ("server", "", {**OK, "prompt": [True, 3]}, "prompt"),
    ("server", "", {**OK, "prompt": [["a"]]}, "prompt"),
    ("server", "", {**OK, "model": 5}, "model"),
    ("server", CHAT_PATH, {**CHAT_OK, "seed": 2**64}, "seed"),
    ("server", CHAT_PATH, {**CHAT_OK, "max_tokens": True}, "max_tokens"),
    ("server", CHAT_PATH, {**CHAT_OK, "max_completion_tokens": True}, "max_completion_tokens"),
    ("server", CHAT_PATH, {**CHAT_OK, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("server", CHAT_PATH, {**CHAT_OK, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ("odd_server", CHAT_PATH, ODD_CHAT, "messages"),  # the template renders an empty prompt
    ("odd_server", CHAT_PATH, {**ODD_CHAT, "stream": True}, "messages"),  # the same, before the stream starts
])
def test_no_client_input_is_a_500(request, on, path, body, field):
    """Every value a client can send that cannot be served is a 400 with an OpenAI error body naming the JSON field
    (never a CLI flag, never a traceback): strict types, seeds in 0..2**63-1, finite numbers, no empty prompt."""
    running = request.getfixturevalue(on)
    r = _post(running.url, body, path or "/v1/completions")
    assert r.status_code == 400, (body, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == field and error["message"].startswith(field), (body, error)
    assert "--" not in error["message"] and "Traceback" not in r.text and "\n" not in error["message"]
    assert running.engine.active == 0


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(odd_server):
    """A request the queue could never hold is a client error that says why, not a "retry later"."""
    r = _post(odd_server.url, {"model": "odd", "prompt": ["a", "b", "c"], "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "too_many_prompts" and "at most 2" in error["message"]
    assert len(_post(odd_server.url, {"model": "odd", "prompt": ["a", "b"], "max_tokens": 2}).json()["choices"]) == 2


def _serve(*args: str, script: str | None = None) -> subprocess.Popen:
    """`llm2slm serve` in a subprocess (`script`: Python run before the CLI, in the same process)."""
    code = f"{script or ''}\nfrom llm2slm_cli.cli import app\napp()"
    return subprocess.Popen([sys.executable, "-c", code, "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=Path(__file__).parent)


def test_a_broken_chat_template_stops_serve_before_it_starts(tmp_path):
    broken = tmp_path / "chat.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }\n")
    proc = _serve("--model", "tiny-gpt2", "--device", "cpu", "--port", str(free_port()), "--chat-template",
                  str(broken))
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: --chat-template {broken}: not a valid Jinja template (line 1"), err


SLOW_DECODING = """
import time
from llm2slm_cli import api
row = api.Model.row
def slow_row(self, *args, **kwargs):  # 20 ms a token: a 1000-token response is still decoding when signalled
    r = row(self, *args, **kwargs)
    push = r.push
    r.push = lambda tokens: time.sleep(0.02) or push(tokens)
    return r
api.Model.row = slow_row
"""


def test_a_second_sigint_answers_the_requests_in_flight_then_exits_non_zero():
    """Ctrl-C twice while a request and a stream are decoding: both clients get an OpenAI error (a 503 body; the
    stream's last event), and `serve` exits 130 with one line, no traceback."""
    port = free_port()
    proc = _serve("--model", "tiny-gpt2", "--device", "cpu", "--port", str(port), "--served-model-name", "slow",
                  "--max-tokens-limit", "1000", "--batch-wait-ms", "2000", "--quiet", script=SLOW_DECODING)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "slow", "prompt": "alpha", "max_tokens": 1000, "temperature": 0}
    got: dict = {"events": []}
    first_text = threading.Event()
    try:
        _wait_healthy(proc, url)

        def whole() -> None:
            got["whole"] = _post(url, body)

        def streamed() -> None:
            with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions",
                                                              json={**body, "stream": True}) as r:
                got["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got["events"].append(line.removeprefix("data: "))
                        first_text.set()

        clients = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for t in clients:
            t.start()
        # both requests decode in one batch (it waits up to 2 s for the second): the stream's text is arriving
        assert first_text.wait(timeout=60)
        assert httpx.get(url + "/health", timeout=5).json()["active"] == 2
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert all(t.is_alive() for t in clients)  # the first Ctrl-C waits for them
        proc.send_signal(signal.SIGINT)
        for t in clients:
            t.join(timeout=60)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130 and "Traceback" not in err and "CancelledError" not in err, err
    assert err.strip().splitlines()[-1] == "error: stopped by a second Ctrl-C: 2 requests in flight got a 503 error"
    whole = got["whole"]
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "shutting_down", whole.text
    assert got["status"] == 200 and got["events"][-1] == "[DONE]", got
    assert json.loads(got["events"][-2])["error"]["code"] == "shutting_down"
    assert len(got["events"]) > 2  # text had arrived before the error


def test_a_client_dropping_mid_stream_frees_its_slot(plain_server, monkeypatch):
    """The queue holds 2: a long stream and a request waiting behind it fill it, a third gets 429. Dropping the
    stream frees its slot and stops its decoding long before its 1000 tokens, so the waiting request is answered
    at once. (Each token is slowed to 5 ms here, so that the stream cannot finish before it is dropped.)"""
    url, engine = plain_server.url, plain_server.engine
    row = engine.model.row

    def slow_row(*args, **kwargs):
        r = row(*args, **kwargs)
        push = r.push
        r.push = lambda tokens: time.sleep(0.005) or push(tokens)
        return r

    monkeypatch.setattr(engine.model, "row", slow_row)
    body = {"model": "tiny-gpt2", "prompt": "alpha", "max_tokens": 1000, "temperature": 0, "stream": True}
    before = engine.generated
    waiting: dict = {}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(line for line in lines if line.startswith("data:"))  # decoding has started
            behind = threading.Thread(target=lambda: waiting.update(
                r=_post(url, {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2}), t=time.monotonic()))
            behind.start()
            deadline = time.monotonic() + 5
            while engine.active < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            full = _post(url, {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2})
            assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
            dropped = time.monotonic()
        # leaving the block closed the stream: the client is gone
        behind.join(timeout=30)
    assert waiting["r"].status_code == 200 and waiting["t"] - dropped < 2.0  # 1000 tokens would take 5 s
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0 and engine.generated - before < 500
    too_long = _post(url, {**body, "stream": False, "max_tokens": 1024})  # past tiny-gpt2's 1024 positions
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["message"].startswith("max_tokens: this model reads at most 1024 tokens")


def test_sigterm_finishes_the_request_in_flight_then_exits(trained_checkpoint, model, toy_files):
    # the prompt with the longest greedy response: what the interrupted stream must still deliver in full
    answers = model.complete(dev_prompts(toy_files), num_beams=1, max_new_tokens=300)
    prompt, expected = max(zip(dev_prompts(toy_files), answers), key=lambda pa: len(pa[1].token_ids))
    assert len(expected.token_ids) > 20
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llm2slm_cli", "serve", "--model", str(trained_checkpoint),
                             "--port", str(port), "--device", "cpu", "--served-model-name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parent)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=300, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(openai.APIConnectionError):  # no longer accepting
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=5).models.list()
        rest = list(stream)
        finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
        text = "".join(c.choices[0].text for c in [first, *rest] if c.choices)
        assert text == expected.text and finish[-1] == expected.finish_reason  # all of it, after the SIGTERM
        assert len([c for c in rest if c.choices and c.choices[0].text]) > 5
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert code == 0, err
        assert "Traceback" not in err and "serving 'kv-model' (llm2slm) on http://127.0.0.1" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _slow_rows(monkeypatch, engine, seconds: float = 0.005) -> None:
    """Each row's tokens slowed to `seconds` apiece, so that long responses are still decoding when the test acts."""
    row = engine.model.row

    def slow_row(*args, **kwargs):
        r = row(*args, **kwargs)
        push = r.push
        r.push = lambda tokens: time.sleep(seconds) or push(tokens)
        return r

    monkeypatch.setattr(engine.model, "row", slow_row)


@pytest.fixture
def step_server():
    """tiny-gpt2 with step-level batching (the default), a queue of 2 and room for long responses; fresh for each
    test, so that its metrics count only that test's requests."""
    running = Running(load("tiny-gpt2", device="cpu"), name="tiny-gpt2", max_batch_size=4, max_queue=2,
                      max_tokens_limit=4000)
    assert running.engine.batching == "step"
    yield running
    running.close()


def test_a_new_request_joins_the_batch_in_flight(step_server, monkeypatch):
    """Step-level batching: a request that arrives while a 1000-token stream decodes (5 ms a token here) is
    answered at once, not after the stream; the queue of 2 full is a 429 with Retry-After; dropping the stream
    frees its slot and stops its row."""
    url, engine = step_server.url, step_server.engine
    _slow_rows(monkeypatch, engine)
    body = {"model": "tiny-gpt2", "prompt": "alpha", "max_tokens": 1000, "temperature": 0, "stream": True}
    short = {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(line for line in lines if line.startswith("data:"))  # decoding has started
        sent = time.monotonic()
        answer = _post(url, short)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        assert time.monotonic() - sent < 2.0 and engine.active == 1  # the stream (5 s of tokens) goes on
        assert max(engine.step_sizes) == 2  # the short request decoded beside the stream
        with http.stream("POST", url + "/v1/completions", json=body) as second:
            assert second.status_code == 200
            full = _post(url, short)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["Retry-After"]) >= 1
        dropped = time.monotonic()
        deadline = dropped + 10
        while engine.active > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 1 and _post(url, short).status_code == 200  # the dropped stream's slot is free
        assert time.monotonic() - dropped < 2.0
    deadline = time.monotonic() + 10
    while (engine.active or len(engine.steps)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0 and len(engine.steps) == 0 and engine.generated < 1000


def _metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(r.text)
            for s in f.samples}


def test_metrics_count_requests_tokens_and_latencies(step_server):
    url = step_server.url
    tokens = 0
    for n in (3, 5, 7):
        r = _post(url, {"model": "tiny-gpt2", "prompt": "alpha beta", "max_tokens": n, "temperature": 0})
        tokens += r.json()["usage"]["completion_tokens"]
    assert _post(url, {"model": "tiny-gpt2", "prompt": "alpha", "max_tokens": -3}).status_code == 400
    assert _post(url, {"model": "nope", "prompt": "alpha"}).status_code == 404
    stream = _post(url, {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}})
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    tokens += json.loads(stream.text.split("data: ")[-2])["usage"]["completion_tokens"]
    m = _metrics(url)
    requests = {labels: v for (name, labels), v in m.items() if name == "llm2slm_requests_total"}
    assert requests == {(("endpoint", "/v1/completions"), ("status", "200")): 4.0,
                        (("endpoint", "/v1/completions"), ("status", "400")): 1.0,
                        (("endpoint", "/v1/completions"), ("status", "404")): 1.0}
    assert m[("llm2slm_generated_tokens_total", ())] == tokens == step_server.engine.generated
    assert m[("llm2slm_time_to_first_token_seconds_count", ())] == 4.0
    assert m[("llm2slm_request_latency_seconds_count", ())] == 4.0
    assert m[("llm2slm_queue_length", ())] == 0.0 and m[("llm2slm_running_requests", ())] == 0.0
    steps = list(step_server.engine.step_sizes)
    assert m[("llm2slm_batch_size_count", ())] == len(steps) >= tokens
    assert m[("llm2slm_batch_size_sum", ())] == sum(steps) == len(steps)  # the requests came one after another


def test_models_report_the_whole_context_as_max_model_len(server, plain_server):
    """/v1/models' max_model_len is prompt and response tokens together (vLLM's meaning): a decoder-only model's
    positions, else the longest prompt plus the largest max_tokens; max_prompt_len is the prompt limit."""
    from llm2slm_cli.server.serving import Engine, OpenAIServing

    plain = httpx.get(plain_server.url + "/v1/models").json()["data"][0]
    assert (plain["max_model_len"], plain["max_prompt_len"], plain["batching"]) == (1024, 512, "request")
    served = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (served["max_model_len"], served["batching"]) == (1024, "step")
    t5 = load("tiny-t5", device="cpu")  # relative positions: no limit of its own
    card = OpenAIServing(t5, Engine(t5), name="t5", max_tokens_limit=100).models().data[0]
    assert (card.max_model_len, card.max_prompt_len) == (612, 512)


def test_an_over_long_prompt_is_cut_and_the_response_says_so(server, model, capfd):
    """serve cuts a prompt over the model's limit to its first tokens, as `generate` and the Python API do: the
    response is the API's for the same prompt, its X-Prompt-Truncated header says what was cut, the log has a
    line."""
    long = "alpha " * 400
    limit = model.max_prompt_length
    n = len(model.tokenizer(model.prompt_text(long))["input_ids"])
    assert n > limit
    r = _post(server.url, {"model": NAME, "prompt": long, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["X-Prompt-Truncated"] == f"the prompt has {n} tokens, cut to its first {limit} (this model's " \
                                              "limit)"
    assert r.json()["usage"]["prompt_tokens"] == limit
    with pytest.warns(UserWarning):
        expected = load(model.name, device="cpu").complete([long], num_beams=1, max_new_tokens=6)[0]
    assert r.json()["choices"][0]["text"] == expected.text
    short = model.prompt_ids([model.prompt_text("alpha")])[0]
    ids = short * (limit + 5)
    r = _post(server.url, {"model": NAME, "prompt": [short, ids], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.headers["X-Prompt-Truncated"] == \
        f"prompt[1] has {len(ids)} tokens, cut to its first {limit} (this model's limit)"
    chat = _post(server.url, {"model": NAME, "messages": [{"role": "user", "content": long}], "max_tokens": 2,
                              "stream": True}, CHAT_PATH)
    assert chat.status_code == 200 and "cut to its first" in chat.headers["X-Prompt-Truncated"]
    assert "x-prompt-truncated" not in _post(server.url, {"model": NAME, "prompt": "alpha", "max_tokens": 2}).headers
    err = capfd.readouterr().err
    assert err.count(f"has {n} tokens, cut to its first {limit}") == 1 and "warning: cmpl-" in err
