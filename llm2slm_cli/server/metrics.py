"""`/metrics`: the server's Prometheus metrics (text exposition format), in a registry of each app's own.

- `llm2slm_requests_total{endpoint, status}`: requests to the OpenAI endpoints (POST /v1/...) by response status
  (a stream that fails after its headers went out counts as its 200).
- `llm2slm_queue_length`: requests waiting to be decoded; `llm2slm_running_requests`: requests being decoded now.
- `llm2slm_batch_size`: rows of each decoding step (step-level batching), or of each request-level batch.
- `llm2slm_generated_tokens_total`: tokens of the answered requests' responses.
- `llm2slm_time_to_first_token_seconds`: from a request's arrival to its first decoded token (beam search: to its
  answer); `llm2slm_request_latency_seconds`: from its arrival to its answer.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llm2slm_cli.server.serving import Engine, Observer

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics(Observer):
    """The metrics of one app: the engine reports to it (its Observer), the app counts responses (`request`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm2slm_requests", "Requests to the OpenAI endpoints, by response status.",
                                ["endpoint", "status"], registry=r)
        Gauge("llm2slm_queue_length", "Requests waiting to be decoded.",
              registry=r).set_function(lambda: len(engine.pending))
        Gauge("llm2slm_running_requests", "Requests being decoded now.",
              registry=r).set_function(lambda: engine.decoding)
        self.batch_size = Histogram("llm2slm_batch_size", "Rows of each decoding step (step-level batching) or of "
                                    "each request-level batch.", buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("llm2slm_generated_tokens", "Tokens of the answered requests' responses.", registry=r)
        self.ttft = Histogram("llm2slm_time_to_first_token_seconds",
                              "From a request's arrival to its first decoded token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("llm2slm_request_latency_seconds", "From a request's arrival to its answer.",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, seconds: float, tokens: int) -> None:
        self.latency.observe(seconds)
        self.tokens.inc(tokens)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: each response of POST /v1/... counted by its status (a plain ASGI layer, so streams and
    client disconnects pass through it untouched)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.request(scope["path"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # the app's last handler answers 500
                self.metrics.request(scope["path"], 500)
            raise
