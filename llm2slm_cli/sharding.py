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

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.errors import Interrupted, UserError


def in_order_shards(n: int, size: int) -> list[list[int]]:
    """Example indices 0..n-1 cut into consecutive shards of `size` (the last may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def shard_seed(seed: int, shard: int) -> int:
    """The random seed of one shard: a resumed or multi-process run samples exactly what one process does."""
    return seed * 1_000_003 + shard


KINDS = {"encode": A.KIND_FEATURES, "distill": A.KIND_LABELS, "generate": A.KIND_PREDICTIONS}


class ShardProgress:
    """What a shard's work reports after each batch: the progress bar advances, the tokens and their rate are
    counted, and a Ctrl-C is honoured (the shard in progress is dropped; --resume redoes it)."""

    def __init__(self, run: ShardedRun, bar, task, digits: int) -> None:
        self.run, self.bar, self.task, self.digits = run, bar, task, digits
        self.tokens = 0

    def advance(self, examples: int, tokens: int = 0) -> None:
        self.tokens += tokens
        elapsed = max(self.bar.tasks[self.task].elapsed or 1e-9, 1e-9)
        self.bar.update(self.task, advance=examples, rate=f"{self.tokens / elapsed:,.{self.digits}f} tok/s")
        self.run.check_stop()


class ShardedRun:
    """One sharded stage's work in --out. `part` is the name of a shard's part file (e.g.
    "predictions-{:05d}.parquet"): merged at the end, then removed.

    Each shard's files are recorded (size and sha256) in a small `.<stage>-shard-NNNNN.json` beside them once they
    are written; that record marks the shard complete. --resume redoes a shard whose files differ from their record
    (with a warning), and the merge refuses one (naming the file), so a part damaged on disk never reaches a
    manifest."""

    def __init__(self, out: Path, *, stage: str, overwrite: bool, resume: bool, device: str, part: str,
                 quiet: bool = False) -> None:
        self.out = Path(out)
        self.stage = stage
        self.part = part
        self.quiet = quiet
        self.state, self.device = runtime.processes(device)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.plan_path = self.out / f".{stage}-plan.json"
        self._options = (overwrite, resume)
        self.resuming: bool | None = None  # known once prepare() ran
        # Refused at once (another process, a non-empty --out, nothing to resume), but nothing is deleted before
        # prepare(): the stage calls it when its model and inputs have passed their checks.
        self.finished = bool(self.on_main(lambda: self._check(overwrite, resume)))
        self.stop = runtime.StopOnInterrupt(quiet or not self.is_main)

    def _check(self, overwrite: bool, resume: bool) -> bool:
        """True when --resume finds a run that had finished (its manifest written) but was stopped before it removed
        its part files: those are removed now, and there is nothing to do."""
        if resume and (self.out / A.MANIFEST).is_file() and self.plan_path.is_file():
            A.lock_output(self.out)
            manifest = A.read_manifest(self.out, KINDS[self.stage])
            for name, record in (manifest.get("files") or {}).items():  # the merged output is complete
                A.verify_file(self.out / name, record, "output file")
            leftovers = [*self.out.glob(self._pattern(self.part)), *self.out.glob(f".{self.stage}-shard-*.json"),
                         *self.out.glob(".*.tmp-*"), *A.library_temporaries(self.out), self.plan_path]
            for p in leftovers:
                p.unlink(missing_ok=True)
            runtime.say(f"this run had finished (manifest.json present) but was stopped before it removed its part "
                        f"files: removed {len(leftovers)} files; nothing to resume -> {self.out}", self.quiet)
            return True
        A.check_output_dir(self.out, overwrite=overwrite, resume=resume)
        return False

    @staticmethod
    def _pattern(name: str) -> str:
        return name.replace("{:05d}", "[0-9]" * 5)

    def prepare(self) -> None:
        """Make --out ready for writing (with --overwrite the previous output is removed only now). Called by
        `plan`, or by the stage itself before it writes anything."""
        if self.resuming is None:
            self.resuming = bool(self.on_main(lambda: self._prepare(*self._options)))

    def _prepare(self, overwrite: bool, resume: bool) -> bool:
        resuming = A.prepare_output_dir(self.out, overwrite=overwrite, resume=resume)
        if resuming:  # files a killed run was writing when it died: never renamed, never read
            for tmp in [*self.out.glob(".*.tmp-*"), *A.library_temporaries(self.out)]:
                tmp.unlink()
        return resuming

    def _record(self, k: int) -> Path:
        return self.out / f".{self.stage}-shard-{k:05d}.json"

    def mark_done(self, k: int, files: list[Path]) -> None:
        """After shard k's files are all written: record their sizes and sha256; the record marks the shard done."""
        A.atomic_write_json(self._record(k), {"shard": k, "files": {Path(f).name: A.file_record(Path(f))
                                                                    for f in files}})

    def recorded(self, n_shards: int) -> set[int]:
        """The shards whose record of complete files is in --out: those a --resume does not redo (one damaged on
        disk since is found, and redone, by `todo`)."""
        return {k for k in range(n_shards) if self._record(k).is_file()}

    def _damage(self, k: int) -> str | None:
        """What is wrong with shard k's files (missing, or not as recorded when written); None if nothing."""
        record = self._record(k)
        try:
            files = json.loads(record.read_text())["files"]
            for name, entry in files.items():
                A.verify_file(self.out / name, entry, "part file")
        except UserError as e:
            return e.message
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{record}: unreadable record of shard {k}"
        return None

    def check_parts(self, n_shards: int) -> None:
        """Before the merge: every shard's files are as they were written. A damaged one is refused with its name,
        and its record removed, so that --resume redoes that shard."""
        for k in range(n_shards):
            problem = self._damage(k) if self._record(k).is_file() else f"shard {k} has no record of its files"
            if problem:
                self._record(k).unlink(missing_ok=True)
                raise UserError(f"{problem}; nothing was merged: run the command again with --resume to redo "
                                f"shard {k}")

    def on_main(self, fn) -> Any:
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
        """Prepare --out, record the plan; on --resume, refuse if it differs from the interrupted run's."""
        self.prepare()
        self.on_main(lambda: A.resume_plan(self.out, self.plan_path.name, plan, self.resuming, self.stage))

    def __enter__(self) -> ShardedRun:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)
        if self.is_main:  # taken by prepare_output_dir: held while the run writes --out
            A.release_output(self.out)

    def todo(self, n_shards: int) -> list[int]:
        """This process's shards that still need work: on --resume, those without a record of complete files, or
        whose files differ from it (damaged on disk: redone, with a warning)."""
        mine = list(range(self.rank, n_shards, self.world))
        if not self.resuming:
            return mine
        todo, unrecorded = [], 0
        for k in mine:
            if not self._record(k).is_file():
                unrecorded += (self.out / self.part.format(k)).is_file()
                todo.append(k)
            elif (problem := self._damage(k)) is not None:
                runtime.say(f"warning: {problem}: redoing shard {k}")
                self._record(k).unlink(missing_ok=True)
                todo.append(k)
        if unrecorded:
            runtime.say(f"warning: {unrecorded} shards of the interrupted run have no record of their files' sha256 "
                        "(an older version wrote them): redoing them", self.quiet)
        return todo

    def run_shards(self, shards: list[list[int]], do_shard: Callable[[int, list[int], ShardProgress], list[Path]],
                   *, label: str, seed: int | None = None, digits: int = 1) -> tuple[int, float]:
        """The loop of every sharded stage: this process's shards still to do (see `todo`), under one progress bar.
        Before shard k, torch's generator is seeded with shard_seed(seed, k) (unless `seed` is None);
        `do_shard(k, members, progress)` writes shard k's files and returns them; their record (`mark_done`) is
        written last and marks the shard complete. Returns the tokens counted through `progress` and the seconds
        the loop took."""
        import torch  # the stages' work is torch's; sharding itself is imported where torch is not

        todo = self.todo(len(shards))
        with runtime.progress(self.quiet or not self.is_main) as bar, runtime.timer() as clock:
            progress = ShardProgress(self, bar, bar.add_task(label, total=sum(len(shards[k]) for k in todo),
                                                             rate=""), digits)
            for k in todo:
                if seed is not None:
                    torch.manual_seed(shard_seed(seed, k))
                self.mark_done(k, do_shard(k, shards[k], progress))
        return progress.tokens, clock["seconds"]

    def read_parts(self, n_shards: int) -> list:
        """Every shard's part file as a pyarrow table, in shard order, after checking that all are as written."""
        import pyarrow.parquet as pq

        self.check_parts(n_shards)
        return [pq.read_table(self.out / self.part.format(k)) for k in range(n_shards)]

    def remove_parts(self, n_shards: int) -> None:
        """After the manifest is written: the part files are merged and go."""
        for k in range(n_shards):
            (self.out / self.part.format(k)).unlink()

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
        if self.is_main:
            for record in self.out.glob(f".{self.stage}-shard-*.json"):
                record.unlink()
            if self.plan_path.is_file():
                self.plan_path.unlink()
        self.state.wait_for_everyone()
