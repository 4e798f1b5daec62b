"""`llm2slm generate`: answer prompts with a trained checkpoint, or with a plain LLM/SLM as a baseline.

Prompts are cut into shards of --shard-size (input order), each with its own batches and random seed, so one
process, several under `accelerate launch`, and a run resumed after a crash give the same predictions
(see sharding.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import GenerateConfig
from llm2slm_cli.data import Fields, length_sorted_batches, pad, read_examples
from llm2slm_cli.errors import UserError
from llm2slm_cli.sharding import ShardedRun, shard_seed

PART = "predictions-{:05d}.parquet"
SPECULATIVE_META = b"llm2slm_speculative"


def generation_kwargs(config: Any) -> dict[str, Any]:
    """Options for transformers' generate: beam search (paper: 4, length penalty 0.6), greedy, or nucleus; the
    repetition penalty and n-gram ban where they are on (so a run without them records what it did before)."""
    if config.sample:
        kwargs = {"do_sample": True, "top_p": config.top_p, "temperature": config.temperature, "num_beams": 1,
                  "max_new_tokens": config.max_new_tokens}
    else:
        kwargs = {"do_sample": False, "num_beams": config.beams, "max_new_tokens": config.max_new_tokens}
        if config.beams > 1:
            kwargs.update(length_penalty=config.length_penalty, early_stopping=True)
    if config.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = config.repetition_penalty
    if config.no_repeat_ngram_size > 0:
        kwargs["no_repeat_ngram_size"] = config.no_repeat_ngram_size
    return kwargs


class PlainModel:
    """A transformers model used as it is (the LLM alone, or an SLM without training), with the same interface."""

    def __init__(self, spec: str, *, dtype: str = "float32", tokenizer=None, device="cpu") -> None:
        from llm2slm_cli import models as M

        hf_config = M.load_config(spec)
        self.kind = M.model_kind(hf_config)
        if self.kind == "encoder-only":
            raise UserError(f"{spec!r} is an encoder-only model and cannot generate")
        self.model = M.load_model(spec, dtype=dtype, role="model").to(device)
        self.prompt_tokenizer = self.target_tokenizer = M.load_tokenizer(spec, tokenizer)
        self.template = None
        self.max_prompt_length = 512
        tok = self.prompt_tokenizer
        for cfg in (self.model.generation_config,):
            cfg.pad_token_id = tok.pad_token_id
            cfg.eos_token_id = tok.eos_token_id
        self.identity = {"name": spec, "kind": self.kind, "fingerprint": M.state_fingerprint(self.model)}

    def generate(self, prompt_ids, prompt_mask, *, streamer=None, **generation) -> list[list[int]]:
        """Our decoding loop (decoding.decode), or transformers' generate for what it does not do (stop strings);
        `streamer` (decoding.Streamer) sees our loop's tokens step by step."""
        import torch

        from llm2slm_cli.decoding import generate_plain, refuse_without_loop, search_from
        from llm2slm_cli.padding import right_to_left, strip_generated

        tok = self.prompt_tokenizer
        if generation.get("stop_strings"):
            generation = {**generation, "tokenizer": tok}
        ids, mask = (prompt_ids, prompt_mask) if self.kind == "encoder-decoder" else \
            right_to_left(prompt_ids, prompt_mask)
        search = search_from(generation, self.model.generation_config, eos=tok.eos_token_id, pad=tok.pad_token_id,
                             device=ids.device)
        if search is None:
            refuse_without_loop(self.model)
        with torch.inference_mode():
            if search is not None:
                out = generate_plain(self.model, ids, mask, search, streamer=streamer)
            elif self.kind == "encoder-decoder":
                out = self.model.generate(input_ids=ids, attention_mask=mask, **generation)[:, 1:]
            else:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **generation)[:, ids.shape[1]:]
        return strip_generated(out, tok.eos_token_id, tok.pad_token_id)


class SpeculativeModel:
    """A checkpoint drafting for an LLM (decoding.speculative_generate), with the interface of the other models."""

    def __init__(self, draft, verifier, *, name: str, gamma: int = 4, seed: int = 0) -> None:
        import torch

        from llm2slm_cli import models as M
        from llm2slm_cli.decoding import SpeculativeStats

        if verifier.kind == "encoder-only":
            raise UserError(f"the LLM {verifier.spec!r} is encoder-only and cannot check drafts: give a generative "
                            "LLM that reads the same vocabulary with --verifier")
        if verifier.tokenizer is None or draft.target_tokenizer is None or \
                M.tokenizer_fingerprint(verifier.tokenizer) != M.tokenizer_fingerprint(draft.target_tokenizer) or \
                M.tokenizer_fingerprint(verifier.tokenizer) != M.tokenizer_fingerprint(draft.prompt_tokenizer):
            raise UserError(f"speculative decoding needs a draft that reads and writes the LLM's tokens: the draft "
                            f"{name} and the LLM {verifier.spec!r} have different vocabularies")
        self.draft, self.verifier, self.gamma = draft, verifier, gamma
        self.prompt_tokenizer = self.target_tokenizer = verifier.tokenizer
        self.stats = SpeculativeStats()
        self.generator = torch.Generator(device=next(draft.parameters()).device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, gamma: int | None = None, streamer=None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, **_ignored) -> list[list[int]]:
        """Options as `speculative_kwargs` writes them."""
        from llm2slm_cli.decoding import speculative_generate

        refuse_repetition_controls(repetition_penalty, no_repeat_ngram_size)

        tokens, stats = speculative_generate(
            self.draft, self.verifier, prompt_ids, prompt_mask, gamma=gamma or self.gamma,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            generator=self.generator, streamer=streamer)
        self.stats.add(stats)
        return tokens


def refuse_repetition_controls(repetition_penalty: float, no_repeat_ngram_size: int) -> None:
    """Speculative decoding has no repetition penalty or n-gram ban (drafts and checks would both need them)."""
    if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
        raise UserError("speculative decoding does not do --repetition-penalty or --no-repeat-ngram-size: leave "
                        "them out, or decode without --speculative")


def speculative_kwargs(config: Any) -> dict[str, Any]:
    """Options for SpeculativeModel.generate (recorded in the predictions' manifest as the generation)."""
    return {"speculative": True, "gamma": config.gamma, "do_sample": config.sample,
            "max_new_tokens": config.max_new_tokens,
            **({"top_p": config.top_p, "temperature": config.temperature} if config.sample else {})}


def load_generator(config: GenerateConfig, device):
    """A checkpoint directory from `train`, or any plain model spec; with --speculative, a draft and its LLM."""
    return open_model(config.model, llm=config.llm, speculative=config.speculative, verifier=config.verifier,
                      gamma=config.gamma, seed=config.seed, dtype=config.dtype, tokenizer=config.tokenizer,
                      device=device, quantize=config.quantize, compile=config.compile,
                      llm_weights="lazy" if config.features else "encoder")  # stored features: no LLM weights


def _cast(model, dtype: str, path: Path):
    """A checkpoint's SLM and projector in --dtype (its LLM runs in the precision it was trained with); float16 is
    refused for a T5-family SLM, as for every T5 model."""
    from llm2slm_cli import models as M

    M.refuse_float16(model.slm.config.model_type, dtype, f"the SLM of checkpoint {path}")
    if M.DTYPES.get(dtype, dtype) != "float32":
        model.to(M.torch_dtype(dtype))
    return model


def is_checkpoint(spec: str | Path) -> bool:
    path = Path(spec)
    return path.is_dir() and (path / A.MODEL_CONFIG).is_file()


def open_model(spec: str, *, llm: str | None = None, speculative: bool = False, verifier: str | None = None,
               gamma: int = 4, seed: int = 0, dtype: str = "float32", tokenizer=None, device="cpu",
               quantize: str = "none", compile: bool = False, llm_weights: str = "encoder"):
    """(model, identity, template, max prompt length) for a checkpoint or a plain model spec; with `speculative`,
    the checkpoint `spec` drafts for `verifier` (default: the LLM it was trained with). `quantize` "int8" or
    "int8-body" (quantize.py) and `compile` (a static cache and compiled steps in decoding.decode) change how it
    decodes; the identity records them."""
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
    from llm2slm_cli.quantize import check_decode_options, check_quantize

    path = Path(spec)
    check_decode_options(quantize=quantize, compile=compile, speculative=speculative)
    check_quantize(quantize, device=device, dtype=dtype)
    if speculative and not is_checkpoint(path):
        raise UserError("--speculative needs a checkpoint from `train` as --model (the draft)", path=spec)
    if is_checkpoint(path):
        model = _cast(LLMToSLM.from_pretrained(path, llm_spec=llm, device=device, llm_weights=llm_weights), dtype,
                      path)
        identity = {"name": str(path), "kind": "llm2slm", **_asdict(model.config)}
        if quantize != "none" or compile:
            identity.update(_decode_as(model, quantize, compile))
        if speculative:
            if verifier:
                checker = FrozenLLM(verifier, dtype=dtype, device=device)
            elif model.llm is not None:
                checker = model.llm.whole()  # it verifies with its decoder: loaded whole
            else:
                raise UserError("this draft was trained without an LLM: name the LLM that checks it with --verifier",
                                path=path)
            identity = {"draft": identity, "verifier": checker.identity(), "gamma": gamma}
            return (SpeculativeModel(model, checker, name=str(spec), gamma=gamma, seed=seed), identity,
                    model.config.template, model.config.max_prompt_length)
        return model, identity, model.config.template, model.config.max_prompt_length
    plain = PlainModel(spec, dtype=dtype, tokenizer=tokenizer, device=device)
    if quantize != "none" or compile:
        plain.identity.update(_decode_as(plain, quantize, compile))
    return plain, plain.identity, None, plain.max_prompt_length


def _decode_as(model, quantize: str, compile: bool) -> dict[str, Any]:
    """Quantize `model` in place and/or set it to decode with a static cache and compiled steps; what to add to its
    identity."""
    from llm2slm_cli.decoding import search_from, set_decode_options
    from llm2slm_cli.quantize import quantize_model

    done = quantize_model(model, quantize)
    if compile:
        if getattr(model, "config", None) is not None and (model.config.peft or {}).get("peft_type") in (
                "PROMPT_TUNING", "PREFIX_TUNING"):
            raise UserError("--compile does not take a prompt- or prefix-tuned checkpoint (it decodes with "
                            "transformers' generate)")
        target = model.model if isinstance(model, PlainModel) else model.slm
        g = target.generation_config
        if search_from({"max_new_tokens": 1}, g, eos=g.eos_token_id, pad=g.pad_token_id, device=None) is None:
            raise UserError("--compile needs this toolkit's decoding loop, and this model's generation config asks "
                            "for what only transformers' generate does (forced or banned words and the like)")
        set_decode_options(target, static_cache=True, compile=True)
    return {**({"quantization": done} if done else {}), **({"compile": True} if compile else {})}


def _checkpoint_template(path: Path) -> str | None:
    """The template a checkpoint was trained with (None for a plain model); refuses other artifact directories."""
    from llm2slm_cli.llm2slm import read_model_config

    if path.is_dir() and (path / A.MODEL_CONFIG).is_file():
        return read_model_config(path).template
    if path.is_dir() and (path / A.MANIFEST).is_file():
        kind = A.read_json_or_none(path / A.MANIFEST, "kind")
        hint = f" (its checkpoints are {path / A.CHECKPOINT_FINAL} and {path}/step-NNNNNN)" \
            if kind == A.KIND_TRAINING else ""
        raise UserError(f"is a '{kind}' artifact, expected a checkpoint from `train` or a model{hint}", path=path)
    return None


def _asdict(cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def run(config: GenerateConfig) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    if config.to_stdout:
        return print_responses(config)
    A.check_out_not_input(config.out, config)  # first: --out is none of the inputs, nor holds or lies inside one
    out = Path(config.out)
    template = config.template or _checkpoint_template(Path(config.model))
    fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field, template=template)
    examples = read_examples(config.inputs, fields)  # a bad input is refused before anything is loaded or written
    with ShardedRun(out, stage="generate", overwrite=config.overwrite, resume=config.resume, device=config.device,
                    part=PART, quiet=config.quiet) as work:
        if work.finished:
            return out
        quiet = config.quiet or not work.is_main
        model, identity, _, max_prompt_length = load_generator(config, work.device)
        max_length = config.max_length or max_prompt_length
        ids, truncated = runtime.tokenize_prompts(model.prompt_tokenizer, [e.prompt for e in examples], max_length,
                                                  strict=config.strict,
                                                  where=runtime.places(config.inputs, examples))
        features = _stored_features(config.features, model, examples, ids) if config.features else None
        generation = generation_kwargs(config)
        if config.first_line and isinstance(model, PlainModel):
            generation["stop_strings"] = ["\n"]
        if config.speculative:
            generation = speculative_kwargs(config)
        input_sha = A.input_sha256(config.inputs)
        shards = [list(range(i, min(i + config.shard_size, len(examples))))
                  for i in range(0, len(examples), config.shard_size)]
        work.plan({"input_sha256": input_sha, "model": identity, "generation": generation, "shards": len(shards),
                   "template": template, "max_length": max_length, "seed": config.seed,
                   "batch_size": config.batch_size})

        tok = model.target_tokenizer
        todo = work.todo(len(shards))
        batcher = HalvingBatcher(config.batch_size)
        new_tokens = 0
        with runtime.progress(quiet) as bar, runtime.timer() as clock:
            task = bar.add_task("generate", total=sum(len(shards[k]) for k in todo), rate="")
            for k in todo:
                members = shards[k]
                torch.manual_seed(shard_seed(config.seed, k))
                if isinstance(model, SpeculativeModel):
                    model.reseed(shard_seed(config.seed, k))
                outputs = generate_shard(model, ids, members, config.batch_size, generation, work, batcher, bar, task,
                                         features=features)
                new_tokens += sum(len(t) for t in outputs.values())
                texts = tok.batch_decode([outputs[i] for i in members], skip_special_tokens=True)
                columns: dict[str, Any] = {
                    "id": pa.array([examples[i].id for i in members], pa.string()),
                    "prompt": pa.array([examples[i].prompt for i in members], pa.string()),
                    "prediction": pa.array([_first_line(t) if config.first_line else t.strip() for t in texts],
                                           pa.string()),
                    "n_tokens": pa.array([len(outputs[i]) for i in members], pa.int32()),
                }
                if any(e.target is not None for e in examples):  # examples without one get a null reference
                    columns["reference"] = pa.array([examples[i].target for i in members], pa.string())
                table = pa.table(columns)
                if isinstance(model, SpeculativeModel):  # this shard's counts, summed over shards at the end
                    table = table.replace_schema_metadata({SPECULATIVE_META: json.dumps(model.stats.as_counts())})
                    model.stats.reset()
                A.write_parquet(out / PART.format(k), table)
                work.mark_done(k, [out / PART.format(k)])
        seconds = clock["seconds"]

        if work.finish():
            work.check_parts(len(shards))
            parts = [pq.read_table(out / PART.format(k)) for k in range(len(shards))]
            speculative = None
            if isinstance(model, SpeculativeModel):
                from llm2slm_cli.decoding import SpeculativeStats

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
                counts={"examples": len(examples), "generated_tokens": generated,
                        "truncated_prompts": sum(truncated)},
                speculative=speculative,
                files={A.PREDICTIONS: A.file_record(out / A.PREDICTIONS)},
                processes=work.world, batch_size_reductions=batcher.reductions,
                timing={"seconds": round(seconds, 3),
                        "tokens_per_second": round(new_tokens * work.world / seconds, 2) if seconds else None},
            )
            A.atomic_write_json(out / A.MANIFEST, manifest)
            for k in range(len(shards)):
                (out / PART.format(k)).unlink()
            runtime.say(f"generated {generated} tokens for {len(examples)} prompts in {seconds:.1f}s -> {out}",
                        config.quiet)
            if speculative:
                runtime.say(f"speculative decoding: {speculative['acceptance_rate']:.1%} of drafts accepted, "
                            f"{speculative['tokens_per_llm_call']:.2f} tokens per LLM call "
                            f"({speculative['llm_calls']} LLM calls)", config.quiet)
        work.done()
    return out


def print_responses(config: GenerateConfig) -> None:
    """--prompt and - (stdin): responses on stdout, as text lines or --json objects; one prompt streams."""
    import sys

    from llm2slm_cli import runtime
    from llm2slm_cli.api import Model

    template = config.template or _checkpoint_template(Path(config.model))
    records = _stdin_prompts(sys.stdin.read(), config, template) if not config.prompt else \
        [(str(i), f"--prompt {i + 1}", p, True) for i, p in enumerate(config.prompt)]
    device = runtime.device(config.device)
    impl, identity, _, max_length = load_generator(config, device)
    kind = "speculative" if config.speculative else "llm2slm" if is_checkpoint(config.model) else "plain"
    model = Model(impl, name=config.model, kind=kind, identity=identity, template=template,
                  max_prompt_length=config.max_length or max_length, chat_template=None, device=device)
    texts = [model.prompt_text(p, where=where) if fill else p for _, where, p, fill in records]
    options = {f: getattr(config, f) for f in ("num_beams", "length_penalty", "sample", "top_p", "temperature",
                                               "seed", "max_new_tokens", "repetition_penalty",
                                               "no_repeat_ngram_size")}
    if config.first_line and isinstance(impl, PlainModel):
        options["stop"] = ["\n"]
    streaming = len(texts) == 1 and not config.json and not config.first_line
    printer = _Printer() if streaming else None
    results = model.complete(texts, template=False, strict=config.strict, batch_size=config.batch_size,
                             on_text=printer, **options)
    if printer is not None:
        print(flush=True)
        return
    for (key, *_), text, result in zip(records, texts, results):
        prediction = _first_line(result.text) if config.first_line else result.text.strip()
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
    from llm2slm_cli.data import Fields, _records_jsonl, _split_lines, _to_examples

    lines = _split_lines(text)  # line feeds only, as files are read: a U+2028 inside a prompt splits nothing
    first = next((line.strip() for line in lines if line.strip()), None)
    if first is None:
        raise UserError("no prompts on stdin")
    if first.startswith("{"):
        fields = Fields(prompt=config.prompt_field, target=None, id=config.id_field, template=template)
        examples = _to_examples(_records_jsonl(Path("<stdin>"), text), "<stdin>", fields, False)
        return [(e.id, f"<stdin>, {e.place}", e.prompt, False) for e in examples]
    lines = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    return [(str(k), f"<stdin>, line {i}", line, True) for k, (i, line) in enumerate(lines)]


def generate_shard(model, ids, members: list[int], batch_size: int, generation: dict[str, Any], work,
                   batcher: HalvingBatcher, bar, task, features=None) -> dict[int, list[int]]:
    """The outputs of one shard's prompts (`members`), in length-sorted batches; the progress bar advances and a
    Ctrl-C is honoured after each batch. `generate` and `distill-labels` both decode through here. `features(b)`:
    the stored LLM features of prompts `b`, padded (else the checkpoint's LLM encodes them)."""
    outputs: dict[int, list[int]] = {}
    pad_id = model.prompt_tokenizer.pad_token_id
    stored = {} if features is None else None
    for batch in length_sorted_batches([len(ids[i]) for i in members], batch_size):
        batch = [members[j] for j in batch]
        for part, result in batcher(batch, lambda b: model.generate(
                *(t.to(work.device) for t in pad([ids[i] for i in b], pad_id)), **generation,
                **(stored if stored is not None else {"features": features(b).to(work.device)}))):
            outputs.update(zip(part, result))
        progress = bar.tasks[task]
        tokens = progress.fields.get("tokens", 0) + sum(len(outputs[i]) for i in batch)
        bar.update(task, advance=len(batch), tokens=tokens,
                   rate=f"{tokens / max(progress.elapsed or 1e-9, 1e-9):,.1f} tok/s")
        work.check_stop()
    return outputs


def _stored_features(path: Path, model, examples, ids):
    """--features: the store checked against the checkpoint's LLM (its identity, without loading it) and against
    each prompt (the token ids it was encoded from); returns features(batch) -> (batch, longest, d_llm)."""
    import numpy as np
    import torch

    from llm2slm_cli.features import FeatureStore
    from llm2slm_cli.llm2slm import LLMToSLM, check_llm

    if not isinstance(model, LLMToSLM) or not model.has_llm:
        raise UserError("--features needs an LLM-to-SLM checkpoint (trained with --llm) as --model")
    store = FeatureStore(path)
    check_llm(model.llm, store.llm, f"features {path}")
    for e, prompt in zip(examples, ids):
        if e.id not in store:
            raise UserError(f"example {e.id!r} has no features in {path}: encode this file with the same options")
        if not np.array_equal(store.input_ids(e.id), prompt):
            raise UserError(f"example {e.id!r}: its prompt differs from the one encoded in {path} (another file, "
                            "template or --max-length?)")

    def features(batch: list[int]):
        rows = [store.features(examples[i].id) for i in batch]
        out = torch.zeros(len(rows), max(len(ids[i]) for i in batch), rows[0].shape[1], dtype=rows[0].dtype)
        for j, r in enumerate(rows):
            out[j, : r.shape[0]] = r
        return out

    return features


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


class HalvingBatcher:
    """Runs a batch; on out-of-memory, halves it and goes on with halves (and with the smaller size for the rest of
    the run), with a warning. Halves of a length-sorted batch are the batches a smaller --batch-size would make."""

    def __init__(self, batch_size: int) -> None:
        self.size = batch_size
        self.reductions: list[int] = []

    def __call__(self, batch: list[int], fn) -> list[tuple[list[int], Any]]:
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        done, queue = [], [batch[i: i + self.size] for i in range(0, len(batch), self.size)]
        while queue:
            part = queue.pop(0)
            try:
                done.append((part, fn(part)))
            except Exception as e:
                if not should_reduce_batch_size(e):
                    raise
                if len(part) == 1:
                    raise UserError("out of memory with a batch of one prompt: use a shorter --max-length or "
                                    "--max-new-tokens, a smaller model dtype, or a larger device") from None
                clear_device_cache(garbage_collection=True)
                self.size = max(1, len(part) // 2)
                self.reductions.append(self.size)
                runtime.say(f"warning: out of memory with a batch of {len(part)}: continuing with batches of "
                            f"{self.size}")
                queue = [p[i: i + self.size] for p in [part, *queue] for i in range(0, len(p), self.size)]
        return done
