"""`llm2slm serve`: an OpenAI-compatible HTTP server (llm2slm_cli/server/) for a checkpoint, a plain model, or a
draft with its verifier, on uvicorn. SIGINT/SIGTERM: stop accepting, finish what is in flight, exit 0 (a second
SIGINT exits at once)."""

from __future__ import annotations

import signal
import sys

from llm2slm_cli.config import ServeConfig


def build(config: ServeConfig):
    """The FastAPI app for `config` (its model loaded) and its OpenAIServing."""
    from llm2slm_cli.api import load
    from llm2slm_cli.server.app import build_app
    from llm2slm_cli.server.serving import Engine, OpenAIServing

    model = load(config.model, draft=config.draft, gamma=config.gamma, llm=config.llm, tokenizer=config.tokenizer,
                 dtype=config.dtype, device=config.device, template=config.template,
                 chat_template=config.chat_template, quantize=config.quantize)
    if config.max_length is not None:
        model.max_prompt_length = config.max_length
    engine = Engine(model, max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                    max_queue=config.max_queue)
    serving = OpenAIServing(model, engine, name=config.served_model_name or config.model,
                            max_new_tokens=config.max_new_tokens, max_tokens_limit=config.max_tokens_limit)
    return build_app(serving), serving


def run(config: ServeConfig) -> None:
    import uvicorn

    app, serving = build(config)
    if config.quantize != "none":
        print(f"warning: --quantize {config.quantize} scales activations per batch, so a request's output can depend "
              "on the requests batched with it (float32 does not)", file=sys.stderr)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn's handling, except that the signal is not raised again after the graceful shutdown: that
            # shutdown is the clean end of `serve`, exit code 0
            serving.engine.drain()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.servers and self.servers[0].sockets:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {serving.name!r} ({serving.model.kind}) on http://{host}:{port}/v1", file=sys.stderr,
                      flush=True)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning" if config.quiet
                                   else "info", access_log=not config.quiet, lifespan="on",
                                   timeout_graceful_shutdown=None))
    server.run()
