"""`train --streaming`: the training examples read from the input as the steps need them, never stored whole.

For a corpus that should not be copied to disk as Arrow (corpus.py) or does not fit there. The input is read record
by record with the very readers and checks of every stage (data.iter_examples: a bad record is refused naming its
file and line, at the step that reaches it), shuffled through a seeded buffer, tokenized a global batch at a time.

Order. Epoch e reads the input from its start; each example read goes into a buffer of --shuffle-buffer examples;
once the buffer is full, every example read takes the place of one drawn at random (numpy's PCG64 from (seed, e)),
which goes to training; when the input ends the buffer is drawn empty the same way. A step takes the next
--batch-size examples of its epoch (the last batch of an epoch may be short, as without --streaming). Every process
of a data-parallel run draws the same stream and so the same global batches as one process does, and keeps its share
of each (every world-th example, sorted by length into micro-batches): the processes shard the batches, not the input,
so the result does not depend on how many there are.

Resume. The stream's state is small and exact: the epoch, how many examples of the input the epoch has read, the
buffer's examples and the generator's state. Every step checkpoint stores it (stream_state.json); a resumed run reads
the input again up to that position (JSON Lines and text files: their lines passed over unparsed, the input known
to be the same by its sha256; other formats read and checked), refills the buffer from the checkpoint and
continues with the very examples an uninterrupted run would have drawn. `datasets`' own IterableDataset.shuffle does
not store its buffer (its state_dict refills the buffer after a resume: another order), which is why the buffer here is
ours.

What --streaming gives up: the ids are not checked for uniqueness across the input (that needs every id; stored
features are still looked up by id and checked against each prompt), and what needs every example before step 1
(--trim-vocab, --bucket-by-length, --kd-weight) is refused; --max-steps gives the run's length (a stream's length is
not known before it is read).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2slm_cli import runtime
from llm2slm_cli.data import Example, Fields, iter_examples
from llm2slm_cli.errors import UserError

STATE_SCHEMA = 1


class ExampleStream:
    """The examples of `inputs`, shuffled through a buffer, epoch after epoch (see the module docstring).

    `next_batch(n)` returns up to n examples of the current epoch (fewer at its end; the next call starts the next
    epoch) and the epoch they belong to; `state_dict()` is the position, as JSON; `ExampleStream(..., state=s)`
    continues from it."""

    def __init__(self, inputs: Sequence[Path | str], fields: Fields, *, seed: int, buffer_size: int,
                 state: dict[str, Any] | None = None) -> None:
        self.inputs, self.fields, self.seed, self.buffer_size = list(inputs), fields, seed, buffer_size
        if state is None:
            self._start_epoch(0)
        else:
            self._load(state)

    # ----------------------------------------------------------------------------------------------- reading

    def _source(self, skip: int = 0) -> Iterator[Example]:
        """The input's examples in its order, after the first `skip` (read and checked before: a resume, whose
        input train has checked is the same by its sha256; lines are passed over unparsed)."""
        return iter_examples(self.inputs, self.fields, require_target=True, unique=False, streaming=True, skip=skip)

    def _start_epoch(self, epoch: int) -> None:
        import numpy as np

        self.epoch, self.read, self.exhausted, self.buffer = epoch, 0, False, []
        self.rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        self._examples = self._source()

    def _next_example(self) -> Example | None:
        """The next example of this epoch's order, or None once the epoch has given every one."""
        while not self.exhausted and len(self.buffer) < self.buffer_size:
            example = next(self._examples, None)
            if example is None:
                self.exhausted = True
                break
            self.read += 1
            self.buffer.append(example)
        if not self.buffer:
            return None
        j = int(self.rng.integers(len(self.buffer)))
        drawn = self.buffer[j]
        if not self.exhausted:  # the next example read takes the drawn one's place ...
            example = next(self._examples, None)
            if example is not None:
                self.read += 1
                self.buffer[j] = example
                return drawn
            self.exhausted = True
        self.buffer[j] = self.buffer[-1]  # ... or, the input done, the buffer shrinks
        self.buffer.pop()
        return drawn

    def next_batch(self, n: int) -> tuple[int, list[Example]]:
        """Up to `n` examples of one epoch (a short batch ends an epoch) and that epoch."""
        batch: list[Example] = []
        while len(batch) < n:
            example = self._next_example()
            if example is None:
                if batch:
                    break
                if self.read == 0:
                    raise UserError("no examples", path=self.inputs[0])
                self._start_epoch(self.epoch + 1)
                continue
            batch.append(example)
        return self.epoch, batch

    def head(self, n: int) -> list[Example]:
        """The first `n` examples of the input, in its order (what --feature-norm standardize reads, as without
        --streaming)."""
        return list(itertools.islice(self._source(), n))

    # ----------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: JSON, small (the buffer's examples and a generator's state)."""
        return {"schema": STATE_SCHEMA, "seed": self.seed, "buffer_size": self.buffer_size, "epoch": self.epoch,
                "read": self.read, "exhausted": self.exhausted, "rng": self.rng.bit_generator.state,
                "buffer": [[e.id, e.prompt, e.target, e.place] for e in self.buffer]}

    def _load(self, state: dict[str, Any]) -> None:
        import numpy as np

        try:
            if state["schema"] != STATE_SCHEMA:
                raise ValueError(f"schema {state['schema']}, expected {STATE_SCHEMA}")
            if (state["seed"], state["buffer_size"]) != (self.seed, self.buffer_size):
                raise ValueError("another --seed or --shuffle-buffer")
            self.epoch, self.read, self.exhausted = int(state["epoch"]), int(state["read"]), bool(state["exhausted"])
            self.buffer = [Example(*row) for row in state["buffer"]]
            self.rng = np.random.Generator(np.random.PCG64())
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"unreadable stream state in the checkpoint ({e})") from None
        # the input read to its end this epoch: nothing more comes from it (and nothing to read again)
        self._examples = iter(()) if self.exhausted else self._source(skip=self.read)


@dataclass
class StreamStep:
    """One optimizer step's examples from the stream: as batching.StepPlan, the examples numbered by their place in
    the stream (`positions`), and the stream's state after them (what the step's checkpoint stores)."""

    step: int
    epoch: int
    examples: list[int]
    tokens: int
    micro: list[list[int]]
    weight: float
    state: dict[str, Any]


class StreamLoader:
    """The micro-batches of steps [start, stop) from an ExampleStream, prepared ahead by a thread of the training
    process (tokenizers release the GIL): `steps()` gives each step's StreamStep, `next_batch()` its micro-batches
    in order, as batching.TrainLoader does. An error in the thread (a bad record far into the input) is raised in
    the training loop, at the step that needs it."""

    def __init__(self, stream: ExampleStream, *, start: int, stop: int, batch_size: int, micro_batch_size: int,
                 tokenize: Callable[[list[Example]], tuple[list, list]], make: Callable[..., Any], rank: int = 0,
                 world: int = 1, prefetch: int = 2, pin_memory: bool = False) -> None:
        self.stream, self.start, self.stop = stream, start, stop
        self.batch_size, self.micro_batch_size, self.rank, self.world = batch_size, micro_batch_size, rank, world
        self.tokenize, self.make, self.pinned = tokenize, make, pin_memory
        self.waited, self.batches = 0.0, 0
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._pending: list[tuple[list[int], Any]] = []
        self._drawn = 0  # examples drawn so far (numbers them: the positions)
        self._thread = threading.Thread(target=self._produce, name="llm2slm-stream", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for step in range(self.start, self.stop):
                item = self._step(step)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 (raised again in the training loop)
            self._queue.put(e)

    def _step(self, step: int) -> tuple[StreamStep, list[tuple[list[int], Any]]]:
        import numpy as np

        epoch, examples = self.stream.next_batch(self.batch_size)
        state = self.stream.state_dict()
        positions = list(range(self._drawn, self._drawn + len(examples)))
        self._drawn += len(examples)
        prompt_rows, target_rows = self.tokenize(examples)
        lengths = np.array([len(p) + len(t) for p, t in zip(prompt_rows, target_rows)], dtype=np.int64)
        global_tokens = int(sum(len(t) for t in target_rows))
        local = sorted(range(self.rank, len(examples), self.world), key=lambda k: (int(lengths[k]), k))
        micro = [local[j: j + self.micro_batch_size] for j in range(0, len(local), self.micro_batch_size)]
        weight = self.world / global_tokens
        if not micro:  # a last batch smaller than the process count: join the all-reduce with zero
            micro, weight = [[0]], 0.0
        batches = [([positions[k] for k in m],
                    self.make([examples[k].id for k in m], [prompt_rows[k] for k in m], [target_rows[k] for k in m]))
                   for m in micro]
        return (StreamStep(step, epoch, positions, global_tokens, [b[0] for b in batches], weight, state), batches)

    def steps(self) -> Iterator[tuple[int, StreamStep]]:
        """(step, StreamStep) for every step, in order."""
        for step in range(self.start, self.stop):
            started = time.perf_counter()
            item = self._queue.get()
            self.waited += time.perf_counter() - started
            if isinstance(item, BaseException):
                raise item
            plan, self._pending = item
            yield step, plan

    def next_batch(self) -> tuple[list[int], Any]:
        """The current step's next micro-batch: (its positions, what `make` made of it)."""
        self.batches += 1
        return self._pending.pop(0)

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


def tokenizer_for(prompt_tokenizer, target_tokenizer, max_length: int, max_target_length: int):
    """The tokenization of corpus.py (runtime.tokenize_prompts / tokenize_targets), for a batch of examples."""

    def tokenize(examples: list[Example]) -> tuple[list, list]:
        prompts, _ = runtime.tokenize_prompts(prompt_tokenizer, [e.prompt for e in examples], max_length,
                                              arrays=True)
        targets = runtime.tokenize_targets(target_tokenizer, [e.target or "" for e in examples], max_target_length,
                                           arrays=True)
        return prompts, targets

    return tokenize
