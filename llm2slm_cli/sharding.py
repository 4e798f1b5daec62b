"""The work of `encode`, `distill-labels` and `generate`: a fixed list of shards, split across processes, resumable.

The examples are cut into shards before any work, by a rule that depends only on the inputs and the options (never
on the number of processes). Each shard is a unit: its batches and its random seed are functions of the shard
alone, and its output files are written under a temporary name and renamed. So

- under `accelerate launch` (or torchrun), process p does shards p, p + N, p + 2N, ... and writes its own files;
  the main process merges them into one index and one manifest when all are done: the same files as one process;
- a run killed at any point (SIGKILL, power cut) leaves only complete shard files, and `--resume` does the rest:
  the same files as an uninterrupted run;
- Ctrl-C finishes the current batch and stops; the shards already written stay valid.

A plan file (`.<stage>-plan.json`) records what the run is doing; `--resume` refuses a directory whose plan differs
from what the command would do now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.errors import Interrupted, UserError


def shard_seed(seed: int, shard: int) -> int:
    """The random seed of one shard: a resumed or multi-process run samples exactly what one process does."""
    return seed * 1_000_003 + shard


class ShardedRun:
    def __init__(self, out: Path, *, stage: str, overwrite: bool, resume: bool, device: str,
                 quiet: bool = False) -> None:
        self.out = Path(out)
        self.stage = stage
        self.quiet = quiet
        self.state, self.device = runtime.processes(device)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.plan_path = self.out / f".{stage}-plan.json"
        self.resuming = bool(self._on_main(lambda: self._prepare(overwrite, resume)))
        self.stop = runtime.StopOnInterrupt(quiet or not self.is_main)

    def _prepare(self, overwrite: bool, resume: bool) -> bool:
        resuming = A.prepare_output_dir(self.out, overwrite=overwrite, resume=resume)
        if resuming:  # files a killed run was writing when it died: never renamed, never read
            for tmp in [*self.out.glob(".*.tmp-*"), *A.library_temporaries(self.out)]:
                tmp.unlink()
        return resuming

    def _on_main(self, fn) -> Any:
        """Run `fn` on the main process only; every process gets its result, or raises its UserError."""
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except UserError as e:
                box[1] = e.message
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        if box[1] is not None:
            raise UserError(box[1])
        return box[0]

    def plan(self, plan: dict[str, Any]) -> None:
        """Record the plan; on --resume, refuse if it differs from the interrupted run's."""
        self._on_main(lambda: A.resume_plan(self.out, self.plan_path.name, plan, self.resuming, self.stage))

    def __enter__(self) -> ShardedRun:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)
        if self.is_main:  # taken by prepare_output_dir: held while the run writes --out
            A.release_output(self.out)

    def todo(self, n_shards: int, done) -> list[int]:
        """This process's shards that still need work; `done(k)` says shard k's files exist from an earlier run."""
        return [k for k in range(self.rank, n_shards, self.world) if not (self.resuming and done(k))]

    def check_stop(self) -> None:
        """Call between batches: stops now if the user asked. The shard in progress is dropped (it is redone by
        --resume); the complete ones stay."""
        if self.stop:
            raise Interrupted(f"stopped: the complete shards in {self.out} are kept; continue with --resume")

    def finish(self) -> bool:
        """Wait for every process; True on the process that merges the shards and writes the manifest."""
        self.state.wait_for_everyone()
        return self.is_main

    def done(self) -> None:
        """After the manifest: the plan is no longer needed; the other processes may exit."""
        if self.is_main and self.plan_path.is_file():
            self.plan_path.unlink()
        self.state.wait_for_everyone()
