"""From a validated OpenAI request to decoding on the Python API's Model, with concurrent requests batched together.

`Engine` is the dynamic batcher: one worker thread takes the oldest waiting job, waits up to `batch_wait_ms` after
it arrived for more jobs with the same decoding settings (up to `max_batch_size`), pads their prompts together and
decodes them as one batch (`api.Model.run`), each row with its own length limit and stop strings. Jobs with other
settings wait for a later batch. New text goes back to each request's event loop as it is decoded. A job whose
client has gone is cancelled: its row stops (a batch of only cancelled rows ends at once) and its slot is free.

`OpenAIServing` turns completion and chat requests into jobs and their results into OpenAI response bodies or
server-sent-event chunks. Every client input it cannot serve is a 400 naming the JSON field (never a 500): the request
is checked by protocol.py's types, then by the Python API's own validation (llm2slm_cli.validation), whose errors
are renamed to the request's fields.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from llm2slm_cli.api import Completion, Decoding, Model
from llm2slm_cli.errors import UserError
from llm2slm_cli.generation import example_seed
from llm2slm_cli.server import protocol as P
from llm2slm_cli.validation import InvalidArgument

MAX_STOP = 4  # as OpenAI's API


class ServingError(Exception):
    """An error with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


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

    def send(self, kind: str, payload: Any) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))


class Engine:
    def __init__(self, model: Model, *, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 max_queue: int = 64) -> None:
        self.model = model
        self.max_batch_size, self.wait, self.max_queue = max_batch_size, batch_wait_ms / 1000, max_queue
        self.pending: collections.deque[Job] = collections.deque()
        self.active = 0  # jobs waiting or decoding
        self.closing = False
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)  # sizes of recent batches
        self.live: set[Job] = set()  # submitted, not yet released
        self.generated = 0  # tokens generated, all jobs (cancelled ones too)
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

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: 400 when they could never fit the queue, 429 when it is full now,
        503 while shutting down."""
        with self.lock:
            if self.closing:
                raise ServingError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(jobs) > self.max_queue:
                raise ServingError(400, f"the request has {len(jobs)} prompts and this server takes at most "
                                        f"{self.max_queue} at once: send them in several requests",
                                   param="prompt", code="too_many_prompts")
            if self.active + len(jobs) > self.max_queue:
                raise ServingError(429, f"the server is busy ({self.active} requests waiting or decoding, at most "
                                        f"{self.max_queue}): retry later", type="rate_limit_error",
                                   code="queue_full")
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

    def _next_batch(self) -> list[Job] | None:
        with self.lock:
            while not self.pending:
                if self.closing:
                    return None
                self.lock.wait()
            first = self.pending[0]
            while True:
                same = [j for j in self.pending if j.key == first.key]
                left = first.arrived + self.wait - time.monotonic()
                if len(same) >= self.max_batch_size or left <= 0 or self.closing or first not in self.pending:
                    break
                self.lock.wait(left)
            batch = [j for j in self.pending if j.key == first.key][: self.max_batch_size]
            for j in batch:
                self.pending.remove(j)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        rows = [self.model.row(len(j.ids), j.decoding, on_text=lambda text, j=j: j.send("text", text),
                               cancelled=j.cancelled) for j in batch]
        self.batches.append(len(batch))
        try:
            results = self.model.run([j.ids for j in batch], batch[0].decoding, rows)
        except UserError as e:
            results = [ServingError(400, e.message)] * len(batch)
        except Exception as e:  # a bug: the client gets a 500 line, the log the traceback
            traceback.print_exc(file=sys.stderr)
            results = [ServingError(500, f"internal error: {type(e).__name__}", type="server_error")] * len(batch)
        self.generated += sum(len(r.ids) for r in rows)
        for job, result in zip(batch, results):
            with self.lock:
                self._release(job)
            job.send("error" if isinstance(result, ServingError) else "done", result)


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
        return P.ModelList(data=[P.ModelCard(id=self.name, created=self.created, kind=self.model.kind,
                                             max_model_len=self.model.max_prompt_length)])

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

    def completion_prompts(self, request: P.CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ServingError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], list):  # token ids: as they are, no template
            vocab = len(self.model.tokenizer)
            for ids in prompt:
                if not ids or any(not 0 <= t < vocab for t in ids):
                    raise ServingError(400, f"token id prompts must be non-empty lists of ids in [0, {vocab})",
                                       param="prompt")
                if len(ids) > self.model.max_prompt_length:
                    raise ServingError(400, f"the prompt has {len(ids)} tokens, over this model's limit of "
                                            f"{self.model.max_prompt_length}", param="prompt")
            return [list(ids) for ids in prompt]
        try:
            texts = [self.model.prompt_text(p, where=f"prompt[{i}]" if len(prompt) > 1 else "prompt")
                     for i, p in enumerate(prompt)]
            return self.model.prompt_ids(texts, strict=True)
        except UserError as e:
            raise ServingError(400, e.message, param="prompt") from None

    def chat_prompt(self, request: P.ChatCompletionRequest) -> list[list[int]]:
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
            return [self.model.chat_ids(messages, strict=True)]
        except UserError as e:
            raise ServingError(400, e.message, param="messages") from None

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
    """A CompletionResponse, or (stream) an async iterator of SSE lines."""
    prompts = serving.completion_prompts(request)
    jobs = serving.start(request, prompts, request.max_tokens)
    rid, created = P.new_id("cmpl"), P.now()

    def chunk(index: int, text: str | None, reason: str | None) -> P.CompletionResponse:
        return P.CompletionResponse(id=rid, created=created, model=serving.name, choices=[
            P.CompletionChoice(index=index, text=text or "", finish_reason=reason)])

    if request.stream:
        include = request.stream_options is not None and request.stream_options.include_usage
        usage = (lambda u: P.CompletionResponse(id=rid, created=created, model=serving.name, choices=[],
                                                usage=u)) if include else None
        return serving.stream(jobs, chunk, usage)
    results = await serving.results(jobs)
    return P.CompletionResponse(id=rid, created=created, model=serving.name, usage=_usage(results), choices=[
        P.CompletionChoice(index=i, text=r.text, finish_reason=finish(r.finish_reason))
        for i, r in enumerate(results)])


async def chat_completion(serving: OpenAIServing, request: P.ChatCompletionRequest):
    """A ChatCompletionResponse, or (stream) an async iterator of SSE lines."""
    prompts = serving.chat_prompt(request)
    field = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
    jobs = serving.start(request, prompts, request.max_completion_tokens or request.max_tokens, field)
    rid, created = P.new_id("chatcmpl"), P.now()

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
        return serving.stream(jobs, chunk, usage)
    results = await serving.results(jobs)
    r = results[0]
    return P.ChatCompletionResponse(id=rid, created=created, model=serving.name, usage=_usage(results), choices=[
        P.ChatChoice(index=0, message=P.AssistantMessage(content=r.text), finish_reason=finish(r.finish_reason))])
