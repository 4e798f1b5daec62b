"""`llm2slm distill-labels`: the LLM answers every prompt; its answers become the SLM's training targets.

Sequence-level distillation (paper Table 7: LLM-generated labels). The output is an examples artifact that every
stage reads like any input file:

    examples.parquet   id, prompt (template applied), target (the LLM's output), reference (the original target)
    manifest.json      the LLM, decoding settings, template, input sha256, counts, timing

With --top-k-logits K the LLM's top-K next-token distributions over every target token are stored beside them
(teacher.py: logits-NNNNN.safetensors, one per shard), for `train --kd-weight`; --teacher-forced keeps the input's
targets and only computes those distributions (no generation).

Work is written in shards of --shard-size examples (input order), split across processes under `accelerate launch`;
--resume skips the shards already written (see sharding.py).
"""

from __future__ import annotations

from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import DistillConfig
from llm2slm_cli.corpus import Examples, Tokens, input_sha256, open_examples, prompt_tokens
from llm2slm_cli.data import Fields
from llm2slm_cli.errors import UserError
from llm2slm_cli.fingerprints import tokenizer_fingerprint
from llm2slm_cli.generation import HalvingBatcher, PlainModel, generate_shard, generation_kwargs
from llm2slm_cli.sharding import ShardedRun, in_order_shards
from llm2slm_cli.teacher import LOGITS_SHARD, teacher_topk, write_shard

PART = "examples-{:05d}.parquet"


def labels_table(rows: list[dict], logits_shard: int | None = None):
    import pyarrow as pa

    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "target": pa.array([r["target"] for r in rows], pa.string()),
        "reference": pa.array([r["reference"] for r in rows], pa.string()),
        "n_tokens": pa.array([r["n_tokens"] for r in rows], pa.int32()),
    }
    if logits_shard is not None:  # where each example's teacher distributions are
        columns["logits_shard"] = pa.array([logits_shard] * len(rows), pa.int32())
        columns["logits_row"] = pa.array(range(len(rows)), pa.int32())
    return pa.table(columns)


def run(config: DistillConfig) -> Path:
    """Read the examples, then (each process its own shards) label them with the LLM and merge."""
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field,
                    template=config.template)
    input_sha = input_sha256(config.inputs, config.data_cache)
    examples = open_examples(config.inputs, fields, require_target=config.teacher_forced, cache=config.data_cache,
                             input_sha=input_sha)
    out = Path(config.out)
    with ShardedRun(out, stage="distill", overwrite=config.overwrite, resume=config.resume, device=config.device,
                    part=PART, quiet=config.quiet) as work:
        if work.finished:
            return out
        llm, tokens, generation = _open_and_tokenize(config, work, examples)
        shards = _plan(config, work, llm, examples, generation, input_sha)
        new_tokens, seconds = _label_shards(config, work, llm, examples, tokens, generation, shards, out)
        if work.finish():
            _merge(config, work, llm, examples, generation, input_sha, (tokens.truncated, shards),
                   (new_tokens, seconds), out)
        work.done()
    return out


def _open_and_tokenize(config: DistillConfig, work: ShardedRun, examples: Examples) -> tuple[PlainModel, Tokens,
                                                                                       dict | None]:
    """The LLM on this process's device, every prompt's token ids (corpus.py: tokenized once, cached) and the
    decoding options (None when teacher forced); --top-k-logits checked against the LLM's vocabulary."""
    llm = PlainModel(config.model, dtype=config.dtype, tokenizer=config.tokenizer, device=work.device)
    tok = llm.prompt_tokenizer
    tokens = prompt_tokens(examples, tok, config.max_length, strict=config.strict, inputs=config.inputs,
                           num_proc=config.num_proc, quiet=config.quiet or not work.is_main)
    generation = None if config.teacher_forced else generation_kwargs(config)
    if config.top_k_logits is not None and config.top_k_logits > len(tok):
        raise UserError(f"--top-k-logits {config.top_k_logits} is more than the LLM's {len(tok)} tokens")
    return llm, tokens, generation


def _plan(config: DistillConfig, work: ShardedRun, llm: PlainModel, examples: Examples, generation: dict | None,
          input_sha: str | None) -> list[list[int]]:
    """Shards of --shard-size examples in input order, recorded as the run's plan."""
    top_k = config.top_k_logits
    shards = in_order_shards(len(examples), config.shard_size)
    work.plan({"input_sha256": input_sha, "llm": llm.identity, "generation": generation, "shards": len(shards),
               "template": config.template, "max_length": config.max_length, "seed": config.seed,
               "top_k_logits": top_k, "teacher_forced": config.teacher_forced,
               "max_target_length": config.max_target_length if top_k else None})
    return shards


def _label_shards(config: DistillConfig, work: ShardedRun, llm: PlainModel, examples: Examples, tokens: Tokens,
                  generation: dict | None, shards: list, out: Path) -> tuple[int, float]:
    """Label this process's shards still to do (each with its own seed): the labels part and, with
    --top-k-logits, the teacher's distributions. Returns the new tokens and the seconds it took."""
    top_k, tok = config.top_k_logits, llm.prompt_tokenizer
    batcher = HalvingBatcher(config.batch_size)

    def label_shard(k: int, members: list[int], progress) -> list[Path]:
        shard = examples.rows(members)
        ids = dict(zip(members, tokens.rows("prompt_ids", members)))  # this shard's prompts, read once
        if config.teacher_forced:
            rows = [{"id": e.id, "prompt": e.prompt, "target": e.target, "reference": e.target, "n_tokens": 0}
                    for e in shard]
        else:
            outputs = generate_shard(llm, ids, members, config.batch_size, generation, work, batcher, progress,
                                     seed=config.seed)
            texts = tok.batch_decode([outputs[i] for i in members], skip_special_tokens=True)
            rows = [{"id": e.id, "prompt": e.prompt, "target": t.strip(), "reference": e.target,
                     "n_tokens": len(outputs[i])} for i, e, t in zip(members, shard, texts)]
        empty = [r["id"] for r in rows if not r["target"]]
        if empty:
            runtime.say(f"warning: the LLM gave an empty answer for {len(empty)} examples of shard {k} "
                        f"(e.g. {empty[0]!r}); train skips examples with empty targets", config.quiet)
        files = [out / PART.format(k)]
        if top_k is not None:
            work.check_stop()
            targets = runtime.tokenize_targets(tok, [r["target"] for r in rows], config.max_target_length)
            topk = teacher_topk(llm.model, llm.kind, [ids[i].tolist() for i in members], targets, top_k,
                                pad_id=tok.pad_token_id, batch_size=config.batch_size,
                                decoder_start=getattr(llm.model.config, "decoder_start_token_id", None))
            write_shard(out / LOGITS_SHARD.format(k), topk, targets)
            files.append(out / LOGITS_SHARD.format(k))
            if config.teacher_forced:
                progress.advance(len(members))
        A.write_parquet(out / PART.format(k), labels_table(rows, k if top_k is not None else None))
        return files

    return work.run_shards(shards, label_shard, label="distill", seed=config.seed)


def _merge(config: DistillConfig, work: ShardedRun, llm: PlainModel, examples: list, generation: dict | None,
           input_sha: str | None, layout: tuple, timing: tuple, out: Path) -> None:
    """One labels file in input order, the logits record and the manifest; then the parts go."""
    import pyarrow as pa

    (truncated, shards), (new_tokens, seconds), top_k = layout, timing, config.top_k_logits
    table = pa.concat_tables(work.read_parts(len(shards)))
    generated = sum(table["n_tokens"].to_pylist())
    A.write_parquet(out / A.LABELS, table.drop_columns(["n_tokens"]))
    logits = None
    if top_k is not None:
        logits = {"top_k": top_k, "max_target_length": config.max_target_length,
                  "tokenizer_fingerprint": tokenizer_fingerprint(llm.prompt_tokenizer),
                  "teacher_forced": config.teacher_forced, "temperature": 1.0,
                  "files": {LOGITS_SHARD.format(k): A.file_record(out / LOGITS_SHARD.format(k))
                            for k in range(len(shards))}}
    manifest = A.make_manifest(
        A.KIND_LABELS, config, llm=llm.identity, generation=generation, template=config.template,
        prompt_field=config.prompt_field, inputs=[str(p) for p in config.inputs], input_sha256=input_sha,
        logits=logits,
        counts={"examples": len(examples), "generated_tokens": generated,
                "truncated_prompts": truncated,
                "empty_targets": sum(1 for t in table["target"].to_pylist() if not t)},
        files={A.LABELS: A.file_record(out / A.LABELS)},
        processes=work.world,
        timing={"seconds": round(seconds, 3),
                "tokens_per_second": round(new_tokens * work.world / seconds, 2) if seconds else None},
    )
    A.atomic_write_json(out / A.MANIFEST, manifest)
    work.remove_parts(len(shards))
    runtime.say(f"distilled {len(examples)} targets ({generated} tokens) with {config.model} in "
                f"{seconds:.1f}s -> {out}", config.quiet)
