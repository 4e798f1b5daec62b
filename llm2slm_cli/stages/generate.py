"""`llm2slm generate`: answer prompts with a trained checkpoint, or with a plain LLM/SLM as a baseline.

Prompts are cut into shards of --shard-size (input order), each with its own batches, and sampling draws example
i from a generator of its own seed (generation.example_seed(--seed, i)), so one process, several under `accelerate
launch`, a run resumed after a crash and any --batch-size give the same predictions (see sharding.py). Opening
the model and decoding are generation.py's: this stage reads the prompts and writes the predictions."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.api import Model, PromptTruncatedWarning
from llm2slm_cli.config import GenerateConfig
from llm2slm_cli.corpus import Examples, Tokens, input_sha256, open_examples, prompt_tokens
from llm2slm_cli.data import Fields, records_jsonl, split_lines, to_examples
from llm2slm_cli.errors import UserError
from llm2slm_cli.features import FeatureStore
from llm2slm_cli.generation import (
    HalvingBatcher,
    PlainModel,
    SpeculativeModel,
    first_line,
    generate_shard,
    generation_kwargs,
    open_model,
    speculative_kwargs,
)
from llm2slm_cli.llama_backend import LlamaCppSLM
from llm2slm_cli.sharding import ShardedRun, in_order_shards, shard_seed

PART = "predictions-{:05d}.parquet"
SPECULATIVE_META = b"llm2slm_speculative"


def load_generator(config: GenerateConfig, device):
    """A checkpoint directory from `train`, or any plain model spec; with --speculative, a draft and its LLM."""
    return open_model(config.model, llm=config.llm, speculative=config.speculative, verifier=config.verifier,
                      gamma=config.gamma, seed=config.seed, dtype=config.dtype, tokenizer=config.tokenizer,
                      device=device, quantize=config.quantize, compile=config.compile,
                      llm_weights="lazy" if config.features else "encoder",  # stored features: no LLM weights
                      backend=config.backend, gguf=config.gguf)


def _checkpoint_template(path: Path) -> str | None:
    """The template a checkpoint was trained with (None for a plain model); refuses other artifact directories."""
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    if path.is_dir() and (path / A.MODEL_CONFIG).is_file():
        return read_model_config(path).template
    if path.is_dir() and (path / A.MANIFEST).is_file():
        kind = A.read_json_or_none(path / A.MANIFEST, "kind")
        hint = (f" (its checkpoints are {path / A.CHECKPOINT_FINAL} and {path}/step-NNNNNN)"
            if kind == A.KIND_TRAINING else "")
        raise UserError(f"is a '{kind}' artifact, expected a checkpoint from `train` or a model{hint}", path=path)
    return None


def run(config: GenerateConfig) -> Path:
    """Read the prompts, then (each process its own shards) decode them and merge; --prompt/- print instead."""
    if config.to_stdout:
        return print_responses(config)
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    out = Path(config.out)
    template = config.template or _checkpoint_template(Path(config.model))
    fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field, template=template)
    input_sha = input_sha256(config.inputs, config.data_cache)
    # a bad input is refused before anything is loaded or written
    examples = open_examples(config.inputs, fields, require_target=False, cache=config.data_cache,
                             input_sha=input_sha)
    with ShardedRun(out, stage="generate", overwrite=config.overwrite, resume=config.resume, device=config.device,
                    part=PART, quiet=config.quiet) as work:
        if work.finished:
            return out
        model, identity, tokens, features, max_length = _open_and_tokenize(config, work, examples)
        generation = _decoding(config, model)
        shards = in_order_shards(len(examples), config.shard_size)
        work.plan({"input_sha256": input_sha, "model": identity, "generation": generation, "shards": len(shards),
                   "template": template, "max_length": max_length, "seed": config.seed,
                   "batch_size": config.batch_size})
        batcher = HalvingBatcher(config.batch_size)
        new_tokens, seconds = _decode_shards(config, work, model, examples, tokens, features, generation, shards,
                                             batcher, out)
        if work.finish():
            _merge(config, work, model, examples, (identity, generation, template, input_sha),
                   (tokens.truncated, shards, batcher), (new_tokens, seconds), out)
        work.done()
    return out


def _open_and_tokenize(config: GenerateConfig, work: ShardedRun, examples: Examples) -> tuple:
    """The model on this process's device, its identity, every prompt's token ids (corpus.py: tokenized once,
    cached; truncated or not), the stored features if --features, and the prompt length used."""
    model, identity, _, max_prompt_length = load_generator(config, work.device)
    max_length = config.max_length or max_prompt_length
    tokens = prompt_tokens(examples, model.prompt_tokenizer, max_length, strict=config.strict, inputs=config.inputs,
                           num_proc=config.num_proc, quiet=config.quiet or not work.is_main)
    if tokens.truncated and work.is_main:  # one line per run; --strict refused them above
        runtime.say(f"warning: {tokens.truncated} of {len(examples)} prompts are longer than --max-length "
                    f"{max_length} tokens and are cut to their first {max_length} (--strict refuses them)")
    features = _stored_features(config.features, model, examples, tokens) if config.features else None
    return model, identity, tokens, features, max_length


def _decoding(config: GenerateConfig, model) -> dict[str, Any]:
    """The decoding options the run records and uses: --first-line stops a plain model at the line's end."""
    generation = generation_kwargs(config)
    if config.first_line and isinstance(model, PlainModel):
        generation["stop_strings"] = ["\n"]
    if config.speculative:
        generation = speculative_kwargs(config)
    return generation


def _decode_shards(config: GenerateConfig, work: ShardedRun, model, examples: Examples, tokens: Tokens, features,
                   generation: dict, shards: list, batcher: HalvingBatcher, out: Path) -> tuple[int, float]:
    """Decode this process's shards still to do into one part file each (sampling: each example from its own seed;
    speculative decoding: each shard's batches from the shard's seed). Returns the new tokens and the seconds it
    took."""
    tok = model.target_tokenizer

    def decode_shard(k: int, members: list[int], progress) -> list[Path]:
        if isinstance(model, SpeculativeModel):
            model.reseed(shard_seed(config.seed, k))
        ids = dict(zip(members, tokens.rows("prompt_ids", members)))  # this shard's prompts, read once
        outputs = generate_shard(model, ids, members, config.batch_size, generation, work, batcher, progress,
                                 features=features, seed=config.seed)
        texts = tok.batch_decode([outputs[i] for i in members], skip_special_tokens=True)
        table = _part_table(config, model, examples.rows(members), examples.has_targets,
                            [len(outputs[i]) for i in members], texts)
        A.write_parquet(out / PART.format(k), table)
        return [out / PART.format(k)]

    return work.run_shards(shards, decode_shard, label="generate", seed=config.seed)


def _part_table(config: GenerateConfig, model, shard: list, with_references: bool, lengths: list[int],
                texts: list[str]):
    """One shard's predictions (with speculative decoding: its counts in the metadata, summed at the end)."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "id": pa.array([e.id for e in shard], pa.string()),
        "prompt": pa.array([e.prompt for e in shard], pa.string()),
        "prediction": pa.array([first_line(t) if config.first_line else t.strip() for t in texts], pa.string()),
        "n_tokens": pa.array(lengths, pa.int32()),
    }
    if with_references:  # examples without one get a null reference
        columns["reference"] = pa.array([e.target for e in shard], pa.string())
    table = pa.table(columns)
    if isinstance(model, SpeculativeModel):
        table = table.replace_schema_metadata({SPECULATIVE_META: json.dumps(model.stats.as_counts())})
        model.stats.reset()
    return table


def _merge(config: GenerateConfig, work: ShardedRun, model, examples: list, recorded: tuple, layout: tuple,
           timing: tuple, out: Path) -> None:
    """One predictions file in input order and the manifest (speculative counts summed over shards); then the
    parts go."""
    import pyarrow as pa

    from llm2slm_cli.decoding import SpeculativeStats  # imports torch: off the import of this module

    (identity, generation, template, input_sha), (truncated, shards, batcher) = recorded, layout
    new_tokens, seconds = timing
    parts = work.read_parts(len(shards))
    speculative = None
    if isinstance(model, SpeculativeModel):
        total = SpeculativeStats()
        for p in parts:
            total.add(SpeculativeStats(**json.loads(p.schema.metadata[SPECULATIVE_META])))
        speculative = total.as_dict()
    table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    A.write_parquet(out / A.PREDICTIONS, table)
    generated = sum(table["n_tokens"].to_pylist())
    manifest = A.make_manifest(
        A.KIND_PREDICTIONS, config, model=identity, generation=generation, template=template,
        inputs=[str(p) for p in config.inputs], input_sha256=input_sha,
        counts={"examples": len(examples), "generated_tokens": generated, "truncated_prompts": truncated},
        speculative=speculative,
        files={A.PREDICTIONS: A.file_record(out / A.PREDICTIONS)},
        processes=work.world, batch_size_reductions=batcher.reductions,
        timing={"seconds": round(seconds, 3),
                "tokens_per_second": round(new_tokens * work.world / seconds, 2) if seconds else None},
    )
    A.atomic_write_json(out / A.MANIFEST, manifest)
    work.remove_parts(len(shards))
    runtime.say(f"generated {generated} tokens for {len(examples)} prompts in {seconds:.1f}s -> {out}", config.quiet)
    if speculative:
        runtime.say(f"speculative decoding: {speculative['acceptance_rate']:.1%} of drafts accepted, "
                    f"{speculative['tokens_per_llm_call']:.2f} tokens per LLM call "
                    f"({speculative['llm_calls']} LLM calls)", config.quiet)


def print_responses(config: GenerateConfig) -> None:
    """--prompt and - (stdin): responses on stdout, as text lines or --json objects; one prompt streams."""
    import sys

    template = config.template or _checkpoint_template(Path(config.model))
    records = (_stdin_prompts(sys.stdin.read(), config, template) if not config.prompt else
        [(str(i), f"--prompt {i + 1}", p, True) for i, p in enumerate(config.prompt)])
    device = runtime.device(config.device)
    impl, identity, _, max_length = load_generator(config, device)
    model = Model(impl, name=config.model, identity=identity, template=template,
                  max_prompt_length=config.max_length or max_length, chat_template=None, device=device)
    texts = [model.prompt_text(p, where=where) if fill else p for _, where, p, fill in records]
    options = {f: getattr(config, f) for f in ("num_beams", "length_penalty", "sample", "top_p", "temperature",
                                               "seed", "max_new_tokens", "repetition_penalty",
                                               "no_repeat_ngram_size")}
    if config.first_line and isinstance(impl, PlainModel):
        options["stop"] = ["\n"]
    streaming = len(texts) == 1 and not config.json and not config.first_line
    printer = _Printer() if streaming else None
    with warnings.catch_warnings(record=True) as said:  # the API's truncation warning, as this command's line
        warnings.simplefilter("always", PromptTruncatedWarning)
        results = model.complete(texts, template=False, strict=config.strict, batch_size=config.batch_size,
                                 on_text=printer, **options)
    for w in said:
        if issubclass(w.category, PromptTruncatedWarning):
            runtime.say(f"warning: {w.message.notice} (--max-length; --strict refuses such prompts)")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if printer is not None:
        print(flush=True)
        return
    for (key, *_), text, result in zip(records, texts, results):
        prediction = first_line(result.text) if config.first_line else result.text.strip()
        if config.json:
            print(json.dumps({"id": key, "prompt": text, "prediction": prediction,
                              "n_tokens": len(result.token_ids), "finish_reason": result.finish_reason},
                             ensure_ascii=False), flush=True)
        else:
            print(prediction, flush=True)


class _Printer:
    """Writes a streamed response to stdout as it comes, without its leading white space (as `generate` strips)."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, _index: int, text: str) -> None:
        import sys

        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def _stdin_prompts(text: str, config: GenerateConfig, template: str | None) -> list[tuple[str, str, str, bool]]:
    """(id, where, prompt, needs the template) for each prompt on stdin: JSONL records (the field options and template
    apply as to a file), or plain lines (blank ones skipped), each filled into the template."""
    lines = split_lines(text)  # line feeds only, as files are read: a U+2028 inside a prompt splits nothing
    first = next((line.strip() for line in lines if line.strip()), None)
    if first is None:
        raise UserError("no prompts on stdin")
    if first.startswith("{"):
        fields = Fields(prompt=config.prompt_field, target=None, id=config.id_field, template=template)
        examples = to_examples(records_jsonl(Path("<stdin>"), text), "<stdin>", fields, False)
        return [(e.id, f"<stdin>, {e.place}", e.prompt, False) for e in examples]
    lines = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    return [(str(k), f"<stdin>, line {i}", line, True) for k, (i, line) in enumerate(lines)]


def _stored_features(path: Path, model, examples: Examples, tokens: Tokens):
    """--features: the store checked against the checkpoint's LLM (its identity, without loading it) and against
    each prompt (the token ids it was encoded from); returns features(batch) -> (batch, longest, d_llm)."""
    import torch

    from llm2slm_cli.checkpoint import check_llm  # imports torch: off the import of this module
    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    if isinstance(model, LlamaCppSLM):  # --backend llama-cpp: the checkpoint that builds its prompts
        model = model.model
    if not isinstance(model, LLMToSLM) or not model.has_llm:
        raise UserError("--features needs an LLM-to-SLM checkpoint (trained with --llm) as --model")
    store = FeatureStore(path)
    check_llm(model.llm, store.llm, f"features {path}")
    store.check_prompts(tokens, examples)

    def features(batch: list[int]):
        rows = [store.features(ex_id) for ex_id in examples.ids(batch)]
        out = torch.zeros(len(rows), int(tokens.prompt_lengths[batch].max()), rows[0].shape[1], dtype=rows[0].dtype)
        for j, r in enumerate(rows):
            out[j, : r.shape[0]] = r
        return out

    return features
