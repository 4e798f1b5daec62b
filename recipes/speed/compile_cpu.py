"""Does a static KV cache + torch.compile pay on a CPU? transformers' own generate (dynamic cache; static cache;
static cache compiled by inductor), greedy, batch 1, 100-token random prompt, 100 new tokens, 2 threads; the first
run of each (the compile) timed apart, then 3 interleaved timed runs. Usage: python compile_cpu.py preset:gpt2"""
import sys
import time

import torch
from transformers import CompileConfig

from llm2slm_cli import loading as M

torch.set_num_threads(2)
spec = sys.argv[1]
model = M.load_model(spec).eval()
V = model.config.vocab_size
ids = torch.randint(10, V - 1, (1, 100), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
kw = dict(max_new_tokens=100, min_new_tokens=100, do_sample=False, num_beams=1)
cc = CompileConfig(mode="default", fullgraph=False)
cc._compile_all_devices = True
variants = {"dynamic": {}, "static": dict(cache_implementation="static", disable_compile=True),
            "static+compile": dict(cache_implementation="static", compile_config=cc)}
outs = {}
for name, extra in variants.items():
    t = time.perf_counter()
    with torch.inference_mode():
        outs[name] = model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
    print(name, "first run (compile) s", round(time.perf_counter() - t, 1), flush=True)
res = {n: [] for n in variants}
for _ in range(3):
    for name, extra in variants.items():
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
        res[name].append((time.perf_counter() - t) * 10)
for n, v in res.items():
    print(spec, n, "ms/token", sorted(round(x, 2) for x in v), "same tokens:", bool((outs[n] == outs["dynamic"]).all()))
