"""Small pieces every stage needs: the device, progress bars, prompt tokenization, timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

from llm2slm_cli.errors import UserError


def fast_cuda_math() -> None:
    """TF32 for float32 matmuls and convolutions on CUDA GPUs that have it (Ampere on): a 10-bit mantissa inside the
    product, float32 everywhere else; what PyTorch recommends for training and inference on those GPUs."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def device(name: str):
    """The torch device of --device (auto: CUDA when visible); on CUDA, TF32 matmuls (fast_cuda_math)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            fast_cuda_math()
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible")
    if dev.type == "cuda":
        fast_cuda_math()
    return dev


def processes(device_name: str):
    """This run's processes (accelerate's PartialState) and the device this process works on.

    One process normally; under `accelerate launch` or `torchrun` one per GPU (or CPU workers with gloo), each on
    its own device.
    """
    import torch
    from accelerate import PartialState

    cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes > 1:
        return state, state.device
    return state, device(device_name)


class StopOnInterrupt:
    """First Ctrl-C (SIGINT, also what `accelerate launch` forwards): finish the current batch, then stop cleanly.
    A second one stops at once. `with StopOnInterrupt() as stop: ... if stop: ...`"""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.quiet = quiet
        self._previous = None

    def __bool__(self) -> bool:
        return self.requested

    def __enter__(self) -> StopOnInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        say("interrupt: stopping after this batch or step (again to stop now)", self.quiet)


PLAIN_PROGRESS_EVERY_S = 10.0  # where stderr is not a terminal: a plain progress line this often


def progress(quiet: bool = False, *, file=None, every: float = PLAIN_PROGRESS_EVERY_S, clock=None):
    """A rich progress bar with rate and ETA, written to stderr (or `file`) so stdout stays clean for --json.

    Where that is not an interactive terminal (piped, under nohup, into a log file), rich would print nothing until
    the end; there each task prints one plain line every `every` seconds, and its last state at the end instead:
    `encode: 1,234/10,000 (12%) 523.0 tok/s, 0:01:05 elapsed`. `clock`: the time source (seconds), for tests."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=file, stderr=file is None)
    if quiet or console.is_interactive:
        return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=quiet, transient=False, get_time=clock)

    class PlainProgress(Progress):
        """The same tasks, shown as plain lines (rich's display is off)."""

        def __init__(self) -> None:
            super().__init__(console=console, disable=True, get_time=clock)
            self.shown: dict = {}  # task id -> (time of its last line, the line)

        def add_task(self, description: str, *args, **kwargs):
            task = super().add_task(description, *args, **kwargs)
            self.shown[task] = (self.get_time(), None)
            return task

        def update(self, task_id, **kwargs) -> None:
            super().update(task_id, **kwargs)
            if self.get_time() - self.shown[task_id][0] >= every:
                self._show(task_id)

        def advance(self, task_id, advance: float = 1) -> None:
            self.update(task_id, advance=advance)

        def stop(self) -> None:
            for task_id in self.shown:
                if self.shown[task_id][1] != plain_progress_line(self._tasks[task_id]):
                    self._show(task_id)
            super().stop()

        def _show(self, task_id) -> None:
            line = plain_progress_line(self._tasks[task_id])
            self.shown[task_id] = (self.get_time(), line)
            print(line, file=console.file, flush=True)

    return PlainProgress()


def plain_progress_line(task) -> str:
    """A rich progress task as one line: `encode: 1,234/10,000 (12%) 523.0 tok/s, 0:01:05 elapsed`."""
    import datetime

    done = int(task.completed)
    text = f"{task.description}: {done:,}"
    if task.total:
        text += f"/{int(task.total):,} ({task.completed / task.total:.0%})"
    rate = task.fields.get("rate")
    if rate:
        text += f" {rate}"
    return f"{text}, {datetime.timedelta(seconds=int(task.elapsed or 0))} elapsed"


def say(message: str, quiet: bool = False, *, markup: bool = False) -> None:
    """One message on stderr. Messages carry user strings (paths like runs/exp[lr], labels like 'LLM [transformers]')
    that rich would read as markup tags and drop: markup only where the caller escaped them (rich.markup.escape)."""
    if not quiet:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=markup)


TOKENIZE_CHUNK = 1024  # prompts per tokenizer call: a whole dataset at once costs gigabytes of Encoding objects


def places(inputs: Sequence, examples: Sequence) -> list[str]:
    """Where each example came from, for error messages: "data.jsonl, line 3, example 'a'"."""
    source = str(inputs[0])
    return [", ".join(p for p in (source, e.place, f"example {e.id!r}") if p) for e in examples]


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int, *, strict: bool = False,
                     where: Sequence[str] | None = None, arrays: bool = False) -> tuple[list, list[bool]]:
    """Token ids of each prompt (with the tokenizer's special tokens), truncated to `max_length`.

    Returns the ids and, per prompt, whether it was truncated; with `strict`, an over-long prompt is an error that
    names it (`where`, from `places`). With `arrays`, each prompt's ids are an int32 numpy array (a tenth of the
    memory of a list, for training sets).
    """
    out: list = []
    flags: list[bool] = []
    for start in range(0, len(prompts), TOKENIZE_CHUNK):
        chunk = list(prompts[start: start + TOKENIZE_CHUNK])
        full = tokenizer(chunk, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        long = [i for i, t in enumerate(full) if len(t) > max_length]
        if long and strict:
            i = long[0]
            rest = list(prompts[start + TOKENIZE_CHUNK:])
            n_long = len(long) + (sum(len(t) > max_length for t in tokenizer(
                rest, add_special_tokens=True, verbose=False)["input_ids"]) if rest else 0)
            name = where[start + i] if where is not None else f"prompt {start + i}"
            raise UserError(f"{name}: prompt has {len(full[i])} tokens, over --max-length {max_length} "
                            f"({n_long} such prompt{'s' if n_long > 1 else ''}; drop --strict to truncate them)")
        if long:
            cut = tokenizer([chunk[i] for i in long], add_special_tokens=True, truncation=True,
                            max_length=max_length, verbose=False)["input_ids"]
            for i, t in zip(long, cut):
                full[i] = t
        out.extend(_arrays(full) if arrays else full)
        cut_here = set(long)
        flags.extend(i in cut_here for i in range(len(chunk)))
    return out, flags


def tokenize_targets(tokenizer, targets: Sequence[str], max_length: int, *, arrays: bool = False) -> list:
    """Target ids: the text's tokens then the end token, at most `max_length` in all."""
    eos = tokenizer.eos_token_id
    out: list = []
    for start in range(0, len(targets), TOKENIZE_CHUNK):
        toks = tokenizer(list(targets[start: start + TOKENIZE_CHUNK]), add_special_tokens=False,
                         verbose=False)["input_ids"]
        toks = [t[: max_length - 1] + [eos] for t in toks]
        out.extend(_arrays(toks) if arrays else toks)
    return out


def _arrays(lists: list[list[int]]) -> list:
    import numpy as np

    return [np.asarray(t, dtype=np.int32) for t in lists]


@contextmanager
def timer():
    start = time.perf_counter()
    box = {"seconds": 0.0}
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start
