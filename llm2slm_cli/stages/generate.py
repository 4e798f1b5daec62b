"""`llm2slm generate`: answer prompts with a trained checkpoint, or with a plain LLM/SLM as a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import runtime
from llm2slm_cli.config import GenerateConfig
from llm2slm_cli.data import Fields, length_sorted_batches, pad, read_examples
from llm2slm_cli.errors import UserError


def generation_kwargs(config: Any) -> dict[str, Any]:
    """Options for transformers' generate: beam search (paper: 4, length penalty 0.6), greedy, or nucleus."""
    if config.sample:
        return {"do_sample": True, "top_p": config.top_p, "temperature": config.temperature, "num_beams": 1,
                "max_new_tokens": config.max_new_tokens}
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": config.beams, "max_new_tokens": config.max_new_tokens}
    if config.beams > 1:
        kwargs.update(length_penalty=config.length_penalty, early_stopping=True)
    return kwargs


class PlainModel:
    """A transformers model used as it is (the LLM alone, or an SLM without training), with the same interface."""

    def __init__(self, spec: str, *, dtype: str = "float32", tokenizer=None, device="cpu") -> None:
        from llm2slm_cli import models as M
        from llm2slm_cli.errors import UserError

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

    def generate(self, prompt_ids, prompt_mask, **generation) -> list[list[int]]:
        import torch

        from llm2slm_cli.llm2slm import _right_to_left, strip_generated

        tok = self.prompt_tokenizer
        with torch.inference_mode():
            if self.kind == "encoder-decoder":
                out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **generation)[:, 1:]
            else:
                ids, mask = _right_to_left(prompt_ids, prompt_mask)
                out = self.model.generate(input_ids=ids, attention_mask=mask, **generation)[:, ids.shape[1]:]
        return strip_generated(out, tok.eos_token_id, tok.pad_token_id)


class SpeculativeModel:
    """A checkpoint drafting for an LLM (decoding.speculative_generate), with the interface of the other models."""

    def __init__(self, draft, verifier, config: GenerateConfig) -> None:
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
                            f"{config.model} and the LLM {verifier.spec!r} have different vocabularies")
        self.draft, self.verifier, self.config = draft, verifier, config
        self.prompt_tokenizer = self.target_tokenizer = verifier.tokenizer
        self.stats = SpeculativeStats()
        self.generator = torch.Generator(device=next(draft.parameters()).device).manual_seed(config.seed)

    def generate(self, prompt_ids, prompt_mask, **_ignored) -> list[list[int]]:
        from llm2slm_cli.decoding import speculative_generate

        c = self.config
        tokens, stats = speculative_generate(
            self.draft, self.verifier, prompt_ids, prompt_mask, gamma=c.gamma, max_new_tokens=c.max_new_tokens,
            do_sample=c.sample, temperature=c.temperature, top_p=c.top_p, generator=self.generator)
        self.stats.add(stats)
        return tokens


def load_generator(config: GenerateConfig, device):
    """A checkpoint directory from `train`, or any plain model spec; with --speculative, a draft and its LLM."""
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

    path = Path(config.model)
    is_checkpoint = path.is_dir() and (path / A.MODEL_CONFIG).is_file()
    if config.speculative and not is_checkpoint:
        raise UserError("--speculative needs a checkpoint from `train` as --model (the draft)", path=config.model)
    if is_checkpoint:
        model = LLMToSLM.from_pretrained(path, llm_spec=config.llm, device=device)
        identity = {"name": str(path), "kind": "llm2slm", **_asdict(model.config)}
        if config.speculative:
            if config.verifier:
                verifier = FrozenLLM(config.verifier, dtype=config.dtype, device=device)
            elif model.llm is not None:
                verifier = model.llm
            else:
                raise UserError("this draft was trained without an LLM: name the LLM that checks it with --verifier",
                                path=path)
            identity = {"draft": identity, "verifier": verifier.identity(), "gamma": config.gamma}
            return (SpeculativeModel(model, verifier, config), identity, model.config.template,
                    model.config.max_prompt_length)
        return model, identity, model.config.template, model.config.max_prompt_length
    plain = PlainModel(config.model, dtype=config.dtype, tokenizer=config.tokenizer, device=device)
    return plain, plain.identity, None, plain.max_prompt_length


def _asdict(cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def run(config: GenerateConfig) -> Path:
    import pyarrow as pa
    import torch

    out = Path(config.out)
    device = runtime.device(config.device)
    model, identity, template, max_prompt_length = load_generator(config, device)
    template = config.template or template
    fields = Fields(prompt=config.prompt_field, target=config.target_field, id=config.id_field, template=template)
    examples = read_examples(config.inputs, fields)
    A.prepare_output_dir(out, overwrite=config.overwrite, resumable=False)
    max_length = config.max_length or max_prompt_length
    ids, truncated = runtime.tokenize_prompts(model.prompt_tokenizer, [e.prompt for e in examples], max_length)
    generation = generation_kwargs(config)
    if config.speculative:
        generation = {"speculative": True, "gamma": config.gamma, "do_sample": config.sample,
                      "max_new_tokens": config.max_new_tokens,
                      **({"top_p": config.top_p, "temperature": config.temperature} if config.sample else {})}
    torch.manual_seed(config.seed)

    outputs: list[list[int] | None] = [None] * len(examples)
    new_tokens = 0
    with runtime.progress(config.quiet) as bar, runtime.timer() as clock:
        task = bar.add_task("generate", total=len(examples), rate="")
        for batch in length_sorted_batches([len(t) for t in ids], config.batch_size):
            prompt_ids, prompt_mask = pad([ids[i] for i in batch], model.prompt_tokenizer.pad_token_id)
            result = model.generate(prompt_ids.to(device), prompt_mask.to(device), **generation)
            for i, tokens in zip(batch, result):
                outputs[i] = tokens
                new_tokens += len(tokens)
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, advance=len(batch), rate=f"{new_tokens / elapsed:,.1f} tok/s")
    seconds = clock["seconds"]

    tok = model.target_tokenizer
    predictions = tok.batch_decode(outputs, skip_special_tokens=True)
    columns: dict[str, Any] = {
        "id": pa.array([e.id for e in examples], pa.string()),
        "prompt": pa.array([e.prompt for e in examples], pa.string()),
        "prediction": pa.array([p.strip() for p in predictions], pa.string()),
        "n_tokens": pa.array([len(o) for o in outputs], pa.int32()),
    }
    if all(e.target is not None for e in examples):
        columns["reference"] = pa.array([e.target for e in examples], pa.string())
    A.write_parquet(out / A.PREDICTIONS, pa.table(columns))
    manifest = A.make_manifest(
        A.KIND_PREDICTIONS, config, model=identity, generation=generation, template=template,
        inputs=[str(p) for p in config.inputs],
        input_sha256=A.input_sha256(config.inputs),
        counts={"examples": len(examples), "generated_tokens": new_tokens, "truncated_prompts": sum(truncated)},
        speculative=model.stats.as_dict() if isinstance(model, SpeculativeModel) else None,
        timing={"seconds": round(seconds, 3), "tokens_per_second": round(new_tokens / seconds, 2) if seconds else None},
    )
    A.atomic_write_json(out / A.MANIFEST, manifest)
    runtime.say(f"generated {new_tokens} tokens for {len(examples)} prompts in {seconds:.1f}s -> {out}",
                config.quiet)
    if isinstance(model, SpeculativeModel):
        st = model.stats
        runtime.say(f"speculative decoding: {st.acceptance_rate:.1%} of drafts accepted, "
                    f"{st.tokens_per_llm_call:.2f} tokens per LLM call ({st.rounds} LLM calls)", config.quiet)
    return out
