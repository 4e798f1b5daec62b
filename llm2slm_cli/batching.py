"""The training input pipeline: which examples each step trains on, and a DataLoader that prepares them ahead.

The order is a pure function of (seed, epoch): a permutation of the examples (optionally regrouped so a global
batch holds examples of similar length, `bucket_by_length`); step s of an epoch takes the s-th slice of
--batch-size; each process takes its share of that slice (rank::world), sorted by length and cut into micro-batches.
`--resume` therefore continues with the very batches an uninterrupted run would have used.

`TrainLoader` prepares those micro-batches in order, in `num_workers` background processes (0: in the training
process, as before), `prefetch` ahead per worker, in pinned memory when training on CUDA; features stay in their
stored half precision until `to_device` casts them on the device. Nothing here draws from the global random
generator (the DataLoader gets its own), so the training run's random stream is the same with or without workers.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# how many examples one length bucket regroups: this many global batches of a shuffled epoch at a time
BUCKET_BATCHES = 64


def epoch_order(n: int, seed: int, epoch: int, *, lengths: Sequence[int] | None = None,
                batch_size: int | None = None):
    """The examples of one epoch in training order, as an int64 numpy array: torch.randperm from (seed, epoch).
    With `lengths` (bucketing), each window of BUCKET_BATCHES global batches of that permutation is sorted by
    (length, index) and cut into batches, and the full batches are shuffled (the short last batch stays last), so a
    batch holds examples of similar length. Vectorised: millions of examples cost arrays, not Python objects."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    if lengths is None:
        return perm
    lengths = np.asarray(lengths)
    full = n - n % batch_size
    window = batch_size * BUCKET_BATCHES
    chunks = []
    for start in range(0, full, window):
        chunk = perm[start: min(start + window, full)]
        chunks.append(chunk[np.lexsort((chunk, lengths[chunk]))])  # by length, then index
    batches = np.concatenate(chunks).reshape(-1, batch_size) if chunks else np.empty((0, batch_size), np.int64)
    shuffled = torch.randperm(len(batches), generator=g).numpy()
    return np.concatenate([batches[shuffled].reshape(-1), perm[full:]])


@dataclass
class StepPlan:
    """What one optimizer step trains on, in this process."""

    step: int
    epoch: int
    global_batch: list[int]  # every process's examples of the step
    global_tokens: int  # target tokens of the global batch: each micro-batch's summed loss is divided by it
    micro: list[list[int]]  # this process's micro-batches
    weight: float  # world / global_tokens; 0.0 for a process without examples (it joins the all-reduce with zero)


class TrainPlan:
    """The run's steps as StepPlans (see the module docstring); the permutation of the last epoch asked is kept."""

    def __init__(self, n: int, *, seed: int, batch_size: int, micro_batch_size: int, prompt_lengths: Sequence[int],
                 target_lengths: Sequence[int], rank: int = 0, world: int = 1,
                 bucket_by_length: bool = False) -> None:
        import numpy as np

        self.n, self.seed, self.batch_size, self.micro_batch_size = n, seed, batch_size, micro_batch_size
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        self.target_lengths = np.asarray(target_lengths, dtype=np.int64)
        self.rank, self.world = rank, world
        self.steps_per_epoch = -(-n // batch_size)
        self._lengths = self.prompt_lengths + self.target_lengths if bucket_by_length else None
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def order(self, epoch: int):
        if epoch != self._epoch:
            self._order = epoch_order(self.n, self.seed, epoch, lengths=self._lengths, batch_size=self.batch_size)
            self._epoch = epoch
        return self._order

    def micro_count(self, step: int) -> int:
        """How many micro-batches step `step` has in this process (without computing the permutation)."""
        s = step % self.steps_per_epoch
        size = min(self.batch_size, self.n - s * self.batch_size)
        local = len(range(self.rank, size, self.world))
        return max(1, -(-local // self.micro_batch_size))

    def __call__(self, step: int) -> StepPlan:
        epoch, s = divmod(step, self.steps_per_epoch)
        global_batch = self.order(epoch)[s * self.batch_size: (s + 1) * self.batch_size].tolist()
        global_tokens = int(self.target_lengths[global_batch].sum())
        local = sorted(global_batch[self.rank::self.world],
                       key=lambda i: (int(self.prompt_lengths[i] + self.target_lengths[i]), i))
        micro = [local[j: j + self.micro_batch_size] for j in range(0, len(local), self.micro_batch_size)]
        weight = self.world / global_tokens
        if not micro:  # a last batch smaller than the process count: join the all-reduce with zero
            micro, weight = [global_batch[:1]], 0.0
        return StepPlan(step, epoch, global_batch, global_tokens, micro, weight)


class _MicroBatches:
    """Map-style dataset: item k is the k-th micro-batch of steps [start, stop), made by `make(indices)`."""

    def __init__(self, plan: TrainPlan, start: int, stop: int, make: Callable[[list[int]], Any]) -> None:
        import numpy as np

        self.plan, self.start, self.make = plan, start, make
        counts = np.array([plan.micro_count(s) for s in range(start, stop)], dtype=np.int64)
        self.ends = np.cumsum(counts).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, k: int) -> Any:
        i = bisect.bisect_right(self.ends, k)
        j = k - (self.ends[i - 1] if i else 0)
        return self.make(self.plan(self.start + i).micro[j])


def _identity(batch: Any) -> Any:
    return batch


class TrainLoader:
    """The micro-batches of steps [start, stop) in training order, prepared ahead by a torch DataLoader.

    `next_batch()` returns the next one (what `make(indices)` returns, its tensors pinned with `pin_memory`) and adds
    the time it waited for it to `waited` (seconds): the share of the step that data loading costs the loop."""

    def __init__(self, plan: TrainPlan, start: int, stop: int, make: Callable[[list[int]], Any], *,
                 num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        import torch
        from torch.utils.data import DataLoader

        self.dataset = _MicroBatches(plan, start, stop, make)
        self.loader = DataLoader(
            self.dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
            pin_memory=pin_memory, prefetch_factor=prefetch if num_workers else None,
            persistent_workers=False, generator=torch.Generator().manual_seed(0),  # never the global generator
            multiprocessing_context="fork" if num_workers and _can_fork() else None)
        self._it: Iterator[Any] | None = None
        self.pinned = pin_memory
        self.waited = 0.0
        self.batches = 0

    def next_batch(self) -> Any:
        started = time.perf_counter()
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.waited += time.perf_counter() - started
        self.batches += 1
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def to_device(batch: dict[str, Any], device, feature_dtype, *, non_blocking: bool = False) -> dict[str, Any]:
    """The batch on the device; the features (stored half precision) cast there to the projector's dtype."""
    out = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    if "features" in out:
        out["features"] = out["features"].to(feature_dtype)
    return out
