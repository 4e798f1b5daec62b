"""Where one greedy decoding step of our loop goes on a CPU: torch.profiler over the steps of one decode.

    python benchmarks/profile_step.py preset:t5-small --tokenizer T5_TOKENIZER_DIR [--quantize MODE] [--compile]
        [--threads 1] [--prompt-length 100] [--new-tokens 100] [--repeats 5] [--json OUT.json]

The model is opened as `generate` opens it (generation.open_model: --quantize, --compile), a random prompt of
--prompt-length ids goes through the prompt pass, then `decoding.decode` runs exactly --new-tokens greedy steps (no
end token), as `bench` times them. First the steps are timed without the profiler (median of --repeats decodes:
ms/step), then one decode is profiled and each step's time is split:

- eager: by the module a piece of work runs in (forward hooks open a profiler scope per module: the output head,
  the other Linears, attention, norms, the feed-forward block's activation; the KV cache's `update`), each split
  into time inside ATen ops and time in Python inside that module's scope (hooks, transformers' glue); what is in no
  module (our loop, the model's own forward above its blocks) is "loop and model glue".
- compiled: by op kind (inductor's generated kernels, extern matmul kernels, the compiled region's own time: guards
  and the call into the graph), since module hooks do not exist inside a compiled graph.

The profiler adds its own overhead, most in the eager case (a scope per module call): the shares are what to read;
the unprofiled ms/step is the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections import defaultdict

import torch

from llm2slm_cli.decoding import Search, decode, start
from llm2slm_cli.generation import open_model

SCOPE = "llm2slm::"


def _scopes(model) -> list:
    """Forward hooks opening a profiler scope around the modules whose time is worth telling apart."""
    from torch import nn

    head = model.get_output_embeddings()
    handles = []

    def label(module) -> str | None:
        if module is head:
            return "output head"
        name = type(module).__name__
        if isinstance(module, nn.Linear) or "Linear" in name:
            return "Linear layers (body)"
        if name.endswith("Attention"):
            return "attention (without its Linears)"
        if name.endswith("LayerNorm") or name.endswith("RMSNorm"):
            return "norms"
        if "Dense" in name or name.endswith("MLP"):
            return "feed-forward (activation, without its Linears)"
        if isinstance(module, nn.Embedding):
            return "embedding"
        return None

    for module in model.modules():
        name = label(module)
        if name is None:
            continue
        stack: list = []

        def pre(_m, _args, name=name, stack=stack):
            scope = torch.profiler.record_function(SCOPE + name)
            scope.__enter__()
            stack.append(scope)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _cache_scope(cache) -> None:
    """The KV cache's update (a layer's keys and values written) as a scope of its own."""
    layers = []
    for part in (getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None), cache):
        layers += list(getattr(part, "layers", []) if part is not None else [])
    for layer in layers:
        update = layer.update

        def scoped(*args, update=update, **kwargs):
            with torch.profiler.record_function(SCOPE + "KV cache update"):
                return update(*args, **kwargs)

        layer.update = scoped


def _kind(name: str) -> str:
    """An op's kind for the compiled breakdown. Inductor fuses a step into a few large kernels named after the ops
    they hold (the int8 products with norms and residuals in one, attention glue in another): they are listed by
    name, with PROFILE_KERNELS=1 in full."""
    low = re.sub(r"^graph_\d+_", "", name.lower())
    if low.startswith("cpp_fused"):
        return "inductor kernel " + (low if os.environ.get("PROFILE_KERNELS") else low[:48] + "...")
    if "dot_product" in low:
        return "attention: the SDPA kernel (extern)"
    if any(k in low for k in ("mm", "linear", "gemm", "int8pack", "quantized::", "mkl")):
        return "matmuls (extern kernels)"
    if "call compiledfxgraph" in low:
        return "compiled graph: outside its kernels"
    if "cache lookup" in low:
        return "guards (TorchDynamo cache lookup)"
    if "torch-compiled region" in low or "compiledfunction" in low or "wrapper" in low or "bytecode" in low:
        return "the call into the graph (wrappers)"
    return "eager ATen ops around the graph (argmax, copies)"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.compile:
        from torch._inductor import config as inductor

        inductor.cpp.enable_kernel_profile = True  # each generated kernel shows in the profile
    model, *_ = open_model(args.model, quantize=args.quantize, compile=args.compile, device="cpu",
                           tokenizer=args.tokenizer)
    net = model.model
    net.eval()
    vocab = min(net.config.vocab_size, len(model.prompt_tokenizer))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (args.batch_size, args.prompt_length), generator=gen)
    mask = torch.ones_like(ids)
    search = Search(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=net.config.pad_token_id or 0)
    first = getattr(net.generation_config, "decoder_start_token_id", None)

    def one_decode(profile=None):
        with torch.inference_mode():
            step, logits = start(net, mask, search, input_ids=ids, decoder_start=first)
            if profile is not None:
                if not args.compile:  # a compiled step would see a new update function: compiled again
                    _cache_scope(step.cache)
                profile.start()
            t = time.perf_counter()
            out = decode(step, logits, search)
            seconds = time.perf_counter() - t
            if profile is not None:
                profile.stop()
        return out, seconds

    t0 = time.perf_counter()
    ref, _ = one_decode()  # warm-up (and the compile)
    first_s = time.perf_counter() - t0
    steps = ref.shape[1] - 1  # the first token's scores come from the prompt pass
    times = [one_decode()[1] for _ in range(args.repeats)]
    ms = 1000 * statistics.median(times) / steps

    handles = [] if args.compile else _scopes(net)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    out, wall = one_decode(prof)
    for h in handles:
        h.remove()
    if not torch.equal(out, ref):
        raise SystemExit("the profiled decode gave other tokens than the unprofiled one")

    split: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("ProfilerStep"):
            continue
        scope, p = None, e
        while p is not None:
            if p.name.startswith(SCOPE):
                scope = p.name[len(SCOPE):]
                break
            p = p.cpu_parent
        own = e.self_cpu_time_total / 1000  # ms
        if e.name.startswith(SCOPE):
            split[f"{scope}: Python and module calls"] += own
        elif args.compile:
            split[_kind(e.name)] += own
        else:
            split[f"{scope or 'loop and model glue'}: ATen ops"] += own
    profiled_ms = 1000 * wall / steps
    rows = {k: v / steps for k, v in split.items()}
    rows["outside any op or scope (Python: our loop, transformers' forward)"] = profiled_ms - sum(rows.values())
    result = {"model": args.model, "quantize": args.quantize, "compile": args.compile, "threads": args.threads,
              "batch_size": args.batch_size, "prompt_length": args.prompt_length, "steps": steps,
              "ms_per_step": round(ms, 3), "ms_per_step_profiled": round(profiled_ms, 3),
              "first_decode_s": round(first_s, 1),
              "split_ms": {k: round(v, 3) for k, v in sorted(rows.items(), key=lambda kv: -kv[1])},
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="preset:t5-small")
    p.add_argument("--tokenizer", help="tokenizer directory (a preset offline: T5's SentencePiece tokenizer)")
    p.add_argument("--quantize", default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    result = run(args)
    print(f"{args.model} quantize={args.quantize} compile={args.compile} threads={args.threads}: "
          f"{result['ms_per_step']:.2f} ms/step ({result['ms_per_step_profiled']:.2f} profiled)")
    print("| where | ms/step | share |\n|---|---:|---:|")
    total = result["ms_per_step_profiled"]
    for k, v in result["split_ms"].items():
        print(f"| {k} | {v:.2f} | {100 * v / total:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
