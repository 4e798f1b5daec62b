"""Serving benchmark: time to first token, ms per token and total tokens/s at 1, 4 and 16 concurrent clients against
`llm2slm serve`, for several models and batching modes side by side in one run (e.g. the LLM alone against
LLM-to-SLM, step-level against request-level batching).

Each (model, batching mode) gets its own `llm2slm serve` process (started here, on 127.0.0.1, `--batching MODE`);
clients are threads of this process using the official `openai` client, streaming greedy completions of
--max-tokens tokens for fixed prompts. With --stagger-ms LOW,HIGH the requests of a level do not come together: each
is due LOW..HIGH ms (uniform, seeded) after the one before it, taken by the clients in turn (a client still busy
with its last response sends its next request when it is done), as requests arrive at a real server. At each
concurrency the servers are measured in turn, after a warm-up, for --rounds rounds in alternating order; every client
sends --requests requests one after another. Reported: medians over all requests of time to first token (request
sent -> first text) and of ms per token after the first (the client's inter-token time), the server's own mean time
to first token (its /metrics histogram: arrival -> first decoded token), and total completion tokens / wall time of
the level. Token counts are the server's (usage).

    OMP_NUM_THREADS=1 python benchmarks/serve_bench.py --model LLM=preset:small-llama \\
        --llm2slm LLM-to-SLM=preset:small-llama,preset:tiny-llama --out runs/serve-bench.json

    # continuous batching against request-level batching, clients arriving 20-50 ms apart
    OMP_NUM_THREADS=1 python benchmarks/serve_bench.py --model tiny-gpt2=preset:tiny-gpt2 --batching step,request \\
        --stagger-ms 20,50 --out runs/serve-batching.json

`--llm2slm LABEL=LLM,SLM` builds a checkpoint for the row with `train` (2 steps on generated text: speed does not
depend on training); `--model LABEL=SPEC` serves any model `generate` takes (a checkpoint directory too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["translate English to German: The house is wonderful.", "summarize: the cat sat on the mat all day",
           "question: what is the capital of France? answer:", "A long time ago, in a city by the sea,",
           "def add(a, b):", "The quick brown fox jumps over the lazy dog", "Once upon a time there was a",
           "List three colors:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(llm: str, slm: str, directory: Path) -> Path:
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.stages import train

    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "train.jsonl"
    data.write_text("".join(json.dumps({"src": p, "tgt": p[::-1]}) + "\n" for p in PROMPTS))
    train.run(TrainConfig(inputs=[data], llm=llm, slm=slm, out=directory / "run", batch_size=8, micro_batch_size=8,
                          max_steps=2, device="cpu", quiet=True))
    return directory / "run" / "final"


class Server:
    def __init__(self, label: str, spec: str, max_batch_size: int, threads: int, batching: str) -> None:
        self.label, self.spec, self.port, self.batching = label, spec, free_port(), batching
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm2slm_cli", "serve", "--model", spec, "--served-model-name", label, "--port",
             str(self.port), "--device", "cpu", "--quiet", "--max-batch-size", str(max_batch_size),
             "--max-queue", "256", "--batching", batching], env=env, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.label} exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit(f"server {self.label} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def one_request(client, label: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.completions.create(model=label, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ttft = (first - sent) if first else float("nan")
    per_token = (last - first) / (tokens - 1) if first and tokens > 1 else float("nan")
    return {"ttft": ttft, "per_token": per_token, "tokens": tokens}


def level(server: Server, clients: int, requests: int, max_tokens: int, stagger: tuple[float, float] | None = None,
          seed: int = 0) -> dict:
    import openai

    # when each request is due, seconds after the level starts: all at once, or (stagger) one every LOW..HIGH ms,
    # request i of client k being the (i * clients + k)-th; a client still busy sends its next one when it is free
    rng = random.Random(seed)
    due = [0.0]
    for _ in range(clients * requests - 1):
        due.append(due[-1] + rng.uniform(*stagger) / 1000 if stagger else 0.0)
    begin = time.perf_counter()

    def client(k: int) -> list[dict]:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        out = []
        for i in range(requests):
            if stagger:
                time.sleep(max(0.0, begin + due[i * clients + k] - time.perf_counter()))
            out.append(one_request(c, server.label, PROMPTS[(k + i) % len(PROMPTS)], max_tokens))
        return out

    before = server_ttft(server)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    after = server_ttft(server)
    return {"results": results, "wall": wall, "server_ttft": (after[0] - before[0], after[1] - before[1])}


def server_ttft(server: Server) -> tuple[float, float]:
    """The server's own time to first token so far (its /metrics histogram: arrival to first decoded token): the
    seconds summed and the count. The client's TTFT is to the first text it sees, which can come later than the
    first token (a token whose text is not complete yet, or empty)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
               for s in f.samples}
    return (samples.get("llm2slm_time_to_first_token_seconds_sum", 0.0),
            samples.get("llm2slm_time_to_first_token_seconds_count", 0.0))


def summarize(runs: list[dict]) -> dict:
    results = [r for run in runs for r in run["results"]]
    ttft = [r["ttft"] for r in results if r["ttft"] == r["ttft"]]
    per = [r["per_token"] for r in results if r["per_token"] == r["per_token"]]
    tokens = sum(r["tokens"] for run in runs for r in run["results"])
    seconds, count = (sum(run["server_ttft"][i] for run in runs) for i in (0, 1))
    return {"requests": len(results), "ttft_ms": 1000 * statistics.median(ttft),
            "server_ttft_ms": 1000 * seconds / count if count else float("nan"),
            "ms_per_token": 1000 * statistics.median(per), "tokens_per_s": tokens / sum(run["wall"] for run in runs),
            "mean_tokens": tokens / len(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="LABEL=SPEC (repeatable)")
    ap.add_argument("--llm2slm", action="append", default=[], help="LABEL=LLM,SLM: a checkpoint built here")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--batching", default="step", help="serve --batching modes, each a server per model: step, "
                                                        "request or step,request")
    ap.add_argument("--stagger-ms", default=None, help="LOW,HIGH: each request is due LOW..HIGH ms after the one "
                                                         "before it (default: every client at once)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch
    import transformers

    specs = [m.split("=", 1) for m in args.model]
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.llm2slm:
            label, pair = item.split("=", 1)
            llm, slm = pair.split(",")
            specs.append((label, str(build_checkpoint(llm, slm, Path(tmp) / label))))
        modes = args.batching.split(",")
        servers = [Server(label if len(modes) == 1 else f"{label} [{mode}]", spec, args.max_batch_size,
                          args.threads, mode) for label, spec in specs for mode in modes]
        stagger = tuple(float(x) for x in args.stagger_ms.split(",")) if args.stagger_ms else None
        try:
            for s in servers:
                s.wait()
            for s in servers:  # warm-up
                level(s, 2, 1, args.max_tokens)
            table = []
            for clients in [int(c) for c in args.concurrency.split(",")]:
                runs: dict[str, list] = {s.label: [] for s in servers}
                for r in range(args.rounds):
                    for s in (servers if r % 2 == 0 else servers[::-1]):
                        runs[s.label].append(level(s, clients, args.requests, args.max_tokens, stagger, seed=r))
                for s in servers:
                    row = {"model": s.label, "spec": s.spec, "batching": s.batching, "clients": clients,
                           **summarize(runs[s.label])}
                    table.append(row)
                    print(f"{s.label:>12} clients={clients:>2} requests={row['requests']:>3} "
                          f"TTFT {row['ttft_ms']:8.1f} ms (server {row['server_ttft_ms']:8.1f})  "
                          f"{row['ms_per_token']:6.2f} ms/token  "
                          f"{row['tokens_per_s']:8.1f} tokens/s", flush=True)
        finally:
            for s in servers:
                s.stop()
    print("\n| model | clients | requests | TTFT (ms, median) | server TTFT (ms, mean) | ms/token (median) | "
          "tokens/s (total) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['model']} | {row['clients']} | {row['requests']} | {row['ttft_ms']:.1f} | "
              f"{row['server_ttft_ms']:.1f} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:.1f} |")
    if len(modes) > 1:  # each model's step-level row against its request-level row, level by level
        print("\n| model | clients | TTFT step / request (ms) | ratio | server TTFT step / request (ms) | ratio | "
              "tokens/s step / request |")
        print("|---|---|---|---|---|---|---|")
        by = {(r["spec"], r["batching"], r["clients"]): r for r in table}
        for (spec, mode, clients), row in by.items():
            other = by.get((spec, "request", clients))
            if mode == "step" and other:
                print(f"| {row['model'].rsplit(' [', 1)[0]} | {clients} | {row['ttft_ms']:.1f} / "
                      f"{other['ttft_ms']:.1f} | {other['ttft_ms'] / row['ttft_ms']:.1f}x | "
                      f"{row['server_ttft_ms']:.1f} / {other['server_ttft_ms']:.1f} | "
                      f"{other['server_ttft_ms'] / row['server_ttft_ms']:.1f}x | "
                      f"{row['tokens_per_s']:.1f} / {other['tokens_per_s']:.1f} |")
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "processor": _processor(), "command": " ".join(sys.argv)}
    print(json.dumps(env))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": table, "environment": env, "config": vars(args)}, indent=2,
                                       default=str))


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
