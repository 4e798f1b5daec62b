"""Opening a model to decode with, and decoding many prompts: what the `generate` and `distill-labels` stages, the
Python API (api.py, and through it `serve`) and the benchmarks share.

- open_model: a checkpoint from `train` (an LLMToSLM), a plain model (PlainModel), or a checkpoint drafting for an
  LLM (SpeculativeModel); all three have prompt_tokenizer, target_tokenizer and
  generate(prompt_ids, prompt_mask, **options) -> one list of new token ids per prompt.
- generation_kwargs, speculative_kwargs: a config's decoding options as those generate methods take them (and as
  manifests record them).
- generate_shard with a HalvingBatcher: one shard's prompts in length-sorted batches, a batch halved on
  out-of-memory.

torch, transformers and the model code (llm2slm.py, decoding.py) are imported inside the functions that use them,
so importing this module (api.py does) stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import fingerprints, runtime
from llm2slm_cli import loading as M
from llm2slm_cli.data import length_sorted_batches, pad
from llm2slm_cli.errors import UserError
from llm2slm_cli.gguf_export import check_exportable
from llm2slm_cli.llama_backend import gguf_path, open_backend
from llm2slm_cli.llama_backend import require as require_llama_cpp
from llm2slm_cli.padding import right_to_left, strip_generated
from llm2slm_cli.quantize import check_decode_options, check_quantize, quantize_model


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


def speculative_kwargs(config: Any) -> dict[str, Any]:
    """Options for SpeculativeModel.generate (recorded in the predictions' manifest as the generation)."""
    return {"speculative": True, "gamma": config.gamma, "do_sample": config.sample,
            "max_new_tokens": config.max_new_tokens,
            **({"top_p": config.top_p, "temperature": config.temperature} if config.sample else {})}


def refuse_repetition_controls(repetition_penalty: float, no_repeat_ngram_size: int) -> None:
    """Speculative decoding has no repetition penalty or n-gram ban (drafts and checks would both need them)."""
    if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
        raise UserError("speculative decoding does not do --repetition-penalty or --no-repeat-ngram-size: leave "
                        "them out, or decode without --speculative")


def example_seed(seed: int, index: int) -> int:
    """The sampling seed of the prompt at `index` (its place in the input, or in the call's list of prompts) under a
    run's --seed: a function of the two alone, so a prompt's sample does not depend on its batch, shard, process
    or a resume. The first prompt's is the seed itself, so one prompt samples as its seed says everywhere (the API,
    `generate --prompt`, `serve`)."""
    return (seed + index * 1_000_003) % 2**63


def first_line(text: str) -> str:
    """The first line of a response, stripped (`--first-line`: a model that goes on after its answer is cut at the
    line break)."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


class PlainModel:
    """A transformers model used as it is (the LLM alone, or an SLM without training), with the same interface."""

    def __init__(self, spec: str, *, dtype: str = "float32", tokenizer=None, device="cpu") -> None:
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
        self.identity = {"name": spec, "kind": self.kind, "fingerprint": fingerprints.state_fingerprint(self.model)}

    def generate(self, prompt_ids, prompt_mask, *, streamer=None, seeds=None, **generation) -> list[list[int]]:
        """Our decoding loop (decoding.decode), or transformers' generate for what it does not do (stop strings);
        `streamer` (decoding.Streamer) sees our loop's tokens step by step; `seeds` (one per prompt) give each row
        of our loop's sampling a generator of its own (transformers' generate draws from torch's global one)."""
        import torch

        # decoding.py imports torch: off the light path
        from llm2slm_cli.decoding import generate_plain, refuse_without_loop, row_generators

        tok = self.prompt_tokenizer
        if generation.get("stop_strings"):
            generation = {**generation, "tokenizer": tok}
        ids, mask = ((prompt_ids, prompt_mask) if self.kind == "encoder-decoder" else
            right_to_left(prompt_ids, prompt_mask))
        search = self.decoding_search(generation, ids.device)
        if search is None:
            refuse_without_loop(self.model)
        with torch.inference_mode():
            if search is not None:
                generator = row_generators(seeds, ids.device) if search.do_sample else None
                out = generate_plain(self.model, ids, mask, search, generator=generator, streamer=streamer)
            elif self.kind == "encoder-decoder":
                out = self.model.generate(input_ids=ids, attention_mask=mask, **generation)[:, 1:]
            else:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **generation)[:, ids.shape[1]:]
        return strip_generated(out, tok.eos_token_id, tok.pad_token_id)

    # the step-level batcher's hooks (continuous.py): `generate`'s own first step, and its Search

    @property
    def decoder(self):
        """The model that steps."""
        return self.model

    def decoding_search(self, generation: dict[str, Any], device):
        """The decoding.Search `generate` decodes `generation` with, or None where it uses transformers' generate."""
        from llm2slm_cli.decoding import search_from  # decoding.py imports torch: off the light path

        tok = self.prompt_tokenizer
        return search_from(generation, self.model.generation_config, eos=tok.eos_token_id, pad=tok.pad_token_id,
                           device=device)

    def prefill(self, prompt_ids, prompt_mask, search):
        """The prompts' pass as `generate` runs it (right-padded prompts): a decoding.Stepper and the first token's
        scores."""
        import torch

        from llm2slm_cli.decoding import start  # decoding.py imports torch: off the light path

        encoder_decoder = self.kind == "encoder-decoder"
        ids, mask = (prompt_ids, prompt_mask) if encoder_decoder else right_to_left(prompt_ids, prompt_mask)
        first = getattr(self.model.generation_config, "decoder_start_token_id", None) if encoder_decoder else None
        with torch.inference_mode():
            return start(self.model, mask, search, input_ids=ids, decoder_start=first)

    def tokenizer_ids(self, ids):
        return ids


class SpeculativeModel:
    """A checkpoint drafting for an LLM (decoding.speculative_generate), with the interface of the other models."""

    def __init__(self, draft, verifier, *, name: str, gamma: int = 4, seed: int = 0) -> None:
        import torch

        from llm2slm_cli.decoding import SpeculativeStats  # decoding.py imports torch: off the light path

        if verifier.kind == "encoder-only":
            raise UserError(f"the LLM {verifier.spec!r} is encoder-only and cannot check drafts: give a generative "
                            "LLM that reads the same vocabulary with --verifier")
        vocab = fingerprints.tokenizer_fingerprint
        if (verifier.tokenizer is None or draft.target_tokenizer is None or
                vocab(verifier.tokenizer) != vocab(draft.target_tokenizer) or
                vocab(verifier.tokenizer) != vocab(draft.prompt_tokenizer)):
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
        """Options as `speculative_kwargs` writes them. Sampling draws from this model's one generator (`reseed`):
        rows decode in lockstep, so per-row seeds (`seeds`, which the other models take) are ignored here."""
        from llm2slm_cli.decoding import speculative_generate  # decoding.py imports torch: off the light path

        refuse_repetition_controls(repetition_penalty, no_repeat_ngram_size)

        tokens, stats = speculative_generate(
            self.draft, self.verifier, prompt_ids, prompt_mask, gamma=gamma or self.gamma,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            generator=self.generator, streamer=streamer)
        self.stats.add(stats)
        return tokens


def is_checkpoint(spec: str | Path) -> bool:
    path = Path(spec)
    return path.is_dir() and (path / A.MODEL_CONFIG).is_file()


def kind_of(model: Any) -> str:
    """What open_model opened: "speculative" (a draft and its LLM), "plain" (a model as it is) or "llm2slm" (a
    checkpoint)."""
    return ("speculative" if isinstance(model, SpeculativeModel) else "plain" if isinstance(model, PlainModel)
        else "llm2slm")


def open_model(spec: str, *, llm: str | None = None, speculative: bool = False, verifier: str | None = None,
               gamma: int = 4, seed: int = 0, dtype: str = "float32", tokenizer=None, device="cpu",
               quantize: str = "none", compile: bool = False, llm_weights: str = "encoder",
               backend: str = "torch", gguf: str | Path | None = None):
    """(model, identity, template, max prompt length) for a checkpoint or a plain model spec; with `speculative`,
    the checkpoint `spec` drafts for `verifier` (default: the LLM it was trained with). `quantize` "int8" or
    "int8-body" (quantize.py) and `compile` (a static cache and compiled steps in decoding.decode) change how it
    decodes; the identity records them. `backend` "llama-cpp": the checkpoint's SLM decodes in llama.cpp from
    `gguf` (default: the directory's slm.gguf; llama_backend.py)."""
    from llm2slm_cli import checkpoint  # the model code imports torch: off the light path
    from llm2slm_cli.llm2slm import FrozenLLM  # imports torch: off the import of this module

    path = Path(spec)
    if backend == "llama-cpp":
        gguf = _check_llama_cpp(path, gguf, speculative=speculative, dtype=dtype, quantize=quantize, compile=compile)
    check_decode_options(quantize=quantize, compile=compile, speculative=speculative)
    check_quantize(quantize, device=device, dtype=dtype)
    if speculative and not is_checkpoint(path):
        raise UserError("--speculative needs a checkpoint from `train` as --model (the draft)", path=spec)
    if is_checkpoint(path):
        model = _cast(checkpoint.load(path, llm_spec=llm, device=device, llm_weights=llm_weights), dtype,
                      path)
        identity = {"name": str(path), "kind": "llm2slm", **_asdict(model.config)}
        if backend == "llama-cpp":
            impl, extra = open_backend(model, path, gguf)
            return impl, {**identity, **extra}, model.config.template, model.config.max_prompt_length
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


# ------------------------------------------------------------------------------------- --backend llama-cpp


def _check_llama_cpp(path: Path, gguf: str | Path | None, *, speculative: bool, dtype: str, quantize: str,
                     compile: bool) -> Path:
    """--backend llama-cpp: what it does not combine with, and its GGUF file, before anything is loaded."""
    from llm2slm_cli.checkpoint import read_model_config  # imports torch: off the import of this module

    require_llama_cpp()
    if not is_checkpoint(path):
        raise UserError("--backend llama-cpp decodes a checkpoint from `train` or `export` (its LLM and projector "
                        "in torch, its SLM in llama.cpp); a whole model in GGUF is `bench --llama-cpp`'s", path=path)
    asked = [o for o, on in (("--speculative", speculative), (f"--dtype {dtype}", dtype != "float32"),
                             (f"--quantize {quantize}", quantize != "none"), ("--compile", compile)) if on]
    if asked:
        raise UserError(f"--backend llama-cpp: not with {', '.join(asked)} (the GGUF's quantization is the SLM's "
                        "precision; the LLM and projector run in float32)")
    check_exportable(read_model_config(path), A.read_json_or_none(path / A.SLM_CONFIG, "model_type"),
                     "--backend llama-cpp")
    return gguf_path(path, gguf)


def _cast(model, dtype: str, path: Path):
    """A checkpoint's SLM and projector in --dtype (its LLM runs in the precision it was trained with); float16 is
    refused for a T5-family SLM, as for every T5 model."""
    M.refuse_float16(model.slm.config.model_type, dtype, f"the SLM of checkpoint {path}")
    if M.DTYPES.get(dtype, dtype) != "float32":
        model.to(M.torch_dtype(dtype))
    return model


def _decode_as(model, quantize: str, compile: bool) -> dict[str, Any]:
    """Quantize `model` in place and/or set it to decode with a static cache and compiled steps; what to add to its
    identity."""
    from llm2slm_cli.decoding import search_from, set_decode_options  # decoding.py imports torch: off the light path

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


def _asdict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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


def generate_shard(model, ids, members: list[int], batch_size: int, generation: dict[str, Any], work,
                   batcher: HalvingBatcher, progress, features=None, seed: int | None = None) -> dict[int, list[int]]:
    """The outputs of one shard's prompts (`members`), in length-sorted batches; `progress` (a ShardProgress)
    advances, and honours a Ctrl-C, after each batch. `generate` and `distill-labels` both decode through here.
    `features(b)`: the stored LLM features of prompts `b`, padded (else the checkpoint's LLM encodes them).
    Sampling with `seed`: example i draws from its own generator, seeded example_seed(seed, i), so its sample is the
    same in any batch, shard or process."""
    outputs: dict[int, list[int]] = {}
    pad_id = model.prompt_tokenizer.pad_token_id
    stored = {} if features is None else None

    def seeds(b: list[int]) -> dict[str, Any]:
        if seed is None or not generation.get("do_sample"):
            return {}
        return {"seeds": [example_seed(seed, i) for i in b]}

    for batch in length_sorted_batches([len(ids[i]) for i in members], batch_size):
        batch = [members[j] for j in batch]
        for part, result in batcher(batch, lambda b: model.generate(
                *(t.to(work.device) for t in pad([ids[i] for i in b], pad_id)), **generation, **seeds(b),
                **(stored if stored is not None else {"features": features(b).to(work.device)}))):
            outputs.update(zip(part, result))
        progress.advance(len(batch), sum(len(outputs[i]) for i in batch))
    return outputs
