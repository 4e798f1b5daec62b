"""Measuring every planned row: each model loaded once, only the row's own models resident; each peer runtime row
in a child process of its own, so that its crash or hang is that row's error and not the run's; and --throughput."""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2slm_cli import artifacts as A
from llm2slm_cli import loading as M
from llm2slm_cli import runtime
from llm2slm_cli.bench import peers
from llm2slm_cli.bench import timing as B
from llm2slm_cli.bench.plan import Plan, sweep_lengths
from llm2slm_cli.bench.report import COLUMNS
from llm2slm_cli.bench.rows import (
    assisted_row,
    can_share,
    llama_cpp_row,
    llm2slm_row,
    plain_row,
    shared_llm,
    speculative_row,
)
from llm2slm_cli.config import BenchConfig
from llm2slm_cli.data import Fields, read_examples
from llm2slm_cli.errors import UserError
from llm2slm_cli.llama_backend import LlamaCppSLM
from llm2slm_cli.quantize import kept_float, quantize_linears, quantize_model


@dataclass
class Session:
    """One run's measuring: its settings, the progress bar, the LLM while it is loaded, and what came out so far
    (rows' results, their models' identities for the manifest, settings not measured, --throughput rows)."""

    config: BenchConfig
    device: Any
    bar: Any
    task: Any
    texts: list[str] | None
    frozen: Any = None  # the FrozenLLM of --llm while rows built on it run; dropped before checkpoints with their own
    results: list[dict[str, Any]] = field(default_factory=list)
    identities: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dtype(self):
        return M.torch_dtype(self.config.dtype)

    def measure(self, *rows: Any, flops: bool = True) -> None:
        """Rows sharing loaded models, timed side by side (B.measure) at every batch size and sweep length;
        results listed row by row. `flops`: False for rows torch's flop counter cannot see (peer runtimes)."""
        config = self.config
        common = dict(prompt_length=config.prompt_length, num_beams=config.num_beams, warmup=config.warmup,
                      repeats=config.repeats, flops=config.flops and flops, seed=config.seed, device=self.device,
                      texts=self.texts, whole=config.whole_prompts)
        got: list[list[dict[str, Any]]] = [[] for _ in rows]
        names = " | ".join(r.label for r in rows)
        points = ([("main", b, config.new_tokens) for b in config.batch_size] +
            [("sweep", config.batch_size[0], n) for n in sweep_lengths(config)])
        for part, batch, n in points:
            self.bar.update(self.task, description=f"{names}: batch {batch}" if part == "main" else
                            f"{names}: {n} tokens")
            measured = B.measure(list(rows), batch=batch, new_tokens=n, warm=part == "sweep", **common)
            for row, mine, m in zip(rows, got, measured):
                if isinstance(m, B.Unsupported):
                    self.skipped.append(f"{row.label}, batch {batch}: {m}" if part == "main" else
                                        f"{row.label}, {n} tokens: {m}")
                else:
                    mine.append({**m, "part": part, "greedy_match": None})
                    self.bar.update(self.task, rate=f"{m['ms_per_token']:.1f} ms/token")
            self.bar.update(self.task, advance=len(rows))
        for mine in got:
            self.results.extend(mine)


def measure_rows(config: BenchConfig, plans: list[Plan], device: Any
                 ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], list[dict[str, Any]]]:
    """Every row at every batch size (and sweep length); each model loaded once, only the row's own resident.

    SLMs alone first, then the LLM and everything built on it, then checkpoints that bring an LLM of their own."""
    texts = _prompt_texts(config)
    with runtime.progress(config.quiet) as bar:
        task = bar.add_task("bench", total=len(plans) * (len(config.batch_size) + len(sweep_lengths(config))),
                            rate="")
        s = Session(config, device, bar, task, texts)
        _slm_rows(s, plans)
        if config.llm:
            s.frozen = _load_llm(s)
            _llm_rows(s, plans)
        _checkpoint_rows(s, plans)
        s.frozen = None  # peer runtimes run with none of our models resident
        free_memory()
        _peer_rows(s, plans)
    return s.results, s.identities, s.skipped, s.throughput


def _slm_rows(s: Session, plans: list[Plan]) -> None:
    """Each SLM alone, loaded once for its rows (ours and, with --compare, transformers')."""
    for spec in dict.fromkeys(p.slm for p in plans if p.role == "SLM"):
        if M.model_kind(M.load_config(spec)) == "encoder-only":
            raise UserError(f"the SLM {spec!r} is encoder-only and cannot generate")
        slm = M.load_model(spec, dtype=s.config.dtype, role="SLM").to(s.device)
        _quantize(s, slm)
        tok = _tokenizer_or_none(spec) if s.texts else None
        group = [p for p in plans if p.role == "SLM" and p.slm == spec]
        for plan in group:
            s.identities[plan.label] = {"slm": plan.slm, "parameters": _count(slm), "engine": plan.engine}
        s.measure(*(plain_row(plan, slm, tok, s.config.compile) for plan in group))
        del slm
        free_memory()


def _quantize(s: Session, model: Any) -> None:
    """bench --quantize: `model` (a transformers model, or an LLMToSLM with its SLM and LLM) with int8 weights, in
    place, as generate --quantize does (quantize.py); its input embedding, and with int8-body its head, stay float."""
    if s.config.quantize == "none":
        return
    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    if isinstance(model, LLMToSLM):
        quantize_model(model, s.config.quantize)
    else:
        quantize_linears(model, skip=kept_float(model, s.config.quantize != "int8-body"), quantize=s.config.quantize)


def _load_llm(s: Session):
    from llm2slm_cli.llm2slm import FrozenLLM  # imports torch: off the import of this module

    frozen = FrozenLLM(s.config.llm, dtype=s.config.dtype, device=s.device, tokenizer_optional=not s.texts,
                       tokenizer_option=None)
    if s.config.quantize != "none":
        _ = frozen.fingerprint  # the identity is of the float weights
        _quantize(s, frozen.model)
    return frozen


def _llm_rows(s: Session, plans: list[Plan]) -> None:
    """Everything built on the loaded LLM: its own rows, --throughput, LLM-to-SLM with fresh projectors, assisted
    generation and speculative decoding."""
    from llm2slm_cli import checkpoint  # imports torch: off the import of this module
    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    config, device, dtype, frozen = s.config, s.device, s.dtype, s.frozen
    group = [p for p in plans if p.role == "LLM"]
    for plan in group:
        s.identities[plan.label] = {"llm": plan.llm, "parameters": _count(frozen.model), "engine": plan.engine}
    if group:
        s.measure(*(plain_row(plan, frozen.model, frozen.tokenizer, s.config.compile) for plan in group))
    if config.throughput:
        s.throughput += _throughput(config, frozen, device, s.bar)
    for spec in dict.fromkeys(p.slm for p in plans if p.role == "LLM-to-SLM"):
        model = LLMToSLM.build(spec, frozen, slm_dtype=config.dtype).to(device=device, dtype=dtype).eval()
        _quantize(s, model)  # its SLM (the shared LLM already is)
        group = [p for p in plans if p.role == "LLM-to-SLM" and p.slm == spec]
        for plan in group:
            s.identities[plan.label] = {"llm": plan.llm, "slm": plan.slm, "projector": "fresh",
                                        "vocab_adapter": model.config.vocab_adapter, "engine": plan.engine,
                                        "parameters": _count(model), "llm_parameters": _count(frozen.model)}
        _measure_llm2slm(s, group, model)
        del model
        free_memory()
    for plan in (p for p in plans if p.role == "assisted"):
        if plan.checkpoint is not None:
            assistant = checkpoint.load(plan.checkpoint, device=device).plain_slm().to(dtype=dtype)
        else:
            assistant = M.load_model(plan.slm, dtype=config.dtype, role="SLM").to(device).eval()
        if (assistant.config.vocab_size != frozen.model.config.vocab_size and
                frozen.model.config.vocab_size < assistant.config.vocab_size):
            raise UserError(f"--assistant {plan.label}: its vocabulary ({assistant.config.vocab_size}) is not "
                            f"the LLM's ({frozen.model.config.vocab_size})")
        s.identities[plan.label] = {"assistant": str(plan.checkpoint or plan.slm), "verifier": plan.llm,
                                    "engine": plan.engine, "parameters": _count(assistant)}
        s.measure(assisted_row(plan, frozen.model, assistant, frozen.tokenizer))
        del assistant
        free_memory()
    for plan in (p for p in plans if p.role == "speculative"):
        # a draft made with this LLM at another layer shares it too (speculative_generate reads its layer)
        draft = checkpoint.load(plan.checkpoint, llm=shared_llm(frozen, plan.checkpoint, any_layer=True),
                                device=device).to(dtype=dtype)
        s.identities[plan.label] = {"draft": str(plan.checkpoint), "verifier": plan.llm, "gamma": config.gamma,
                                    "weights_sha256": A.sha256_file(plan.checkpoint / A.MODEL_WEIGHTS),
                                    "parameters": _count(draft), "engine": plan.engine}
        s.measure(speculative_row(plan, draft.eval(), frozen, config.gamma))
        del draft
        free_memory()


def _measure_llm2slm(s: Session, group: list[Plan], model) -> None:
    """The rows of one loaded LLM-to-SLM model: ours in our loop, then each --llama-cpp-model row with the SLM
    decoded by llama.cpp from its GGUF."""
    ours = [p for p in group if p.engine != "llama.cpp"]
    if ours:
        s.measure(*(llm2slm_row(plan, model, s.config.compile) for plan in ours))
    for plan in (p for p in group if p.engine == "llama.cpp"):
        backend = LlamaCppSLM(model, plan.path)
        s.identities[plan.label].update(backend.identity())
        first = len(s.results)
        s.measure(llama_cpp_row(plan, backend), flops=False)
        for r in s.results[first:]:  # the SLM's precision is the GGUF's, not --dtype
            r["dtype"] = f"gguf {backend.quantization}"
        backend.close()


def _checkpoint_rows(s: Session, plans: list[Plan]) -> None:
    """Trained checkpoints: those made with exactly the loaded LLM reuse it; the others then load their own, one
    at a time (the shared LLM is dropped first)."""
    from llm2slm_cli import checkpoint  # imports torch: off the import of this module

    checkpoints = list(dict.fromkeys(p.checkpoint for p in plans if p.role == "checkpoint"))
    shared = [c for c in checkpoints if can_share(s.frozen, c)]
    for directory in shared + [c for c in checkpoints if c not in shared]:
        if directory not in shared and s.frozen is not None:
            s.frozen = None
            free_memory()
        model = checkpoint.load(directory, llm=s.frozen, device=s.device).to(dtype=s.dtype).eval()
        _quantize(s, model)
        group = [p for p in plans if p.role == "checkpoint" and p.checkpoint == directory]
        for plan in group:
            s.identities[plan.label] = {"checkpoint": str(directory), "llm": plan.llm, "slm": plan.slm,
                                        "weights_sha256": A.sha256_file(directory / A.MODEL_WEIGHTS),
                                        "parameters": _count(model), "engine": plan.engine}
        _measure_llm2slm(s, group, model)
        del model
        free_memory()


def _peer_rows(s: Session, plans: list[Plan]) -> None:
    """CTranslate2 and llama.cpp rows, one at a time, each measured in a child process of its own (`peer_child`):
    a runtime that crashes (a segfault in its first decode, say) or hangs past --peer-timeout becomes that row's
    error (`error_row`), and every other row is kept."""
    import torch

    config = s.config
    context = config.prompt_length + max([config.new_tokens, *sweep_lengths(config)]) + 8
    points = len(config.batch_size) + len(sweep_lengths(config))
    for plan in (p for p in plans if p.role == "peer"):
        s.bar.update(s.task, description=f"{plan.label}: in its own process")
        outcome = run_peer_child({"config": config, "plan": plan, "device": str(s.device), "texts": s.texts,
                                  "threads": torch.get_num_threads(), "context": context}, config.peer_timeout)
        if "error" in outcome:
            s.results.append(error_row(plan, config, outcome["error"]))
            s.identities[plan.label] = {"runtime": plan.engine, "model": str(plan.path),
                                        "compute_type": plan.compute_type, "source": plan.slm,
                                        "error": outcome["error"]}
        else:
            s.results.extend(outcome["results"])
            s.identities[plan.label] = outcome["identity"]
            s.skipped.extend(outcome["skipped"])
        s.bar.update(s.task, advance=points)


def _peer_row(s: Session, plan: Plan, context: int) -> None:
    """One peer row measured here (in the child process): loaded, timed by B.measure like every row, and with
    --peer-source its greedy tokens checked against ours on the source model (float32), on the first batch-1
    prompt the row was timed on."""
    import torch

    config = s.config
    model = peers.load_peer(plan, s.device, context)
    tok = _tokenizer_or_none(plan.slm) if s.texts and plan.slm else None
    row = peers.peer_row(plan, model, tok)
    s.identities[plan.label] = {"runtime": plan.engine, "version": model.version, "model": str(plan.path),
                                "compute_type": plan.compute_type, "threads": torch.get_num_threads(),
                                "device": model.device, "source": plan.slm,
                                "weights_sha256": A.sha256_file(plan.path / "model.bin"
                                                                if plan.engine == "ctranslate2" else plan.path)}
    first = len(s.results)
    s.measure(row, flops=False)
    for r in s.results[first:]:  # the runtime's own device and precision, not --device and --dtype
        r.update(device=model.device, dtype=plan.compute_type or "gguf")
    if plan.slm is not None:
        ids, _ = B.prompts_for(row, 1, config.prompt_length, config.seed, s.device, s.texts, config.whole_prompts)
        check = peers.greedy_check(model, plan.slm, ids, config.new_tokens)
        s.identities[plan.label]["greedy_check"] = check
        for r in (r for r in s.results[first:] if r["part"] == "main"):
            r["greedy_match"] = check["same_prefix_tokens"] / config.new_tokens


PEER_CHILD = "import sys; from llm2slm_cli.bench.measure import peer_child; peer_child(sys.argv[1], sys.argv[2])"


def peer_command(request: Path, result: Path) -> list[str]:
    """The command of a peer row's child process: this Python, running `peer_child` on the two files."""
    return [sys.executable, "-c", PEER_CHILD, str(request), str(result)]


def run_peer_child(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure one peer row in a child process (`peer_command`), given `request` (pickled: the config, the plan,
    the device, the prompts, torch's threads, the context length); returns what it wrote (results, identity,
    skipped), or {"error": why} when it failed, died of a signal, exited without a result or ran past `timeout`
    seconds (then it is killed)."""
    import pickle
    import subprocess
    import tempfile

    engine = ENGINE_NAMES.get(request["plan"].engine, request["plan"].engine)
    with tempfile.TemporaryDirectory(prefix="llm2slm-peer-") as tmp:
        request_path, result_path = Path(tmp) / "request.pickle", Path(tmp) / "result.json"
        request_path.write_bytes(pickle.dumps(request))
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very llm2slm_cli
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                           if p)}
        try:
            done = subprocess.run(peer_command(request_path, result_path), env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within --peer-timeout {timeout:g} s: the {engine} process was stopped "
                             "(a hang?)"}
        if result_path.is_file():
            return json.loads(result_path.read_text())
    code = done.returncode
    how = f"died of signal {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
    if code > 128 and not _signal_name(code - 128).isdigit():  # how a shell reports a crash: 128 + the signal
        how += f" (128 + {_signal_name(code - 128)})"
    said = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    return {"error": f"the {engine} process {how} before it finished this row"
                     + (f" (its last words: {said[-1].strip()[:200]})" if said else "")}


ENGINE_NAMES = {"ctranslate2": "CTranslate2", "llama.cpp": "llama.cpp"}


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def peer_child(request_path: str, result_path: str) -> None:
    """The child process of one peer row: read the request, measure the row (`_peer_row`) with the same
    bench.timing functions as every row, and write its results, its identity and what it skipped as JSON (a
    failure as {"error": one line})."""
    import pickle

    import torch

    request = pickle.loads(Path(request_path).read_bytes())
    config, plan = request["config"], request["plan"]
    torch.set_num_threads(request["threads"])
    if plan.slm is not None:  # --peer-source loads the source model with transformers
        import transformers

        transformers.logging.set_verbosity_error()
    try:
        with runtime.progress(True) as bar:
            s = Session(config, torch.device(request["device"]), bar, bar.add_task(plan.label, rate=""),
                        request["texts"])
            _peer_row(s, plan, request["context"])
        out: dict[str, Any] = {"results": s.results, "identity": s.identities[plan.label], "skipped": s.skipped}
    except UserError as e:
        out = {"error": e.message}
    except Exception as e:  # noqa: BLE001 -- the runtime's failure is the row's error, in one line
        out = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:500]}
    Path(result_path).write_text(json.dumps(out))


def error_row(plan: Plan, config: BenchConfig, error: str) -> dict[str, Any]:
    """The table's row for a peer row that could not be measured: its names, the protocol's lengths, `error`, and
    no numbers."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(label=plan.label, role=plan.role, engine=plan.engine, part="main", slm=plan.slm,
               dtype=plan.compute_type or "gguf", prompt_length=config.prompt_length, new_tokens=config.new_tokens,
               num_beams=config.num_beams, error=error)
    del row["device"]  # the stage fills in --device
    return row


def _throughput(config: BenchConfig, frozen: Any, device: Any, bar: Any) -> list[dict[str, Any]]:
    """encode's prompt tokens/s and train's examples/s over the batch sizes x prompt lengths of --throughput."""
    from llm2slm_cli.llm2slm import LLMToSLM  # imports torch: off the import of this module

    batches = [int(x) for x in config.throughput_batch_sizes.split(",") if x.strip()]
    lengths = [int(x) for x in config.throughput_lengths.split(",") if x.strip()]
    common = dict(warmup=config.warmup, repeats=config.repeats, seed=config.seed, device=device)
    rows = []
    task = bar.add_task("throughput", total=2 * len(batches) * len(lengths), rate="")
    for length in lengths:
        for batch in batches:
            bar.update(task, description=f"encode {batch}x{length}")
            rows.append({"llm": config.llm, "slm": None, **B.encode_throughput(frozen, batch=batch, length=length,
                                                                                 **common)})
            bar.update(task, advance=1)
    model = LLMToSLM.build(config.slm[0], frozen, slm_dtype=config.dtype).to(device=device)
    for length in lengths:
        for batch in batches:
            bar.update(task, description=f"train {batch}x{length}")
            rows.append({"llm": config.llm, "slm": config.slm[0],
                         **B.train_throughput(model, batch=batch, length=length,
                                              target_length=config.throughput_target_length, **common)})
            bar.update(task, advance=1)
    del model
    free_memory()
    return rows


def _prompt_texts(config: BenchConfig) -> list[str] | None:
    """The prompts of --prompts (an examples file, with the template and fields of the other stages)."""
    if config.prompts is None:
        return None
    examples = read_examples([config.prompts], Fields(prompt=config.prompt_field, target=None, id=None,
                                                      template=config.template))
    return [e.prompt for e in examples]


def _tokenizer_or_none(spec: str):
    try:
        return M.load_tokenizer(spec, local_only=True)
    except UserError:
        return None


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
