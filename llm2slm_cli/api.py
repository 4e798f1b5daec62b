"""Use a trained model from Python: text in, text out.

    from llm2slm_cli import load

    model = load("runs/t5l-t5s/final")               # a checkpoint from `train` (or `export`); its LLM is loaded too
    model.generate(["Hello world"], num_beams=4)      # -> ["Hallo Welt"]: the training template is applied
    load("preset:tiny-gpt2").generate("Hi", num_beams=1, max_new_tokens=5)      # a plain model
    load("t5-large", draft="runs/t5l-t5s/final")      # speculative decoding: t5-large's own output, drafted

Decoding options and their defaults are the CLI's (config.DecodingOptions, `generate --max-new-tokens`): beam search
4 with length penalty 0.6 unless `num_beams=1` or `sample=True`. `generate` returns what `llm2slm generate` writes
as predictions (the same tokens, stripped); `complete` returns the raw text with its tokens and finish reason, and
is what `llm2slm serve` calls. A Model is used from one thread at a time.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm2slm_cli import runtime
from llm2slm_cli.config import DecodingOptions, GenerateConfig
from llm2slm_cli.data import Fields, length_sorted_batches, pad, template_fields, to_examples
from llm2slm_cli.errors import UserError
from llm2slm_cli.generation import (
    PlainModel,
    SpeculativeModel,
    example_seed,
    generation_kwargs,
    is_checkpoint,
    kind_of,
    open_model,
    speculative_kwargs,
)
from llm2slm_cli.generation import first_line as _first_line  # `generate` has an argument of that name
from llm2slm_cli.quantize import QUANTIZE_CHOICES
from llm2slm_cli.runtime import tokenize_prompts
from llm2slm_cli.validation import (
    CallArgs,
    DecodingArgs,
    InvalidArgument,
    check,
    check_messages,
    check_prompt,
    check_prompts,
    check_seeds,
    compile_chat_template,
)

MAX_NEW_TOKENS = next(f.default for f in dataclasses.fields(GenerateConfig) if f.name == "max_new_tokens")
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(kw_only=True)
class Decoding(DecodingOptions):
    """One call's decoding options: the CLI's (DecodingOptions) plus the response length and stop strings."""

    max_new_tokens: int = MAX_NEW_TOKENS
    stop: list[str] = field(default_factory=list)
    # None: leave the random state as it is (the server's requests without a seed); the CLI and `generate` seed.
    # Prompt i of a call samples from its own generator, seeded generation.example_seed(seed, i) (the first: seed)
    seed: int | None = 0
    gamma: int | None = None  # speculative decoding: draft tokens per LLM pass (None: the model's, load(gamma=))

    def __post_init__(self) -> None:
        # the one validation layer (validation.py): strict types, ranges, errors naming the argument
        check(DecodingArgs, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the model's prompt limit and was cut to its first tokens (`notice` says so)."""

    def __init__(self, notice: str) -> None:
        super().__init__(f"{notice}; strict=True refuses such prompts (said once per model)")
        self.notice = notice


def truncation_notice(tokens: int, limit: int, count: int = 1) -> str:
    """What `generate`, the Python API and `serve` say when they cut a prompt."""
    more = f" (and {count - 1} more prompt{'s' if count > 2 else ''})" if count > 1 else ""
    return (f"a prompt has {tokens} tokens{more}, over this model's limit of {limit}: it is cut to its first "
            f"{limit} tokens")


@dataclass
class Completion:
    text: str  # the decoded response, cut before the first stop string
    token_ids: list[int]  # the generated tokens (without the end token)
    prompt_tokens: int
    finish_reason: FinishReason


class _Row:
    """One response being decoded: its tokens, text so far and why it ended; sends new text to `on_text`."""

    def __init__(self, tokenizer, eos: int | None, pad: int | None, prompt_tokens: int, decoding: Decoding,
                 on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> None:
        self.tok, self.eos, self.pad = tokenizer, eos, pad
        self.prompt_tokens, self.max_new_tokens, self.stop = prompt_tokens, decoding.max_new_tokens, decoding.stop
        self.on_text, self.cancelled = on_text, cancelled
        self.seed = decoding.seed  # this row's sampling seed (Model.complete gives each prompt its own)
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.finished: FinishReason | None = None
        # text that could still become a stop string is held back while streaming
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, tokens: Sequence[int]) -> bool:
        """Take newly generated tokens; True once this row needs no more."""
        if self.finished is None and self.cancelled is not None and self.cancelled.is_set():
            self.finished = "cancelled"
        if self.finished is not None:
            return True
        for t in tokens:
            if t == self.eos:
                self.finished = "stop"
                break
            self.ids.append(int(t))
            if len(self.ids) >= self.max_new_tokens:
                self.finished = "length"
                break
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finished = self.text[:cut], "stop"
        self._send()
        return self.finished is not None

    def finish(self, generated: list[int]) -> Completion:
        """After the batch: `generated` is what the model returned for this row (used where no streamer ran)."""
        if not self.ids and self.finished is None:
            self.push(generated)
        if self.finished is None:  # the model ended the row (its end token is not in `generated`)
            self.finished = "length" if len(self.ids) >= self.max_new_tokens else "stop"
        while self.ids and self.pad is not None and self.ids[-1] == self.pad and self.pad != self.eos:
            self.ids.pop()  # padding after a row's end, as strip_generated drops it
        self._send()
        return Completion(self.text, self.ids, self.prompt_tokens, self.finished)

    def _send(self) -> None:
        if self.on_text is None:
            return
        ready = self.text if self.finished else self.text[: len(self.text) - self.hold] if self.hold else self.text
        if not self.finished:
            ready = ready.rstrip("\ufffd")  # an incomplete multi-byte character waits for its next token
        if len(ready) > self.sent and self.finished != "cancelled":
            self.on_text(ready[self.sent:])
            self.sent = len(ready)


class Model:
    """A trained checkpoint, a plain model, or a draft with the LLM that verifies it: `generate` takes text and
    gives text. Made by `load`."""

    def __init__(self, impl: Any, *, name: str, identity: dict[str, Any], template: str | None,
                 max_prompt_length: int, chat_template: str | None, device: Any) -> None:
        self.impl, self.name, self.kind, self.identity = impl, name, kind_of(impl), identity
        self.template, self.max_prompt_length, self.device = template, max_prompt_length, device
        self.tokenizer = impl.prompt_tokenizer
        self.output_tokenizer = impl.target_tokenizer
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None) or None
        self.eos = self.output_tokenizer.eos_token_id
        self.pad = self.output_tokenizer.pad_token_id
        # prompt + response tokens a decoder-only model's positions allow (None: no such limit, e.g. T5)
        self.context_length = _context_length(impl)
        self._warned_cut = False  # the prompt-truncation warning is given once per Model

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt and response longer than the model's positions reach (a decoder-only model would fail
        or degrade past them)."""
        if self.context_length is not None and prompt_tokens + max_new_tokens > self.context_length:
            raise InvalidArgument("max_new_tokens", f"this model reads at most {self.context_length} tokens, prompt "
                                  f"and response together: the prompt has {prompt_tokens}, so at most "
                                  f"{max(self.context_length - prompt_tokens, 0)} can be generated, not "
                                  f"{max_new_tokens}")

    def __repr__(self) -> str:
        return f"Model({self.name!r}, kind={self.kind!r})"

    # ------------------------------------------------------------------------------------------------ prompts

    def prompt_text(self, prompt: str | dict[str, Any], *, template: bool = True, where: str = "prompt") -> str:
        """The text the model reads: the training template applied to `prompt` (or to the fields of a dict)."""
        use = self.template if template else None
        if isinstance(prompt, dict):
            record = prompt
        elif not isinstance(prompt, str):
            raise UserError(f"{where}: expected text, got {type(prompt).__name__}")
        elif not prompt.strip():
            raise UserError(f"{where}: empty prompt")
        elif use:
            names = sorted({re.split(r"[.\[]", n, maxsplit=1)[0] for n in template_fields(use)})
            if len(names) != 1:
                raise UserError(f"the template {use!r} fills the fields {', '.join(names)}: give each prompt as a "
                                "dict of them")
            record = {names[0]: prompt}
        else:
            record = {"src": prompt}
        fields = Fields(prompt="src", target=None, id=None, template=use)
        return to_examples(iter([({}, record)]), where, fields, False)[0].prompt

    def tokenize(self, texts: Sequence[str], *, special_tokens: bool = True) -> tuple[list[list[int]], list[int]]:
        """Each prompt's token ids as `generate` makes them, cut to the model's prompt limit (its first
        `max_prompt_length` tokens), and its length in tokens before the cut."""
        if not special_tokens:  # a chat template writes the special tokens itself
            ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
            return [t[: self.max_prompt_length] for t in ids], [len(t) for t in ids]
        ids, cut = tokenize_prompts(self.tokenizer, list(texts), self.max_prompt_length)
        lengths = [len(self.tokenizer(t, verbose=False)["input_ids"]) if c else len(i)
                   for t, i, c in zip(texts, ids, cut)]
        return ids, lengths

    def prompt_ids(self, texts: Sequence[str], *, strict: bool = False, special_tokens: bool = True) -> list[list[int]]:
        """Token ids as `generate` makes them: longer than the model's prompt limit is cut to its first tokens, with
        a warning (PromptTruncatedWarning, once per Model), or with `strict` refused."""
        ids, lengths = self.tokenize(texts, special_tokens=special_tokens)
        self._over_limit(lengths, strict)
        return ids

    def _over_limit(self, lengths: Sequence[int], strict: bool) -> None:
        long = [n for n in lengths if n > self.max_prompt_length]
        if not long:
            return
        if strict:
            raise UserError(f"the prompt has {long[0]} tokens, over this model's limit of {self.max_prompt_length}")
        if not self._warned_cut:
            self._warned_cut = True
            import warnings

            warnings.warn(PromptTruncatedWarning(truncation_notice(long[0], self.max_prompt_length, len(long))),
                          stacklevel=4)

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for chat `messages` ({"role", "content"} dicts), from the model's chat template."""
        if not self.chat_template:
            raise UserError(f"the model {self.name!r} has no chat template: use completions, or give one "
                            "(load(..., chat_template=FILE), serve --chat-template FILE)")
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # jinja2 errors: a template that raises, or one that does not fit these messages
            raise UserError(f"the chat template cannot render these messages ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------------------------------------ decoding

    def decoding(self, **options: Any) -> Decoding:
        """Checked options (Decoding's fields; unknown names are refused): InvalidArgument names the one at fault."""
        known = {f.name for f in dataclasses.fields(Decoding)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"unknown decoding option {', '.join(unknown)} (options: {', '.join(sorted(known))})")
        options = {k: v for k, v in options.items()}
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        elif isinstance(options.get("stop"), tuple):
            options["stop"] = list(options["stop"])
        elif "stop" in options and not isinstance(options["stop"], list):
            raise InvalidArgument("stop", "expected a string or a list of strings, got "
                                          f"{type(options['stop']).__name__}")
        d = Decoding(**options)
        if self.kind == "speculative":
            if d.num_beams not in (None, 1):
                raise InvalidArgument("num_beams", "speculative decoding draws one sequence per prompt: leave "
                                                   "num_beams out")
            for name, off in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
                if getattr(d, name) != off:
                    raise InvalidArgument(name, "speculative decoding does not do it: leave it out")
            d.num_beams = 1
        return d

    def run(self, prompt_ids: list[list[int]], decoding: Decoding, rows: list[_Row]) -> list[Completion]:
        """Decode one batch (prompts padded together); each row has its own length limit, stop strings and sampling
        seed (its own generator: its sample is the same in any batch). Speculative decoding samples the batch in
        lockstep from one generator, seeded with `decoding.seed`."""
        import torch

        speculative = isinstance(self.impl, SpeculativeModel)
        for ids, row in zip(prompt_ids, rows):
            self.check_length(len(ids), row.max_new_tokens)
        options = dataclasses.replace(decoding, max_new_tokens=max(r.max_new_tokens for r in rows))
        kwargs = speculative_kwargs(options) if speculative else generation_kwargs(options)
        if decoding.sample and not speculative:
            kwargs["seeds"] = [r.seed for r in rows]
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)  # what transformers' generate draws from, where it decodes
            if speculative:
                self.impl.reseed(decoding.seed)
        ids, mask = pad(prompt_ids, self.tokenizer.pad_token_id)

        def streamer(tokens: torch.Tensor) -> list[bool]:
            return [row.push(t) for row, t in zip(rows, tokens.tolist())]

        out = self.impl.generate(ids.to(self.device), mask.to(self.device), streamer=streamer, **kwargs)
        return [row.finish(list(generated)) for row, generated in zip(rows, out)]

    def steps(self) -> StepBatch | None:
        """A batch that rows join and leave between decoding steps (`serve`'s step-level batching), or None where
        this model cannot decode that way: speculative decoding, a prefix-tuned checkpoint, a static or compiled
        cache, a cache whose tensors cannot be padded (sliding windows)."""
        from llm2slm_cli.continuous import Running, steppable  # imports torch: off the import of this module

        decoder = None if isinstance(self.impl, SpeculativeModel) else self.impl.decoder
        if decoder is None or not steppable(decoder):
            return None
        return StepBatch(self, Running(self.impl.tokenizer_ids))

    def complete(self, prompts: str | dict | Sequence[str | dict], *, template: bool = True, strict: bool = False,
                 batch_size: int = 16, on_text: Callable[[int, str], None] | None = None,
                 **options: Any) -> list[Completion]:
        """The raw responses with their tokens and finish reasons, in length-sorted batches of `batch_size` (as
        `generate` makes them); `on_text(i, text)` receives each response's new text as it is decoded.

        Sampling: prompt i draws from its own generator, seeded example_seed(seed, i) (prompt 0: `seed` itself), or
        `seed[i]` when `seed` is a list of one seed per prompt; so a prompt's sample depends on its seed alone, not
        on the prompts batched with it (except in speculative decoding, which samples a batch in lockstep)."""

        prompts, _ = check_prompts(prompts)
        check(CallArgs, {"template": template, "strict": strict, "batch_size": batch_size})
        if on_text is not None and not callable(on_text):
            raise InvalidArgument("on_text", f"expected a function (index, text), got {type(on_text).__name__}")
        seeds = None
        if isinstance(options.get("seed"), (list, tuple)):
            seeds = check_seeds(options["seed"], len(prompts))
            options = {**options, "seed": seeds[0] if seeds else 0}
        decoding = self.decoding(**options)
        if not prompts:
            return []
        if seeds is None:
            seeds = [None if decoding.seed is None else example_seed(decoding.seed, i) for i in range(len(prompts))]
        texts = [self.prompt_text(p, template=template, where=f"prompts[{i}]") for i, p in enumerate(prompts)]
        ids = self.prompt_ids(texts, strict=strict)
        results: dict[int, Completion] = {}
        for batch in length_sorted_batches([len(t) for t in ids], batch_size):
            rows = [self.row(len(ids[i]), decoding, None if on_text is None else
                             (lambda text, i=i: on_text(i, text))) for i in batch]
            for i, row in zip(batch, rows):
                row.seed = seeds[i]
            results.update(zip(batch, self.run([ids[i] for i in batch], decoding, rows)))
        return [results[i] for i in range(len(prompts))]

    def row(self, prompt_tokens: int, decoding: Decoding, on_text: Callable[[str], None] | None = None,
            cancelled: threading.Event | None = None) -> _Row:
        return _Row(self.output_tokenizer, self.eos, self.pad, prompt_tokens, decoding, on_text, cancelled)

    def generate(self, prompts: str | dict | Sequence[str | dict], *, first_line: bool = False,
                 **options: Any) -> list[str]:
        """Responses to `prompts` (one string gives a list of one), as `llm2slm generate` writes them: the same
        tokens for the same options, stripped. Options: those of `complete` and Decoding (num_beams,
        length_penalty, sample, top_p, temperature, repetition_penalty, no_repeat_ngram_size, seed (or a list of
        one seed per prompt; see `complete`), max_new_tokens, stop); `first_line` as in the CLI."""
        check(CallArgs, {"first_line": first_line})
        stop = options.get("stop") or []
        if first_line and isinstance(self.impl, PlainModel) and isinstance(stop, (str, list, tuple)):
            # the CLI stops a plain model at the line break (another type of `stop` is refused by `complete`)
            options["stop"] = [*([stop] if isinstance(stop, str) else stop), "\n"]
        out = [c.text for c in self.complete(prompts, **options)]
        return [_first_line(t) if first_line else t.strip() for t in out]

    def stream(self, prompt: str | dict, **options: Any) -> Iterator[str]:
        """The response to one prompt, piece by piece as it is decoded (greedy, sampling and speculative decoding;
        beam search gives it whole at the end). Stopping the iteration stops the decoding."""
        prompt = check_prompt(prompt)
        decoding = self.decoding(**options)
        ids = self.prompt_ids([self.prompt_text(prompt)])
        pieces: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def work() -> None:
            try:
                row = self.row(len(ids[0]), decoding, pieces.put, cancelled)
                self.run(ids, decoding, [row])
                pieces.put(done)
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                pieces.put(e)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            thread.join()

    def chat_tokens(self, messages: list[dict[str, Any]]) -> tuple[list[int], int]:
        """The prompt's token ids for chat `messages`, cut to the prompt limit, and its length before the cut; a
        prompt the template renders empty is refused."""
        ids, lengths = self.tokenize([self.chat_text(check_messages(messages))], special_tokens=False)
        if not ids[0]:
            raise InvalidArgument("messages", "the chat template renders these messages as an empty prompt")
        return ids[0], lengths[0]

    def chat_ids(self, messages: list[dict[str, Any]], *, strict: bool = False) -> list[int]:
        """The prompt's token ids for chat `messages` (cut as `prompt_ids` cuts, or with `strict` refused)."""
        ids, length = self.chat_tokens(messages)
        self._over_limit([length], strict)
        return ids

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> str:
        """The assistant's reply to chat `messages`, through the model's chat template."""
        decoding = self.decoding(**options)
        ids = [self.chat_ids(messages)]
        return self.run(ids, decoding, [self.row(len(ids[0]), decoding)])[0].text.strip()


class StepBatch:
    """Step-level batching on a Model (continuous.py): `join` prefills prompts (padded together, as `Model.run`
    pads a batch) and adds their rows at the next step; `step` decodes one token for every row and returns the rows
    that ended with their Completions. Greedy and sampling rows with no repetition controls (`takes`); a row's
    tokens are those it gets decoded alone (sampling: from its own generator, seeded by its seed). Used from one
    thread, as the Model."""

    def __init__(self, model: Model, running: Any) -> None:
        self.model, self.running = model, running
        self._device = None

    def __len__(self) -> int:
        return len(self.running)

    def takes(self, decoding: Decoding) -> bool:
        """Can a row with these options join: one sequence per prompt, decoded by our loop, with no state beyond
        the row's own tokens."""
        if decoding.beams != 1 or decoding.repetition_penalty != 1.0 or decoding.no_repeat_ngram_size > 0:
            return False
        return self.model.impl.decoding_search(generation_kwargs(decoding), self.model.device) is not None

    def join(self, prompt_ids: list[list[int]], decodings: list[Decoding], rows: list[_Row], tags: list[Any]) -> None:
        """Prefill these prompts together and add their rows; `tags` come back with their Completions."""
        import dataclasses as dc

        import torch

        from llm2slm_cli.continuous import Row  # imports torch: off the import of this module

        impl = self.model.impl
        searches = []
        for ids, decoding, row in zip(prompt_ids, decodings, rows):
            self.model.check_length(len(ids), row.max_new_tokens)
            search = impl.decoding_search(generation_kwargs(dc.replace(decoding, max_new_tokens=row.max_new_tokens)),
                                          self.model.device)
            if search is None or not self.takes(decoding):
                raise ValueError("these decoding options cannot be stepped (StepBatch.takes)")
            searches.append(search)
        widest = max(searches, key=lambda s: s.max_new_tokens)  # the mask's reserve: the longest response
        ids, mask = pad(prompt_ids, self.model.tokenizer.pad_token_id)
        step, logits = impl.prefill(ids.to(self.model.device), mask.to(self.model.device), widest)
        members = []
        for search, decoding, row, tag in zip(searches, decodings, rows, tags):
            generator = None
            if search.do_sample and decoding.seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(decoding.seed)
            members.append(Row(search, lambda token, row=row: row.push([token]), generator, (row, tag)))
        self.running.join(step, logits, members)

    def step(self) -> list[tuple[Any, Completion]]:
        """One token for every row; (tag, Completion) of the rows that ended."""
        return [(r.tag[1], r.tag[0].finish(r.tag[0].ids)) for r in self.running.advance()]

    def clear(self) -> None:
        """Drop every row (after a failed step: their cache is no longer trustworthy)."""
        self.running.clear()


def _context_length(impl: Any) -> int | None:
    if isinstance(impl, SpeculativeModel):
        models = [impl.draft.slm, impl.verifier.model]
    elif isinstance(impl, PlainModel):
        models = [impl.model]
    else:
        models = [impl.slm]
    limits = [getattr(m.config, "n_positions", None) or getattr(m.config, "max_position_embeddings", None)
              for m in models if not m.config.is_encoder_decoder]
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def _chat_template(value: str | Path | None) -> str | None:
    """The template's text, compiled once to refuse a broken one here rather than at every chat."""
    if value is None:
        return None
    text = str(value)
    if "{" not in text:  # a file
        path = Path(text)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read the chat template ({e.strerror})", path=path) from None
        compile_chat_template(text, f"chat_template {path}")
        return text
    compile_chat_template(text)
    return text


def load(model: str | Path, *, draft: str | Path | None = None, gamma: int = 4, llm: str | None = None,
         tokenizer: str | Path | None = None, dtype: str = "float32", device: str = "auto",
         template: str | None = None, chat_template: str | Path | None = None, quantize: str = "none",
         compile: bool = False, backend: str = "torch", gguf: str | Path | None = None) -> Model:
    """A model to generate with: a checkpoint directory from `train` or `export` (its LLM is loaded by the name it
    records, or from `llm`), or a plain model (hub id, directory, .gguf, preset:NAME). With `draft` (a
    checkpoint), speculative decoding: `model` is the LLM that verifies and the output is its own.

    `template` replaces the checkpoint's training template; `chat_template` (Jinja text or a file) the tokenizer's.
    `quantize` decodes on a CPU with int8 weights: "int8-weight" (torchao, weight-only), "int8-dynamic" (torchao),
    or torch.ao's deprecated "int8" / "int8-body" (float32 head) fallback (quantize.py); `compile` with a static cache
    and compiled steps (`llm2slm generate --quantize`, `--compile`). `backend` "llama-cpp": a
    checkpoint's SLM decodes in llama.cpp from `gguf` (default: the directory's slm.gguf), greedy or sampling.
    """
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
    dev = runtime.device(device)
    spec = str(model)
    if draft is not None:
        if not is_checkpoint(draft):
            raise UserError("the draft must be a checkpoint from `train`", path=draft)
        recorded = (read_model_config(Path(draft)).llm or {}).get("name")
        verifier = None if recorded is not None and _same_model(recorded, spec) else spec
        impl, identity, own_template, max_length = open_model(
            str(draft), llm=llm, speculative=True, verifier=verifier, gamma=gamma, dtype=dtype, device=dev,
            quantize=quantize, compile=compile)
    else:
        impl, identity, own_template, max_length = open_model(spec, llm=llm, dtype=dtype, tokenizer=tokenizer,
                                                              device=dev, quantize=quantize, compile=compile,
                                                              backend=backend, gguf=gguf)
    return Model(impl, name=spec, identity=identity, template=template or own_template,
                 max_prompt_length=max_length, chat_template=_chat_template(chat_template), device=dev)


def _same_model(a: str, b: str) -> bool:
    if a == b or a.removeprefix("preset:") == b.removeprefix("preset:"):
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
