"""One validation layer for generation requests: the Python API (api.py) and the HTTP server (server/) check what a
caller sends with the same pydantic types, so both refuse the same values for the same reasons.

Types are strict: a bool is not an int, 2.5 is not an int, a string is not a number (an int is a float, as JSON has
it); floats are finite. Ranges are those decoding can honour: counts from 1, seeds in 0..2**63-1 (what torch takes).
An error is one line naming the field in the caller's terms: the argument name for the API (`InvalidArgument`), the
JSON field for HTTP (protocol.py uses these types, and app.py names the field of the first error).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from llm2slm_cli.errors import UserError

MAX_SEED = 2**63 - 1

Count = Annotated[int, Strict(), Field(ge=1)]  # max_new_tokens, num_beams, batch_size, gamma, ...
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
Number = Annotated[float, Strict(), AllowInfNan(False)]  # a finite float (an int is one too), never a bool
StopString = Annotated[str, Strict(), Field(min_length=1)]


class InvalidArgument(UserError):
    """A request option or argument with a wrong type or value; `param` names it, `reason` says what is wrong."""

    def __init__(self, param: str, reason: str) -> None:
        self.param, self.reason = param, reason
        super().__init__(f"{param}: {reason}")


class DecodingArgs(BaseModel):
    """api.Decoding's fields, checked together (Decoding validates itself with this model)."""

    model_config = ConfigDict(extra="forbid")

    num_beams: Count | None
    length_penalty: Number
    sample: StrictBool
    top_p: Annotated[Number, Field(gt=0, le=1)]
    temperature: Annotated[Number, Field(gt=0)]
    repetition_penalty: Annotated[Number, Field(gt=0)]
    no_repeat_ngram_size: Annotated[int, Strict(), Field(ge=0)]
    seed: Seed | None
    max_new_tokens: Count
    stop: list[StopString]
    gamma: Count | None

    @model_validator(mode="after")
    def _one_sequence(self) -> DecodingArgs:
        if self.sample and self.num_beams not in (None, 1):
            raise InvalidArgument("num_beams", "sampling (sample=True) draws one sequence per prompt: leave "
                                               "num_beams out")
        return self


class CallArgs(BaseModel):
    """The arguments of Model.complete and generate that are not decoding options."""

    model_config = ConfigDict(extra="forbid")

    template: StrictBool = True
    strict: StrictBool = False
    batch_size: Count = 16
    first_line: StrictBool = False


Prompt = StrictStr | dict[StrictStr, Any]
_PROMPT = TypeAdapter(Prompt)
_PROMPTS = TypeAdapter(list[Prompt])
_MESSAGES = TypeAdapter(Annotated[list[dict[StrictStr, Any]], Field(min_length=1)])


def check(model: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """`model` validated from `values`, or InvalidArgument naming the first field at fault."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise _invalid(e) from None


def check_prompts(prompts: Any, name: str = "prompts") -> tuple[list[str | dict], bool]:
    """The prompts as a list, and whether one prompt (text or a dict of fields) was given rather than a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts], True
    if isinstance(prompts, tuple):
        prompts = list(prompts)
    try:
        return _PROMPTS.validate_python(prompts), False
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        index = next((p for p in first["loc"] if isinstance(p, int)), None)
        if index is None:
            raise InvalidArgument(name, f"expected text, a dict of fields, or a list of them, got "
                                        f"{_type(prompts)}") from None
        raise InvalidArgument(f"{name}[{index}]", f"expected text or a dict of fields, got "
                                                  f"{_type(prompts[index])}") from None


_SEEDS = TypeAdapter(list[Seed])


def check_seeds(seeds: Any, n: int, name: str = "seed") -> list[int]:
    """A list of one sampling seed per prompt (each in 0..2**63-1), for `n` prompts."""
    try:
        seeds = _SEEDS.validate_python(list(seeds))
    except ValidationError as e:
        raise InvalidArgument(name + _invalid(e).param, _invalid(e).reason) from None
    if len(seeds) != n:
        raise InvalidArgument(name, f"a list of seeds gives one per prompt: {len(seeds)} seeds for {n} prompts")
    return seeds


def check_prompt(prompt: Any, name: str = "prompt") -> str | dict:
    try:
        return _PROMPT.validate_python(prompt)
    except ValidationError:
        raise InvalidArgument(name, f"expected text or a dict of fields, got {_type(prompt)}") from None


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, Any]]:
    if isinstance(messages, tuple):
        messages = list(messages)
    try:
        messages = _MESSAGES.validate_python(messages)
    except ValidationError:
        raise InvalidArgument(name, "expected a non-empty list of {'role': ..., 'content': ...} dicts") from None
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str):
            raise InvalidArgument(f"{name}[{i}]", "a message needs a 'role' string")
    return messages


def compile_chat_template(text: str, name: str = "chat_template") -> None:
    """Refuse a chat template that does not compile (a syntax error, an unknown filter), as early as it is given,
    rather than on every chat request."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # older transformers: its environment, without its extra filters
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def compile_template(source: str):
            return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                 extensions=["jinja2.ext.loopcontrols"]).from_string(source)
    try:
        compile_template(text)
    except jinja2.TemplateError as e:
        line = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
        raise InvalidArgument(name, f"not a valid Jinja template ({line}{e.message or type(e).__name__})") from None


def _invalid(e: ValidationError) -> InvalidArgument:
    first = e.errors(include_url=False)[0]
    name = field_name(first["loc"]) or "arguments"
    if first["type"] == "extra_forbidden":
        return InvalidArgument(name, "unknown argument")
    message = first["msg"]
    message = message.removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    return InvalidArgument(name, f"{message}, got {_shown(first.get('input'))}")


def field_name(loc: tuple | list) -> str:
    """A pydantic error's location as a caller writes it: `stop[1]`, `messages[0].role`."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return "an int of thousands of digits"
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({_type(value)})"


def _type(value: Any) -> str:
    return "None" if value is None else type(value).__name__
