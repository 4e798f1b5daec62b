"""The `llm2slm` command: one subcommand per pipeline stage, each parsed from its config and dispatched.

The options of a stage are generated from its config dataclass (config.py), so help texts and defaults live in
one place; the stage itself is `llm2slm_cli.stages.<name>.run(config)`, a plain function.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from llm2slm_cli import __version__
from llm2slm_cli import artifacts as A
from llm2slm_cli import config as C
from llm2slm_cli.artifacts import config_to_dict
from llm2slm_cli.errors import Interrupted, UserError

app = typer.Typer(
    name="llm2slm",
    help="LLM-to-SLM: a frozen large model encodes the prompt once, a small model does the decoding "
         "(arXiv 2402.16844). Stages read and write files, so they chain in scripts and Makefiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _parameter(f: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    meta = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = ... if required else (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                     else f.default)
    kwargs: dict[str, Any] = {"help": meta.get("help", ""), "hidden": meta.get("hidden", False),
                              "rich_help_panel": meta.get("panel")}
    if meta.get("envvar"):
        kwargs.update(envvar=meta["envvar"], show_envvar=True)
    if meta.get("choices"):  # typer shows an Enum as a choice list and checks it
        annotation = enum.Enum(f.name, {c: c for c in meta["choices"]}, type=str)
        default = default if default in (None, ...) else annotation(default)
    if not meta.get("choices"):
        kwargs["metavar"] = _metavar(annotation, meta.get("argument", False))
    if meta.get("argument"):
        kwargs.pop("rich_help_panel")  # arguments have their own section
        info = typer.Argument(show_default=False, **kwargs)
    else:
        flag = meta.get("name") or "--" + f.name.replace("_", "-")
        if annotation is bool:
            info = typer.Option(f"{flag}/--no-{flag[2:]}" if default else flag, **kwargs)
        else:
            info = typer.Option(flag, show_default=default not in (None, [], ...), **kwargs)
    if default == [] and not meta.get("argument"):
        default = None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def command(name: str, config_cls: type, stage: str) -> None:
    """Register `llm2slm <name>`: its options are the fields of `config_cls`; it runs `stages.<stage>.run`."""
    hints = typing.get_type_hints(config_cls)
    fields = C.option_fields(config_cls)
    params = [_parameter(f, hints[f.name]) for f in fields]
    names = {f.name for f in fields}
    params += [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--config", metavar="FILE", is_eager=True, show_default=False,
                                      callback=lambda ctx, value: _read_config_file(ctx, value, hints, names),
                                      help="Options from a YAML or JSON file (keys: option names, as "
                                           "--print-config writes them); options on the command line win.")]),
        inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--print-config", help="Print the effective configuration as YAML and exit.")]),
    ]

    def run_stage(config_file: Path | None = None, print_config: bool = False, **kwargs: Any) -> None:
        kwargs = {k: ([] if v is None and _list_hint(hints[k]) else v.value if isinstance(v, enum.Enum) else v)
                  for k, v in kwargs.items()}
        config = None
        try:
            config = config_cls(**kwargs)
            C.check_numbers(config)
            if print_config:
                import yaml

                values = config_to_dict(config)  # testing aids (hidden) are not configuration
                shown = {f.name: values[f.name] for f in fields if not f.metadata.get("hidden")}
                print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True), end="")
                return
            importlib.import_module(f"llm2slm_cli.stages.{stage}").run(config)
        except UserError as e:
            if isinstance(e, A.DiskFull):  # raised where a file was being written: remove the other temporaries too
                A.remove_temporaries(getattr(config, "out", None))
                raise _fail(e.message + (" with --resume" if stage in RESUMABLE else "")) from None
            raise _fail(e.message) from None
        except Interrupted as e:
            raise _fail(str(e), 130) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except Exception as e:
            out = getattr(config, "out", None)
            if not A.is_disk_full(e, out):
                raise
            # a full disk wherever it happened (torch.save, safetensors, a tokenizer's files): one line, and no
            # temporary left behind (what a stage renamed into place is complete; --resume trusts nothing else)
            A.remove_temporaries(out)
            # a copy or rename names its source first and its destination second: the destination is what filled
            where = getattr(e, "filename2", None) or getattr(e, "filename", None) or out or "."
            message = A.disk_full_error(e, where).message
            raise _fail(message + (" with --resume" if stage in RESUMABLE else "")) from None
        finally:
            A.release_output()  # the stage's lock on its --out

    run_stage.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run_stage.__name__ = name.replace("-", "_")
    app.command(name, help=config_cls.__doc__, no_args_is_help=True, cls=PanelCommand)(run_stage)


class PanelCommand(typer.core.TyperCommand):
    """A stage's command whose plain `--help` lists the options under their panels' headings (config.opt's
    `panel`, passed to typer as rich_help_panel) in config.PANELS' order, each option in its declared place within
    its panel; options without a panel first, under "Options"."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list = []
        panels: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        order = {title: i for i, title in enumerate(C.PANELS)}
        for title, records in sorted(panels.items(), key=lambda item: order.get(item[0], len(order))):
            with formatter.section(title):
                formatter.write_dl(records)


def _read_config_file(ctx: typer.Context, path: Path | None, hints: dict[str, Any], names: set[str]) -> Path | None:
    """--config FILE: its values become the defaults of this command's options (click's default map), so options
    given on the command line (or by environment variable) still win."""
    if path is None:
        return None
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise _fail(f"{path}: nested too deeply to be a config file (options take a value or a list)") from None
    except (ValueError, yaml.YAMLError) as e:
        raise _fail(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                    f"({' '.join(str(e).split())})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise _fail(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        matches = [difflib.get_close_matches(k, sorted(names), n=1) for k in unknown]
        close = [m[0].replace("_", "-") for m in matches if m]
        maybe = f"; did you mean {', '.join(close)}?" if close else ""
        raise _fail(f"{path}: unknown option{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(k.replace('_', '-') for k in unknown)} for `llm2slm {ctx.info_name}`{maybe}")
    for k, v in values.items():
        if isinstance(v, (dict, set)) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
            raise _fail(f"{path}: option {k.replace('_', '-')} takes a value or a list of values, not a mapping")
        problem = _type_problem(v, hints[k])
        if problem:
            raise _fail(f"{path}: option {k.replace('_', '-')} {problem}")
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in values.items() if v is not None}}
    return path


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why a config file's value cannot be this option's, or None. Strict where click would coerce quietly: YAML's
    `true` is not the number 1, 2.5 is not an int, "4" is not a number (a config file has types; use them)."""
    if value is None:
        return None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        for v in value if isinstance(value, list) else [value]:
            problem = _type_problem(v, item)
            if problem:
                return problem
        return None
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = kinds[0]
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:  # PyYAML reads 1e-3 (no dot) as text: a float literal written so is still a number
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()) is not None)
    else:  # str and Path: a YAML scalar that reads as text (6 for --layer is the text "6"), never a bool
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if ok:
        return None
    want = {bool: "true or false", int: "a whole number", float: "a number"}.get(base, "a text value")
    shown = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
    return f"takes {want}, got {shown}"


RESUMABLE = {"encode", "distill", "generate", "train"}  # stages whose --resume continues after the last complete part


def _metavar(annotation: Any, argument: bool) -> str:
    if typing.get_origin(annotation) is list:
        if argument:
            return "INPUT"
        annotation = typing.get_args(annotation)[0]
    base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return {str: "TEXT", int: "INT", float: "FLOAT", Path: "PATH", bool: ""}.get(base[0], "VALUE")


def _list_hint(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


command("encode", C.EncodeConfig, "encode")
command("distill-labels", C.DistillConfig, "distill")
command("train", C.TrainConfig, "train")
command("generate", C.GenerateConfig, "generate")
command("eval", C.EvalConfig, "evaluate")
command("bench", C.BenchConfig, "bench")
command("convert", C.ConvertConfig, "convert")
command("serve", C.ServeConfig, "serve")
command("export", C.ExportConfig, "export")


def _version(value: bool) -> None:
    if value:
        print(f"llm2slm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def main() -> None:
    app()


__all__ = ["app", "main", "Path"]
