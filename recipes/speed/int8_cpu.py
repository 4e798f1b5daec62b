"""int8 decoding on a CPU (`generate --quantize`) against float32: speed and how far the output moves.

  speed:    python recipes/speed/int8_cpu.py speed SPEC... [--threads 1] [--repeats 3]
            ms/token, our loop, greedy, batch 1, 100-token prompt, exactly 100 new tokens; float32, int8 and
            int8-body (float32 head) of each SPEC (a preset, model directory or checkpoint), timed interleaved.
  steps:    python recipes/speed/int8_cpu.py steps SPEC... [--threads 1] [--repeats 3]
            the same protocol in float32 for our loop's three ways to run a step: the dynamic cache (eager), the
            static cache (eager) and the static cache compiled (`generate --compile`); compile time apart.
  quality:  python recipes/speed/int8_cpu.py quality SPEC --src dev500.en --refs dev500.de [-n 50] [--template T]
            greedy outputs of int8 and int8-body against float32's: identical outputs, tokens identical before the
            first difference, chrF against float32's output and against the references.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from llm2slm_cli import loading as M
from llm2slm_cli.bench import timing as B
from llm2slm_cli.generation import is_checkpoint, open_model

MODES = ["none", "int8", "int8-body"]


def _speed_row(spec: str, mode: str):
    """(generate fn, prompt vocabulary ids) of SPEC in `mode`."""
    from llm2slm_cli.quantize import quantize_model

    if is_checkpoint(spec):
        model = open_model(spec, quantize=mode, device="cpu")[0]
        allowed = model.slm_vocab if model.config.trim_vocab else torch.arange(model.slm.config.vocab_size)
        return B.llm2slm_generate(model), allowed
    model = M.load_model(spec, role="model").eval()
    quantize_model(SimpleNamespace(model=model), mode)
    return B.plain_generate(model, engine="llm2slm"), torch.arange(model.config.vocab_size)


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    for spec in args.specs:
        rows = {mode: _speed_row(spec, mode) for mode in MODES}
        allowed = rows["none"][1]
        allowed = allowed[allowed >= 10]
        gen = torch.Generator().manual_seed(0)
        ids = allowed[torch.randint(len(allowed), (1, args.prompt_length), generator=gen)]
        mask = torch.ones_like(ids)
        kwargs = B.generation_kwargs(args.new_tokens, 1)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.warmup + args.repeats):
            for mode, (fn, _) in rows.items():
                t = time.perf_counter()
                n = fn(ids, mask, **kwargs)
                seconds = time.perf_counter() - t
                assert n == args.new_tokens, (mode, n)
                if r >= args.warmup:
                    times[mode].append(seconds * 1000 / args.new_tokens)
        base = statistics.median(times["none"])
        for mode in MODES:
            ms = statistics.median(times[mode])
            print(json.dumps({"spec": spec, "quantize": mode, "ms_per_token": round(ms, 2),
                              "speedup": round(base / ms, 2), "runs": [round(x, 2) for x in times[mode]],
                              "threads": args.threads}), flush=True)


def steps(args) -> None:
    from llm2slm_cli.decoding import DECODE_OPTIONS, generate_plain, search_from, set_decode_options

    torch.set_num_threads(args.threads)
    ways = {"dynamic": {}, "static": {"static_cache": True}, "compiled": {"static_cache": True, "compile": True}}
    for spec in args.specs:
        model = M.load_model(spec, role="model").eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(10, model.config.vocab_size, (1, args.prompt_length), generator=gen)
        mask = torch.ones_like(ids)
        kwargs = B.generation_kwargs(args.new_tokens, 1)
        times: dict[str, list[float]] = {w: [] for w in ways}
        outputs = {}
        for r in range(1 + args.repeats):  # the first run of each way is its warm-up (and the compile)
            for way, options in ways.items():
                model.__dict__.pop(DECODE_OPTIONS, None)
                if options:
                    set_decode_options(model, **options)
                t = time.perf_counter()
                g = model.generation_config
                search = search_from(kwargs, g, eos=g.eos_token_id, pad=g.pad_token_id, device=ids.device)
                out = generate_plain(model, ids, mask, search)
                seconds = time.perf_counter() - t
                assert out.shape[1] == args.new_tokens
                if r == 0:
                    outputs[way] = out
                    print(json.dumps({"spec": spec, "way": way, "first_run_s": round(seconds, 1)}), flush=True)
                else:
                    times[way].append(seconds * 1000 / args.new_tokens)
        for way in ways:
            print(json.dumps({"spec": spec, "way": way, "ms_per_token": round(statistics.median(times[way]), 2),
                              "runs": [round(x, 2) for x in times[way]], "threads": args.threads,
                              "same_tokens_as_dynamic": bool(torch.equal(outputs[way], outputs["dynamic"]))}),
                  flush=True)


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of `a`'s tokens that `b` has at the same place before the first difference."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def quality(args) -> None:
    import sacrebleu

    from llm2slm_cli.api import load

    torch.set_num_threads(args.threads)
    src = Path(args.src).read_text().splitlines()[: args.n]
    refs = Path(args.refs).read_text().splitlines()[: args.n]
    out = {}
    for mode in MODES:
        model = load(args.spec, quantize=mode, device="cpu", template=args.template)
        t = time.perf_counter()
        done = model.complete(src, num_beams=1, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        first = [c.text.strip().splitlines()[0].strip() if c.text.strip() else "" for c in done]
        out[mode] = (done, first, time.perf_counter() - t)
        del model
    f32 = out["none"]
    print(json.dumps({"spec": args.spec, "quantize": "none", "sentences": len(src),
                      "chrf_vs_refs": round(sacrebleu.corpus_chrf(f32[1], [refs]).score, 2),
                      "seconds": round(f32[2], 1)}), flush=True)
    for mode in MODES[1:]:
        done, first, seconds = out[mode]
        print(json.dumps({
            "spec": args.spec, "quantize": mode, "sentences": len(src),
            "identical_outputs": round(sum(a == b for a, b in zip(first, f32[1])) / len(src), 3),
            "identical_token_ids": round(sum(c.token_ids == d.token_ids for c, d in zip(done, f32[0])) / len(src), 3),
            "tokens_agreeing_before_first_difference": round(statistics.mean(
                _agreement(d.token_ids, c.token_ids) for c, d in zip(done, f32[0])), 3),
            "chrf_vs_float32": round(sacrebleu.corpus_chrf(first, [f32[1]]).score, 2),
            "chrf_vs_refs": round(sacrebleu.corpus_chrf(first, [refs]).score, 2),
            "seconds": round(seconds, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("speed", "steps"):
        s = sub.add_parser(name)
        s.add_argument("specs", nargs="+")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--warmup", type=int, default=1)
        s.add_argument("--prompt-length", type=int, default=100)
        s.add_argument("--new-tokens", type=int, default=100)
    q = sub.add_parser("quality")
    q.add_argument("spec")
    q.add_argument("--src", required=True)
    q.add_argument("--refs", required=True)
    q.add_argument("-n", type=int, default=50)
    q.add_argument("--template", default=None)
    q.add_argument("--max-new-tokens", type=int, default=96)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"speed": speed, "steps": steps, "quality": quality}[args.what](args)


if __name__ == "__main__":
    main()
