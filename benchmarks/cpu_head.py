"""The vocabulary head on a CPU: F.linear against cpu_head's W @ h.T, as products and inside our decoding loop.

    python benchmarks/cpu_head.py --model $RUNS/gemma --model CHECKPOINT ... [--threads 2] [--repeats 5]

($RUNS: the offline study recipe's RUNS folder, e.g. runs/study; see recipes/offline-study/Makefile.)

Part 1 times the head product alone for the heads of the models given (and T5's and GPT2's shapes), for 1, 3 and 5
rows (a decoding step; a speculative pass verifying 2 and 4 drafts). Part 2 decodes greedily with each model through
our loop (generate_plain, or an LLM-to-SLM checkpoint's generate_ids), batch 1, NEW tokens after a real prompt,
alternating plain head / fast head run by run, and checks that both give the same tokens. Medians; prints a Markdown
table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from llm2slm_cli import cpu_head
from llm2slm_cli import loading as M

PROMPT = ("Translate English to German.\nEnglish: The European Central Bank kept its interest rates unchanged on "
          "Thursday, as expected.\nGerman:")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def products(shapes: dict[str, tuple[int, int]], repeats: int) -> list[dict]:
    rows = []
    for name, (vocab, d) in shapes.items():
        head = torch.nn.Linear(d, vocab, bias=False)
        fast = torch.nn.Linear(d, vocab, bias=False)
        fast.weight = head.weight
        fast.__class__ = cpu_head.WideHead
        for n in (1, 3, 5):
            x = torch.randn(1, n, d)
            with torch.inference_mode():
                plain = _median_ms(lambda x=x, w=head.weight: F.linear(x, w), repeats)

                def run_fast(x=x, fast=fast):
                    with cpu_head.fast_heads():
                        fast(x)
                quick = _median_ms(run_fast, repeats)
            rows.append({"head": name, "shape": f"{vocab} x {d}", "rows": n, "linear_ms": round(plain, 2),
                         "fast_ms": round(quick, 2), "ratio": round(plain / quick, 2)})
    return rows


def _decoder(spec: str, new: int):
    """(name, head shape, generate() -> token ids) for a plain model or an LLM-to-SLM checkpoint."""
    from llm2slm_cli.decoding import Search, generate_plain
    from llm2slm_cli.generation import is_checkpoint

    if is_checkpoint(spec):
        from llm2slm_cli import checkpoint

        model = checkpoint.load(Path(spec), llm_weights="full")
        tok = model.prompt_tokenizer
        ids = torch.tensor([tok(PROMPT).input_ids])
        head = model.slm.get_output_embeddings().weight.shape

        def run():
            return model.generate_ids(ids, torch.ones_like(ids), do_sample=False, num_beams=1, max_new_tokens=new,
                                      min_new_tokens=new)
        return f"LLM-to-SLM {Path(spec).parent.parent.name}" if spec.endswith("final") else spec, head, run
    model = M.load_model(spec, role="model")
    tok = M.load_tokenizer(spec)
    ids = torch.tensor([tok(PROMPT).input_ids])
    search = Search(max_new_tokens=new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
                    min_new_tokens=new)

    def run():
        return generate_plain(model, ids, torch.ones_like(ids), search)
    return Path(spec).name, model.get_output_embeddings().weight.shape, run


def passes(spec: str, repeats: int) -> list[dict]:
    """A decoder-only model's pass over k new tokens after the prompt (k = 1: a step; k = g + 1: a speculative
    verification of g drafts), with each head: what chooses gamma."""
    from llm2slm_cli.decoding import Stepper

    model = M.load_model(spec, role="model")
    tok = M.load_tokenizer(spec)
    ids = torch.tensor([tok(PROMPT).input_ids])
    rows = []
    with torch.inference_mode():
        step = Stepper(model, encoder_decoder=False)
        step.prefill(torch.ones_like(ids), input_ids=ids, logits_to_keep=1)
        for k in (1, 2, 3, 4, 5, 6):
            tokens = ids[:, -k:] if ids.shape[1] >= k else ids[:, :1].expand(1, k)
            ms = {}
            for on in (False, True):
                cpu_head.ENABLED = on

                def one(tokens=tokens, k=k):
                    step.feed(tokens)
                    step.rewind(step.fed - k)
                ms[on] = _median_ms(one, repeats)
            cpu_head.ENABLED = True
            rows.append({"model": Path(spec).name, "tokens": k, "plain_ms": round(ms[False], 1),
                         "fast_ms": round(ms[True], 1)})
    base = {on: rows[0]["plain_ms" if not on else "fast_ms"] for on in (False, True)}
    for r in rows:
        r["plain_vs_1"], r["fast_vs_1"] = round(r["plain_ms"] / base[False], 2), round(r["fast_ms"] / base[True], 2)
    return rows


def decoding(specs: list[str], new: int, repeats: int) -> list[dict]:
    rows = []
    for spec in specs:
        name, shape, run = _decoder(spec, new)
        times = {False: [], True: []}
        tokens = {}
        for on in (False, True):  # warm-up, and the tokens of each
            cpu_head.ENABLED = on
            tokens[on] = run().tolist()
        for _ in range(repeats):
            for on in (False, True):
                cpu_head.ENABLED = on
                t = time.perf_counter()
                run()
                times[on].append(time.perf_counter() - t)
        cpu_head.ENABLED = True
        plain, quick = (1000 * statistics.median(times[k]) / new for k in (False, True))
        rows.append({"model": name, "head": f"{shape[0]} x {shape[1]}", "new_tokens": new,
                     "plain_ms_per_token": round(plain, 2), "fast_ms_per_token": round(quick, 2),
                     "speedup": round(plain / quick, 2), "same_tokens": tokens[False] == tokens[True]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a plain model or a checkpoint (repeatable)")
    parser.add_argument("--passes", action="append", default=[],
                        help="a decoder-only model whose k-token passes to time (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"Gemma-3 (262,144)": (262144, 640), "GPT2 (50,257)": (50257, 768), "T5 (32,128)": (32128, 512),
              "T5-Large (32,128)": (32128, 1024)}
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": args.threads, "torch": torch.__version__,
              "products": products(shapes, max(args.repeats, 5)),
              "decoding": decoding(args.model, args.new_tokens, args.repeats),
              "passes": [r for spec in args.passes for r in passes(spec, max(args.repeats, 5))]}
    print("| head | rows | F.linear ms | W @ h.T ms | ratio |\n|---|---|---|---|---|")
    for r in result["products"]:
        print(f"| {r['head']} | {r['rows']} | {r['linear_ms']} | {r['fast_ms']} | {r['ratio']}x |")
    print("\n| model | head | plain head ms/token | fast head ms/token | speedup | same tokens |\n"
          "|---|---|---|---|---|---|")
    for r in result["decoding"]:
        print(f"| {r['model']} | {r['head']} | {r['plain_ms_per_token']} | {r['fast_ms_per_token']} | "
              f"{r['speedup']}x | {r['same_tokens']} |")
    print("\n| model | tokens in the pass | plain head ms | x a 1-token pass | fast head ms | x a 1-token pass |\n"
          "|---|---|---|---|---|---|")
    for r in result["passes"]:
        print(f"| {r['model']} | {r['tokens']} | {r['plain_ms']} | {r['plain_vs_1']} | {r['fast_ms']} | "
              f"{r['fast_vs_1']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
