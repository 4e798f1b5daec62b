"""`llm2slm serve`: an OpenAI-compatible HTTP server (llm2slm_cli/server/) for a checkpoint, a plain model, or a
draft with its verifier, on uvicorn. Before the model is loaded, the 'serve' extra and the port are checked; the chat
template is compiled before the server starts (each: one line, exit 2). SIGINT/SIGTERM: stop accepting, finish what
is in flight, exit 0. A second SIGINT stops at once: the requests in flight get a 503 error body (a stream: an error
event), then `serve` exits 130 with one line."""

from __future__ import annotations

import asyncio
import signal
import sys

from llm2slm_cli.api import load
from llm2slm_cli.config import ServeConfig
from llm2slm_cli.errors import Interrupted, UserError, require_extra
from llm2slm_cli.server.serving import Engine, OpenAIServing, ServingError
from llm2slm_cli.validation import InvalidArgument, compile_chat_template

FORCE_AFTER_S = 5.0  # after a second SIGINT, how long clients have to take their error before the sockets close


def build(config: ServeConfig):
    """The FastAPI app for `config` (its model loaded) and its OpenAIServing."""
    from llm2slm_cli.server.app import build_app  # imports fastapi: off the import of this module

    try:
        model = load(config.model, draft=config.draft, gamma=config.gamma, llm=config.llm,
                     tokenizer=config.tokenizer, dtype=config.dtype, device=config.device, template=config.template,
                     chat_template=config.chat_template, quantize=config.quantize,
                     backend=config.backend, gguf=config.gguf)
    except InvalidArgument as e:  # the API's argument names, as this command's options
        if not e.param.startswith("chat_template"):
            raise
        raise UserError(f"--chat-template{e.param.removeprefix('chat_template')}: {e.reason}") from None
    if config.chat_template is None and model.chat_template:
        try:
            compile_chat_template(model.chat_template, "the tokenizer's chat template")
        except InvalidArgument as e:
            raise UserError(f"{e.message}: give one that works with --chat-template FILE") from None
    if config.max_length is not None:
        model.max_prompt_length = config.max_length
    engine = Engine(model, max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                    max_queue=config.max_queue, batching=config.batching)
    serving = OpenAIServing(model, engine, name=config.served_model_name or config.model,
                            max_new_tokens=config.max_new_tokens, max_tokens_limit=config.max_tokens_limit)
    return build_app(serving), serving


def check_port(host: str, port: int) -> None:
    """Refuse a port another program listens on, before the model is loaded (uvicorn would find out only after)."""
    import socket

    if port == 0:  # any free port
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server may be running there; "
                        "give another --port (0: any free one)") from None


def run(config: ServeConfig) -> None:
    require_extra("serve", "serve", "fastapi", "uvicorn")
    check_port(config.host, config.port)
    import uvicorn

    app, serving = build(config)
    if config.quantize in ("int8", "int8-body"):
        print(f"warning: --quantize {config.quantize} scales activations per batch, so a request's output can depend "
              "on the requests batched with it (float32 does not)", file=sys.stderr)

    stopped: dict[str, int | None] = {"jobs": None}  # set by a second SIGINT: how many jobs it stopped

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn's handling, except that the signal is not raised again after the graceful shutdown (that
            # shutdown is the clean end of `serve`, exit code 0), and that a second SIGINT answers the requests in
            # flight with an error body before the sockets close, rather than cancelling them mid-response
            serving.engine.drain()
            if not (self.should_exit and sig == signal.SIGINT):
                self.should_exit = True
            elif stopped["jobs"] is None and self.loop is not None:
                stopped["jobs"] = 0
                self.loop.call_soon_threadsafe(self.abort)  # on the loop: this handler may interrupt it anywhere
            else:
                self.force_exit = True

        def abort(self) -> None:
            stopped["jobs"] = serving.engine.abort(ServingError(
                503, "the server was stopped (a second Ctrl-C) before this request finished", type="server_error",
                code="shutting_down"))
            # uvicorn's graceful shutdown ends once the errors are sent; a client that does not read its own is not
            # waited for long
            self.loop.call_later(FORCE_AFTER_S, setattr, self, "force_exit", True)

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if self.servers and self.servers[0].sockets:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {serving.name!r} ({serving.model.kind}) on http://{host}:{port}/v1 "
                      f"({serving.engine.batching}-level batching)", file=sys.stderr, flush=True)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning" if config.quiet
                                   else "info", access_log=not config.quiet, lifespan="on",
                                   timeout_graceful_shutdown=None))
    server.run()
    if stopped["jobs"] is not None:
        n = stopped["jobs"]
        raise Interrupted(f"stopped by a second Ctrl-C: {n} request{'' if n == 1 else 's'} in flight got a 503 error")
