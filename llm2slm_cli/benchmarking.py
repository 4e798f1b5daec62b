"""Measuring decoding the paper's way, apart from the `bench` stage that picks the rows and writes the files.

A row is something that turns a batch of prompts into exactly n new tokens per sequence: the LLM or the SLM with
transformers' `generate` on input ids, or an LLM-to-SLM model through `LLMToSLM.generate` (so its one LLM encoder
pass is timed too). Prompts are random token ids: speed does not depend on what the tokens say, and fresh weights
would stop at once on an end token, so generation runs with `min_new_tokens = max_new_tokens = n` and every run's
output length is checked. Times are medians over repeats after warm-up; GPU work is synchronised around each run.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llm2slm_cli.errors import UserError

# (prompt ids, prompt mask, **generate kwargs) -> how many tokens came out per sequence.
GenerateFn = Callable[..., int]


@dataclass
class Row:
    """One model to time, with what it is made of (for the table) and the vocabulary its prompts are drawn from."""

    label: str
    role: str  # "LLM", "SLM", "LLM-to-SLM" or "checkpoint"
    llm: str | None
    slm: str | None
    generate: GenerateFn
    modules: list[Any]  # every nn.Module the row runs, for its weight bytes
    vocab_size: int
    special_ids: set[int] = field(default_factory=set)
    tokenizer: Any = None  # for --prompts (real text instead of random ids)
    speculative: Any = None  # SpeculativeStats of the timed runs, for speculative decoding rows


def generation_kwargs(new_tokens: int, num_beams: int) -> dict[str, Any]:
    """Greedy or beam search producing exactly `new_tokens` tokens (the end token is suppressed until then)."""
    return {"do_sample": False, "num_beams": num_beams, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}


def special_ids(config: Any, tokenizer: Any = None) -> set[int]:
    """Ids a random prompt should not contain: the config's pad/eos/bos/start ids and the tokenizer's specials."""
    ids: set[int] = set()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id", "unk_token_id",
                 "sep_token_id", "cls_token_id"):
        value = getattr(config, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int):
                ids.add(v)
    if tokenizer is not None:
        ids.update(tokenizer.all_special_ids)
    return ids


def prompt_vocab(config: Any, tokenizer: Any = None) -> int:
    """Prompt ids stay below the tokenizer's size when known (T5's config has unused padding rows above it)."""
    return min(config.vocab_size, len(tokenizer)) if tokenizer is not None else config.vocab_size


def random_prompts(vocab_size: int, avoid: set[int], batch: int, length: int, seed: int, device: Any):
    """`batch` different prompts of `length` ids drawn uniformly from [10, vocab_size) minus `avoid`; mask all ones.

    The same seed, vocabulary and shape give the same prompts, so the LLM row and the LLM-to-SLM rows built on it
    read identical inputs."""
    import torch

    allowed = torch.tensor([i for i in range(10, vocab_size) if i not in avoid], dtype=torch.long)
    if not len(allowed):
        raise UserError(f"a vocabulary of {vocab_size} ids leaves no ids >= 10 for random prompts")
    gen = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (batch, length), generator=gen)]
    return ids.to(device), torch.ones_like(ids, device=device)


def plain_generate(model: Any) -> GenerateFn:
    """The model alone with transformers' generate on input ids (encoder-decoder or decoder-only)."""
    import torch

    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    gen.eos_token_id = eos
    gen.pad_token_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    prefix = 1 if model.config.is_encoder_decoder else None  # the decoder start token, or the prompt

    def run(ids, mask, **generation: Any) -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **generation)
        return out.shape[1] - (prefix if prefix is not None else ids.shape[1])

    return run


def llm2slm_generate(model: Any) -> GenerateFn:
    """An LLM-to-SLM model through its own `generate`: LLM encoder once, then the SLM's generate on embeddings.

    `LLMToSLM.generate` returns token lists cut at the end token and stripped of trailing padding, which would
    hide a fresh model's padding ids; the SLM's raw output is observed instead to check the length."""
    encoder_decoder = model.config.slm_kind == "encoder-decoder"

    def run(ids, mask, **generation: Any) -> int:
        widths: list[int] = []
        with _observe_generate(model.slm, widths):
            model.generate(ids, mask, **generation)
        return widths[-1] - (1 if encoder_decoder else 0)  # with inputs_embeds only new tokens come back

    return run


def speculative_generate_fn(draft: Any, verifier: Any, gamma: int, stats: Any) -> GenerateFn:
    """Speculative decoding (decoding.py) for exactly the asked length: the end and padding tokens are suppressed
    in both models, as `min_new_tokens` does for the other rows. Acceptance statistics accumulate in `stats`."""
    from llm2slm_cli.decoding import speculative_generate

    banned = sorted({draft.config.eos_token_id, draft.config.pad_token_id})

    def run(ids, mask, **generation: Any) -> int:
        if generation.get("num_beams", 1) != 1:
            raise UserError("speculative decoding rows are greedy: use --num-beams 1")
        tokens, st = speculative_generate(draft, verifier, ids, mask, gamma=gamma,
                                          max_new_tokens=generation["max_new_tokens"], suppress_tokens=banned)
        stats.add(st)
        return min(len(t) for t in tokens)

    return run


def text_prompts(tokenizer: Any, texts: list[str], batch: int, length: int, device: Any):
    """The first `batch` prompts of at least `length` tokens, cut to exactly `length` (real text, exact shape)."""
    import torch

    if tokenizer is None:
        raise UserError("--prompts needs every row's tokenizer, and a row has none (a preset without its tokenizer?)")
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == batch:
            break
    if len(rows) < batch:
        raise UserError(f"--prompts has {len(rows)} prompts of at least {length} tokens; {batch} are needed")
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids)


@contextmanager
def _observe_generate(slm: Any, widths: list[int]) -> Iterator[None]:
    original = slm.generate

    def generate(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        widths.append(out.shape[1])
        return out

    slm.generate = generate  # an instance attribute shadows the method for this one call
    try:
        yield
    finally:
        del slm.generate


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(row: Row, ids: Any, mask: Any, n: int, num_beams: int) -> None:
    got = row.generate(ids, mask, **generation_kwargs(n, num_beams))
    if got != n:
        raise UserError(f"row {row.label!r} generated {got} tokens instead of {n}: the model stops on its own "
                        "(stopping criteria other than the end token?), so its speed cannot be compared")


def time_runs(row: Row, ids: Any, mask: Any, n: int, *, num_beams: int, warmup: int, repeats: int,
              device: Any) -> list[float]:
    """Seconds of each timed run (after `warmup` untimed ones), with the GPU synchronised before and after."""
    for _ in range(warmup):
        _one_run(row, ids, mask, n, num_beams)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _one_run(row, ids, mask, n, num_beams)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def count_flops(row: Row, ids: Any, mask: Any, n: int, *, num_beams: int) -> int:
    """FLOPs of one whole run (LLM encoder pass included where the row has one), by torch's flop counter.

    Operators it has no formula for (SDPA on a CPU) are decomposed into ones it counts."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _one_run(row, ids, mask, n, num_beams)
    return int(counter.get_total_flops())


def weight_bytes(modules: list[Any]) -> int:
    """Bytes of every parameter and buffer of the row's models (tied or shared tensors counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory: a high-water mark since start, so it never goes down between rows."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def prompts_for(row: Row, batch: int, prompt_length: int, seed: int, device: Any, texts: list[str] | None):
    if texts:
        return text_prompts(row.tokenizer, texts, batch, prompt_length, device)
    return random_prompts(row.vocab_size, row.special_ids, batch, prompt_length, seed, device)


def measure(row: Row, *, batch: int, prompt_length: int, new_tokens: int, num_beams: int, warmup: int,
            repeats: int, flops: bool, seed: int, device: Any, texts: list[str] | None = None) -> dict[str, Any]:
    """Time one row at one batch size and generation length; FLOPs from one extra run after the timed ones."""
    import torch

    ids, mask = prompts_for(row, batch, prompt_length, seed, device, texts)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _reset_speculative(row)
    seconds = time_runs(row, ids, mask, new_tokens, num_beams=num_beams, warmup=warmup, repeats=repeats,
                        device=device)
    accepted = _speculative_summary(row)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    total_flops = count_flops(row, ids, mask, new_tokens, num_beams=num_beams) if flops else None
    return {**summarize(row, seconds, batch=batch, prompt_length=prompt_length, new_tokens=new_tokens,
                        num_beams=num_beams, total_flops=total_flops, cuda_peak=cuda_peak), **accepted}


def _reset_speculative(row: Row) -> None:
    if row.speculative is not None:
        row.speculative.reset()


def _speculative_summary(row: Row) -> dict[str, float | None]:
    """Acceptance over the runs since the last reset (the warm-up and timed runs of one measurement)."""
    if row.speculative is None:
        return {"acceptance_rate": None, "tokens_per_llm_call": None}
    return {"acceptance_rate": row.speculative.acceptance_rate,
            "tokens_per_llm_call": row.speculative.tokens_per_llm_call}


def measure_length(row: Row, *, batch: int, prompt_length: int, new_tokens: int, num_beams: int, warmup: int,
                   repeats: int, flops: bool, seed: int, device: Any, texts: list[str] | None = None
                   ) -> dict[str, Any]:
    """One point of the length sweep: the models are warm already, so one untimed run (the FLOP-counted one, if
    FLOPs are counted) precedes the timed ones."""
    import torch

    ids, mask = prompts_for(row, batch, prompt_length, seed, device, texts)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    total_flops = count_flops(row, ids, mask, new_tokens, num_beams=num_beams) if flops else None
    _reset_speculative(row)
    seconds = time_runs(row, ids, mask, new_tokens, num_beams=num_beams, warmup=0 if flops else min(warmup, 1),
                        repeats=repeats, device=device)
    accepted = _speculative_summary(row)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**summarize(row, seconds, batch=batch, prompt_length=prompt_length, new_tokens=new_tokens,
                        num_beams=num_beams, total_flops=total_flops, cuda_peak=cuda_peak), **accepted}


def summarize(row: Row, seconds: list[float], *, batch: int, prompt_length: int, new_tokens: int, num_beams: int,
              total_flops: int | None, cuda_peak: int | None) -> dict[str, Any]:
    """The numbers of one measurement; ratios to other rows are added by the caller, who sees them all."""
    median = statistics.median(seconds)
    rss = peak_rss_bytes()
    mb = 1024 * 1024
    return {
        "label": row.label, "role": row.role, "llm": row.llm, "slm": row.slm,
        "batch_size": batch, "prompt_length": prompt_length, "new_tokens": new_tokens, "num_beams": num_beams,
        "repeats": len(seconds),
        "seconds_median": median, "seconds_min": min(seconds), "seconds_max": max(seconds),
        "ms_per_token": median / new_tokens * 1000, "ms_per_token_min": min(seconds) / new_tokens * 1000,
        "ms_per_token_max": max(seconds) / new_tokens * 1000,
        "tokens_per_s": batch * new_tokens / median,
        "flops_per_token": total_flops / new_tokens if total_flops is not None else None,
        "flops_total": float(total_flops) if total_flops is not None else None,
        "weights_mb": weight_bytes(row.modules) / mb,
        "cuda_peak_mb": cuda_peak / mb if cuda_peak is not None else None,
        "process_peak_rss_mb": rss / mb if rss is not None else None,
        "run_seconds": list(seconds),
    }


def add_ratios(results: list[dict[str, Any]], slm_of: Callable[[dict[str, Any]], str | None]) -> None:
    """Speedup against the LLM row and time relative to the SLM row, both from the same run, matched on batch size
    and generation length. A row's SLM row is the SLM row of the same SLM (`slm_of` normalises names), else the only
    SLM row there is; with several SLMs and no match there is none."""
    key = lambda r: (r["part"], r["batch_size"], r["new_tokens"])  # noqa: E731
    llm = {key(r): r for r in results if r["role"] == "LLM"}
    slms = [r for r in results if r["role"] == "SLM"]
    for r in results:
        ref = llm.get(key(r))
        r["speedup_vs_llm"] = ref["seconds_median"] / r["seconds_median"] if ref else None
        same = [s for s in slms if key(s) == key(r)]
        match = [s for s in same if slm_of(s) == slm_of(r) and slm_of(r) is not None]
        if not match and len({s["label"] for s in slms}) == 1:
            match = same
        r["slm_row"] = match[0]["label"] if match else None
        r["time_vs_slm"] = r["seconds_median"] / match[0]["seconds_median"] if match else None
