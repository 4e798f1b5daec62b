"""An LLM judge behind an OpenAI-compatible chat API: MT-bench single-answer grading against a reference (1-10).

A rating is read only from the judge's "[[N]]"; a reply without one is recorded as unparsable and counted, never
guessed. Requests use the standard library alone, so judging adds no dependency. Temperature 0, so a rerun against
the same server gives the same ratings as far as the server is deterministic.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from llm2slm_cli.errors import UserError

PROMPT_NAME = "mt-bench single-answer grading with a reference answer (single-v1-ref style)"

# After MT-bench's "single-v1-ref" judge prompt (Zheng et al., 2023), for general answers rather than math only.
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider correctness and helpfulness. You will be given "
    "a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's answer with "
    "the reference answer. Identify and correct any mistakes. Be as objective as possible. After providing your "
    "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
    '"Rating: [[N]]", for example: "Rating: [[5]]".'
)
USER_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]\n\n"
    'End your reply with your rating in the format "Rating: [[N]]".'
)

RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RETRY_DELAYS: tuple[float, ...] = (1.0, 4.0)  # seconds before each retry: two retries, then the example fails
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}  # other 4xx answers would only repeat themselves
WORKERS = 8  # requests in flight; servers batch them
ABORT_AFTER = 8  # this many failures before any success: a wrong URL or a dead server, so stop early


@dataclass(frozen=True)
class Verdict:
    """The judge's outcome for one example: a rating, or why there is none (reply None: no answer came)."""

    rating: float | None
    error: str | None = None
    reply: str | None = None

    @property
    def failed(self) -> bool:
        return self.reply is None


class _Retry(Exception):
    """A failure worth another try (connection trouble, timeout, server overload)."""


class _Fail(Exception):
    """A failure that another try would repeat (bad request, unknown model, malformed answer)."""


def parse_rating(reply: str) -> float | None:
    """The last "[[N]]" of the reply, if it is a number in 1..10 (the format example the judge may quote comes
    before its verdict)."""
    found = RATING.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def endpoint(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def request_body(model: str, question: str, reference: str, answer: str) -> dict:
    user = USER_TEMPLATE.format(question=question, reference=reference, answer=answer)
    return {"model": model, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]}


def _one_line(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


def _post(url: str, body: dict, headers: dict[str, str], timeout: float) -> str:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = _one_line(e.read().decode("utf-8", "replace"), 200)
        except Exception:  # a broken error body must not hide the status
            detail = ""
        message = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
        raise (_Retry if e.code in RETRY_STATUS else _Fail)(message) from None
    except urllib.error.URLError as e:
        raise _Retry(f"cannot connect ({e.reason})") from None
    except (http.client.HTTPException, OSError) as e:  # timeouts, resets, a server that hangs up
        raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        text = _one_line(raw.decode("utf-8", "replace"), 80)
        raise _Fail(f"malformed response (not an OpenAI chat completion): {text}") from None
    return content if isinstance(content, str) else ""


def ask(url: str, body: dict, headers: dict[str, str], timeout: float) -> Verdict:
    """One judgement, with two retries on transient failures."""
    for attempt in range(len(RETRY_DELAYS) + 1):
        try:
            reply = _post(url, body, headers, timeout)
        except _Retry as e:
            if attempt < len(RETRY_DELAYS):
                time.sleep(RETRY_DELAYS[attempt])
                continue
            return Verdict(None, f"failed: {e} (after {attempt + 1} attempts)")
        except _Fail as e:
            return Verdict(None, f"failed: {e}")
        rating = parse_rating(reply)
        if rating is None:
            return Verdict(None, f"unparsable: {_one_line(reply, 80)}", reply)
        return Verdict(rating, None, reply)
    raise AssertionError("unreachable")


def judge_all(items: Sequence[tuple[str, str, str]], *, base_url: str, model: str, api_key: str | None,
              timeout: float, on_done: Callable[[], None] | None = None) -> list[Verdict]:
    """Rate each (question, reference, answer); raises UserError when the endpoint answers none of them."""
    url = endpoint(base_url)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    verdicts: list[Verdict | None] = [None] * len(items)
    answered = failed = 0
    last_error = ""
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    try:
        futures = {pool.submit(ask, url, request_body(model, *item), headers, timeout): i
                   for i, item in enumerate(items)}
        for future in as_completed(futures):
            verdict = verdicts[futures[future]] = future.result()
            if on_done is not None:
                on_done()
            if verdict.failed:
                failed += 1
                last_error = (verdict.error or "").removeprefix("failed: ")
            else:
                answered += 1
            if not answered and failed >= ABORT_AFTER and failed < len(items):
                raise UserError(f"judge: the first {failed} requests to {url} all failed ({last_error}); "
                                f"check --judge-url and --judge-model")
    finally:  # on an error or Ctrl-C, drop the requests not yet sent instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
    if not answered:
        raise UserError(f"judge: every request to {url} failed ({last_error}); check --judge-url and --judge-model")
    return [v for v in verdicts if v is not None]
