"""From a validated OpenAI request to decoding on the Python API's Model, with concurrent requests batched together.

`Engine` is the batcher, one worker thread over the model, in one of two modes (`serve --batching`):

- step (the default): continuous batching. A request is prefilled as soon as the worker reaches a step boundary
  (with the others that arrived meanwhile) and its row joins the running batch there; every step decodes one token
  for each row, and a row that ends leaves at once (api.StepBatch, continuous.py), so a new request never waits for
  the batch in flight to finish. Greedy and sampling rows share steps, whatever their settings: each row chooses its
  own tokens (sampling from its own generator, seeded by the request's seed), so its output is what it gets decoded
  alone. Beam search and requests with a repetition penalty or n-gram ban (whose state spans the whole decoding of a
  prompt) are decoded in request-level batches between the running batch's turns: when such a request is the oldest
  waiting, no new row joins, the running rows finish, and its batch runs. Speculative decoding (`--draft`), and a
  model whose cache cannot take rows (continuous.steppable), use request-level batches only.
- request: the worker takes the oldest waiting job, waits up to `batch_wait_ms` after it arrived for more jobs with
  the same decoding settings (up to `max_batch_size`), pads their prompts together and decodes them as one batch
  (`api.Model.run`) to the end; jobs that arrive meanwhile wait for a later batch.

Either way each row has its own length limit and stop strings, new text goes back to each request's event loop as it
is decoded, and a job whose client has gone is cancelled: its row stops (a batch of only cancelled rows ends at once)
and its slot is free.

`OpenAIServing` turns completion and chat requests into jobs and their results into OpenAI response bodies or
server-sent-event chunks. Every client input it cannot serve is a 400 naming the JSON field (never a 500): the request
is checked by protocol.py's types, then by the Python API's own validation (llm2slm_cli.validation), whose errors
are renamed to the request's fields. A prompt longer than the model's limit is cut to its first tokens, as `generate`
and the Python API cut it; the response says so in its `X-Prompt-Truncated` header and the server's log has a line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import statistics
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from llm2slm_cli.api import Completion, Decoding, Model
from llm2slm_cli.errors import UserError
from llm2slm_cli.generation import example_seed
from llm2slm_cli.server import protocol as P
from llm2slm_cli.validation import InvalidArgument

MAX_STOP = 4  # as OpenAI's API
Batching = Literal["step", "request"]
BATCHING = ("step", "request")


class ServingError(Exception):
    """An error with its HTTP status and OpenAI error type (and headers for its response: Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


class Observer:
    """What the engine reports as it works (server/metrics.py counts it; this one ignores it). Called from the worker
    thread."""

    def first_token(self, seconds: float) -> None: ...

    def finished(self, seconds: float, tokens: int) -> None: ...

    def batch(self, size: int) -> None: ...


@dataclass(eq=False)
class Job:
    """One prompt to answer; its events (("text", str), ("done", Completion), ("error", ServingError)) go to `events`
    on the loop that submitted it."""

    index: int
    ids: list[int]
    decoding: Decoding
    key: tuple
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    released: bool = False
    stepped: bool = False  # joins the running batch (step-level batching) rather than a request-level batch
    first: float | None = None  # when its first token was decoded

    def send(self, kind: str, payload: Any) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))


class Engine:
    def __init__(self, model: Model, *, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 max_queue: int = 64, batching: Batching = "step") -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, not {batching!r}")
        self.model = model
        self.max_batch_size, self.wait, self.max_queue = max_batch_size, batch_wait_ms / 1000, max_queue
        self.steps = model.steps() if batching == "step" else None  # None: request-level batches only
        self.batching: Batching = "step" if self.steps is not None else "request"
        self.pending: collections.deque[Job] = collections.deque()
        self.active = 0  # jobs waiting or decoding
        self.closing = False
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)  # sizes of recent request batches
        self.step_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # rows of recent steps
        self.latencies: collections.deque[float] = collections.deque(maxlen=100)  # seconds of recent requests
        self.live: set[Job] = set()  # submitted, not yet released
        self.running: dict[int, Job] = {}  # id(job) -> job, for the rows of the running batch
        self.decoding = 0  # jobs being decoded now (running rows, or the request-level batch in flight)
        self.generated = 0  # tokens generated, all jobs (cancelled ones too)
        self.completed = 0  # jobs answered (done or error)
        self.observer = Observer()
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="llm2slm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def drain(self) -> None:
        """Refuse new jobs (503); what was submitted is still decoded."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()

    def stop(self) -> None:
        """Drain, then wait for the worker to finish the jobs it has."""
        self.drain()
        if self.thread.is_alive():
            self.thread.join()

    def abort(self, error: ServingError) -> int:
        """Stop now: every job submitted and not finished gets `error` (its client an OpenAI error body, or the
        last event of its stream) and its row stops; new jobs are refused. Returns how many requests were stopped."""
        with self.lock:
            self.closing = True
            jobs = list(self.live)
            for job in jobs:
                job.loop.call_soon_threadsafe(job.events.put_nowait, (job.index, "error", error))
                job.cancelled.set()  # after the error went out: a cancelled job sends nothing more
                if job in self.pending:
                    self.pending.remove(job)
                self._release(job)
            self.lock.notify_all()
        return len({id(job.events) for job in jobs})  # a request's jobs share their queue

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about how long a request takes now (the median of the recent ones),
        at least 1, at most 60."""
        recent = list(self.latencies)
        return min(60, max(1, math.ceil(statistics.median(recent)))) if recent else 1

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: 400 when they could never fit the queue, 429 (with Retry-After) when
        it is full now, 503 while shutting down."""
        with self.lock:
            if self.closing:
                raise ServingError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(jobs) > self.max_queue:
                raise ServingError(400, f"the request has {len(jobs)} prompts and this server takes at most "
                                        f"{self.max_queue} at once: send them in several requests",
                                   param="prompt", code="too_many_prompts")
            if self.active + len(jobs) > self.max_queue:
                wait = self.retry_after()
                raise ServingError(429, f"the server is busy ({self.active} requests waiting or decoding, at most "
                                        f"{self.max_queue}): retry in {wait} s", type="rate_limit_error",
                                   code="queue_full", headers={"Retry-After": str(wait)})
            for job in jobs:
                job.stepped = self.steps is not None and self.steps.takes(job.decoding)
            self.active += len(jobs)
            self.live.update(jobs)
            self.pending.extend(jobs)
            self.lock.notify_all()

    def cancel(self, job: Job) -> None:
        """The client has gone: stop the job's row, free its slot at once."""
        job.cancelled.set()
        with self.lock:
            if job in self.pending:
                self.pending.remove(job)
            self._release(job)

    def _release(self, job: Job) -> None:
        if not job.released:
            job.released = True
            self.active -= 1
            self.live.discard(job)
            self.lock.notify_all()

    # ------------------------------------------------------------------------------------------- the worker

    def _work(self) -> None:
        while (work := self._next()) is not None:
            kind, jobs = work
            if kind == "join":
                self._join(jobs)
            elif kind == "step":
                self._step()
            else:
                self._decode(jobs)

    def _next(self) -> tuple[str, list[Job]] | None:
        """What the worker does next: rows to join the running batch ("join"), one step of it ("step"), a
        request-level batch ("batch"), or None: shutting down with nothing left."""
        with self.lock:
            while True:
                while self.pending and self.pending[0].cancelled.is_set():
                    self.pending.popleft()
                if self.pending and self.pending[0].stepped:
                    room = self.max_batch_size - len(self.running)
                    if room > 0:
                        joining = []
                        for job in self.pending:  # in arrival order, up to the first request-level job
                            if not job.stepped or len(joining) == room:
                                break
                            joining.append(job)
                        for job in joining:
                            self.pending.remove(job)
                        return "join", joining
                elif self.pending and not self.running:
                    return "batch", self._request_batch()
                if self.running:
                    return "step", []
                if self.closing and not self.pending:
                    return None
                if not self.pending:
                    self.lock.wait()

    def _request_batch(self) -> list[Job]:
        """The oldest job and those with its settings that arrive within `batch_wait_ms` of it (under the lock)."""
        first = self.pending[0]
        while True:
            same = [j for j in self.pending if j.key == first.key and not j.stepped]
            left = first.arrived + self.wait - time.monotonic()
            if len(same) >= self.max_batch_size or left <= 0 or self.closing or first not in self.pending:
                break
            self.lock.wait(left)
        batch = [j for j in self.pending if j.key == first.key and not j.stepped][: self.max_batch_size]
        for j in batch:
            self.pending.remove(j)
        return batch

    def _row(self, job: Job):
        row = self.model.row(len(job.ids), job.decoding, on_text=lambda text: job.send("text", text),
                             cancelled=job.cancelled)
        push = row.push

        def first_push(tokens) -> bool:  # the row's first token: the request's time to first token
            self._first(job)
            return push(tokens)

        row.push = first_push
        return row

    def _first(self, job: Job) -> None:
        """The job's first token is out (or, beam search, its whole answer)."""
        if job.first is None:
            job.first = time.monotonic()
            self.observer.first_token(job.first - job.arrived)

    def _answer(self, job: Job, result: Completion | ServingError) -> None:
        """The job's last event, its slot freed."""
        with self.lock:
            self._release(job)
            self.completed += 1
        now = time.monotonic()
        if isinstance(result, ServingError):
            job.send("error", result)
            return
        self._first(job)
        self.latencies.append(now - job.arrived)
        self.generated += len(result.token_ids)
        self.observer.finished(now - job.arrived, len(result.token_ids))
        job.send("done", result)

    def _join(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        try:
            self.steps.join([j.ids for j in jobs], [j.decoding for j in jobs], [self._row(j) for j in jobs],
                            [id(j) for j in jobs])
        except Exception as e:
            error = self._failure(e)
            for job in jobs:
                self._answer(job, error)
            return
        with self.lock:
            self.running.update((id(j), j) for j in jobs)
            self.decoding = len(self.running)

    def _step(self) -> None:
        self.step_sizes.append(len(self.running))
        self.observer.batch(len(self.running))
        try:
            ended = self.steps.step()
        except Exception as e:  # the running rows cannot go on: each gets the error
            error = self._failure(e)
            self.steps.clear()
            with self.lock:
                jobs, self.running, self.decoding = list(self.running.values()), {}, 0
            for job in jobs:
                self._answer(job, error)
            return
        with self.lock:
            jobs = [(self.running.pop(tag), result) for tag, result in ended]
            self.decoding = len(self.running)
        for job, result in jobs:
            self._answer(job, result)

    def _failure(self, e: Exception) -> ServingError:
        if isinstance(e, UserError):
            return ServingError(400, e.message)
        traceback.print_exc(file=sys.stderr)  # a bug: the client gets a 500 line, the log the traceback
        return ServingError(500, f"internal error: {type(e).__name__}", type="server_error")

    def _decode(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.cancelled.is_set()]
        if not batch:
            return
        rows = [self._row(j) for j in batch]
        self.batches.append(len(batch))
        self.observer.batch(len(batch))
        with self.lock:
            self.decoding = len(batch)
        try:
            results = self.model.run([j.ids for j in batch], batch[0].decoding, rows)
        except Exception as e:
            results = [self._failure(e)] * len(batch)
        with self.lock:
            self.decoding = 0
        for job, row, result in zip(batch, rows, results):
            if isinstance(result, ServingError):
                self.generated += len(row.ids)
            self._answer(job, result)


def _key(d: Decoding) -> tuple:
    """Jobs decode together when these agree; a seeded sampling job decodes alone (its draws are its own)."""
    seeded = object() if d.sample and d.seed is not None else None
    return (d.beams, d.sample, d.temperature if d.sample else None, d.top_p if d.sample else None,
            d.length_penalty if d.beams > 1 else None, d.max_new_tokens if d.beams > 1 else None, d.gamma, seeded)


class OpenAIServing:
    """Completion and chat requests on one model, through an Engine."""

    def __init__(self, model: Model, engine: Engine, *, name: str, max_new_tokens: int = 128,
                 max_tokens_limit: int = 1024) -> None:
        self.model, self.engine, self.name = model, engine, name
        self.max_new_tokens, self.max_tokens_limit = max_new_tokens, max_tokens_limit
        self.created = P.now()

    def models(self) -> P.ModelList:
        """The one model; max_model_len is what vLLM means by it, the tokens of prompt and response together this
        server can decode: the model's context where its positions have a limit (a decoder-only model), at most the
        longest prompt plus the largest max_tokens."""
        limit = self.model.max_prompt_length + self.max_tokens_limit
        context = self.model.context_length
        return P.ModelList(data=[P.ModelCard(
            id=self.name, created=self.created, kind=self.model.kind,
            max_model_len=min(context, limit) if context else limit, max_prompt_len=self.model.max_prompt_length,
            batching=self.engine.batching)])

    # ---------------------------------------------------------------------------------------- request -> jobs

    def _check(self, request: P._Sampling, max_tokens: int | None, max_tokens_field: str) -> Decoding:
        if request.model != self.name:
            raise ServingError(404, f"the model {request.model!r} does not exist: this server serves {self.name!r}",
                               param="model", code="model_not_found")
        if request.n != 1:
            raise ServingError(400, "n > 1 is not supported: send the request n times", param="n")
        unsupported = {"presence_penalty": request.presence_penalty != 0,
                       "frequency_penalty": request.frequency_penalty != 0, "logit_bias": bool(request.logit_bias)}
        for extra in ("echo", "suffix", "logprobs", "tools", "response_format", "top_logprobs"):
            value = getattr(request, extra, None)
            unsupported[extra] = value not in (None, False)
        if getattr(request, "best_of", None) not in (None, 1):
            unsupported["best_of"] = True
        for name, used in unsupported.items():
            if used:
                raise ServingError(400, f"{name} is not supported by this server", param=name)
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise ServingError(400, f"{max_tokens_field} {max_tokens} is over this server's limit of "
                                    f"{self.max_tokens_limit}", param=max_tokens_field)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise ServingError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
        beams = request.num_beams or 1
        if beams > 1 and request.temperature not in (None, 0):
            raise ServingError(400, "beam search (num_beams > 1) is deterministic: give temperature 0 or leave it "
                                    "out", param="num_beams")
        temperature = 1.0 if request.temperature is None else request.temperature
        sample = beams == 1 and temperature > 0
        options: dict[str, Any] = {"max_new_tokens": max_tokens or self.max_new_tokens, "stop": stop,
                                   "seed": request.seed, "num_beams": 1 if sample else beams, "sample": sample}
        if sample:
            options.update(temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p)
        if request.length_penalty is not None:
            options["length_penalty"] = request.length_penalty
        try:
            return self.model.decoding(**options)
        except InvalidArgument as e:  # the API's argument names, as the request's fields
            field = {"max_new_tokens": max_tokens_field}.get(e.param, e.param)
            raise ServingError(400, f"{field}: {e.reason}", param=field) from None
        except UserError as e:
            raise ServingError(400, e.message) from None

    def _jobs(self, decoding: Decoding, prompts: list[list[int]]) -> list[Job]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        key = _key(decoding)
        # prompt i samples from its own seed, as Model.complete gives it (the first: the request's seed)
        return [Job(i, ids, decoding if decoding.seed is None or i == 0 else
                    replace(decoding, seed=example_seed(decoding.seed, i)), key, loop, events)
                for i, ids in enumerate(prompts)]

    def completion_prompts(self, request: P.CompletionRequest) -> Prompts:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ServingError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        limit = self.model.max_prompt_length
        if isinstance(prompt[0], list):  # token ids: as they are, no template
            vocab = len(self.model.tokenizer)
            for ids in prompt:
                if not ids or any(not 0 <= t < vocab for t in ids):
                    raise ServingError(400, f"token id prompts must be non-empty lists of ids in [0, {vocab})",
                                       param="prompt")
            return Prompts([list(ids[:limit]) for ids in prompt], [len(ids) for ids in prompt], limit)
        try:
            texts = [self.model.prompt_text(p, where=f"prompt[{i}]" if len(prompt) > 1 else "prompt")
                     for i, p in enumerate(prompt)]
            return Prompts(*self.model.tokenize(texts), limit)
        except UserError as e:
            raise ServingError(400, e.message, param="prompt") from None

    def chat_prompt(self, request: P.ChatCompletionRequest) -> Prompts:
        if not self.model.chat_template:
            raise ServingError(400, f"the model {self.name!r} has no chat template, so it cannot chat: use "
                                    "/v1/completions, or start the server with --chat-template FILE",
                               param="messages", code="no_chat_template")
        messages = []
        for i, m in enumerate(request.messages):
            content = m.content
            if isinstance(content, list):
                if any(not isinstance(part, P.TextPart) for part in content):
                    raise ServingError(400, f"messages[{i}]: only text content parts are supported",
                                       param="messages")
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids, length = self.model.chat_tokens(messages)
        except UserError as e:
            raise ServingError(400, e.message, param="messages") from None
        return Prompts([ids], [length], self.model.max_prompt_length)

    # ---------------------------------------------------------------------------------------- jobs -> responses

    def start(self, request: P._Sampling, prompts: list[list[int]], max_tokens: int | None,
              max_tokens_field: str = "max_tokens") -> list[Job]:
        decoding = self._check(request, max_tokens, max_tokens_field)
        for ids in prompts:
            try:
                self.model.check_length(len(ids), decoding.max_new_tokens)
            except InvalidArgument as e:
                raise ServingError(400, f"{max_tokens_field}: {e.reason}", param=max_tokens_field,
                                   code="context_length_exceeded") from None
        jobs = self._jobs(decoding, prompts)
        self.engine.submit(jobs)
        return jobs

    async def results(self, jobs: list[Job]) -> list[Completion]:
        """Wait for every job; cancelled if the request is (the client went away)."""
        done: dict[int, Completion] = {}
        try:
            async for index, kind, payload in self._events(jobs):
                if kind == "done":
                    done[index] = payload
        finally:
            self._cancel_unfinished(jobs, done)
        return [done[j.index] for j in jobs]

    async def _events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, str, Any]]:
        events, left = jobs[0].events, len(jobs)
        while left:
            index, kind, payload = await events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                left -= 1
            yield index, kind, payload

    def _cancel_unfinished(self, jobs: list[Job], done: dict[int, Any]) -> None:
        for j in jobs:
            if j.index not in done:
                self.engine.cancel(j)

    async def stream(self, jobs: list[Job], chunk, usage_chunk=None) -> AsyncIterator[str]:
        """Server-sent events: `chunk(index, text, finish_reason)` bodies as text arrives, then [DONE]. A client that
        goes away closes this generator, which cancels its jobs."""
        done: dict[int, Completion] = {}
        try:
            try:
                async for index, kind, payload in self._events(jobs):
                    if kind == "text":
                        yield _sse(chunk(index, payload, None))
                    else:
                        done[index] = payload
                        yield _sse(chunk(index, None, payload.finish_reason))
                if usage_chunk is not None:
                    yield _sse(usage_chunk(_usage(list(done.values()))))
            except ServingError as e:  # after the headers went out: the error is the last event
                yield _sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            self._cancel_unfinished(jobs, done)


@dataclass
class Prompts:
    """A request's prompts as token ids, cut to the model's prompt limit, with their lengths before the cut."""

    ids: list[list[int]]
    lengths: list[int]
    limit: int

    def notice(self) -> str | None:
        """What was cut, in words (the X-Prompt-Truncated header and the log line), or None."""
        cut = [(i, n) for i, n in enumerate(self.lengths) if n > self.limit]
        if not cut:
            return None
        where = (lambda i: f"prompt[{i}]") if len(self.lengths) > 1 else (lambda i: "the prompt")
        return "; ".join(f"{where(i)} has {n} tokens, cut to its first {self.limit} (this model's limit)"
                         for i, n in cut)


@dataclass
class Reply:
    """A response body (or an async iterator of SSE lines) and the headers that go with it."""

    body: Any
    headers: dict[str, str]


def _cut(prompts: Prompts, rid: str) -> dict[str, str]:
    """The header and the log line that say a prompt was cut."""
    notice = prompts.notice()
    if notice is None:
        return {}
    print(f"warning: {rid}: {notice}", file=sys.stderr, flush=True)
    return {TRUNCATED_HEADER: notice}


TRUNCATED_HEADER = "X-Prompt-Truncated"


def _sse(body: Any) -> str:
    data = body.model_dump_json(exclude_none=False) if hasattr(body, "model_dump_json") else json.dumps(body)
    return f"data: {data}\n\n"


def _usage(results: list[Completion]) -> P.Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


async def completion(serving: OpenAIServing, request: P.CompletionRequest):
    """A CompletionResponse, or (stream) an async iterator of SSE lines, with its headers."""
    prompts = serving.completion_prompts(request)
    jobs = serving.start(request, prompts.ids, request.max_tokens)
    rid, created = P.new_id("cmpl"), P.now()
    headers = _cut(prompts, rid)

    def chunk(index: int, text: str | None, reason: str | None) -> P.CompletionResponse:
        return P.CompletionResponse(id=rid, created=created, model=serving.name, choices=[
            P.CompletionChoice(index=index, text=text or "", finish_reason=reason)])

    if request.stream:
        include = request.stream_options is not None and request.stream_options.include_usage
        usage = (lambda u: P.CompletionResponse(id=rid, created=created, model=serving.name, choices=[],
                                                usage=u)) if include else None
        return Reply(serving.stream(jobs, chunk, usage), headers)
    results = await serving.results(jobs)
    return Reply(P.CompletionResponse(id=rid, created=created, model=serving.name, usage=_usage(results), choices=[
        P.CompletionChoice(index=i, text=r.text, finish_reason=finish(r.finish_reason))
        for i, r in enumerate(results)]), headers)


async def chat_completion(serving: OpenAIServing, request: P.ChatCompletionRequest):
    """A ChatCompletionResponse, or (stream) an async iterator of SSE lines, with its headers."""
    prompts = serving.chat_prompt(request)
    field = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
    jobs = serving.start(request, prompts.ids, request.max_completion_tokens or request.max_tokens, field)
    rid, created = P.new_id("chatcmpl"), P.now()
    headers = _cut(prompts, rid)

    if request.stream:
        first = {"sent": False}

        def chunk(index: int, text: str | None, reason: str | None) -> P.ChatCompletionChunk:
            role = None if first["sent"] else "assistant"
            first["sent"] = True
            return P.ChatCompletionChunk(id=rid, created=created, model=serving.name, choices=[
                P.ChatStreamChoice(index=index, delta=P.Delta(role=role, content=text), finish_reason=reason)])

        include = request.stream_options is not None and request.stream_options.include_usage
        usage = (lambda u: P.ChatCompletionChunk(id=rid, created=created, model=serving.name, choices=[],
                                                 usage=u)) if include else None
        return Reply(serving.stream(jobs, chunk, usage), headers)
    results = await serving.results(jobs)
    r = results[0]
    return Reply(P.ChatCompletionResponse(id=rid, created=created, model=serving.name, usage=_usage(results),
                                          choices=[P.ChatChoice(index=0, message=P.AssistantMessage(content=r.text),
                                                                finish_reason=finish(r.finish_reason))]), headers)
