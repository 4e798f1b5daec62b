"""`llm2slm train`: fine-tune the projector and the SLM (paper: AdamW, wd 0.1, lr 1e-3, 10% warm-up then cosine to 0,
effective batch 128 by gradient accumulation, cross-entropy on target tokens).

The loop runs through accelerate's Accelerator, so `accelerate launch -m llm2slm_cli train ...` trains data-parallel
unchanged. The global batch is fixed by --batch-size whatever the number of processes, and each micro-batch's loss
is scaled by the global batch's target-token count, so the update is the same token-mean gradient for any
--micro-batch-size or process count. Checkpoints keep the optimizer, scheduler and RNG states beside the weights;
the data order is a function of (seed, epoch), so --resume continues exactly where an interrupted run stopped.

`run` is the table of contents: check_inputs -> load_llm (where the LLM is loaded) -> build_model -> load_splits ->
adapt_model -> prepare_output (the first write) -> start_training (optimiser, schedule, resume) -> train_loop, whose
steps take their examples from step_batches (where batches come from) and run train_step -> finish.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import loading as M
from llm2slm_cli import runtime
from llm2slm_cli.batching import TrainLoader, TrainPlan, to_device
from llm2slm_cli.config import TrainConfig
from llm2slm_cli.corpus import Examples, Tokens, input_sha256, open_examples, open_tokens
from llm2slm_cli.data import Fields, length_sorted_batches, pad
from llm2slm_cli.errors import Interrupted, UserError
from llm2slm_cli.features import FeatureStore
from llm2slm_cli.fingerprints import tokenizer_fingerprint
from llm2slm_cli.loading import short_error
from llm2slm_cli.peft_baselines import peft_spec
from llm2slm_cli.streaming import ExampleStream, StreamLoader, StreamStep, tokenizer_for
from llm2slm_cli.surgery import set_dropout
from llm2slm_cli.teacher import TeacherLogits


class Split:
    """Tokenized examples of one split, memory-mapped (corpus.Tokens), and where their LLM features are."""

    def __init__(self, tokens: Tokens, store: Any | None) -> None:
        self.tokens, self.store = tokens, store
        self.prompt_lengths, self.target_lengths = tokens.prompt_lengths, tokens.target_lengths
        self.teacher: Any | None = None  # teacher.TeacherLogits, for logit distillation

    def __len__(self) -> int:
        return len(self.tokens)

    def ids(self, indices) -> list[str]:
        return self.tokens.examples.ids(indices)

    def batch(self, indices: list[int], prompt_pad: int, target_pad: int, dtype) -> dict[str, Any]:
        ids = self.ids(indices) if self.store is not None or self.teacher is not None else None
        return batch_tensors(self.tokens.rows("prompt_ids", indices), self.tokens.rows("target_ids", indices), ids,
                             self.store, self.teacher, prompt_pad, target_pad, dtype)

    def first_prompts(self, n: int) -> tuple[list[str], list]:
        """The ids and prompt token ids of the first `n` examples, in the input's order."""
        indices = range(min(n, len(self)))
        return self.ids(indices), self.tokens.rows("prompt_ids", indices)


class StreamedSplit:
    """--streaming: the training examples as streaming.ExampleStream reads them, tokenized a batch at a time, and
    where their LLM features are (each prompt checked against its stored features as its batch is made)."""

    teacher = None  # --kd-weight is refused with --streaming

    def __init__(self, config: TrainConfig, fields: Fields, model, max_length: int, store: Any | None) -> None:
        self.config, self.fields, self.store = config, fields, store
        self.tokenize = tokenizer_for(model.prompt_tokenizer, model.target_tokenizer, max_length,
                                      config.max_target_length)

    def stream(self, state: dict[str, Any] | None = None) -> ExampleStream:
        return ExampleStream(self.config.inputs, self.fields, seed=self.config.seed,
                             buffer_size=self.config.shuffle_buffer, state=state)

    def first_prompts(self, n: int) -> tuple[list[str], list]:
        examples = self.stream().head(n)
        return [e.id for e in examples], self.tokenize(examples)[0]

    def batch(self, ids: list[str], prompt_rows: list, target_rows: list, prompt_pad: int, target_pad: int,
              dtype) -> dict[str, Any]:
        if self.store is not None:
            for ex_id, row in zip(ids, prompt_rows):
                self.store.check_prompt(ex_id, row, "training")
        return batch_tensors(prompt_rows, target_rows, ids, self.store, None, prompt_pad, target_pad, dtype)


def batch_tensors(prompt_rows: list, target_rows: list, ids: list[str] | None, store: Any | None,
                  teacher: Any | None, prompt_pad: int, target_pad: int, dtype) -> dict[str, Any]:
    """A micro-batch's tensors: prompts and targets padded (with their masks), the stored features of each prompt
    (`ids`) and the teacher's top-k rows, where the run has them."""
    import torch

    prompt_ids, prompt_mask = pad(prompt_rows, prompt_pad)
    target_ids, target_mask = pad(target_rows, target_pad)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "target_ids": target_ids,
             "target_mask": target_mask}
    if store is not None:
        rows = [store.features(i) for i in ids]
        feats = torch.zeros(len(rows), prompt_ids.shape[1], rows[0].shape[1], dtype=dtype)
        for j, r in enumerate(rows):
            feats[j, : r.shape[0]] = r.to(dtype)
        batch["features"] = feats
    if teacher is not None:  # (batch, target length, K); id -1 where a row is padding
        rows = [teacher.rows(i) for i in ids]
        k = teacher.top_k
        top_ids = torch.full((len(rows), target_ids.shape[1], k), -1, dtype=torch.long)
        logprobs = torch.zeros(len(rows), target_ids.shape[1], k, dtype=torch.float32)
        for j, (top, values, _) in enumerate(rows):
            top_ids[j, : len(top)] = torch.from_numpy(top).long()
            logprobs[j, : len(values)] = torch.from_numpy(values).float()
        batch["teacher_ids"], batch["teacher_logprobs"] = top_ids, logprobs
    return batch


def _set_feature_statistics(model, train: Split | StreamedSplit, device, examples: int = 512) -> None:
    """--feature-norm standardize: the projector's fixed per-channel mean and standard deviation, over every prompt
    token of the first `examples` training examples (their stored features, or the LLM's own on the fly)."""
    import torch

    ids, prompts = train.first_prompts(examples)
    rows = []
    for start in range(0, len(ids), 16):
        if train.store is not None:
            rows += [train.store.features(i).float() for i in ids[start: start + 16]]
        else:
            tokens, mask = pad(prompts[start: start + 16], model.prompt_tokenizer.pad_token_id)
            feats = model.llm.encode(tokens.to(device), mask.to(device)).float().cpu()
            rows += [f[m.bool()] for f, m in zip(feats, mask)]
    model.projector.set_feature_statistics(torch.cat(rows))


def _load_split(examples: Examples, config: TrainConfig, store: Any | None, model, max_length: int, what: str,
                quiet: bool) -> Split:
    """A split's tokens (corpus.py: tokenized once, then from the cache), each prompt checked against its stored
    features."""
    tokens = open_tokens(examples, model.prompt_tokenizer, model.target_tokenizer, max_length=max_length,
                         max_target_length=config.max_target_length, num_proc=config.num_proc, quiet=quiet)
    if store is not None:
        store.check_prompts(tokens, examples, what)
    return Split(tokens, store)


def _fields(config: TrainConfig, template: str | None) -> Fields:
    return Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field, template=template)


def _read(inputs: list[Path], config: TrainConfig, template: str | None, input_sha: str | None) -> Examples:
    """A split's examples, read and checked once (corpus.py: then from the cache)."""
    return open_examples(inputs, _fields(config, template), require_target=True, cache=config.data_cache,
                         input_sha=input_sha)


def _features(path: Path | None, llm, what: str):
    if path is None:
        return None
    from llm2slm_cli.checkpoint import check_llm  # imports torch: off the import of this module

    store = FeatureStore(path)
    check_llm(llm, store.llm, f"{what} features {path}")
    return store


def latest_checkpoint(out: Path) -> Path | None:
    """The step checkpoint with the highest step (a directory step-NNNNNN/ only appears complete: it is written
    under a temporary name and renamed). One with a file missing is still the latest: --resume refuses it (naming
    the file) rather than going back to an earlier one unasked."""
    steps = [p for p in out.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return max(steps, key=lambda p: int(p.name.removeprefix("step-"))) if steps else None


# Options a resumed run may change: they change neither the weights nor the loss log. Every other option must be the
# interrupted run's, --max-steps and --epochs included (the run's length fixes the learning-rate schedule).
RESUME_FREE = ("resume", "overwrite", "quiet", "stop_after", "device", "log_every", "save_every", "out",
               "count_parameters", "json", "num_workers", "num_proc", "data_cache")
# Options naming inputs: compared by their contents' sha256, so a moved file or directory still resumes.
INPUT_OPTIONS = {"inputs": "training input", "dev": "dev input", "features": "training features (--features)",
                 "dev_features": "dev features (--dev-features)", "kd_logits": "teacher logits (--kd-logits)",
                 "init_from": "starting checkpoint (--init-from)"}


def run_identity(config: TrainConfig, input_sha: dict[str, str | None] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one, as JSON: its options (less RESUME_FREE) and the
    sha256 of its inputs (features and teacher logits: of their manifests). Recorded in every step checkpoint's
    trainer_state.json."""
    options = {k: v for k, v in A.config_to_dict(config).items() if k not in RESUME_FREE and k not in INPUT_OPTIONS}

    def manifest_sha(path: Path | None) -> str | None:
        return (A.sha256_file(Path(path) / A.MANIFEST) if path is not None and (Path(path) / A.MANIFEST).is_file()
            else None)

    input_sha = input_sha or {"inputs": A.input_sha256(config.inputs),
                              "dev": A.input_sha256(config.dev) if config.dev else None}
    inputs = {"inputs": input_sha["inputs"], "dev": input_sha["dev"],
              "features": manifest_sha(config.features), "dev_features": manifest_sha(config.dev_features),
              "kd_logits": manifest_sha(config.kd_logits), "init_from": manifest_sha(config.init_from)}
    return json.loads(json.dumps({"options": options, "inputs": inputs}, default=str))


def check_resume(checkpoint: Path, identity: dict[str, Any], total_steps: int | None = None) -> None:
    """Refuse to resume `checkpoint` with other options or inputs than the run that wrote it (one line naming
    them), or with fewer steps than it has done. Checkpoints of older versions record no identity in
    trainer_state.json: their manifest's configuration is compared (the options; their inputs cannot be)."""
    state = A.read_json_table(checkpoint / A.TRAINER_STATE, "trainer state")
    recorded = state.get("run")
    if isinstance(recorded, dict):
        before, now = recorded.get("options") or {}, identity["options"]
        changed_inputs = [INPUT_OPTIONS[k] for k, v in identity["inputs"].items()
                          if (recorded.get("inputs") or {}).get(k) != v]
    else:
        manifest = A.read_manifest(checkpoint, A.KIND_CHECKPOINT) if (checkpoint / A.MANIFEST).is_file() else {}
        before = {k: v for k, v in (manifest.get("config") or {}).items()
                  if k not in RESUME_FREE and k not in INPUT_OPTIONS}
        now, changed_inputs = identity["options"], []
    # an option this tool gained after the interrupted run started reads as its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k, defaults.get(k)) != now.get(k)]
    if changed or changed_inputs:
        what = [f"--{k.replace('_', '-')} {_shown(now.get(k))} (the interrupted run's: {_shown(before.get(k))})"
                for k in changed[:3]] + [f"the {name}'s sha256" for name in changed_inputs]
        more = f" and {len(changed) - 3} more options" if len(changed) > 3 else ""
        raise UserError(f"cannot resume {checkpoint.name}: this command differs from the interrupted run in "
                        f"{', '.join(what)}{more}; give the same options and inputs, or --overwrite to start over",
                        path=checkpoint.parent)
    step = state.get("step")
    if total_steps is not None and isinstance(step, int) and step >= total_steps:
        raise UserError(f"cannot resume {checkpoint.name}: it is at step {step}, and this run has {total_steps} "
                        "steps (a smaller --max-steps or --epochs?)", path=checkpoint.parent)


def _shown(value: Any) -> str:
    return "(unset)" if value is None or value == [] else str(value)


def run(config: TrainConfig) -> Path:
    """Train, read top to bottom: check every input, load the LLM, build the model, tokenize the splits, only then
    touch --out, set up the optimiser, run the steps, save `final/` and the manifest."""
    _refuse_float16(config)  # before accelerate's state exists, so it holds in any process
    accelerator = _accelerator(config)
    quiet = config.quiet or not accelerator.is_main_process
    out = Path(config.out)
    if not config.count_parameters:
        A.check_out_not_input(out, config)  # --out is none of the inputs, nor holds or lies inside one
    inputs = check_inputs(config, out)  # inputs and their manifests: checked before anything is written or loaded
    llm = load_llm(config, inputs, accelerator.device)
    stores = open_feature_stores(config, llm)
    model = build_model(config, llm, inputs)
    if config.count_parameters:
        if accelerator.is_main_process:
            _print_counts(config, model, llm)
        return out
    train, dev = load_splits(config, inputs, model, stores, quiet)
    adapt_model(config, model, train, accelerator.device, quiet)
    attach_teacher(inputs.teacher, train, model)
    resume_from = prepare_output(config, out, accelerator, quiet)  # every input is read and checked: only now
    state = start_training(config, inputs, model, train, dev, out, accelerator, resume_from, quiet)
    return train_loop(state)


def _refuse_float16(config: TrainConfig) -> None:
    """float16 overflows T5-family models: refused from the SLM's and the LLM's configs, whether asked here or by
    the launcher."""
    if (config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16":
        for role, spec in (("SLM", config.slm), ("LLM", config.llm)):
            if spec is not None:
                M.refuse_float16(M.load_config(spec).model_type, "float16", f"{role} {spec!r}",
                                 "use --mixed-precision bf16 or no")


def default_mixed_precision(config: TrainConfig) -> str | None:
    """--mixed-precision as given; else accelerate's (what `accelerate launch` or its config set: left to it); else
    bf16 on a CUDA GPU that supports it (float32 master weights, as accelerate's autocast keeps them); else none."""
    import torch

    if config.mixed_precision is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return config.mixed_precision
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def _accelerator(config: TrainConfig):
    """accelerate's Accelerator on the asked device (one process, or each of `accelerate launch`'s); on a GPU,
    TF32 matmuls and bf16 autocast by default (default_mixed_precision)."""
    import torch
    from accelerate import Accelerator

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if not cpu:
        runtime.fast_cuda_math()
    config.mixed_precision = default_mixed_precision(config)  # recorded as run: the manifest names the precision
    return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)


@dataclass
class Inputs:
    """What check_inputs read: the features' manifest, the template in force, the examples, the teacher's
    distributions and the run's identity (None for --count-parameters, which reads no examples)."""

    store_manifest: dict[str, Any] | None
    template: str | None
    train_examples: Examples | None
    dev_examples: Examples | None
    teacher: Any | None
    identity: dict[str, Any] | None
    max_length: int  # stored features fix the prompt length they were encoded with


def check_inputs(config: TrainConfig, out: Path) -> Inputs:
    """Read and check the features' manifests, the template, the examples and the teacher; with --resume, refuse a
    checkpoint of another run (check_resume). Nothing is loaded or written yet."""
    store_manifest = A.read_manifest(config.features, A.KIND_FEATURES) if config.features is not None else None
    if config.dev_features is not None:
        A.read_manifest(config.dev_features, A.KIND_FEATURES)
    template = config.template
    if store_manifest is not None:
        if template is not None and template != store_manifest["template"]:
            raise UserError(f"--template {template!r} differs from the one the features were encoded with "
                            f"({store_manifest['template']!r})")
        template = store_manifest["template"]
    max_length = store_manifest["max_length"] if store_manifest else config.max_length
    if config.count_parameters:
        return Inputs(store_manifest, template, None, None, None, None, max_length)
    input_sha = {"inputs": input_sha256(config.inputs, config.data_cache),
                 "dev": input_sha256(config.dev, config.data_cache) if config.dev else None}
    if config.streaming:  # read as the steps need it; its first examples now, so a bad input fails before a write
        train_examples = None
        ExampleStream(config.inputs, _fields(config, template), seed=config.seed, buffer_size=1).head(1)
    else:
        train_examples = _read(config.inputs, config, template, input_sha["inputs"])
    dev_examples = _read(config.dev, config, template, input_sha["dev"]) if config.dev else None
    teacher = _teacher(config) if config.kd_weight else None
    identity = run_identity(config, input_sha)
    earlier = latest_checkpoint(out) if config.resume else None
    if earlier is not None:  # what --resume would continue must be this very run: checked before any loading
        A.verify_step_checkpoint(earlier)  # every file of it against its sha256, trainer_state.json's shape
        check_resume(earlier, identity, config.max_steps or
                     math.ceil(len(train_examples) / config.batch_size) * config.epochs)
    return Inputs(store_manifest, template, train_examples, dev_examples, teacher, identity, max_length)


def load_llm(config: TrainConfig, inputs: Inputs, device: Any):
    """The frozen LLM (None without --llm): on the training device when it encodes on the fly (a T5 LLM's encoder
    alone); with stored features nothing is loaded (its identity is checked from the weight files' sha256, and the
    LLM loads only if it must encode, e.g. dev examples without --dev-features). Stored decoder-only features fix the
    layer."""
    if config.llm is None:
        return None
    from llm2slm_cli.llm2slm import FrozenLLM  # imports torch: off the import of this module

    layer = config.layer
    if config.init_from is not None and str(layer) == "-1":  # the default: the starting checkpoint's layer
        from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

        if (Path(config.init_from) / A.MODEL_CONFIG).is_file():
            layer = str((read_model_config(Path(config.init_from)).llm or {}).get("layer", layer))
    manifest = inputs.store_manifest
    if manifest is not None and manifest["llm"]["kind"] == "decoder-only":
        layer = str(manifest["llm"]["layer"])
    on_the_fly = config.features is None
    try:
        return FrozenLLM(config.llm, layer=layer, dtype=config.llm_dtype, tokenizer=config.tokenizer,
                         device=device if on_the_fly else "cpu", weights="encoder" if on_the_fly else "lazy")
    except UserError as e:
        if layer == config.layer or "layer" not in e.message:
            raise
        # the layer was not given: it is --init-from's; the LLM given is not the one that checkpoint was trained with
        raise UserError(f"--llm {config.llm}: the --init-from checkpoint reads its LLM at layer {layer}, which this "
                        f"LLM cannot give ({e.message}); give the checkpoint's LLM", path=config.init_from) from None


def open_feature_stores(config: TrainConfig, llm) -> tuple[Any | None, Any | None]:
    """The training and dev feature stores (--features, --dev-features), each checked against the LLM."""
    return _features(config.features, llm, "training"), _features(config.dev_features, llm, "dev")


def build_model(config: TrainConfig, llm, inputs: Inputs):
    """The LLM-to-SLM model (or the SLM alone; or --init-from's checkpoint), seeded, with --freeze-slm applied."""
    from accelerate.utils import set_seed

    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    set_seed(config.seed)
    if config.init_from is not None:
        model = _init_from(config, llm, inputs)
    else:
        model = LLMToSLM.build(config.slm, llm, fusion=config.fusion, tokenizer=config.tokenizer_mode,
                               slm_tokenizer=config.slm_tokenizer, template=inputs.template,
                               max_prompt_length=inputs.max_length, slm_layers=config.slm_layers,
                               peft=_peft_spec(config), feature_norm=config.feature_norm)
    if config.dropout is not None:
        set_dropout(model.slm, config.dropout)
    if config.freeze_slm:
        model.slm.requires_grad_(False)
        if model.config.vocab_adapter:  # new layers are trained from scratch even with a frozen SLM
            model.slm.get_input_embeddings().requires_grad_(True)
            model.slm.get_output_embeddings().requires_grad_(True)
    return model


def _init_from(config: TrainConfig, llm, inputs: Inputs):
    """--init-from: the checkpoint's model (verified, its LLM checked against this run's), in training mode; every
    option this command gives that the checkpoint fixes must agree with it."""
    from llm2slm_cli import checkpoint  # imports torch: off the import of this module
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    path = Path(config.init_from)
    if not (path / A.MODEL_CONFIG).is_file():
        raise UserError("--init-from must be a checkpoint directory of `train` (final/ or step-N/) or `export`",
                        path=path)
    ck = read_model_config(path)
    if ck.peft is not None:
        raise UserError("--init-from cannot continue a PEFT baseline (its adapters are peft's): train it anew",
                        path=path)
    if (ck.llm is None) != (config.llm is None):
        raise UserError("the checkpoint was trained " + ("without an LLM: leave out --llm" if ck.llm is None else
                        f"with the LLM {ck.llm['name']!r}: give --llm"), path=path)
    differ = [(what, mine, theirs) for what, mine, theirs in (
        ("--slm", config.slm, ck.slm), ("--fusion", config.fusion, ck.fusion),
        ("--tokenizer-mode", config.tokenizer_mode, ck.tokenizer), ("the template", inputs.template, ck.template),
        ("--max-length", inputs.max_length, ck.max_prompt_length)) if mine != theirs]
    if differ:
        what, mine, theirs = differ[0]
        raise UserError(f"{what} {mine!r} differs from the checkpoint's {theirs!r} (--init-from fixes the model)",
                        path=path)
    model = checkpoint.load(path, llm=llm)  # verified against its manifest; the LLM's fingerprint checked
    return model.train()


def load_splits(config: TrainConfig, inputs: Inputs, model, stores: tuple[Any | None, Any | None],
                quiet: bool = False) -> tuple[Split | StreamedSplit, Split | None]:
    """The tokenized training and dev splits (each prompt checked against its stored features); with --streaming,
    the training split as a stream."""
    if config.streaming:
        train = StreamedSplit(config, _fields(config, inputs.template), model, inputs.max_length, stores[0])
    else:
        train = _load_split(inputs.train_examples, config, stores[0], model, inputs.max_length, "training", quiet)
    dev = (_load_split(inputs.dev_examples, config, stores[1], model, inputs.max_length, "dev", quiet) if config.dev
        else None)
    return train, dev


def adapt_model(config: TrainConfig, model, train: Split, device: Any, quiet: bool) -> None:
    """What the model takes from the training data before step 1: --trim-vocab, --feature-norm statistics and
    --projector-init zero."""
    import torch

    if config.trim_vocab:
        _trim_vocabulary(model, train, quiet)
    if config.feature_norm == "standardize":
        _set_feature_statistics(model, train, device)
    if config.projector_init == "zero" and model.has_llm:  # fusion starts as the plain SLM
        torch.nn.init.zeros_(model.projector[-1].weight)
        torch.nn.init.zeros_(model.projector[-1].bias)


def attach_teacher(teacher, train: Split, model) -> None:
    """--kd-weight: check the teacher's rows against the training targets, then serve them with its batches."""
    if teacher is None:
        return
    pairs = ((ex_id, ids) for indices, rows in train.tokens.chunks("target_ids")
             for ex_id, ids in zip(train.ids(indices), rows))
    teacher.check(pairs, tokenizer_fingerprint(model.target_tokenizer), "training")
    train.teacher = teacher


def prepare_output(config: TrainConfig, out: Path, accelerator, quiet: bool) -> Path | None:
    """Create (or, with --overwrite, replace) --out; with --resume, the checkpoint to continue from."""
    if accelerator.is_main_process:
        A.prepare_output_dir(out, overwrite=config.overwrite, resume=config.resume)
    accelerator.wait_for_everyone()
    resume_from = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None and accelerator.is_main_process:
        runtime.say(f"no checkpoint in {out} yet: starting from the beginning", quiet)
    return resume_from


def make_optimizer(config: TrainConfig, model, total_steps: int):
    """AdamW (weight decay on matrices only) and linear warm-up then cosine decay to 0 (paper defaults)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(total_steps * config.warmup_ratio), total_steps)
    return params, optimizer, scheduler


@dataclass
class Training:
    """A run in progress: the prepared model and optimiser, the data, where it is, what it has logged."""

    config: TrainConfig
    accelerator: Any
    model: Any  # as accelerate prepared it (DDP-wrapped with several processes)
    core: Any  # the LLMToSLM inside
    params: list[Any]
    optimizer: Any
    scheduler: Any
    train: Split | StreamedSplit
    dev: Split | None
    out: Path
    quiet: bool
    identity: dict[str, Any]
    teacher: Any | None
    counts: dict[str, Any]
    steps_per_epoch: int | None  # None with --streaming
    total_steps: int
    start_step: int
    prompt_pad: int
    target_pad: int
    feature_dtype: Any
    last: dict[str, float | None] = field(default_factory=lambda: {"loss": None, "dev_loss": None})
    seen_examples: int = 0
    loader: Any = None  # batching.TrainLoader (streaming.StreamLoader): the training micro-batches, prepared ahead
    resume_from: Path | None = None  # the checkpoint this run continues
    stream_state: dict[str, Any] | None = None  # --streaming: the stream's position after the last step trained

    @property
    def log_path(self) -> Path:
        return self.out / A.TRAIN_LOG

    def batch(self, split: Split, indices: list[int]) -> dict[str, Any]:
        """Where a micro-batch's tensors come from: the split's rows `indices`, padded, on the training device."""
        batch = split.batch(indices, self.prompt_pad, self.target_pad, self.feature_dtype)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def train_batch(self, indices: list[int]) -> dict[str, Any]:
        """The next training micro-batch from the loader (which follows the same plan as `step_batches`), on the
        training device, features cast there."""
        got, batch = self.loader.next_batch()
        if got != indices:
            raise RuntimeError(f"the data loader is out of step: examples {got[:4]} for {indices[:4]}")
        started = time.perf_counter()  # the copy and the features' cast count as waiting for data too
        batch = to_device(batch, self.accelerator.device, self.feature_dtype, non_blocking=self.loader.pinned)
        self.loader.waited += time.perf_counter() - started
        return batch

    def checkpoint(self, name: str, step: int, training_state: bool) -> None:
        state = {"total_steps": self.total_steps, "seed": self.config.seed, "batch_size": self.config.batch_size,
                 "run": self.identity,  # what a --resume of a step checkpoint must share with this run
                 "step": step, **self.last}
        _save(self.out, name, step, self.core, self.optimizer, self.scheduler, self.accelerator, self.config,
              self.counts, training_state, state, stream=self.stream_state)

    def dev_loss(self) -> float:
        return _dev_loss(self.model, self.dev, self.accelerator, self.config, self.prompt_pad, self.target_pad,
                         self.feature_dtype)


def start_training(config: TrainConfig, inputs: Inputs, model, train: Split, dev: Split | None, out: Path,
                   accelerator, resume_from: Path | None, quiet: bool) -> Training:
    """The optimiser and schedule for the run's length, the model and optimiser prepared by accelerate, the state of
    `resume_from` restored (its log truncated to its step), and the run announced."""
    import torch

    from llm2slm_cli.llm2slm import parameter_counts  # imports torch: off the import of this module

    n = None if isinstance(train, StreamedSplit) else len(train)  # a stream's length is not known
    steps_per_epoch = None if n is None else math.ceil(n / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    params, optimizer, scheduler = make_optimizer(config, model, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    start_step = 0
    if resume_from is not None:
        start_step = _restore(resume_from, core, optimizer, scheduler, accelerator)
        runtime.say(f"resuming from {resume_from} (step {start_step} of {total_steps})", quiet)
    if accelerator.is_main_process:
        _truncate_log(out / A.TRAIN_LOG, start_step)
    counts = {**parameter_counts(core), "train_examples": n, "dev_examples": len(dev) if dev else 0,
              "steps": total_steps, "steps_per_epoch": steps_per_epoch}
    runtime.say(f"training {config.slm}" + (f" with LLM {config.llm}" if config.llm else " alone") +
                (f" (--peft {config.peft})" if config.peft else "") +
                f": {counts['trainable_parameters']:,} trainable parameters, "
                + ("examples streamed" if n is None else f"{n} examples") + f", {total_steps} steps "
                f"of {config.batch_size}", quiet)
    return Training(config, accelerator, model, core, params, optimizer, scheduler, train, dev, out, quiet,
                    inputs.identity, inputs.teacher, counts, steps_per_epoch, total_steps, start_step,
                    prompt_pad=core.prompt_tokenizer.pad_token_id, target_pad=core.config.pad_token_id,
                    feature_dtype=next(core.projector.parameters()).dtype if core.has_llm else torch.float32,
                    resume_from=resume_from if start_step else None)


@dataclass
class StepBatch:
    """One optimizer step's examples: the global batch, this process's micro-batches, and the weight of each
    micro-batch's summed loss (processes / the global batch's target tokens; 0 for a filler batch)."""

    epoch: int
    examples: list[int]
    tokens: int
    micro: list[list[int]]
    weight: float


def train_plan(train: Split, config: TrainConfig, rank: int, world: int):
    """The run's order (batching.TrainPlan): a permutation drawn from (seed, epoch) alone (regrouped by length with
    --bucket-by-length), so a resumed run sees the same batches; each process takes every world-th example of the
    global batch, sorted by length into micro-batches."""
    return TrainPlan(len(train), seed=config.seed, batch_size=config.batch_size,
                     micro_batch_size=config.micro_batch_size, prompt_lengths=train.prompt_lengths,
                     target_lengths=train.target_lengths, rank=rank, world=world,
                     bucket_by_length=config.bucket_by_length)


def step_batches(plan, start_step: int, total_steps: int):
    """Where batches come from: (step, StepBatch) for each step from `start_step`, as `plan` (train_plan) orders
    them."""
    for step in range(start_step, total_steps):
        p = plan(step)
        yield step, StepBatch(p.epoch, p.global_batch, p.global_tokens, p.micro, p.weight)


def open_loader(t: Training, plan):
    """The DataLoader of the training micro-batches from the start step on (--num-workers background processes;
    pinned memory on CUDA); stored features stay half precision until the device."""
    import functools

    import torch

    dtype = t.train.store.dtype if t.train.store is not None else torch.float32
    if t.train.store is not None and t.config.num_workers:
        t.train.store.open_all()  # checked once here; forked workers share the open files
    make = functools.partial(_indexed_batch, t.train, prompt_pad=t.prompt_pad, target_pad=t.target_pad, dtype=dtype)
    return TrainLoader(plan, t.start_step, t.total_steps, make, num_workers=t.config.num_workers,
                       pin_memory=t.accelerator.device.type == "cuda")


def open_stream_loader(t: Training):
    """--streaming: the micro-batches from the stream, from its start or from the position the resumed checkpoint
    stored."""
    import functools

    import torch

    state = None
    if t.resume_from is not None:
        path = t.resume_from / A.STREAM_STATE
        if not path.is_file():
            raise UserError(f"no {A.STREAM_STATE} in this checkpoint: it was not written with --streaming",
                            path=t.resume_from)
        state = A.read_json_table(path, "stream state")
    dtype = t.train.store.dtype if t.train.store is not None else torch.float32
    make = functools.partial(t.train.batch, prompt_pad=t.prompt_pad, target_pad=t.target_pad, dtype=dtype)
    return StreamLoader(t.train.stream(state), start=t.start_step, stop=t.total_steps,
                        batch_size=t.config.batch_size, micro_batch_size=t.config.micro_batch_size,
                        tokenize=t.train.tokenize, make=make, rank=t.accelerator.process_index,
                        world=t.accelerator.num_processes, pin_memory=t.accelerator.device.type == "cuda")


def _indexed_batch(split: Split, indices: list[int], **kw: Any) -> tuple[list[int], dict[str, Any]]:
    return list(indices), split.batch(indices, **kw)


def train_step(t: Training, batch: StepBatch) -> dict[str, float | None]:
    """One optimizer step over the step's micro-batches (gradients synchronised on the last one): the global
    batch's token-mean loss (and its cross-entropy and KD parts with --kd-weight) and the gradient norm."""
    import torch

    accelerator, config, device = t.accelerator, t.config, t.accelerator.device
    loss_sum = torch.zeros((), device=device)
    parts_sum = torch.zeros(2, device=device)  # cross-entropy, KD (with --kd-weight)
    for j, indices in enumerate(batch.micro):
        tensors = t.train_batch(indices)
        sync = nullcontext() if j == len(batch.micro) - 1 else accelerator.no_sync(t.model)
        with sync, accelerator.autocast():
            summed, _, parts = t.model(**tensors, kd_weight=config.kd_weight, kd_temperature=config.kd_temperature,
                                       return_parts=True)
            accelerator.backward(summed * batch.weight)
        loss_sum += summed.detach() * (batch.weight > 0)
        parts_sum += torch.stack([parts["ce"], parts.get("kd", parts["ce"] * 0)]) * (batch.weight > 0)
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = float(accelerator.clip_grad_norm_(t.params, config.max_grad_norm))
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    result = {"loss": float(accelerator.reduce(loss_sum, "sum")) / batch.tokens, "grad_norm": grad_norm}
    if config.kd_weight:
        result["ce"], result["kd"] = (float(x) / batch.tokens for x in accelerator.reduce(parts_sum, "sum"))
    return result


def train_loop(t: Training) -> Path:
    """Every step from the start (or the resumed) step: train, log, evaluate and checkpoint on schedule; a first
    Ctrl-C or --stop-after finishes the step and checkpoints it. Then `final/` and the manifest."""
    config, main = t.config, t.accelerator.is_main_process
    stop = runtime.StopOnInterrupt(t.quiet).__enter__()  # first Ctrl-C: finish the step, checkpoint, stop
    started = time.perf_counter()
    if isinstance(t.train, StreamedSplit):
        t.loader = open_stream_loader(t)
        batches = t.loader.steps()
    else:
        plan = train_plan(t.train, config, t.accelerator.process_index, t.accelerator.num_processes)
        t.loader = open_loader(t, plan)
        batches = step_batches(plan, t.start_step, t.total_steps)
    try:
        t.model.train()
        with runtime.progress(t.quiet) as bar:
            task = bar.add_task("train", total=t.total_steps, completed=t.start_step, rate="")
            for step, batch in batches:
                result = train_step(t, batch)
                if isinstance(batch, StreamStep):
                    t.stream_state = batch.state
                loss = result["loss"]
                t.seen_examples += len(batch.examples)
                if not math.isfinite(loss):
                    kept = latest_checkpoint(t.out)
                    raise UserError(f"training loss is {loss} at step {step + 1}: stopped; "
                                    + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was "
                                       "written yet") + " (try a lower --lr or --max-grad-norm)")
                t.last["loss"] = loss
                record = _log_step(t, step, batch, result, time.perf_counter() - started)
                bar.update(task, advance=1, rate=f"loss {loss:.4f}")
                if main and (step + 1) % config.log_every == 0 and not t.quiet:
                    bar.console.print(f"step {step + 1}/{t.total_steps}  loss {loss:.4f}  lr {record['lr']:.2e}"
                                      + (f"  dev {record['dev_loss']:.4f}" if "dev_loss" in record else ""))
                if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < t.total_steps:
                    t.checkpoint(A.CHECKPOINT_STEP.format(step + 1), step + 1, True)
                if (stop.requested or step + 1 == config.stop_after) and step + 1 < t.total_steps:
                    t.checkpoint(A.CHECKPOINT_STEP.format(step + 1), step + 1, True)
                    saved = t.out / A.CHECKPOINT_STEP.format(step + 1)
                    message = f"stopped after step {step + 1}: checkpoint {saved}; continue with --resume"
                    if stop.requested:
                        raise Interrupted(message)
                    runtime.say(message, config.quiet)
                    return t.out
        if t.dev is not None:
            t.last["dev_loss"] = t.dev_loss()
        t.loader.close()
        finish(t, time.perf_counter() - started)
        return t.out
    finally:
        t.loader.close()
        stop.__exit__(None, None, None)


def _log_step(t: Training, step: int, batch: StepBatch, result: dict[str, float | None],
              elapsed: float) -> dict[str, Any]:
    """The step's line of the training log (with the dev loss every --eval-every steps), appended by the main
    process; returned for the console."""
    config = t.config
    record = {"step": step + 1, "epoch": batch.epoch, "loss": round(result["loss"], 6),
              "lr": t.scheduler.get_last_lr()[0], "grad_norm": result["grad_norm"], "tokens": batch.tokens,
              "examples_per_second": round(t.seen_examples / elapsed, 2)}
    if config.kd_weight:
        record.update(ce=round(result["ce"], 6), kd=round(result["kd"], 6))
    if t.dev is not None and config.eval_every and (step + 1) % config.eval_every == 0:
        record["dev_loss"] = t.last["dev_loss"] = t.dev_loss()
    if t.accelerator.is_main_process:
        with open(t.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def finish(t: Training, seconds: float) -> None:
    """`final/` (weights only) and the run's manifest: inputs' hashes, last losses, timing, checkpoints."""
    t.checkpoint(A.CHECKPOINT_FINAL, t.total_steps, False)
    out, last = t.out, t.last
    if t.accelerator.is_main_process:
        manifest = A.make_manifest(
            A.KIND_TRAINING, t.config, model=_model_identity(t.core), counts=t.counts,
            inputs={"train_sha256": t.identity["inputs"]["inputs"],  # hashed once, at the start (run_identity)
                    "dev_sha256": t.identity["inputs"]["dev"],
                    "kd_logits_manifest_sha256": A.sha256_file(t.teacher.directory / A.MANIFEST)
                    if t.teacher is not None else None},
            result={"train_loss": last["loss"], "dev_loss": last["dev_loss"]},
            timing={"seconds": round(seconds, 2), "examples_per_second": round(t.seen_examples / seconds, 2),
                    # the training loop's time blocked on the next micro-batch (batching.TrainLoader)
                    "data_wait_seconds": round(t.loader.waited, 3),
                    "data_wait_share": round(t.loader.waited / seconds, 4) if seconds else None,
                    "num_workers": t.config.num_workers},
            checkpoints=sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")))
        A.atomic_write_json(out / A.MANIFEST, manifest)
    runtime.say(f"done: train loss {last['loss']:.4f}" + (f", dev loss {last['dev_loss']:.4f}"
                                                          if last["dev_loss"] is not None else "")
                + f" in {seconds:.1f}s -> {out / A.CHECKPOINT_FINAL}", t.quiet)


def _teacher(config: TrainConfig):
    """The stored teacher distributions for --kd-weight: --kd-logits, else the training input if it has them."""
    path = config.kd_logits
    if path is None:
        src = Path(config.inputs[0])
        if len(config.inputs) != 1 or not src.is_dir():
            raise UserError("--kd-weight needs the teacher's distributions: give --kd-logits DIR (distill-labels "
                            "--top-k-logits), or that directory as the training input")
        path = src
    return TeacherLogits(path)


def _trim_vocabulary(model, train: Split, quiet: bool) -> None:
    """Keep the SLM rows of the tokens the training examples use: all target tokens, and the prompt tokens where the
    SLM embeds them (SLM alone, or --fusion add with the LLM's tokenizer)."""
    import numpy as np
    import torch

    seen = train.tokens.all_tokens("target_ids")
    embeds_prompt = model.config.llm is None or (model.config.fusion == "add" and model.config.tokenizer == "llm")
    if embeds_prompt:
        seen += train.tokens.all_tokens("prompt_ids")
    tok = model.target_tokenizer
    specials = [i for i in tok.all_special_ids if i is not None]
    unknown = tok.unk_token_id if tok.unk_token_id is not None else model.config.pad_token_id
    full = model.slm.get_input_embeddings().num_embeddings
    before = sum(p.numel() for p in model.parameters())
    model.trim_vocabulary(torch.from_numpy(np.unique(np.concatenate([*seen, specials]))).long(), unknown)
    after = sum(p.numel() for p in model.parameters())
    runtime.say(f"vocabulary trimmed to the {model.config.trim_vocab['kept']:,} of {full:,} tokens the training "
                f"examples use: {before:,} -> {after:,} parameters", quiet)


def _peft_spec(config: TrainConfig) -> dict[str, Any] | None:
    if config.peft is None:
        return None
    targets = ([t.strip() for t in config.peft_lora_targets.split(",") if t.strip()] if config.peft_lora_targets
        else None)
    return peft_spec(config.peft, M.load_config(config.slm), virtual_tokens=config.peft_virtual_tokens,
                     prefix_hidden=config.peft_prefix_hidden, lora_rank=config.peft_lora_rank,
                     lora_alpha=config.peft_lora_alpha, lora_dropout=config.peft_lora_dropout, lora_targets=targets)


def _print_counts(config: TrainConfig, model, llm) -> None:
    """--count-parameters: the model as this command would train it (paper Table 6 matches trainable counts)."""
    from llm2slm_cli.llm2slm import parameter_counts  # imports torch: off the import of this module

    counts = parameter_counts(model)
    counts = {"slm": config.slm, "llm": config.llm, "peft": config.peft, "slm_layers": config.slm_layers,
              "freeze_slm": config.freeze_slm, **counts,
              "llm_parameters": sum(p.numel() for p in llm.model.parameters()) if llm is not None else None}
    if config.json:
        print(json.dumps(counts))
        return
    what = config.slm + (f" with LLM {config.llm}" if config.llm else "") + (f", --peft {config.peft}"
                                                                            if config.peft else "")
    share = counts["trainable_parameters"] / counts["parameters"]
    print(f"{what}\nparameters            {counts['parameters']:>14,}\n"
          f"trainable parameters  {counts['trainable_parameters']:>14,}  ({share:.2%})")
    for part, n in counts["trainable_by_part"].items():
        print(f"  {part:<20}{n:>14,}")
    if llm is not None:
        print(f"frozen LLM (not part of the model) {counts['llm_parameters']:,}")


def _dev_loss(model, dev: Split, accelerator, config: TrainConfig, prompt_pad: int, target_pad: int,
              feature_dtype) -> float:
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    lengths = (dev.prompt_lengths.astype("int64") + dev.target_lengths).tolist()
    batches = length_sorted_batches(lengths, config.micro_batch_size)
    with torch.no_grad():
        for indices in batches[accelerator.process_index:: accelerator.num_processes]:
            batch = {k: v.to(accelerator.device) for k, v in dev.batch(indices, prompt_pad, target_pad,
                                                                        feature_dtype).items()}
            with accelerator.autocast():
                summed, tokens = accelerator.unwrap_model(model)(**batch)
            total += torch.stack([summed.double(), tokens.double()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return round(float(total[0] / total[1]), 6)


def _model_identity(core) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(core.config)


def _save(out: Path, name: str, step: int, core, optimizer, scheduler, accelerator, config: TrainConfig,
          counts: dict[str, Any], training_state: bool, state: dict[str, Any],
          stream: dict[str, Any] | None = None) -> None:
    """Write a checkpoint under a temporary name, its manifest (every file's sha256) last, then rename it: a crash
    never leaves half a checkpoint, and --resume verifies every file of a step checkpoint before it loads one."""
    import random

    import numpy as np
    import torch

    from llm2slm_cli import checkpoint  # imports torch: off the import of this module

    final = out / name
    tmp = out / f".{name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        checkpoint.save(core, tmp)
        if training_state:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / A.OPTIMIZER_STATE)
    accelerator.wait_for_everyone()
    if training_state:
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, tmp / A.RNG_STATE.format(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if training_state:
            A.atomic_write_json(tmp / A.TRAINER_STATE, state)
            if stream is not None:  # --streaming: where the stream is, so a resume draws what comes next
                A.atomic_write_json(tmp / A.STREAM_STATE, stream)
        # last: the size and sha256 of its files -- a step checkpoint's every file (optimizer, RNG and trainer
        # state too, verified before --resume loads any), final/'s weights, configs and tokenizer
        A.atomic_write_json(tmp / A.MANIFEST, A.make_manifest(
            A.KIND_CHECKPOINT, config, model=_model_identity(core), step=step, counts=counts,
            files=A.directory_records(tmp) if training_state else A.checkpoint_records(tmp)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def _restore(directory: Path, core, optimizer, scheduler, accelerator) -> int:
    import pickle
    import random

    import torch
    from safetensors.torch import load_model

    state = A.read_trainer_state(directory)  # every file was verified against the manifest by check_inputs
    # a CPU process of a multi-process run is on "cpu:N", which neither safetensors nor torch.load takes
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    try:
        load_model(core, str(directory / A.MODEL_WEIGHTS), strict=True, device=device)
    except (OSError, RuntimeError) as e:  # another SLM's weights (shapes, names): not this run's checkpoint
        raise UserError(f"cannot resume from this checkpoint: its weights do not fit the model this command "
                        f"builds ({short_error(e)}); give the interrupted run's options, or --overwrite",
                        path=directory) from None
    path = directory / A.OPTIMIZER_STATE
    try:  # verified; this catches what an unverified checkpoint (LLM2SLM_UNVERIFIED_CHECKPOINTS=1) may hold
        opt = torch.load(path, map_location=device, weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        path = directory / A.RNG_STATE.format(accelerator.process_index)
        if path.is_file():
            import numpy as np

            rng = torch.load(path, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError) as e:  # what unpickling damaged bytes raises
        raise UserError(f"cannot resume from this checkpoint: unreadable training state ({short_error(e)})",
                        path=path) from None
    return state["step"]


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they are about to be run again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
        if record["step"] <= step:
            keep.append(line)
    A.atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
