"""One typed config per stage: the single source of truth for its options, defaults and help texts.

The CLI is generated from these dataclasses (cli.py), so a stage called from Python takes exactly what the command
line takes. Checks that need no files run in `__post_init__`; a bad value raises UserError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2slm_cli.errors import UserError


def opt(default: Any = None, help: str = "", *, argument: bool = False, choices: list[str] | None = None,
        name: str | None = None, hidden: bool = False) -> Any:
    meta = {"help": help, "argument": argument, "choices": choices, "name": name, "hidden": hidden}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v <= 0:
            raise UserError(f"--{n.replace('_', '-')} must be positive, got {v}")


def _inputs(paths: list[Path]) -> None:
    if not 1 <= len(paths) <= 2:
        raise UserError("give one input file, or two line-aligned text files (prompts then targets)")


@dataclass(kw_only=True)
class ExampleFields:
    """Options shared by every stage that reads examples."""

    template: str | None = opt(None, "Prompt template over the record's fields, e.g. 'translate English to "
                                     "German: {src}'. Without it the prompt is --prompt-field.")
    prompt_field: str = opt("src", "Field holding the prompt (nested fields as a.b).")
    target_field: str = opt("tgt", "Field holding the target.")
    id_field: str = opt("id", "Field holding a unique example id (the record number when absent).")


@dataclass(kw_only=True)
class EncodeConfig(ExampleFields):
    """Run the frozen LLM over the prompts once and store its features (half precision, sharded safetensors)."""

    inputs: list[Path] = opt(REQUIRED, "Examples: JSONL, JSON, Parquet, CSV, TSV, a text file of prompts, or two "
                                       "line-aligned text files.", argument=True)
    model: str = opt(REQUIRED, "The LLM: hub id, local directory, .gguf file, or preset:NAME.")
    out: Path = opt(REQUIRED, "Output directory.")
    layer: str = opt("-1", "Decoder-only LLMs: hidden state after block k (0 = embeddings, -1 = last) or 'all' "
                           "(mean of all layers). Other LLMs give their (encoder's) last layer.")
    llm_dtype: str = opt("float32", "Precision the LLM runs in.", choices=["float32", "bfloat16", "float16"])
    feature_dtype: str = opt("float16", "Precision the features are stored in.", choices=["float16", "bfloat16"])
    max_length: int = opt(512, "Longest prompt in tokens; longer prompts are truncated (and counted).")
    strict: bool = opt(False, "Refuse over-long prompts instead of truncating them.")
    batch_size: int = opt(32, "Prompts per LLM forward pass (length-sorted batches).")
    shard_size: int = opt(4096, "Examples per feature shard (the unit of --resume).")
    tokenizer: Path | None = opt(None, "Tokenizer directory to use instead of the model's own.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    overwrite: bool = opt(False, "Replace an existing output directory.")
    resume: bool = opt(False, "Continue an interrupted run in --out from its last complete shard.")
    quiet: bool = opt(False, "No progress bar.")

    def __post_init__(self) -> None:
        _inputs(self.inputs)
        _positive(self, "max_length", "batch_size", "shard_size")


@dataclass(kw_only=True)
class TrainConfig(ExampleFields):
    """Train the projector and the SLM on prompts (+ LLM features) and targets; or the SLM alone without --llm."""

    inputs: list[Path] = opt(REQUIRED, "Training examples with targets (any format `encode` reads, or the "
                                       "output directory of distill-labels).", argument=True)
    slm: str = opt(REQUIRED, "The SLM: hub id, local directory, .gguf file, or preset:NAME.")
    out: Path = opt(REQUIRED, "Output directory: step-NNNNNN/ and final/ checkpoints, train_log.jsonl.")
    llm: str | None = opt(None, "The frozen LLM. Without it the SLM is trained alone (the baseline).")
    features: Path | None = opt(None, "Features of the training prompts from `encode` (else the LLM encodes "
                                      "each batch on the fly).")
    dev: list[Path] = opt([], "Dev examples for the dev loss (one file, or give twice for line-aligned pairs).")
    dev_features: Path | None = opt(None, "Features of the dev prompts from `encode`.")
    layer: str = opt("-1", "Decoder-only LLMs: layer k or 'all' (see encode); taken from --features if given.")
    llm_dtype: str = opt("float32", "Precision the LLM runs in.", choices=["float32", "bfloat16", "float16"])
    tokenizer: Path | None = opt(None, "Tokenizer directory for the LLM (the prompt tokenizer).")
    fusion: str = opt("add", "add: LLM features + SLM prompt embeddings; replace: the features alone.",
                      choices=["add", "replace"])
    tokenizer_mode: str = opt("llm", "llm: the SLM reads and writes the LLM's tokens (adds an embedding "
                                     "projection and head if the vocabularies differ); slm: its own tokens "
                                     "(needs --fusion replace).", choices=["llm", "slm"])
    slm_tokenizer: Path | None = opt(None, "Tokenizer directory for the SLM.")
    freeze_slm: bool = opt(False, "Train only the projector (and vocabulary adapter); the SLM stays frozen.")
    max_length: int = opt(512, "Longest prompt in tokens (prompts are truncated).")
    max_target_length: int = opt(256, "Longest target in tokens (targets are truncated).")
    lr: float = opt(1e-3, "Peak learning rate (paper: 1e-3).")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (paper: 0.1).")
    warmup_ratio: float = opt(0.1, "Share of steps with linear warm-up; cosine decay to 0 after (paper: 0.1).")
    batch_size: int = opt(128, "Effective batch in examples per optimizer step (paper: 128).")
    micro_batch_size: int = opt(16, "Examples per forward pass; gradients accumulate to --batch-size.")
    epochs: int = opt(1, "Passes over the training data.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).")
    max_grad_norm: float | None = opt(1.0, "Clip gradients to this norm (none: no clipping).")
    eval_every: int | None = opt(None, "Dev loss every N steps (and always at the end, if --dev is given).")
    save_every: int | None = opt(None, "Checkpoint step-NNNNNN/ every N steps (final/ is always written).")
    log_every: int = opt(10, "Print the training loss every N steps (every step goes to train_log.jsonl).")
    seed: int = opt(0, "Seed for data order, initialisation and dropout.")
    mixed_precision: str = opt("no", "Mixed precision on GPUs.", choices=["no", "bf16", "fp16"])
    device: str = opt("auto", "auto, cpu, cuda. Several GPUs: accelerate launch -m llm2slm_cli train ...")
    overwrite: bool = opt(False, "Replace an existing output directory.")
    resume: bool = opt(False, "Continue from the last checkpoint in --out (same result as an uninterrupted run).")
    quiet: bool = opt(False, "No progress bar.")
    stop_after: int | None = opt(None, "Stop after step N as on Ctrl-C (checkpoint, then exit): for testing "
                                       "--resume.", hidden=True)

    def __post_init__(self) -> None:
        _inputs(self.inputs)
        if self.dev and len(self.dev) > 2:
            raise UserError("--dev takes one file, or two line-aligned files")
        _positive(self, "max_length", "max_target_length", "lr", "batch_size", "micro_batch_size", "epochs",
                  "max_steps", "eval_every", "save_every", "log_every")
        if self.batch_size % self.micro_batch_size:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                            f"{self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.llm is None:
            for name in ("features", "dev_features"):
                if getattr(self, name) is not None:
                    raise UserError(f"--{name.replace('_', '-')} needs --llm (features come from an LLM)")
            if self.freeze_slm:
                raise UserError("--freeze-slm without --llm would train nothing")
        if self.dev_features is not None and not self.dev:
            raise UserError("--dev-features needs --dev (the dev examples with their targets)")


@dataclass(kw_only=True)
class GenerateConfig(ExampleFields):
    """Generate responses with a trained checkpoint, or with a plain LLM or SLM as a baseline."""

    inputs: list[Path] = opt(REQUIRED, "Examples to answer (any format `encode` reads).", argument=True)
    model: str = opt(REQUIRED, "A checkpoint directory from `train` (final/ or step-NNNNNN/), or a plain model "
                               "(hub id, directory, .gguf, preset:NAME).")
    out: Path = opt(REQUIRED, "Output directory: predictions.parquet + manifest.json.")
    llm: str | None = opt(None, "Load the checkpoint's LLM from here instead of the name it records (its "
                                "fingerprint must match).")
    num_beams: int = opt(4, "Beam width (paper: 4); 1 is greedy.")
    length_penalty: float = opt(0.6, "Beam length penalty (paper: 0.6).")
    sample: bool = opt(False, "Nucleus sampling instead of beam search (paper, for instructions).")
    top_p: float = opt(0.9, "Nucleus mass when sampling.")
    temperature: float = opt(1.0, "Softmax temperature when sampling.")
    max_new_tokens: int = opt(128, "Longest response in tokens.")
    max_length: int | None = opt(None, "Longest prompt in tokens (default: the checkpoint's, or 512).")
    batch_size: int = opt(16, "Prompts per batch (length-sorted).")
    tokenizer: Path | None = opt(None, "Tokenizer directory for a plain model.")
    dtype: str = opt("float32", "Precision of a plain model.", choices=["float32", "bfloat16", "float16"])
    seed: int = opt(0, "Seed for sampling.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    overwrite: bool = opt(False, "Replace an existing output directory.")
    quiet: bool = opt(False, "No progress bar.")

    def __post_init__(self) -> None:
        _inputs(self.inputs)
        _positive(self, "num_beams", "max_new_tokens", "batch_size", "max_length", "temperature")
        if self.sample and self.num_beams not in (1, 4):
            raise UserError("--sample draws one response per prompt: leave --num-beams out")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")


@dataclass(kw_only=True)
class DistillConfig(ExampleFields):
    """(Not yet available.) Generate training targets with the LLM (sequence-level distillation)."""

    inputs: list[Path] = opt(REQUIRED, "Examples.", argument=True)
    model: str = opt(REQUIRED, "The LLM.")
    out: Path = opt(REQUIRED, "Output directory.")


@dataclass(kw_only=True)
class EvalConfig:
    """(Not yet available.) Score predictions against references: BLEU, chrF, ROUGE."""

    predictions: Path = opt(REQUIRED, "Output directory of `generate`.", argument=True)
    out: Path = opt(REQUIRED, "Output directory.")


@dataclass(kw_only=True)
class BenchConfig:
    """(Not yet available.) Measure ms per generated token of the LLM, the SLM and LLM-to-SLM."""

    out: Path = opt(REQUIRED, "Output directory.")
