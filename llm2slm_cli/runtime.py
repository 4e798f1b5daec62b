"""Small pieces every stage needs: the device, progress bars, prompt tokenization, timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

from llm2slm_cli.errors import UserError


def device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible")
    return dev


def progress(quiet: bool = False):
    """A rich progress bar with rate and ETA, written to stderr so stdout stays clean for --json."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=quiet, transient=False)


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(message)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int, *, strict: bool = False,
                     ids: Sequence[str] | None = None) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt (with the tokenizer's special tokens), truncated to `max_length`.

    Returns the ids and, per prompt, whether it was truncated; with `strict`, an over-long prompt is an error.
    """
    full = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    long = [i for i, t in enumerate(full) if len(t) > max_length]
    if long and strict:
        i = long[0]
        name = ids[i] if ids is not None else str(i)
        raise UserError(f"example {name!r}: prompt has {len(full[i])} tokens, over --max-length {max_length} "
                        f"({len(long)} such prompts; drop --strict to truncate them)")
    flags = [False] * len(full)
    if not long:
        return full, flags
    cut = tokenizer([prompts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length,
                    verbose=False)["input_ids"]
    for i, t in zip(long, cut):
        full[i] = t
        flags[i] = True
    return full, flags


def tokenize_targets(tokenizer, targets: Sequence[str], max_length: int) -> list[list[int]]:
    """Target ids: the text's tokens then the end token, at most `max_length` in all."""
    eos = tokenizer.eos_token_id
    toks = tokenizer(list(targets), add_special_tokens=False, verbose=False)["input_ids"]
    return [t[: max_length - 1] + [eos] for t in toks]


@contextmanager
def timer():
    start = time.perf_counter()
    box = {"seconds": 0.0}
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start
