"""`llm2slm encode`: the frozen LLM reads every prompt once; its features are stored for training.

Shards are cut from the prompts sorted by length (longest first), --shard-size each, before any work; under
`accelerate launch` each process encodes its own shards (see sharding.py), so the files are the same whatever the
number of processes. With --cache, a feature set is stored once per (LLM, layer, dtype, max length, template,
fields, input) and linked into every --out that asks for it again. Before the first shard, the features' size is
said, and a file system without room for them refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import EncodeConfig
from llm2slm_cli.corpus import Examples, Tokens, input_sha256, open_examples, prompt_tokens
from llm2slm_cli.data import Fields, length_sorted_batches, pad
from llm2slm_cli.errors import UserError
from llm2slm_cli.features import ELEMENT_BYTES, feature_bytes, index_bytes, index_table
from llm2slm_cli.sharding import ShardedRun

SHARD_META = b"llm2slm_shard"


def cache_key(config: EncodeConfig, llm_identity: dict[str, Any], input_sha: str | None) -> str | None:
    """What makes two feature sets the same; None when the input has no fingerprint (a Hugging Face dataset)."""
    if input_sha is None:
        return None
    identity = {k: v for k, v in llm_identity.items() if k != "name"}  # the same weights under another path
    return A.sha256_json({"schema": A.SCHEMA_VERSION, "llm": identity, "feature_dtype": config.feature_dtype,
                          "max_length": config.max_length, "template": config.template,
                          "prompt_field": config.prompt_field, "id_field": config.id_field,
                          "input_sha256": input_sha})


def run(config: EncodeConfig) -> Path:
    """Read the prompts, then (in the main process, or each process its own shards) encode and merge."""
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    fields = Fields(prompt=config.prompt_field, target=None, id=config.id_field, template=config.template)
    input_sha = input_sha256(config.inputs, config.data_cache)
    examples = open_examples(config.inputs, fields, require_target=False, cache=config.data_cache,
                             input_sha=input_sha)
    out = Path(config.out)
    with ShardedRun(out, stage="encode", overwrite=config.overwrite, resume=config.resume, device=config.device,
                    part=A.FEATURES_SHARD_INDEX, quiet=config.quiet) as work:
        if work.finished:
            return out
        llm, tokens = _open_and_tokenize(config, work, examples)
        key, cached = _cache_entry(config, work, llm, input_sha)
        if cached is not None and _linked_from_cache(config, work, cached, key, out):
            return out
        lengths, shards = _cut_shards(config, tokens)
        estimate = _check_space(config, work, llm, lengths, shards, out)
        _plan(config, work, llm, shards, input_sha)
        encoded, seconds = _encode_shards(config, work, llm, examples, tokens, shards, out)
        if work.finish():
            _merge(config, work, llm, examples, input_sha, (tokens, shards), (key, cached),
                   (encoded, seconds, estimate), out)
        work.done()
    return out


def _open_and_tokenize(config: EncodeConfig, work: ShardedRun, examples: Examples) -> tuple[Any, Tokens]:
    """The frozen LLM on this process's device, and every prompt's token ids (corpus.py: tokenized once, cached;
    with whether each was truncated)."""
    from llm2slm_cli.llm2slm import FrozenLLM  # imports torch: off the import of this module

    llm = FrozenLLM(config.model, layer=config.layer, dtype=config.llm_dtype, tokenizer=config.tokenizer,
                    device=work.device, weights="encoder")
    tokens = prompt_tokens(examples, llm.tokenizer, config.max_length, strict=config.strict, inputs=config.inputs,
                           num_proc=config.num_proc, quiet=config.quiet or not work.is_main)
    return llm, tokens


def _cache_entry(config: EncodeConfig, work: ShardedRun, llm,
                 input_sha: str | None) -> tuple[str | None, Path | None]:
    """The --cache key and entry folder (None, None without --cache or for a hub dataset)."""
    quiet = config.quiet or not work.is_main
    key = cache_key(config, llm.identity(), input_sha) if config.cache else None
    if config.cache and key is None:
        runtime.say("warning: --cache is not used for a Hugging Face dataset (its files are not ours to "
                    "fingerprint)", quiet)
    return key, (Path(config.cache) / key if key else None)


def _linked_from_cache(config: EncodeConfig, work: ShardedRun, cached: Path, key: str, out: Path) -> bool:
    """Link a sound cache entry into --out (True: nothing to encode); a damaged one is encoded again (False)."""
    if not (cached / A.MANIFEST).is_file():
        return False
    damage = work.on_main(lambda: _cache_damage(cached))
    if damage is not None:  # never linked on: encoded again, and the entry replaced at the end
        runtime.say(f"warning: the feature cache entry {cached} is damaged ({damage}): encoding the features "
                    "again; the entry is replaced")  # a warning: --quiet hides only the progress
        return False
    work.prepare()
    if work.finish():
        _link_from_cache(cached, out, config, key)
        runtime.say(f"features found in the cache ({cached}): linked into {out}, nothing encoded",
                    config.quiet or not work.is_main)
    work.done()
    return True


def _cut_shards(config: EncodeConfig, tokens: Tokens) -> tuple[Any, list]:
    """Every prompt's length (an int64 array), and the shards: cut from the prompts sorted by length (longest
    first; equal lengths in input order)."""
    import numpy as np

    lengths = tokens.prompt_lengths.astype(np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    return lengths, [order[i: i + config.shard_size].tolist() for i in range(0, len(order), config.shard_size)]


def _check_space(config: EncodeConfig, work: ShardedRun, llm, lengths: list, shards: list, out: Path) -> int:
    """Say how much disk the features take, before anything is encoded or --out is made; refuse (one line, --out as
    it was) when the file system that holds --out cannot take the shards still to do (on --resume those complete
    on disk are done; with --overwrite the files it removes count as free). Returns the features' bytes.

    The need: the feature rows (exact), plus an estimated allowance for the index (`index_bytes`: the shards' index
    parts and the merged index are on disk together until the parts go). --cache needs no second copy: the entry
    is hard links to the files in --out (a cache on another file system gets a copy; a cache that cannot take it
    only warns)."""
    total_tokens = int(lengths.sum())
    total = feature_bytes(total_tokens, llm.d_model, config.feature_dtype)

    def check() -> None:
        done = work.recorded(len(shards)) if config.resume else set()
        todo = [shards[k] for k in range(len(shards)) if k not in done]
        tokens, examples = sum(int(lengths[shard].sum()) for shard in todo), sum(map(len, todo))
        need = (feature_bytes(tokens, llm.d_model, config.feature_dtype) + index_bytes(tokens, examples)
                + index_bytes(total_tokens, len(lengths)))
        runtime.say(f"features: {total_tokens:,} tokens x {llm.d_model} x {ELEMENT_BYTES[config.feature_dtype]} "
                    f"bytes = {A.human_bytes(total)} ({total:,} bytes) in {out}"
                    + (f"; {len(done)} of {len(shards)} shards already there" if done else ""), config.quiet)
        replaced = A.owned_bytes(out) if config.overwrite else 0
        try:
            free = A.free_space(out) + replaced
        except OSError:  # a file system that does not say: the writes themselves report a full disk
            return
        if need > free:
            raise UserError(f"the features {'still to write ' if done else ''}need {A.human_bytes(need)} on disk "
                            f"({need:,} bytes with the index) but its file system has {A.human_bytes(free)} free"
                            + (" (with the files --overwrite replaces)" if replaced else "")
                            + ": free some space, or give an --out on a larger disk, or skip the feature files: "
                            "`train --llm MODEL` without --features encodes each batch on the fly", path=out)

    work.on_main(check)
    return total


def _plan(config: EncodeConfig, work: ShardedRun, llm, shards: list, input_sha: str | None) -> None:
    """The shards recorded as the run's plan (--out is made ready for writing now)."""
    plan = {"input_sha256": input_sha, "llm": llm.identity(), "config": A.config_to_dict(config),
            "shards": len(shards)}
    for name in ("overwrite", "resume", "quiet", "device", "cache", "num_proc", "data_cache"):
        plan["config"].pop(name)
    work.plan(plan)


def _encode_shards(config: EncodeConfig, work: ShardedRun, llm, examples: Examples, tokens: Tokens,
                   shards: list, out: Path) -> tuple[int, float]:
    """Encode this process's shards still to do: each shard's features file, then its index part. Returns the
    tokens encoded here and the seconds it took."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, config.feature_dtype)
    truncated = tokens.truncated_flags

    def encode_shard(k: int, members: list[int], progress) -> list[Path]:
        ids = dict(zip(members, tokens.rows("prompt_ids", members)))  # this shard's rows, read once
        names = dict(zip(members, examples.ids(members)))
        chunks, rows, offset = [], [], 0
        for batch in _batches(members, tokens.prompt_lengths, config.batch_size):
            input_ids, mask = pad([ids[i] for i in batch], llm.tokenizer.pad_token_id)
            hidden = llm.encode(input_ids, mask)
            for row, i in enumerate(batch):
                n = len(ids[i])
                chunks.append(hidden[row, :n].to("cpu", dtype))
                rows.append({"id": names[i], "shard": k, "offset": offset, "length": n,
                             "input_ids": ids[i].tolist(), "truncated": bool(truncated[i])})
                offset += n
            progress.advance(len(batch), int(mask.sum()))
        shard_path = out / A.FEATURES_SHARD.format(k)
        with A.atomic_output(shard_path) as tmp:
            save_file({"features": torch.cat(chunks).contiguous()}, str(tmp))
        info = {"file": shard_path.name, **A.file_record(shard_path), "examples": len(members)}
        table = index_table(rows).replace_schema_metadata({SHARD_META: json.dumps(info)})
        A.write_parquet(out / A.FEATURES_SHARD_INDEX.format(k), table)
        return [shard_path, out / A.FEATURES_SHARD_INDEX.format(k)]

    return work.run_shards(shards, encode_shard, label="encode", digits=0)


def _batches(members: list[int], lengths, batch_size: int) -> list[list[int]]:
    """A shard's examples in the batches they are encoded in: length-sorted (longest first, stable)."""
    return [[members[j] for j in batch]
            for batch in length_sorted_batches([int(lengths[i]) for i in members], batch_size)]


def _row_examples(shards: list, lengths, batch_size: int):
    """The example behind each row of the shards' index parts, concatenated in shard order (each part lists its
    shard's examples batch by batch, as _batches orders them)."""
    import numpy as np

    return np.fromiter((i for members in shards for batch in _batches(members, lengths, batch_size) for i in batch),
                       np.int64)


def _merge(config: EncodeConfig, work: ShardedRun, llm, examples: list, input_sha: str | None, layout: tuple,
           cache: tuple, timing: tuple, out: Path) -> None:
    """One index in input order (the per-shard parts exist only so that processes and resumes can merge), the
    manifest, the cache entry; then the parts go."""
    import numpy as np
    import pyarrow as pa

    (tokens_, shards), (key, cached), (tokens, seconds, estimate) = layout, cache, timing
    lengths, truncated = tokens_.prompt_lengths, tokens_.truncated
    parts = work.read_parts(len(shards))
    shard_info = [json.loads(p.schema.metadata[SHARD_META]) for p in parts]
    table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    table = table.take(np.argsort(_row_examples(shards, lengths, config.batch_size)))  # input order
    A.write_parquet(out / A.FEATURES_INDEX, table)
    total_tokens = int(lengths.sum())
    manifest = A.make_manifest(
        A.KIND_FEATURES, config,
        llm=llm.identity(), layer=llm.layer, feature_dtype=config.feature_dtype, d_model=llm.d_model,
        max_length=config.max_length, template=config.template, prompt_field=config.prompt_field,
        inputs=[str(p) for p in config.inputs], input_sha256=input_sha,
        counts={"examples": len(examples), "tokens": total_tokens, "truncated": truncated,
                "shards": len(shards)},
        estimate={"bytes": estimate},
        shards=shard_info,
        files={A.FEATURES_INDEX: A.file_record(out / A.FEATURES_INDEX)},
        processes=work.world,
        cache={"key": key, "hit": False} if key else None,
        timing={"seconds": round(seconds, 3),
                "tokens_per_second": round(tokens * work.world / seconds, 1) if seconds else None},
    )
    A.atomic_write_json(out / A.MANIFEST, manifest)
    work.remove_parts(len(shards))
    if cached is not None:
        _publish_to_cache(out, cached)
    runtime.say(f"encoded {len(examples)} prompts ({total_tokens} tokens, {truncated} truncated) with "
                f"{config.model} in {seconds:.1f}s" + (f" on {work.world} processes" if work.world > 1 else "")
                + f" -> {out}", config.quiet)


def _artifact_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name != A.MANIFEST)


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no second copy of the features), else a copy."""
    tmp = A.atomic_path(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _cache_damage(entry: Path) -> str | None:
    """What is wrong with a cache entry's files (missing, or not what its manifest records); None when nothing."""
    try:
        manifest = A.read_manifest(entry, A.KIND_FEATURES)
        A.verify_file(entry / A.FEATURES_INDEX, manifest.get("files", {}).get(A.FEATURES_INDEX),
                      "cached features index")
        for info in manifest["shards"]:
            A.verify_file(entry / Path(info["file"]).name, info, "cached feature shard")
    except UserError as e:
        return e.message
    return None


def _publish_to_cache(out: Path, entry: Path) -> None:
    """Add a finished feature set to the cache, atomically: a cache entry is complete or absent. An entry already
    there (a damaged one: a sound one is linked, never encoded again) is replaced."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for f in [*_artifact_files(out), out / A.MANIFEST]:
            _link(f, tmp / f.name)
        if entry.exists():
            old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as e:  # a full or read-only cache must not fail a finished encode
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / A.MANIFEST).is_file():
            runtime.say(f"warning: could not add the features to the cache {entry.parent} ({e})")


def _link_from_cache(entry: Path, out: Path, config: EncodeConfig, key: str) -> None:
    manifest = A.read_manifest(entry, A.KIND_FEATURES)
    for f in _artifact_files(entry):
        _link(f, out / f.name)
    manifest.update(config=A.config_to_dict(config), cache={"key": key, "hit": True, "entry": str(entry)},
                    created=A.now())
    A.atomic_write_json(out / A.MANIFEST, manifest)
