"""`llm2slm encode`: the frozen LLM reads every prompt once; its features are stored for training."""

from __future__ import annotations

import os
from pathlib import Path

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import EncodeConfig
from llm2slm_cli.data import Fields, length_sorted_batches, pad, read_examples
from llm2slm_cli.features import index_table

PLAN = ".encode-plan.json"


def run(config: EncodeConfig) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from llm2slm_cli.llm2slm import FrozenLLM

    fields = Fields(prompt=config.prompt_field, target=None, id=config.id_field, template=config.template)
    examples = read_examples(config.inputs, fields)
    input_sha = A.input_sha256(config.inputs)
    out = Path(config.out)
    resuming = A.prepare_output_dir(out, overwrite=config.overwrite, resume=config.resume)

    llm = FrozenLLM(config.model, layer=config.layer, dtype=config.llm_dtype, tokenizer=config.tokenizer,
                    device=runtime.device(config.device))
    ids, truncated = runtime.tokenize_prompts(llm.tokenizer, [e.prompt for e in examples], config.max_length,
                                              strict=config.strict, ids=[e.id for e in examples])
    lengths = [len(t) for t in ids]
    order = length_sorted_batches(lengths, len(lengths))[0]  # longest first, stable
    shards = [order[i: i + config.shard_size] for i in range(0, len(order), config.shard_size)]
    plan = {"input_sha256": input_sha, "llm": llm.identity(), "config": A.config_to_dict(config),
            "shards": len(shards)}
    plan["config"].pop("overwrite"), plan["config"].pop("resume"), plan["config"].pop("quiet")
    plan_path = A.resume_plan(out, PLAN, plan, resuming, "encode")

    dtype = getattr(torch, config.feature_dtype)
    stats = {"tokens": 0, "seconds": 0.0}
    with runtime.progress(config.quiet) as bar, runtime.timer() as clock:
        task = bar.add_task("encode", total=len(examples), rate="")
        for k, members in enumerate(shards):
            shard_path = out / A.FEATURES_SHARD.format(k)
            part_path = out / A.FEATURES_SHARD_INDEX.format(k)
            if resuming and shard_path.is_file() and part_path.is_file():
                bar.advance(task, len(members))
                continue
            chunks, rows, offset = [], [], 0
            for batch in length_sorted_batches([lengths[i] for i in members], config.batch_size):
                batch = [members[j] for j in batch]
                input_ids, mask = pad([ids[i] for i in batch], llm.tokenizer.pad_token_id)
                hidden = llm.encode(input_ids, mask)
                for row, i in enumerate(batch):
                    chunks.append(hidden[row, : lengths[i]].to("cpu", dtype))
                    rows.append({"id": examples[i].id, "shard": k, "offset": offset, "length": lengths[i],
                                 "input_ids": ids[i], "truncated": truncated[i]})
                    offset += lengths[i]
                stats["tokens"] += int(mask.sum())
                bar.update(task, advance=len(batch),
                           rate=f"{stats['tokens'] / max(bar.tasks[0].elapsed or 1e-9, 1e-9):,.0f} tok/s")
            tmp = A.atomic_path(shard_path)
            save_file({"features": torch.cat(chunks).contiguous()}, str(tmp))
            os.replace(tmp, shard_path)
            A.write_parquet(part_path, index_table(rows))
    stats["seconds"] = clock["seconds"]

    # One index in input order; the per-shard parts only existed so an interrupted run can resume.
    parts = [pq.read_table(out / A.FEATURES_SHARD_INDEX.format(k)) for k in range(len(shards))]
    table = pa.concat_tables(parts)
    position = {e.id: n for n, e in enumerate(examples)}
    table = table.take(sorted(range(table.num_rows), key=lambda r: position[table["id"][r].as_py()]))
    A.write_parquet(out / A.FEATURES_INDEX, table)
    shard_info = []
    for k in range(len(shards)):
        path = out / A.FEATURES_SHARD.format(k)
        shard_info.append({"file": path.name, "bytes": path.stat().st_size, "sha256": A.sha256_file(path),
                           "examples": len(shards[k])})
    total_tokens = sum(lengths)
    manifest = A.make_manifest(
        A.KIND_FEATURES, config,
        llm=llm.identity(), layer=llm.layer, feature_dtype=config.feature_dtype, d_model=llm.d_model,
        max_length=config.max_length, template=config.template, prompt_field=config.prompt_field,
        inputs=[str(p) for p in config.inputs], input_sha256=input_sha,
        counts={"examples": len(examples), "tokens": total_tokens, "truncated": sum(truncated), "shards": len(shards)},
        shards=shard_info,
        timing={"seconds": round(stats["seconds"], 3),
                "tokens_per_second": round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else None},
    )
    A.atomic_write_json(out / A.MANIFEST, manifest)
    for k in range(len(shards)):
        (out / A.FEATURES_SHARD_INDEX.format(k)).unlink()
    plan_path.unlink()
    runtime.say(f"encoded {len(examples)} prompts ({total_tokens} tokens, {sum(truncated)} truncated) with "
                f"{config.model} in {stats['seconds']:.1f}s -> {out}", config.quiet)
    return out
