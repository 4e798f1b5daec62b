"""Measuring decoding the paper's way, apart from the `bench` stage that picks the rows and writes the files.

A row is something that turns a batch of prompts into exactly n new tokens per sequence: the LLM or the SLM alone
on input ids, or an LLM-to-SLM model through `LLMToSLM.generate_ids` (so its one LLM encoder pass is timed too),
each decoded by this toolkit's loop (decoding.decode, engine "llm2slm") or by transformers' `generate` (engine
"transformers"); or transformers' assisted generation, or our speculative decoding. Prompts are random token ids:
speed does not depend on what the tokens say, and fresh weights would stop at once on an end token, so generation
runs with `min_new_tokens = max_new_tokens = n` and every run's output length is checked. Times are medians over
repeats after warm-up; GPU work is synchronised around each run. `encode_throughput` and `train_throughput` time
the other two stages' inner work.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm2slm_cli.errors import UserError

# (prompt ids, prompt mask, **generate kwargs) -> how many tokens came out per sequence.
GenerateFn = Callable[..., int]


@dataclass
class Row:
    """One model to time, with what it is made of (for the table) and the vocabulary its prompts are drawn from."""

    label: str
    role: str  # "LLM", "SLM", "LLM-to-SLM", "checkpoint", "speculative", "assisted" or "peer"
    llm: str | None
    slm: str | None
    generate: GenerateFn
    modules: list[Any]  # every nn.Module the row runs, for its weight bytes
    vocab_size: int
    special_ids: set[int] = field(default_factory=set)
    tokenizer: Any = None  # for --prompts (real text instead of random ids)
    speculative: Any = None  # SpeculativeStats of the timed runs, for speculative decoding rows
    engine: str = "llm2slm"  # whose decoding loop: "llm2slm" (decoding.decode), "transformers" (generate), or a
    # peer runtime's ("ctranslate2", "llama.cpp")
    file_bytes: int | None = None  # a peer runtime's weight files: its weights are not torch modules


class Unsupported(Exception):
    """A row cannot run at this setting (transformers' assisted generation takes one prompt at a time)."""


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


def compiled(target: Any, run: GenerateFn) -> GenerateFn:
    """`run` with `target` (the module our loop decodes) set to a static KV cache and compiled one-token steps
    (bench --compile) for the call only, so transformers' rows on the same module stay as they are."""
    from llm2slm_cli.decoding import set_decode_options  # imports torch: off the import of this module

    def compiled_run(ids, mask, **generation: Any) -> int:
        set_decode_options(target, static_cache=True, compile=True)
        try:
            return run(ids, mask, **generation)
        finally:
            set_decode_options(target)

    return compiled_run


def plain_generate(model: Any, engine: str = "transformers") -> GenerateFn:
    """The model alone on input ids (encoder-decoder or decoder-only), decoded by `engine`."""
    import torch

    from llm2slm_cli.decoding import generate_plain, search_from  # imports torch: off the import of this module

    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    gen.eos_token_id = eos
    gen.pad_token_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    prefix = 1 if model.config.is_encoder_decoder else None  # the decoder start token, or the prompt

    def run(ids, mask, **generation: Any) -> int:
        if engine == "llm2slm":
            search = search_from(generation, gen, eos=_one(gen.eos_token_id), pad=gen.pad_token_id, device=ids.device)
            if search is None:
                raise UserError(f"decoding.decode cannot do {sorted(generation)} with this model's generation config")
            return generate_plain(model, ids, mask, search).shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **generation)
        return out.shape[1] - (prefix if prefix is not None else ids.shape[1])

    return run


def _one(eos: Any) -> int | None:
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def llm2slm_generate(model: Any, engine: str = "llm2slm") -> GenerateFn:
    """An LLM-to-SLM model through `generate_ids`: LLM encoder once, then the SLM decodes from the fused prompt."""
    def run(ids, mask, **generation: Any) -> int:
        return model.generate_ids(ids, mask, engine="transformers" if engine == "transformers" else "auto",
                                  **generation).shape[1]

    return run


def assisted_generate(model: Any, assistant: Any) -> GenerateFn:
    """transformers' assisted generation: `assistant` drafts for `model` (same vocabulary), greedy, one prompt."""
    import torch

    prefix = 1 if model.config.is_encoder_decoder else None

    def run(ids, mask, **generation: Any) -> int:
        if ids.shape[0] != 1:
            raise Unsupported("transformers' assisted generation takes batch size 1")
        if generation.get("num_beams", 1) != 1:
            raise Unsupported("transformers' assisted generation is greedy or sampling, not beam search")
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, assistant_model=assistant, **generation)
        return out.shape[1] - (prefix if prefix is not None else ids.shape[1])

    return run


def speculative_generate_fn(draft: Any, verifier: Any, gamma: int, stats: Any) -> GenerateFn:
    """Speculative decoding (decoding.py) for exactly the asked length: the end and padding tokens are suppressed
    in both models, as `min_new_tokens` does for the other rows. Acceptance statistics accumulate in `stats`."""
    from llm2slm_cli.decoding import speculative_generate  # imports torch: off the import of this module

    banned = sorted({draft.config.eos_token_id, draft.config.pad_token_id})

    def run(ids, mask, **generation: Any) -> int:
        if generation.get("num_beams", 1) != 1:
            raise Unsupported("speculative decoding is greedy or sampling, not beam search")
        tokens, st = speculative_generate(draft, verifier, ids, mask, gamma=gamma,
                                          max_new_tokens=generation["max_new_tokens"], suppress_tokens=banned)
        stats.add(st)
        return min(len(t) for t in tokens)

    return run


def text_prompts(tokenizer: Any, texts: list[str], batch: int, length: int, device: Any, *, whole: bool = False):
    """The first `batch` prompts of at least `length` tokens, cut to exactly `length` (real text, exact shape); with
    `whole`, the first `batch` prompts of exactly `length` tokens."""
    import torch

    if tokenizer is None:
        raise UserError("--prompts needs every row's tokenizer, and a row has none (a preset without its tokenizer?)")
    rows, lengths = [], Counter()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        lengths[len(ids)] += 1
        if len(ids) == length or (len(ids) > length and not whole):
            rows.append(ids[:length])
        if len(rows) == batch:
            break
    if len(rows) < batch:
        if whole:
            common = ", ".join(f"{n} ({c})" for n, c in sorted(lengths.items(), key=lambda x: -x[1])[:5])
            raise UserError(f"--prompts has {len(rows)} prompts of exactly {length} tokens; {batch} are needed "
                            f"(most common lengths, with counts: {common})")
        raise UserError(f"--prompts has {len(rows)} prompts of at least {length} tokens; {batch} are needed")
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(row: Row, ids: Any, mask: Any, n: int, num_beams: int) -> None:
    got = row.generate(ids, mask, **generation_kwargs(n, num_beams))
    if got != n:
        raise UserError(f"row {row.label!r} generated {got} tokens instead of {n}: the model stops on its own "
                        "(stopping criteria other than the end token?), so its speed cannot be compared")


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int, device: Any) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones, the GPU synchronised around each."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
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
    """Bytes of every parameter and buffer of the row's models (tied or shared tensors counted once), and of the
    packed weights of int8 (dynamically quantized) Linears, which are neither: their int8 weight, per-channel scales
    and zero points, and bias. A torchao int8 weight (a tensor subclass that reports its float dtype) counts its
    int8 data, scales and zero points."""
    seen: dict[tuple[Any, ...], int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            parts = [getattr(t, n, None) for n in ("qdata", "scale", "zero_point")] if hasattr(t, "qdata") else [t]
            for p in parts:
                if p is not None:
                    seen[(p.data_ptr(), p.numel())] = p.numel() * p.element_size()
        for m in module.modules():
            if getattr(m, "_packed_params", None) is not None and callable(getattr(m, "weight", None)):
                seen[("packed", id(m))] = _packed_bytes(m)
    return sum(seen.values())


def _packed_bytes(m: Any) -> int:
    import torch

    w, b = m.weight(), m.bias()
    n = w.numel() * w.element_size()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                       torch.per_channel_affine_float_qparams):
        n += sum(t.numel() * t.element_size() for t in (w.q_per_channel_scales(), w.q_per_channel_zero_points()))
    else:
        n += 16  # one float64 scale, one int64 zero point
    return n + (b.numel() * b.element_size() if b is not None else 0)


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory: a high-water mark since start, so it never goes down between rows."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def prompts_for(row: Row, batch: int, prompt_length: int, seed: int, device: Any, texts: list[str] | None,
                whole: bool = False):
    if texts:
        return text_prompts(row.tokenizer, texts, batch, prompt_length, device, whole=whole)
    return random_prompts(row.vocab_size, row.special_ids, batch, prompt_length, seed, device)


def measure(rows: list[Row], *, batch: int, prompt_length: int, new_tokens: int, num_beams: int, warmup: int,
            repeats: int, flops: bool, seed: int, device: Any, texts: list[str] | None = None, whole: bool = False,
            warm: bool = False) -> list[dict[str, Any] | Unsupported]:
    """Time rows whose models are loaded together (one model decoded by two engines, say), side by side: each row
    is warmed up, then their timed runs interleave (run i of every row before run i + 1 of any), so a drift of the
    machine (clock, other load) falls on every row alike. Per row: its measurement, or why it was not measured.

    `warm`: the models ran already (a point of the length sweep): one untimed run per row, the FLOP-counted one if
    FLOPs are counted. Otherwise `warmup` untimed runs, and FLOPs from one extra run after the timed ones."""
    import torch

    cuda = device.type == "cuda"
    out: list[dict[str, Any] | Unsupported] = [Unsupported("not measured")] * len(rows)
    live: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        ids, mask = prompts_for(row, batch, prompt_length, seed, device, texts, whole)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _reset_speculative(row)
        try:
            total = count_flops(row, ids, mask, new_tokens, num_beams=num_beams) if warm and flops else None
            untimed = (0 if flops else min(warmup, 1)) if warm else warmup
            for _ in range(untimed):
                _one_run(row, ids, mask, new_tokens, num_beams)
        except Unsupported as e:
            out[i] = e
            continue
        ran = total is not None or untimed > 0
        live[i] = {"ids": ids, "mask": mask, "seconds": [], "flops": total,
                   "cuda_peak": torch.cuda.max_memory_allocated(device) if cuda and ran else None}
    for _ in range(repeats):
        for i, m in list(live.items()):
            peak = cuda and m["cuda_peak"] is None  # no untimed run: the peak of the first timed one
            if peak:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                m["seconds"] += timed(lambda r=rows[i], m=m: _one_run(r, m["ids"], m["mask"], new_tokens, num_beams),
                                      warmup=0, repeats=1, device=device)
            except Unsupported as e:  # only when there was no warm-up run to find out
                out[i] = e
                del live[i]
                continue
            if peak:
                m["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    for i, m in live.items():
        row = rows[i]
        accepted = _speculative_summary(row)  # the warm-up and timed runs, not the FLOP-counted one after
        if flops and not warm:
            m["flops"] = count_flops(row, m["ids"], m["mask"], new_tokens, num_beams=num_beams)
        out[i] = {**summarize(row, m["seconds"], batch=batch, prompt_length=prompt_length, new_tokens=new_tokens,
                              num_beams=num_beams, total_flops=m["flops"], cuda_peak=m["cuda_peak"]), **accepted}
    return out


def _reset_speculative(row: Row) -> None:
    if row.speculative is not None:
        row.speculative.reset()


def _speculative_summary(row: Row) -> dict[str, float | None]:
    """Acceptance over the runs since the last reset (the warm-up and timed runs of one measurement)."""
    if row.speculative is None:
        return {"acceptance_rate": None, "tokens_per_llm_call": None}
    return {"acceptance_rate": row.speculative.acceptance_rate,
            "tokens_per_llm_call": row.speculative.tokens_per_llm_call}


def summarize(row: Row, seconds: list[float], *, batch: int, prompt_length: int, new_tokens: int, num_beams: int,
              total_flops: int | None, cuda_peak: int | None) -> dict[str, Any]:
    """The numbers of one measurement; ratios to other rows are added by the caller, who sees them all."""
    median = statistics.median(seconds)
    rss = peak_rss_bytes()
    mb = 1024 * 1024
    return {
        "label": row.label, "role": row.role, "engine": row.engine, "llm": row.llm, "slm": row.slm,
        "batch_size": batch, "prompt_length": prompt_length, "new_tokens": new_tokens, "num_beams": num_beams,
        "repeats": len(seconds),
        "seconds_median": median, "seconds_min": min(seconds), "seconds_max": max(seconds),
        "ms_per_token": median / new_tokens * 1000, "ms_per_token_min": min(seconds) / new_tokens * 1000,
        "ms_per_token_max": max(seconds) / new_tokens * 1000,
        "tokens_per_s": batch * new_tokens / median,
        "flops_per_token": total_flops / new_tokens if total_flops is not None else None,
        "flops_total": float(total_flops) if total_flops is not None else None,
        "weights_mb": (row.file_bytes if row.file_bytes is not None else weight_bytes(row.modules)) / mb,
        "cuda_peak_mb": cuda_peak / mb if cuda_peak is not None else None,
        "process_peak_rss_mb": rss / mb if rss is not None else None,
        "run_seconds": list(seconds),
    }


def add_ratios(results: list[dict[str, Any]], slm_of: Callable[[dict[str, Any]], str | None]) -> None:
    """Speedup against the LLM row and time relative to the SLM row, both from the same run, matched on batch size
    and generation length. The LLM row is the one decoded by transformers' generate where there is one (what a user
    would otherwise run), else ours. A row's SLM row is the SLM row of the same SLM (`slm_of` normalises names) and
    the same decoding engine, else the only SLM there is; with several SLMs and no match there is none."""
    key = lambda r: (r["part"], r["batch_size"], r["new_tokens"])  # noqa: E731
    llm: dict[Any, dict[str, Any]] = {}
    for r in results:
        if r["role"] == "LLM" and (key(r) not in llm or r["engine"] == "transformers"):
            llm[key(r)] = r
    slms = [r for r in results if r["role"] == "SLM"]
    for r in results:
        if r["seconds_median"] is None:  # a row that failed: no numbers to compare
            r["speedup_vs_llm"] = r["time_vs_slm"] = r["slm_row"] = None
            continue
        ref = llm.get(key(r))
        r["speedup_vs_llm"] = ref["seconds_median"] / r["seconds_median"] if ref else None
        same = [s for s in slms if key(s) == key(r)]
        match = [s for s in same if slm_of(s) == slm_of(r) and slm_of(r) is not None]
        if not match and len({slm_of(s) for s in slms}) == 1:
            match = same
        engine = [s for s in match if s["engine"] == r["engine"]]
        match = engine or match
        r["slm_row"] = match[0]["label"] if match else None
        r["time_vs_slm"] = r["seconds_median"] / match[0]["seconds_median"] if match else None


UNSTEADY = 1.3  # a row whose slowest repeat took more than this times its fastest ran on a busy machine


def unsteady(results: list[dict[str, Any]], ratio: float = UNSTEADY) -> list[str]:
    """A warning line for each measured row whose repeats vary by more than `ratio` (its slowest repeat over its
    fastest): something else ran on the machine meanwhile, and its median is less sure than it looks."""
    lines = []
    for r in results:
        seconds = r.get("run_seconds") or []
        if len(seconds) < 2 or min(seconds) <= 0 or max(seconds) / min(seconds) <= ratio:
            continue
        where = f"batch {r['batch_size']}" if r["part"] == "main" else f"{r['new_tokens']} tokens"
        lines.append(f"warning: row {r['label']!r} ({where}): its {len(seconds)} repeats vary "
                     f"{max(seconds) / min(seconds):.2f}x ({min(seconds) * 1000:.3g} to {max(seconds) * 1000:.3g} "
                     f"ms), more than {ratio}x: the machine was busy, so its median is less sure")
    return lines


# ------------------------------------------------------------------------------------------------------ throughput


def encode_throughput(llm: Any, *, batch: int, length: int, warmup: int, repeats: int, seed: int,
                      device: Any) -> dict[str, Any]:
    """`encode`'s work: the frozen LLM's forward pass up to the feature layer over `batch` prompts of `length`
    random tokens; prompt tokens per second."""
    import torch

    config, tok = llm.config, llm.tokenizer
    ids, mask = random_prompts(prompt_vocab(config, tok), special_ids(config, tok), batch, length, seed, device)
    with torch.inference_mode():
        seconds = timed(lambda: llm.encode(ids, mask), warmup=warmup, repeats=repeats, device=device)
    median = statistics.median(seconds)
    return {"stage": "encode", "batch_size": batch, "prompt_length": length, "target_length": None,
            "seconds_median": median, "tokens_per_s": batch * length / median, "examples_per_s": batch / median,
            "repeats": len(seconds)}


def train_throughput(model: Any, *, batch: int, length: int, target_length: int, warmup: int, repeats: int, seed: int,
                     device: Any) -> dict[str, Any]:
    """`train`'s work per optimizer step: the LLM-to-SLM loss on stored features (float16, as `encode` writes
    them), backward, gradient clipping and an AdamW step, for `batch` examples of `length` prompt and
    `target_length` target tokens; examples and target tokens per second."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = (model.config.trim_vocab["full"] if model.config.trim_vocab else
        model.slm.get_input_embeddings().num_embeddings)
    hi = min(vocab, len(model.prompt_tokenizer)) if model.prompt_tokenizer is not None else vocab
    ids = torch.randint(10, hi, (batch, length), generator=gen).to(device)
    targets = torch.randint(10, hi, (batch, target_length), generator=gen).to(device)
    mask, target_mask = torch.ones_like(ids), torch.ones_like(targets)
    features = None
    if model.has_llm:
        width = model.projector[0].in_features
        features = torch.randn(batch, length, width, generator=gen).to(device=device, dtype=torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1)
    model.train()

    def step() -> None:
        loss, n = model(ids, mask, targets, target_mask, features)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = timed(step, warmup=warmup, repeats=repeats, device=device)
    finally:
        model.eval()
    median = statistics.median(seconds)
    return {"stage": "train", "batch_size": batch, "prompt_length": length, "target_length": target_length,
            "seconds_median": median, "tokens_per_s": batch * target_length / median, "examples_per_s": batch / median,
            "repeats": len(seconds)}
