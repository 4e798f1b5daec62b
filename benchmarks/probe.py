"""The outside probe as a harness: hundreds of careless-user and damaged-file cases through the real CLI.

    python benchmarks/probe.py [--out probe.json] [--families options,damage] [--limit N]

Every case is one `llm2slm` command (in-process, through typer's test runner: the same parsing, checks and stage
code as the shell, without ~10 s of imports per case) on tiny presets and small artifacts made at the start by the
stages themselves. Each outcome is one of:

- `refused`: exit 2 and no traceback (one `error:` line, or click's usage error for a value of the wrong type);
- `ran`: exit 0, where the case is harmless: the value is legal for that option, or the consumer's result (its
  metrics, predictions, weights) is exactly the one it gives on the undamaged artifact (the damage sits in a field it
  does not read, e.g. a manifest's record of the LLM that eval never uses), or the file is one it does not read;
- `traceback`: any other exit, or a Python traceback in the output;
- `silent`: exit 0 where the input should have been refused (nan or inf given to a number; a damaged file that
  changed the consumer's result) -- a wrong result no one is told about.

Families: `options` (every int and float option of every stage, given nan, inf, 1e309, -1 and a word) and `damage`
(every file of every artifact a later stage reads -- features, labels with teacher logits, a checkpoint, predictions,
an evaluation -- truncated, with a byte flipped, emptied, deleted, or for JSON files replaced by another JSON shape;
then the stage that reads it runs). Kills, full disks and two processes on one --out are tested in
tests/test_faults.py, tests/test_reliability.py and tests/test_integrity.py with real subprocesses and a small
tmpfs. Prints a table of counts by family and outcome and every case that is not refused/ran; exits 1 if any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import typing
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

BAD_NUMBERS = ["nan", "inf", "1e309", "-1", "word"]
NEVER_LEGAL = {"nan", "inf", "1e309"}  # no option of the toolkit means anything by them
# files a consumer does not read: damage to them must not stop it (a log, a model card)
UNREAD = {"train_log.jsonl", "README.md", "predictions.jsonl", "trainer_state.json", "optimizer.pt", "scheduler.pt",
          "rng_state.pt", "bench.md", "report.md"}


def _runner():
    from typer.testing import CliRunner

    from llm2slm_cli.cli import app

    runner = CliRunner()

    def invoke(args: list[str]):
        r = runner.invoke(app, [str(a) for a in args])
        text = r.output  # click >= 8.2: stdout and stderr together
        tb = "Traceback" in text or (r.exception is not None and not isinstance(r.exception, SystemExit))
        return r.exit_code, text, tb

    return invoke


def _rows(n: int, seed: int) -> list[dict]:
    import random

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        src = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        out.append({"id": f"r{i}", "src": src, "tgt": src.upper()})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Probe:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.invoke = _runner()
        self.results: list[dict] = []
        self.n = 0

    def out(self) -> Path:
        self.n += 1
        return self.root / "outs" / f"o{self.n}"

    def must(self, args: list) -> None:
        code, text, _ = self.invoke(args)
        if code != 0:
            raise SystemExit(f"setup failed: {' '.join(map(str, args))}\n{text[-2000:]}")

    # ------------------------------------------------------------------------------------------------ artifacts
    def setup(self) -> None:
        r = self.root
        (r / "outs").mkdir(parents=True)
        self.train = _write_jsonl(r / "train.jsonl", _rows(12, 1))
        self.dev = _write_jsonl(r / "dev.jsonl", _rows(4, 2))
        self.feats, self.labels, self.ckpt = r / "feats", r / "labels", r / "ckpt"
        self.pred, self.evald = r / "pred", r / "evald"
        self.must(["encode", self.train, "--model", "tiny-llama", "--out", self.feats, "--quiet"])
        self.must(["distill-labels", self.train, "--model", "tiny-llama", "--top-k-logits", "4", "--teacher-forced",
                   "--max-target-length", "16", "--out", self.labels, "--quiet"])
        self.must(self.base("train") + ["--out", self.ckpt])
        self.must(["generate", self.dev, "--model", self.ckpt / "final", "--max-new-tokens", "4", "--out", self.pred,
                   "--quiet"])
        self.must(["eval", self.pred, "--out", self.evald, "--quiet"])

    def base(self, stage: str, **over: Path) -> list:
        """A small valid command of `stage` (its --out added by the caller)."""
        feats = over.get("feats", self.feats)
        commands = {
            "encode": ["encode", self.train, "--model", "tiny-llama"],
            "train": ["train", self.train, "--llm", "tiny-llama", "--features", feats, "--slm", "tiny-gpt2",
                      "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4"],
            "train-kd": ["train", over.get("labels", self.labels), "--slm", "tiny-gpt2", "--kd-weight", "0.5",
                         "--max-target-length", "16", "--max-steps", "2", "--batch-size", "4",
                         "--micro-batch-size", "4", "--tokenizer", "tiny-llama"],
            "generate": ["generate", self.dev, "--model", over.get("ckpt", self.ckpt / "final"),
                         "--max-new-tokens", "4"],
            "distill-labels": ["distill-labels", self.dev, "--model", "tiny-llama", "--max-new-tokens", "4"],
            "eval": ["eval", over.get("pred", self.pred)],
            "bench": ["bench", "--slm", "preset:tiny-gpt2", "--new-tokens", "4", "--prompt-length", "4",
                      "--repeats", "1", "--warmup", "0", "--no-flops"] +
                     (["--quality", f"SLM={over['evald']}"] if "evald" in over else []),
            "export": ["export", over.get("ckpt", self.ckpt / "final")],
            "convert": ["convert", "preset:tiny-gpt2"],
        }
        return commands[stage] + ["--quiet"]

    def result(self, consumer: str, out: Path):
        """What a consumer produced, less what differs between two runs anyway (times, paths): damage that left it
        unchanged did no harm."""
        import pyarrow.parquet as pq
        from safetensors.torch import load_file

        if consumer == "eval":
            return json.loads((out / "metrics.json").read_text())["metrics"]
        if consumer == "generate":
            return pq.read_table(out / "predictions.parquet").column("prediction").to_pylist()
        if consumer in ("train", "train-kd"):
            return {k: v.tolist() for k, v in load_file(str(out / "final" / "model.safetensors")).items()}
        if consumer == "export":
            return {k: v.tolist() for k, v in load_file(str(out / "model.safetensors")).items()}
        if consumer == "bench":
            return json.loads((out / "bench.json").read_text()).get("quality")
        return None

    def record(self, family: str, case: str, args: list, expect_refusal: bool, harmless_if_ran: bool,
               consumer: str | None = None, clean=None) -> None:
        code, text, tb = self.invoke(args)
        if tb or code not in (0, 2):
            outcome = "traceback"
        elif code == 2:
            outcome = "refused"
        elif consumer is not None and self.result(consumer, Path(args[args.index("--out") + 1])) == clean:
            outcome = "ran"  # the damage did not reach the result: the same output as from the undamaged input
        else:
            outcome = "silent" if expect_refusal and not harmless_if_ran else "ran"
        error = next((ln for ln in text.splitlines() if ln.startswith("error:")), text.strip().splitlines()[-1:])
        self.results.append({"family": family, "case": case, "outcome": outcome, "exit": code,
                             "message": error if isinstance(error, str) else " ".join(error)})

    # ------------------------------------------------------------------------------------------------ families
    def options(self, limit: int | None) -> None:
        from llm2slm_cli import config as C

        stages = {"encode": C.EncodeConfig, "train": C.TrainConfig, "generate": C.GenerateConfig,
                  "distill-labels": C.DistillConfig, "eval": C.EvalConfig, "bench": C.BenchConfig,
                  "export": C.ExportConfig, "convert": C.ConvertConfig}
        count = 0
        for stage, cls in stages.items():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                kind = hints.get(f.name)
                base_kind = next((t for t in (int, float) if kind is t or t in typing.get_args(kind)), None)
                if base_kind is None or kind is bool or f.metadata.get("argument") or f.metadata.get("hidden"):
                    continue
                flag = f.metadata.get("name") or "--" + f.name.replace("_", "-")
                for value in BAD_NUMBERS:
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    args = self.base(stage) + [flag, value, "--out", self.out()]
                    # -1 and 0-like values are legal for some options (--layer -1, --seed-less runs): review them
                    self.record("options", f"{stage} {flag} {value}", args, expect_refusal=True,
                                harmless_if_ran=value not in NEVER_LEGAL and value != "word")

    def damage(self, limit: int | None) -> None:
        artifacts = [("features", self.feats, "train", "feats"), ("labels+logits", self.labels, "train-kd", "labels"),
                     ("checkpoint", self.ckpt / "final", "generate", "ckpt"),
                     ("checkpoint", self.ckpt / "final", "export", "ckpt"),
                     ("predictions", self.pred, "eval", "pred"), ("evaluation", self.evald, "bench", "evald")]
        count = 0
        clean = {}
        for _, directory, consumer, key in artifacts:
            out = self.out()
            self.must(self.base(consumer, **{key: directory}) + ["--out", out])
            clean[consumer] = self.result(consumer, out)
        for name, directory, consumer, key in artifacts:
            for file in sorted(p for p in directory.rglob("*") if p.is_file()):
                rel = file.relative_to(directory)
                modes = ["truncate", "flip", "empty", "delete"] + (["shape"] if file.suffix == ".json" else [])
                for mode in modes:
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    copy = self.root / "damaged" / f"d{count}"
                    shutil.copytree(directory, copy)
                    target = copy / rel
                    data = target.read_bytes()
                    if mode == "truncate":
                        target.write_bytes(data[: len(data) // 2])
                    elif mode == "flip":
                        i = len(data) // 2
                        target.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:] if data else b"x")
                    elif mode == "empty":
                        target.write_bytes(b"")
                    elif mode == "delete":
                        target.unlink()
                    else:  # another JSON shape where a table belongs
                        target.write_text('["not", "a", "table"]')
                    args = self.base(consumer, **{key: copy}) + ["--out", self.out()]
                    self.record("damage", f"{name} {rel} {mode} -> {consumer}", args, expect_refusal=True,
                                harmless_if_ran=rel.name in UNREAD, consumer=consumer, clean=clean[consumer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write every case and its outcome here (JSON)")
    parser.add_argument("--families", default="options,damage")
    parser.add_argument("--limit", type=int, help="at most N cases per family (a quick look)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        probe = Probe(Path(tmp))
        probe.setup()
        for family in args.families.split(","):
            getattr(probe, family)(args.limit)
    counts = Counter((r["family"], r["outcome"]) for r in probe.results)
    families = sorted({f for f, _ in counts})
    outcomes = ["refused", "ran", "traceback", "silent"]
    print("| family | cases | " + " | ".join(outcomes) + " |")
    print("|---|---|" + "---|" * len(outcomes))
    for f in families:
        print(f"| {f} | {sum(v for (g, _), v in counts.items() if g == f)} | " +
              " | ".join(str(counts.get((f, o), 0)) for o in outcomes) + " |")
    bad = [r for r in probe.results if r["outcome"] in ("traceback", "silent")]
    for r in bad:
        print(f"{r['outcome']}: {r['case']} (exit {r['exit']}): {r['message'][:200]}")
    reviewed = [r for r in probe.results if r["outcome"] == "ran" and r["family"] == "options"]
    print(f"\nran (legal values, listed for review): {len(reviewed)}")
    for r in reviewed:
        print(f"  ran: {r['case']}")
    if args.out:
        args.out.write_text(json.dumps(probe.results, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
