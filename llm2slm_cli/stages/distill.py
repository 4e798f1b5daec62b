"""`llm2slm distill-labels`: the LLM answers every prompt; its answers become the SLM's training targets.

Sequence-level distillation (paper Table 7: LLM-generated labels). The output is an examples artifact that every
stage reads like any input file:

    examples.parquet   id, prompt (template applied), target (the LLM's output), reference (the original target)
    manifest.json      the LLM, decoding settings, template, input sha256, counts, timing

Work is written in shards of --shard-size examples (input order), split across processes under `accelerate launch`;
--resume skips the shards already written (see sharding.py).
"""

from __future__ import annotations

from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import DistillConfig
from llm2slm_cli.data import Fields, read_examples
from llm2slm_cli.sharding import ShardedRun, shard_seed

PART = "examples-{:05d}.parquet"


def labels_table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "target": pa.array([r["target"] for r in rows], pa.string()),
        "reference": pa.array([r["reference"] for r in rows], pa.string()),
        "n_tokens": pa.array([r["n_tokens"] for r in rows], pa.int32()),
    })


def run(config: DistillConfig) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from llm2slm_cli.stages.generate import HalvingBatcher, PlainModel, generate_shard, generation_kwargs

    fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field,
                    template=config.template)
    examples = read_examples(config.inputs, fields)
    out = Path(config.out)
    with ShardedRun(out, stage="distill", overwrite=config.overwrite, resume=config.resume, device=config.device,
                    quiet=config.quiet) as work:
        quiet = config.quiet or not work.is_main
        llm = PlainModel(config.model, dtype=config.dtype, tokenizer=config.tokenizer, device=work.device)
        tok = llm.prompt_tokenizer
        ids, truncated = runtime.tokenize_prompts(tok, [e.prompt for e in examples], config.max_length,
                                                  strict=config.strict,
                                                  where=runtime.places(config.inputs, examples))
        generation = generation_kwargs(config)
        input_sha = A.input_sha256(config.inputs)
        shards = [list(range(i, min(i + config.shard_size, len(examples))))
                  for i in range(0, len(examples), config.shard_size)]
        work.plan({"input_sha256": input_sha, "llm": llm.identity, "generation": generation, "shards": len(shards),
                   "template": config.template, "max_length": config.max_length, "seed": config.seed})

        todo = work.todo(len(shards), lambda k: (out / PART.format(k)).is_file())
        batcher = HalvingBatcher(config.batch_size)
        new_tokens = 0
        with runtime.progress(quiet) as bar, runtime.timer() as clock:
            task = bar.add_task("distill", total=sum(len(shards[k]) for k in todo), rate="")
            for k in todo:
                members = shards[k]
                torch.manual_seed(shard_seed(config.seed, k))
                outputs = generate_shard(llm, ids, members, config.batch_size, generation, work, batcher, bar, task)
                new_tokens += sum(len(t) for t in outputs.values())
                texts = tok.batch_decode([outputs[i] for i in members], skip_special_tokens=True)
                rows = [{"id": examples[i].id, "prompt": examples[i].prompt, "target": t.strip(),
                         "reference": examples[i].target, "n_tokens": len(outputs[i])}
                        for i, t in zip(members, texts)]
                empty = [r["id"] for r in rows if not r["target"]]
                if empty:
                    runtime.say(f"warning: the LLM gave an empty answer for {len(empty)} examples of shard {k} "
                                f"(e.g. {empty[0]!r}); train skips examples with empty targets", config.quiet)
                A.write_parquet(out / PART.format(k), labels_table(rows))
        seconds = clock["seconds"]

        if work.finish():
            table = pa.concat_tables([pq.read_table(out / PART.format(k)) for k in range(len(shards))])
            generated = sum(table["n_tokens"].to_pylist())
            A.write_parquet(out / A.LABELS, table.drop_columns(["n_tokens"]))
            manifest = A.make_manifest(
                A.KIND_LABELS, config, llm=llm.identity, generation=generation, template=config.template,
                prompt_field=config.prompt_field, inputs=[str(p) for p in config.inputs], input_sha256=input_sha,
                counts={"examples": len(examples), "generated_tokens": generated,
                        "truncated_prompts": sum(truncated),
                        "empty_targets": sum(1 for t in table["target"].to_pylist() if not t)},
                files={A.LABELS: A.file_record(out / A.LABELS)},
                processes=work.world,
                timing={"seconds": round(seconds, 3),
                        "tokens_per_second": round(new_tokens * work.world / seconds, 2) if seconds else None},
            )
            A.atomic_write_json(out / A.MANIFEST, manifest)
            for k in range(len(shards)):
                (out / PART.format(k)).unlink()
            runtime.say(f"distilled {len(examples)} targets ({generated} tokens) with {config.model} in "
                        f"{seconds:.1f}s -> {out}", config.quiet)
        work.done()
    return out
